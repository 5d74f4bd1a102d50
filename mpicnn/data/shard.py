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

from dataclasses import asdict, dataclass

import numpy as np

from ..cluster.errors import MpicnnError


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def chunk_order(n: int, seed: int, epoch: int, block: int = 1, window: int = 0,
                offset: int = 0, rank: int | None = None, batch: int = 1) -> np.ndarray:
    """A permutation of ``range(n)`` that keeps reads contiguous, fixed by (seed, epoch).

    Blocks of ``block`` consecutive rows (boundaries at ``offset + k * block``: the
    file's chunks) are put in random order and the sequence is cut into windows of
    ``window`` rows (rounded up to whole batches of ``batch`` rows; 0: one window).
    Each window is dealt into its batches stratified: its rows, sorted, form ``batch``
    strata of neighbouring rows and every batch takes one random row of each stratum.
    A batch thus spans its whole window, while the r-th slice of every sorted batch
    comes from the r-th stretch of the window: one rank reads the same few chunks for
    the whole window. ``block=1`` with one window is the plain :func:`epoch_order`.
    ``rank`` gives each rank its own order (``--shuffle local``: ``n`` is its shard).
    """
    stream = [seed, epoch] if rank is None else [seed, epoch, rank]
    if block <= 1 and (window <= 0 or window >= n):
        return np.random.default_rng(stream).permutation(n)
    window = max(batch, -(-(window or n) // batch) * batch)
    rng = np.random.default_rng(stream + [block, window, batch])
    first = offset % block
    edges = np.unique(np.r_[0, np.arange(first, n, block), n])
    lengths = np.diff(edges)
    pick = rng.permutation(len(lengths))
    # row i of the block-permuted sequence = start of its block + position inside it
    starts = np.repeat(edges[:-1][pick] - (np.cumsum(lengths[pick]) - lengths[pick]),
                       lengths[pick])
    blocks = starts + np.arange(n)
    order = np.empty(n, np.int64)
    for a in range(0, n, window):
        part = blocks[a: a + window]
        steps = len(part) // batch
        if len(part) > steps * batch:          # the last window: random rows left over
            part = rng.permutation(part)
            order[a + steps * batch: a + len(part)] = part[steps * batch:]
            part = part[: steps * batch]
        strata = np.sort(part).reshape(batch, steps)
        dealt = np.take_along_axis(strata, np.argsort(rng.random((batch, steps)), 1), 1)
        order[a: a + steps * batch] = dealt.T.reshape(-1)
    return order


WINDOW_BATCHES = 64
WINDOW_BYTES = 64 << 20


def auto_window(batch: int, block: int, sample_bytes: int = 1) -> int:
    """Default shuffle window: 64 batches, at most 64 MiB; at least a batch and 4 blocks."""
    return max(batch, 4 * block, min(WINDOW_BATCHES * batch, WINDOW_BYTES // sample_bytes))


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


@dataclass(frozen=True)
class Layout:
    """How an epoch's samples are cut into steps: per-rank batch, ranks that read, shuffle."""

    batch_size: int
    world_size: int
    shuffle: str = "global"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps(self, n: int) -> int:
        """Steps of an epoch of ``n`` samples."""
        return steps_per_epoch(n, self.batch_size, self.world_size, self.shuffle)

    def samples(self, n: int) -> int:
        """Samples an epoch of ``n`` trains on (the rest do not fill a global batch)."""
        return self.steps(n) * self.global_batch

    def same_order(self, other: Layout) -> bool:
        """Whether both layouts give an epoch the same global batches."""
        if self.shuffle != other.shuffle:
            return False
        if self.shuffle == "global":
            return self.global_batch == other.global_batch
        return self == other

    def as_dict(self) -> dict:
        return asdict(self)


def continue_batches(global_rows: np.ndarray, first: int, batch: int, world: int = 1,
                     rank: int = 0) -> list[np.ndarray]:
    """Rows of ``rank`` for each step after the first ``first`` samples of an epoch.

    ``global_rows`` (steps, global batch) are the epoch's global batches in training
    order, as another layout cut them. The samples not yet trained on are cut into
    global batches of ``batch * world`` in the same order; each is sorted and dealt in
    slices as :func:`rank_batches` deals. The last may be smaller: its samples are
    spread as evenly as the ranks allow (some may get none), so every sample of the
    epoch is trained on exactly once.
    """
    rest = np.asarray(global_rows).reshape(-1)[first:]
    size = batch * world
    full = len(rest) // size
    rows = list(np.sort(rest[: full * size].reshape(full, size), axis=1)
                [:, rank * batch: (rank + 1) * batch])
    tail = np.sort(rest[full * size:])
    if len(tail):
        rows.append(tail[rank * len(tail) // world: (rank + 1) * len(tail) // world])
    return rows


def join_plans(plans) -> np.ndarray:
    """The global batches (steps, global batch), rows sorted, of every rank's plan in rank order."""
    return np.sort(np.concatenate([np.asarray(p) for p in plans], axis=1), axis=1)


def step_sizes(remaining: int, global_batch: int) -> list[int]:
    """Samples of each global step when ``remaining`` samples are cut into global batches."""
    full, tail = divmod(remaining, global_batch)
    return [global_batch] * full + ([tail] if tail else [])


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
