"""Where ranks run: the MPI world, nodes, devices, the batch job, and an emulated cluster.

- ``world``: ranks, nodes (``COMM_TYPE_SHARED``), the rank-aware logger, abort,
  ``reduce_sums``, and ``run_guarded`` (report a failure once, end every rank); with
  ``batchjob``, the only reader of launcher environment variables.
- ``startup``: MPI's start bounded by ``MPICNN_START_TIMEOUT``: a rank stuck in
  ``MPI_Init`` (e.g. behind MPICH shared memory a crashed run of the same SLURM step
  left) is killed after one line, and the restart supervisor relaunches;
  ``startwatcher`` is the process that does it (``MPI_Init`` holds Python's lock).
- ``mpi_wait``: ``--mpi-wait``: whether MPI polls or sleeps while it waits, set in the
  environment before ``MPI_Init``.
- ``devices``: this rank's GPU or CPU threads; the startup line describing the world.
- ``batchjob``: the SLURM/PBS job a run belongs to, its stop signals and defaults.
- ``errors``: ``MpicnnError``, the one printer of ``mpicnn: error:`` lines, and the
  argparse ``Parser`` of the commands that reports through it.
- ``jobs``: the one builder of ``mpirun`` command lines and runner of jobs as processes
  (benchmarks, tests and the emulated cluster): a timeout kills the whole job.

Emulated nodes on one machine (root and iproute2; ``python -m mpicnn.cluster run --
python -m mpicnn.train`` trains across two nodes and removes them afterwards):

- ``netns``: the nodes: network namespaces, veth links on a bridge without uplink,
  optional ``tc`` rate limits (one link slower if asked), cores of their own
  (``taskset``) where there are enough, idempotent ``up``/``down``, links taken down
  for drills, the wrapper hydra runs to enter a node; ``interrupted_by_signals`` turns
  Ctrl-C, SIGTERM and SIGHUP into a teardown.
- ``hydra``: the ``mpiexec`` command line across the nodes per netmod (ucx, ofi), run so
  that a timeout kills every process of the job.
- ``__main__``: ``python -m mpicnn.cluster up|run|down``; ``run`` removes the nodes on
  exit, failure, Ctrl-C, SIGTERM and SIGHUP.
"""
