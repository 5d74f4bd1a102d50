"""Which samples each rank reads at each step: pure functions, no MPI and no I/O.

With ``shuffle="global"`` the global batch of every step depends only on
(dataset size, seed, epoch, global batch), never on how many ranks share it:
rank ``r`` of ``W`` takes the ``r``-th slice of each global batch, sorted by row, so
each rank reads a compact stretch of the file. Samples that do
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


def chunk_order(n: int, seed: int, epoch: int, block: int = 1, window: int = 0,
                offset: int = 0, rank: int | None = None) -> np.ndarray:
    """A permutation of ``range(n)`` that keeps reads contiguous, fixed by (seed, epoch).

    Blocks of ``block`` consecutive rows (boundaries at ``offset + k * block``, i.e. the
    file's chunks) are put in random order, then rows are shuffled inside consecutive
    windows of ``window`` rows (rounded up to whole blocks; 0 or >= n: one window).
    ``block=1`` with one window is the plain :func:`epoch_order`. ``rank`` gives each
    rank its own order (for ``--shuffle local``, where ``n`` is the rank's shard).
    """
    window = n if window <= 0 else -(-window // block) * block
    stream = [seed, epoch] if rank is None else [seed, epoch, rank]
    if block <= 1 and window >= n:
        return np.random.default_rng(stream).permutation(n)
    rng = np.random.default_rng(stream + [block, window])
    first = offset % block
    edges = np.unique(np.r_[0, np.arange(first, n, block), n])
    lengths = np.diff(edges)
    pick = rng.permutation(len(lengths))
    # row i of the block-permuted sequence = start of its block + position inside it
    starts = np.repeat(edges[:-1][pick] - (np.cumsum(lengths[pick]) - lengths[pick]),
                       lengths[pick])
    order = starts + np.arange(n)
    if window < n or block > 1:
        keys = np.arange(n) // window + rng.random(n)
        order = order[np.argsort(keys, kind="stable")]
    return order


def auto_window(batch: int, block: int) -> int:
    """Default shuffle window: 32 batches (global, or local with --shuffle local), >= 4 blocks."""
    return max(32 * batch, 4 * block)


def steps_per_epoch(n: int, batch: int, world: int = 1, shuffle: str = "global") -> int:
    """Steps every rank runs per epoch (the same on every rank)."""
    if shuffle == "local":
        return (n // world) // batch
    return n // (batch * world)


def rank_batches(n: int, batch: int, world: int = 1, rank: int = 0, seed: int = 0,
                 epoch: int = 0, shuffle: str = "global",
                 order: np.ndarray | None = None) -> np.ndarray:
    """Sample indices of this rank for each step of an epoch: shape (steps, batch), rows sorted.

    ``order`` overrides the permutation (e.g. :func:`chunk_order`): of ``range(n)`` for
    ``global``, of this rank's shard ``range(n // world)`` for ``local``; it must itself
    be a pure function of (n, seed, epoch) (and of the rank, for ``local``).
    """
    steps = steps_per_epoch(n, batch, world, shuffle)
    if shuffle == "local":
        shard = n // world
        if order is None:
            order = np.random.default_rng([seed, epoch, rank]).permutation(shard)
        local = order + rank * shard
        rows = local[: steps * batch].reshape(steps, batch)
    else:
        order = epoch_order(n, seed, epoch) if order is None else order
        # sorting the global batch (a set that does not depend on the world size) before
        # slicing gives each rank neighbouring rows: few chunks per rank per step
        glob = np.sort(order[: steps * batch * world].reshape(steps, world * batch), axis=1)
        rows = glob.reshape(steps, world, batch)[:, rank, :]
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
