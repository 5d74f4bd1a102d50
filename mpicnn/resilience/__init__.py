"""Failures: stop signals, stalls, non-finite steps, crashes and restarts; test-only drills.

- ``preemption``: SIGUSR1/SIGTERM/SIGINT → every rank stops after the same step.
- ``watchdog``: heartbeats to rank 0 and its answers, stall warnings naming the missing
  ranks, stall abort, and the end of a job whose node is cut off (``--unreachable-abort``).
- ``nan_policy``: abort or skip a step whose gradient is not finite.
- ``step_guard``: the hooks the loop calls by name around each step (the two above, drills);
  a step's verdict (fine, non-finite, loss-scale overflow), judged at once or deferred to
  the next log interval where the optimizer skips the update on the device.
- ``write_failure``: a failed checkpoint or metrics write as one line (file, cause, last
  good checkpoint); disk full and permission exit 74, which is not retried.
- ``crash``: what ended a launch (status, rank, node, signal) from what it printed.
- ``supervisor``: relaunch after a crash with ``--resume auto``, back-off, budget,
  ``srun --exclude`` of a failing node (``python -m mpicnn.run``).
- ``drills``: test-only stall injection and the straggler (no effect outside drills).
"""
