"""Shard plan properties (pure functions, no MPI)."""
import itertools

import numpy as np
import pytest

from mpicnn.cluster.errors import MpicnnError
from mpicnn.data import shard

CASES = [(n, world, batch) for n, world, batch in
         itertools.product([1, 7, 100, 1000, 1797], [1, 2, 3, 4, 8], [1, 5, 16, 32])
         if n >= world * batch]


@pytest.mark.parametrize("n,world,batch", CASES)
def test_global_shards_are_disjoint_equal_and_world_invariant(n, world, batch):
    for epoch in (0, 3):
        plans = [shard.rank_batches(n, batch, world, r, seed=1, epoch=epoch)
                 for r in range(world)]
        steps = shard.steps_per_epoch(n, batch, world)
        assert all(p.shape == (steps, batch) for p in plans)          # equal step counts
        every = np.concatenate([p.reshape(-1) for p in plans])
        assert len(np.unique(every)) == len(every)                     # disjoint
        assert every.min() >= 0 and every.max() < n
        assert len(every) == steps * batch * world                     # covers all but < 1 batch
        assert n - len(every) < batch * world
        for p in plans:
            assert (np.diff(p, axis=1) > 0).all()                      # sorted reads
        # the same global batches as a single rank with the global batch size
        single = shard.rank_batches(n, batch * world, 1, 0, seed=1, epoch=epoch)
        for s in range(steps):
            merged = np.sort(np.concatenate([p[s] for p in plans]))
            assert (merged == single[s]).all()


@pytest.mark.parametrize("n,world,batch", CASES[::3])
def test_local_shards_are_fixed_contiguous_and_equal(n, world, batch):
    size = n // world
    for r in range(world):
        e0 = shard.rank_batches(n, batch, world, r, seed=2, epoch=0, shuffle="local")
        e1 = shard.rank_batches(n, batch, world, r, seed=2, epoch=1, shuffle="local")
        assert e0.shape == e1.shape == (size // batch, batch)
        for plan in (e0, e1):
            assert plan.min() >= r * size and plan.max() < (r + 1) * size
            assert len(np.unique(plan)) == plan.size


def test_epochs_differ_and_seed_reproduces():
    a = shard.rank_batches(1000, 10, 2, 0, seed=0, epoch=0)
    assert (a == shard.rank_batches(1000, 10, 2, 0, seed=0, epoch=0)).all()
    assert not (a == shard.rank_batches(1000, 10, 2, 0, seed=0, epoch=1)).all()
    assert not (a == shard.rank_batches(1000, 10, 2, 0, seed=1, epoch=0)).all()


@pytest.mark.parametrize("n,world", [(10, 3), (359, 8), (5, 8), (1797, 4)])
def test_eval_ranges_partition_the_split(n, world):
    ranges = [shard.eval_range(n, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_too_small_dataset_names_usable_sizes():
    with pytest.raises(MpicnnError, match="at most 3 ranks"):
        shard.check_fits(100, 32, 8, "global")
    assert shard.check_fits(100, 32, 3, "global") == 1
