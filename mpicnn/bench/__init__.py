"""Benchmarks (``python -m mpicnn.bench <name>``): side by side with peers, as ratios.

- ``launch``: the one launcher: ``mpirun`` command lines, job environments, timeouts that
  kill the whole job, and a run's records read back (shared with the tests).
- ``comm``: the allreduce engine against DDP-gloo and a flat Allreduce.
- ``ps``: allreduce against ps-sync and ps-async, with and without a straggler.
- ``scale``: alpha/beta measured here, throughput predicted for 1..1024 ranks.
- ``data``: loader throughput and data wait on a large HDF5 file.
- ``failure_overhead``: what the NaN check and the stall watchdog cost per step.
- ``stopcheck``: what the per-step stop agreement costs (run under ``mpirun``).
- ``checkpoint``: the step-time stall of a checkpoint, synchronous against asynchronous.
- ``_bandwidth``, ``_ddp_peer``: the programs ``comm`` starts on its ranks.
- ``__main__``: ``python -m mpicnn.bench NAME`` runs one of them.
"""
