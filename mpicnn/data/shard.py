"""Which samples each rank reads at each step: pure functions, no MPI and no I/O.

With ``shuffle="global"`` the global batch of every step depends only on
(dataset size, seed, epoch, global batch), never on how many ranks share it:
rank ``r`` of ``W`` takes the ``r``-th slice of each global batch. Samples that do
not fill a whole global batch are dropped for that epoch (they are different
samples every epoch), so every rank runs the same number of steps and no
collective can wait on a rank that ran out of data.
"""
from __future__ import annotations

import numpy as np

from ..errors import MpicnnError


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch: int, world: int = 1, shuffle: str = "global") -> int:
    """Steps every rank runs per epoch (the same on every rank)."""
    if shuffle == "local":
        return (n // world) // batch
    return n // (batch * world)


def rank_batches(n: int, batch: int, world: int = 1, rank: int = 0, seed: int = 0,
                 epoch: int = 0, shuffle: str = "global",
                 order: np.ndarray | None = None) -> np.ndarray:
    """Sample indices of this rank for each step of an epoch: shape (steps, batch), rows sorted.

    ``order`` overrides the global permutation (e.g. a chunk-aware order); it must
    itself be a pure function of (n, seed, epoch).
    """
    steps = steps_per_epoch(n, batch, world, shuffle)
    if shuffle == "local":
        shard = n // world
        rng = np.random.default_rng([seed, epoch, rank])
        local = rng.permutation(shard) + rank * shard
        rows = local[: steps * batch].reshape(steps, batch)
    else:
        order = epoch_order(n, seed, epoch) if order is None else order
        glob = order[: steps * batch * world].reshape(steps, world, batch)
        rows = glob[:, rank, :]
    return np.sort(rows, axis=1)


def eval_range(n: int, world: int = 1, rank: int = 0) -> tuple[int, int]:
    """Contiguous, balanced slice of an evaluation split for this rank."""
    return n * rank // world, n * (rank + 1) // world


def check_fits(n: int, batch: int, world: int, shuffle: str, split: str = "train") -> int:
    """Steps per epoch, or a clear error when one global batch does not fit the data."""
    steps = steps_per_epoch(n, batch, world, shuffle)
    if steps == 0:
        largest_world = n // batch
        largest_batch = n // world
        raise MpicnnError(
            f"the {split} split has {n} samples, fewer than one global batch "
            f"({batch} per rank x {world} ranks = {batch * world}); use at most "
            f"{largest_world} ranks at --batch-size {batch}, or --batch-size "
            f"{largest_batch} or less at {world} ranks", collective=True)
    return steps
