"""Pipeline parallelism combined with data parallelism (``--mode pipeline``).

- ``partition``: per-layer costs (measured time, parameter bytes), balanced cut points,
  ``--split``, activation shapes between layers.
- ``grid``: the K stages x R replicas grid of ranks (replica-major) and setting checks.
- ``schedule``: GPipe and 1F1B orders of one stage's forwards and backwards; ideal bubble.
- ``transport``: activations and gradients between stages, nonblocking point-to-point
  into preallocated buffers.
- ``memory``: activation memory a stage keeps for backward (saved-tensor hooks).
- ``strategy``: the mode: stage compute, replica allreduce, evaluation, checkpoint gather.
"""
