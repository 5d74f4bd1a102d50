"""Where ranks run: the MPI world, nodes, devices, the batch job, and how failures end it.

- ``world``: ranks, nodes (``COMM_TYPE_SHARED``), the rank-aware logger, abort, ``reduce_sums``;
  with ``batchjob``, the only reader of launcher environment variables.
- ``devices``: this rank's GPU or CPU threads; the startup line describing the world.
- ``batchjob``: the SLURM/PBS job a run belongs to and the defaults that follow from it.
- ``errors``: ``MpicnnError`` and the one printer of ``mpicnn: error:`` lines.
- ``world`` also holds ``run_guarded``: report a failure once, end every rank.
"""
