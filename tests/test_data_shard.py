"""The chunk-aware sample order and the shard plan: pure functions, no MPI, no I/O."""
import numpy as np
import pytest

from mpicnn.data import shard


@pytest.mark.parametrize("n,block,window,offset", [
    (1000, 37, 300, 0), (1000, 37, 300, 11), (1000, 1, 0, 0), (1000, 1, 100, 0),
    (50, 64, 0, 5), (12345, 341, 4096, 100), (7, 3, 1, 2)])
def test_chunk_order_is_a_permutation(n, block, window, offset):
    order = shard.chunk_order(n, 3, 1, block, window, offset)
    assert np.array_equal(np.sort(order), np.arange(n))


def test_plain_permutation_when_blocks_are_single_rows_and_one_window():
    assert np.array_equal(shard.chunk_order(500, 4, 2, 1, 0), shard.epoch_order(500, 4, 2))
    assert np.array_equal(shard.chunk_order(500, 4, 2, 1, 10_000),
                          shard.epoch_order(500, 4, 2))


def test_windows_hold_few_aligned_blocks():
    """Every window of the order draws on only the blocks that fill it (plus edge blocks)."""
    n, block, window, offset = 20_000, 100, 800, 30
    order = shard.chunk_order(n, 0, 0, block, window, offset)
    blocks_of = (order - offset % block + block) // block      # aligned block ids
    for start in range(0, n, window):
        touched = np.unique(blocks_of[start: start + window])
        assert len(touched) <= window // block + 2
    # and the epoch still mixes the whole file: windows are spread over all of it
    first_rows = order[:window]
    assert np.ptp(first_rows) > n // 4


def test_order_depends_on_seed_and_epoch_only():
    a = shard.chunk_order(5000, 1, 0, 50, 400)
    assert np.array_equal(a, shard.chunk_order(5000, 1, 0, 50, 400))
    assert not np.array_equal(a, shard.chunk_order(5000, 1, 1, 50, 400))
    assert not np.array_equal(a, shard.chunk_order(5000, 2, 0, 50, 400))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_batches_do_not_depend_on_world_size(world):
    n, global_batch = 3000, 64
    order = shard.chunk_order(n, 5, 3, 100, shard.auto_window(global_batch, 100),
                              batch=global_batch)
    reference = shard.rank_batches(n, global_batch, 1, 0, 5, 3, order=order)
    parts = [shard.rank_batches(n, global_batch // world, world, r, 5, 3, order=order)
             for r in range(world)]
    merged = np.sort(np.concatenate(parts, axis=1), axis=1)
    assert np.array_equal(merged, reference)
    # ranks hold neighbouring slices of each sorted global batch: disjoint, increasing
    for a, b in zip(parts, parts[1:]):
        assert (a[:, -1] < b[:, 0]).all()


@pytest.mark.parametrize("world,batch", [(2, 64), (4, 32), (8, 8)])
def test_each_rank_reads_its_own_few_chunks_per_window(world, batch):
    n, chunk = 80_000, 341
    global_batch = world * batch
    window = shard.auto_window(global_batch, chunk, 3072)
    order = shard.chunk_order(n, 0, 0, chunk, window, batch=global_batch)
    steps_per_window = window // global_batch
    region = -(-window // (world * chunk))
    loads = 0
    for rank in range(world):
        rows = shard.rank_batches(n, batch, world, rank, 0, 0, order=order)
        for w in range(0, len(rows), steps_per_window):
            touched = np.unique(rows[w: w + steps_per_window] // chunk)
            assert len(touched) <= region + 2      # its stretch of the window, two edges
            loads += len(touched)
    read = loads * chunk / (len(rows) * global_batch)
    assert read < 1 + 2 / region                   # little is read twice
    # the sample-level order touches a fresh spread of chunks at every step instead
    plain = [shard.rank_batches(n, batch, world, r, 0, 0) for r in range(world)]
    assert sum(len(np.unique(s // chunk)) for rows in plain for s in rows) > 5 * loads


def test_batches_are_spread_over_their_window():
    """Stratified dealing: every batch holds one row of each stretch of its window."""
    order = shard.chunk_order(4096, 1, 0, 64, 1024, batch=32)
    for w in range(0, 4096, 1024):
        window = np.sort(order[w: w + 1024])
        for s in range(w, w + 1024, 32):
            batch = np.sort(order[s: s + 32])
            assert np.array_equal(np.searchsorted(window, batch) // 32, np.arange(32))


def test_local_shuffle_takes_the_given_shard_order():
    n, world, batch = 1000, 4, 10
    size = n // world
    for rank in range(world):
        order = shard.chunk_order(size, 0, 0, 32, 64, offset=-rank * size, rank=rank)
        rows = shard.rank_batches(n, batch, world, rank, 0, 0, "local", order=order)
        assert rows.min() >= rank * size and rows.max() < (rank + 1) * size
        assert len(np.unique(rows)) == rows.size == (size // batch) * batch
    assert not np.array_equal(shard.chunk_order(size, 0, 0, 32, 64, rank=0),
                              shard.chunk_order(size, 0, 0, 32, 64, rank=1))
