"""The loader on real HDF5 files: what it reads, prefetch, cache, augmentation (no MPI)."""
import h5py
import numpy as np
import pytest
import torch

from mpicnn.cluster.errors import MpicnnError
from mpicnn.data import shard
from mpicnn.data.augment import Augmenter, parse_augment, sample_draws
from mpicnn.data.loader import Loader
from mpicnn.data.memory import check_cache_fits
from mpicnn.data.prefetch import ProcessSource
from mpicnn.data.reader import ReaderSpec
from mpicnn.data.schema import open_dataset

CPU = torch.device("cpu")


def write_file(path, n=900, shape=(3, 6, 5), chunk=23, layout="nchw", flat=False, seed=0):
    """Random uint8 images with odd-sized chunks, so batches cross many chunk edges."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    stored = images.transpose(0, 2, 3, 1) if layout == "nhwc" else images
    labels = rng.integers(0, 5, n)
    with h5py.File(path, "w") as f:
        if flat:
            f.create_dataset("images", data=stored, chunks=(chunk,) + stored.shape[1:])
            f.create_dataset("labels", data=labels)
        else:
            for name, rows in (("train", slice(0, n - 100)), ("val", slice(n - 100, n))):
                f.create_dataset(f"{name}/images", data=stored[rows],
                                 chunks=(chunk,) + stored.shape[1:])
                f.create_dataset(f"{name}/labels", data=labels[rows])
        f.attrs["mean"], f.attrs["std"] = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    return images, labels


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.h5"
    write_file(path)
    data = open_dataset(str(path))
    yield data
    data.close()


def collect(loader, epochs=(0, 1), start_step=0, evals=True):
    out = []
    for epoch in epochs:
        out += [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start_step)]
    if evals:
        out += [(x.clone(), y.clone()) for x, y in loader.eval_batches()]
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("layout,flat", [("nchw", False), ("nhwc", False), ("nchw", True)])
def test_batches_are_the_planned_rows_normalised(tmp_path, layout, flat):
    images, labels = write_file(tmp_path / "f.h5", layout=layout, flat=flat)
    data = open_dataset(str(tmp_path / "f.h5"), layout=layout, val_fraction=0.1)
    split = data.val if flat else data.train      # flat val starts mid-chunk (row 810)
    loader = Loader(data, split, CPU, 8, world=2, rank=1, seed=3)
    mean = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    std = torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    plan = loader.plan(1)
    batches = list(loader.epoch(1))
    assert len(batches) == len(plan) == loader.steps
    for rows, (x, y) in zip(plan, batches):
        expected = (torch.from_numpy(images[split.start + rows]).float() - mean) / std
        assert torch.allclose(x, expected)
        assert torch.equal(y, torch.from_numpy(labels[split.start + rows]))
    lo, hi = shard.eval_range(len(split), 2, 1)
    evaluated = torch.cat([x for x, _ in loader.eval_batches()])
    expected = (torch.from_numpy(images[split.start + lo: split.start + hi]).float() - mean)
    assert torch.allclose(evaluated, expected / std)
    data.close()


@pytest.mark.parametrize("shuffle", ["global", "local"])
def test_prefetch_modes_and_cache_give_identical_batches(small, shuffle):
    def loader(**options):
        return Loader(small, small.train, CPU, 16, world=2, rank=0, seed=1, shuffle=shuffle,
                      augment=("crop", "flip"), **options)

    reference = collect(loader())
    for options in [dict(prefetch=2), dict(prefetch=1, prefetch_mode="process"),
                    dict(prefetch=3, cache=True), dict(prefetch=2, prefetch_mode="process",
                                                       cache=True), dict(on_device=True)]:
        candidate = loader(**options)
        try:
            assert same(collect(candidate), reference), options
        finally:
            candidate.close()


def test_rows_held_on_the_device_give_the_streamed_batches_and_read_nothing_per_step(small):
    def loader(**options):
        return Loader(small, small.train, CPU, 16, world=2, rank=1, seed=3,
                      augment=("crop", "flip", "erase"), **options)

    streamed, held = loader(), loader(on_device=True)
    try:
        assert same(collect(held), collect(streamed))
        for each in (streamed, held):       # resumed at another layout: uneven steps
            each.continue_epoch(1, shard.Layout(12, 3, "global"), first=100)
        assert len({len(y) for _, y in collect(streamed, epochs=(1,), evals=False)}) > 1
        assert same(collect(held, epochs=(1,)), collect(streamed, epochs=(1,)))
        rows = streamed.plan(0)[3]            # one batch at a time (parameter servers)
        assert same([held.rows_batch(rows, 0)], [streamed.rows_batch(rows, 0)])
        kept = held.resident["epoch"]
        assert kept.images.dtype == torch.uint8 and len(kept.images) == len(small.train)
        assert not held.sources               # no reader: nothing is read per step
    finally:
        streamed.close(), held.close()
    assert not held.resident


def test_sample_level_shuffle_reads_rows_directly(small):
    loader = Loader(small, small.train, CPU, 16, world=2, rank=1, block=1, window=10**9)
    assert loader.spec("epoch").unit == 1
    plain = shard.rank_batches(len(small.train), 16, 2, 1, 0, 0)    # the Foundation's order
    assert np.array_equal(loader.plan(0), plain)
    images = small.train.images
    mean, std = loader.normalize.mean, loader.normalize.std
    for rows, (x, _) in zip(plain[:5], loader.epoch(0)):
        assert torch.allclose(x, (torch.from_numpy(images[rows]).float() - mean) / std)


def test_cache_reads_the_file_once(small):
    cached = Loader(small, small.train, CPU, 16, world=2, rank=1, shuffle="local",
                    cache=True)
    lru = Loader(small, small.train, CPU, 16, world=2, rank=1, shuffle="local", window=64)
    units_read = []
    for loader in (cached, lru):
        for epoch in range(3):
            list(loader.epoch(epoch))
            units_read.append(loader.sources["epoch"].read.__self__.units_read)
    lo, hi = cached.ranges("epoch")
    assert (lo, hi) == (400, 800)
    shard_units = len(np.unique((np.arange(lo, hi)) // 23))
    assert units_read[0] == units_read[1] == units_read[2] <= shard_units
    assert units_read[5] > units_read[4] > units_read[3] >= shard_units   # the LRU re-reads
    assert cached.cache_bytes("epoch") == 400 * 90
    assert Loader(small, small.train, CPU, 16, 2, 1, cache=True).cache_bytes("epoch") == 800 * 90


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_abandoned_epochs_leave_the_reader_usable(small, mode):
    reference = Loader(small, small.train, CPU, 16, world=2, rank=0)
    loader = Loader(small, small.train, CPU, 16, world=2, rank=0, prefetch=2,
                    prefetch_mode=mode)
    try:
        for epoch in range(3):
            batches = loader.epoch(epoch)
            for _ in range(3):                 # stop early, as --max-steps does
                next(batches)
        resumed = collect(loader, epochs=(3,), start_step=5)
        assert same(resumed, collect(reference, epochs=(3,), start_step=5))
    finally:
        loader.close()


def test_reader_process_reports_errors_and_exits(small):
    spec = ReaderSpec(small.path, "/train/nothing", 0, 10, "nchw", 23, 2)
    with pytest.raises(MpicnnError, match="nothing"):
        ProcessSource(spec, 1, 4, (3, 6, 5), np.uint8)
    loader = Loader(small, small.train, CPU, 16, prefetch=1, prefetch_mode="process")
    list(loader.epoch(0))
    proc = loader.sources["epoch"].proc
    loader.close()
    assert proc.poll() is not None


def test_augmentations_are_per_sample_and_world_size_invariant():
    x = torch.randn(12, 3, 16, 16)
    rows = np.arange(100, 112)
    aug = Augmenter(("crop", "flip"), (3, 16, 16), seed=7)
    whole = aug(x, rows, epoch=2)
    halves = torch.cat([aug(x[:6], rows[:6], 2), aug(x[6:], rows[6:], 2)])
    assert torch.equal(whole, halves)                  # any split across ranks agrees
    assert not torch.equal(whole, aug(x, rows, epoch=3))
    assert not torch.equal(whole, Augmenter(("crop", "flip"), (3, 16, 16), 8)(x, rows, 2))
    bits = sample_draws(np.arange(10_000), 7, 2)
    flips = ((bits >> np.uint64(32)) & np.uint64(1)).mean()
    assert 0.45 < flips < 0.55
    assert np.array_equal(bits, sample_draws(np.arange(10_000), 7, 2))


def test_crop_and_flip_move_pixels_as_expected():
    aug = Augmenter(("crop",), (1, 4, 4), seed=0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    pad = aug.pad
    assert torch.equal(aug.crop(x, np.array([pad]), np.array([pad])), x)      # centred
    down = aug.crop(x, np.array([pad - 1]), np.array([pad]))
    assert torch.equal(down[0, 0, 1:], x[0, 0, :3]) and (down[0, 0, 0] == 0).all()
    flipper = Augmenter(("flip",), (1, 4, 4), seed=0)
    rows = np.arange(64)
    batch = x.expand(64, 1, 4, 4)
    out = flipper(batch, rows, 0)
    flipped = (out != batch).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 64
    assert torch.equal(out[flipped], batch[flipped].flip(3))


def test_erase_zeroes_one_square_of_half_the_side_in_about_half_the_samples():
    aug = Augmenter(("erase",), (1, 28, 28), seed=3)
    x = torch.ones(4000, 1, 28, 28)
    rows = np.arange(4000)
    out = aug(x, rows, epoch=1)
    holes = out[:, 0] == 0
    erased = holes.flatten(1).any(1)
    assert 0.45 < float(erased.float().mean()) < 0.55
    for hole in holes[erased][:200]:           # one axis-aligned square (clipped at the border)
        ys, xs = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert len(ys) <= 14 and len(xs) <= 14
        assert int(hole.sum()) == len(ys) * len(xs)
        assert ys[-1] - ys[0] + 1 == len(ys) and xs[-1] - xs[0] + 1 == len(xs)
    assert int(holes.flatten(1).sum(1).max()) == 14 * 14       # some squares lie whole inside
    assert torch.equal(out[~erased], x[~erased])
    assert torch.equal(out, aug(x, rows, epoch=1))               # a pure function of the row
    assert not torch.equal(out, aug(x, rows, epoch=2))
    ramp = x[:64] * torch.arange(64.0).view(64, 1, 1, 1)          # distinct nonzero pixels
    crop_flip = Augmenter(("crop", "flip"), (1, 28, 28), seed=3)(ramp, rows[:64], 1)
    all_three = Augmenter(("crop", "flip", "erase"), (1, 28, 28), seed=3)(ramp, rows[:64], 1)
    kept = (all_three != 0)                    # erasing leaves crop and flip's draws alone
    assert torch.equal(all_three[kept], crop_flip[kept])


def test_augment_names_are_checked():
    assert parse_augment("crop, flip") == ("crop", "flip")
    assert parse_augment("crop,flip,erase") == ("crop", "flip", "erase")
    assert parse_augment("") == ()
    with pytest.raises(MpicnnError, match="choose from crop, flip, erase"):
        parse_augment("crop,rotate")


def test_cache_memory_is_checked_per_node_local_rank():
    gib = 2 ** 30
    check_cache_fits(1 * gib, local_size=4, available=10 * gib)     # 4 GiB of 8 usable
    with pytest.raises(MpicnnError, match=r"3.00 GiB per rank x 4 rank\(s\) on this node"):
        check_cache_fits(3 * gib, local_size=4, available=10 * gib)
    with pytest.raises(MpicnnError, match="--shuffle local"):
        check_cache_fits(3 * gib, 4, 10 * gib, hint=" or with --shuffle local")
