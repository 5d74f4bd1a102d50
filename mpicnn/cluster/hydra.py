"""MPI across emulated nodes: hydra's command line per netmod, and a runner that cleans up."""
from __future__ import annotations

import shutil

from . import jobs
from .jobs import Finished
from .netns import Cluster, ClusterError

# Cross-node traffic over TCP on the bridge; ranks of one node still use MPICH's shared memory.
NETMODS = {
    "ucx": {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp,self"},
    "ofi": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"},
}


def mpiexec_command(cluster: Cluster, command, ranks_per_node: int = 1, ranks: int | None = None,
                    netmod: str = "ucx", mpiexec: str | None = None,
                    cycle: bool = False) -> tuple[list[str], dict]:
    """``mpiexec`` argv that fills the nodes ``ranks_per_node`` at a time, and its env additions.

    ``ranks`` defaults to nodes x ranks_per_node; fewer leave the last node part-filled.
    ``cycle``: more ranks than that go round the nodes again (hydra's placement), e.g. 3
    ranks at 1 per node on 2 nodes put ranks 0 and 2 on the first.
    """
    if netmod not in NETMODS:
        raise ClusterError(f"unknown netmod {netmod!r}; choose {' or '.join(NETMODS)}")
    if ranks_per_node < 1:
        raise ClusterError(f"--ranks-per-node must be at least 1, got {ranks_per_node}")
    ranks = cluster.nodes * ranks_per_node if ranks is None else ranks
    if ranks < 1 or (not cycle and ranks > cluster.nodes * ranks_per_node):
        raise ClusterError(f"{ranks} ranks do not fit {cluster.nodes} node(s) x "
                           f"{ranks_per_node} rank(s)")
    mpiexec = mpiexec or shutil.which("mpiexec")
    if mpiexec is None:
        raise ClusterError("mpiexec not found on PATH (pip install mpich)")
    # hydra's ssh launcher runs our wrapper instead of ssh; its proxies call back to
    # mpiexec on the bridge address (-iface), the only one the nodes can reach.
    argv = [mpiexec, "-launcher", "ssh", "-launcher-exec", str(cluster.wrapper),
            "-hosts", ",".join(cluster.hosts), "-iface", cluster.bridge,
            "-ppn", str(ranks_per_node), "-n", str(ranks), *map(str, command)]
    return argv, dict(NETMODS[netmod])


def run(cluster: Cluster, command, ranks_per_node: int = 1, ranks: int | None = None,
        netmod: str = "ucx", timeout: float | None = None, capture: bool = False,
        env: dict | None = None, cycle: bool = False) -> Finished:
    """Run ``command`` on every rank; on timeout or Ctrl-C kill mpiexec and the nodes' processes.

    hydra's mpiexec ignores SIGTERM and its proxies lead sessions of their own inside the
    nodes, so the job ends by SIGKILL to mpiexec's group and to everything in the nodes.
    """
    argv, extra = mpiexec_command(cluster, command, ranks_per_node, ranks, netmod, cycle=cycle)
    return jobs.run(argv, timeout, {**(env or {}), **extra}, capture=capture,
                    cleanup=cluster.kill_processes)
