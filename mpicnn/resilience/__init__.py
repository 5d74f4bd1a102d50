"""Failures short of a crash: stop signals, stalls, non-finite steps; test-only drills.

- ``preemption``: SIGUSR1/SIGTERM/SIGINT → every rank stops after the same step.
- ``watchdog``: heartbeats to rank 0, stall warnings naming the missing ranks, stall abort.
- ``nan_policy``: abort or skip a step whose gradient is not finite.
- ``step_guard``: the hooks the loop calls by name around each step (the two above, drills).
- ``drills``: test-only stall injection and the straggler (no effect outside drills).
"""
