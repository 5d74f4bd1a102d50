"""An emulated cluster on one machine: network namespaces as nodes, MPICH's hydra across them.

- ``netns.py``: the nodes: namespaces, veth links on a bridge without uplink, optional
  ``tc`` rate limits, idempotent ``up``/``down``, and the wrapper hydra runs to enter a node
- ``launch.py``: the ``mpiexec`` command line per netmod (ucx, ofi) and a runner whose
  timeout kills every process of the job
- ``__main__.py``: ``python -m mpicnn.cluster up|run|down``

Needs root and iproute2. ``python -m mpicnn.cluster run -- python -m mpicnn.train`` trains
across two nodes and removes them afterwards.
"""
from .launch import NETMODS, Finished, mpiexec_command, run
from .netns import Cluster, ClusterError, Node

__all__ = ["NETMODS", "Cluster", "ClusterError", "Finished", "Node", "mpiexec_command", "run"]
