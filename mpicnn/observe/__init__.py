"""What a run tells its user: step statistics, metrics records, progress, timeline, reports.

- ``steps``: phase timers, (sum, count) meters, interval records reduced over ranks.
- ``records``: the JSON-lines metrics schema, its checker and the writer.
- ``tensorboard``: ``--tensorboard``: the records' numbers as TensorBoard scalars.
- ``progress``: rank 0's tqdm bar or status lines.
- ``timeline``: Chrome-trace spans of every rank's phases, merged on rank 0.
- ``profile``: ``--profile``: torch.profiler over a window of steps; per-step host
  operators, kernels and device waits.
- ``report``: ``python -m mpicnn.report``: plots and tables from metrics files.
"""
