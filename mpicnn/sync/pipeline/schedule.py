"""The order in which one stage runs the forwards ("F", i) and backwards ("B", i) of a step.

Both schedules run micro-batches in increasing order in each direction, so messages
between two stages (one communicator, one tag per direction) arrive in the order used.
"""
from __future__ import annotations


def gpipe(micro: int, stages: int, stage: int) -> list[tuple[str, int]]:
    """All forwards, then all backwards: every micro-batch's activations live at once."""
    return [("F", i) for i in range(micro)] + [("B", i) for i in range(micro)]


def one_f_one_b(micro: int, stages: int, stage: int) -> list[tuple[str, int]]:
    """1F1B (PipeDream-flush): K - stage - 1 warm-up forwards, then one forward and one
    backward alternately, then the remaining backwards; at most K - stage micro-batches'
    activations are alive on a stage at any time."""
    warmup = min(stages - stage - 1, micro)
    ops = [("F", i) for i in range(warmup)]
    for i in range(micro - warmup):
        ops += [("F", warmup + i), ("B", i)]
    ops += [("B", i) for i in range(micro - warmup, micro)]
    return ops


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def in_flight(ops: list[tuple[str, int]]) -> int:
    """The most micro-batches forwarded and not yet backwarded at any point of ``ops``."""
    alive = peak = 0
    for op, _ in ops:
        alive += 1 if op == "F" else -1
        peak = max(peak, alive)
    return peak


def ideal_bubble(micro: int, stages: int) -> float:
    """The idle share of a stage in a perfectly balanced pipeline: (K-1) / (M+K-1)."""
    return (stages - 1) / (micro + stages - 1)
