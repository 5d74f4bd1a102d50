"""Read this rank's batches from HDF5 and hand them to the device, normalised.

Per step the shard plan names the rows; a source (inline, thread or process, see
:mod:`prefetch`) reads them through chunk-aligned units (:mod:`reader`), optionally
kept in RAM (:mod:`stores`); on the device they become float, normalised and augmented.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from . import shard
from .augment import Augmenter, to_device
from .chunks import unit_rows
from .memory import check_cache_fits
from .prefetch import InlineSource, ProcessSource, ThreadSource
from .reader import ReaderSpec
from .resident import ResidentRows, keeps_on_device, ranks_sharing
from .schema import Dataset, Split

EVAL_BATCH = 512


class Normalizer:
    """(x - mean) / std in float32 on the device, from the file's attributes."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, device):
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        if x is images:              # already float on the device: keep the caller's tensor
            x = x.clone()
        return x.sub_(self.mean).div_(self.std)


class Loader:
    """This rank's view of one split: per-step reads planned by :mod:`shard`.

    ``block``/``window``: the chunk-aware shuffle (0: the file's chunk rows / see
    :func:`shard.auto_window`; ``block=1`` and ``window >= len(split)`` give a plain
    permutation).
    ``prefetch``: batches read ahead (0: read in the loop); ``prefetch_mode`` thread or
    process. ``cache``: keep every row read in RAM. ``augment``: names from
    :mod:`augment`. ``on_device``: hold the readable rows on the device
    (:mod:`resident`) instead of reading per step.
    """

    def __init__(self, data: Dataset, split: Split, device, batch: int, world: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: str = "global", *,
                 prefetch: int = 0, prefetch_mode: str = "thread", cache: bool = False,
                 augment=(), block: int = 0, window: int = 0, on_device: bool = False):
        self.data, self.split = data, split
        self.batch, self.world, self.rank = batch, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.normalize = Normalizer(data.mean, data.std, device)
        self.augment = Augmenter(augment, data.input_shape, seed)
        self.device = device
        self.prefetch, self.prefetch_mode, self.cache = prefetch, prefetch_mode, cache
        self.unit = unit_rows(split.images)
        self.block = block or self.unit
        self.layout = shard.Layout(batch, world, shuffle)
        self.planned = self._planned(self.layout)                     # rows per step
        self.window_setting = window
        self.window = self._window(self.layout)
        self.sources: dict = {}
        self.on_device = on_device
        self.resident: dict = {}      # kind -> ResidentRows (with on_device)
        self._plans: tuple = (None, {})
        self.continued = None        # (epoch, Layout of its order, samples already trained)

    @property
    def steps(self) -> int:
        return self.layout.steps(len(self.split))

    def steps_in(self, epoch: int) -> int:
        """Steps of ``epoch``: fewer in an epoch continued from a checkpoint of another layout."""
        if self.continued is not None and self.continued[0] == epoch:
            return len(self.plan(epoch))
        return self.steps

    def continue_epoch(self, epoch: int, order: shard.Layout, first: int) -> None:
        """Make ``epoch`` the rest of the order ``order`` gave it, after ``first`` samples.

        A run resumed at another global batch (or world size, with ``--shuffle local``)
        trains every sample of the interrupted epoch that was not yet trained, once.
        """
        self.continued = (epoch, order, first)
        self._plans = (None, {})

    def weight(self, epoch: int, step: int, worker: int | None = None) -> float:
        """This worker's share of global step ``step``'s samples, times the world size.

        1 for every step but the last of a continued epoch, whose global batch may be
        smaller and unevenly dealt: scaling each rank's mean loss by it makes the
        averaged gradient the mean over that step's samples.
        """
        if self.continued is None or self.continued[0] != epoch:
            return 1.0
        rows = self.plan_for(self.rank if worker is None else worker, epoch)[step]
        _, order, first = self.continued
        total = shard.step_sizes(order.samples(len(self.split)) - first,
                                 self.layout.global_batch)[step]
        return len(rows) * self.world / total

    def _planned(self, layout: shard.Layout) -> int:
        return layout.global_batch if layout.shuffle == "global" else layout.batch_size

    def _window(self, layout: shard.Layout) -> int:
        return self.window_setting or shard.auto_window(self._planned(layout), self.block,
                                                        self.sample_bytes)

    # --- what is read ---------------------------------------------------------------
    def plan(self, epoch: int) -> np.ndarray:
        """Rows of this rank for every step of ``epoch``: (steps, batch), rows sorted."""
        return self.plan_for(self.rank, epoch)

    def plan_for(self, worker: int, epoch: int) -> np.ndarray:
        """Rows of ``worker`` for every step of ``epoch`` (the last epoch's plans are kept).

        A parameter-server dispatcher may hand any worker's batch to any worker.
        """
        if self._plans[0] != epoch:
            self._plans = (epoch, {})
        plans = self._plans[1]
        if worker not in plans:
            plans[worker] = self._plan(worker, epoch)
        return plans[worker]

    def _plan(self, worker: int, epoch: int):
        if self.continued is not None and self.continued[0] == epoch:
            _, order, first = self.continued
            return shard.continue_batches(self.global_batches(order, epoch), first,
                                          self.batch, self.world, worker)
        return self._layout_plan(self.layout, worker, epoch)

    def _layout_plan(self, layout: shard.Layout, worker: int, epoch: int) -> np.ndarray:
        """Rows of ``worker`` for every step of ``epoch`` when ``layout`` cuts it."""
        n, start = len(self.split), self.split.start
        window = self._window(layout)
        if layout.shuffle == "local":
            size = n // layout.world_size
            first = start + worker * size
            order = shard.chunk_order(size, self.seed, epoch, self.block, window,
                                      offset=-first, rank=worker, batch=layout.batch_size)
        else:
            order = shard.chunk_order(n, self.seed, epoch, self.block, window,
                                      offset=-start, batch=layout.global_batch)
        return shard.rank_batches(n, layout.batch_size, layout.world_size, worker, self.seed,
                                  epoch, layout.shuffle, order=order)

    def global_batches(self, layout: shard.Layout, epoch: int) -> np.ndarray:
        """The global batches (steps, global batch) of ``epoch`` as ``layout`` cuts it."""
        if layout.shuffle == "global":     # one rank reading whole global batches: one order
            return self._layout_plan(shard.Layout(layout.global_batch, 1), 0, epoch)
        return shard.join_plans([self._layout_plan(layout, w, epoch)
                                 for w in range(layout.world_size)])

    def ranges(self, kind: str) -> tuple[int, int]:
        """Split rows that ``epoch`` (kind "epoch") or ``eval_batches`` ("eval") may read."""
        n = len(self.split)
        if kind == "eval":
            return shard.eval_range(n, self.world, self.rank)
        if self.shuffle == "local":
            size = n // self.world
            return self.rank * size, (self.rank + 1) * size
        return 0, n

    def spec(self, kind: str) -> ReaderSpec:
        """How to read for ``kind``: unit size, store capacity in units, cached range."""
        lo, hi = self.ranges(kind)
        sample_level = kind == "epoch" and self.block == 1 and not self.cache
        unit = 1 if sample_level else self.unit
        if kind == "eval":                        # forward: the units under one batch
            capacity = math.ceil(EVAL_BATCH / unit) + 2
        else:            # the units of one rank's stretch of a window, and its two edges
            spread = self.world if self.shuffle == "global" else 1
            window = -(-self.window // self.planned) * self.planned
            capacity = math.ceil(window / (spread * min(self.block, unit))) + 3
        capacity = min(capacity, math.ceil((hi - lo) / unit) + 1)
        return ReaderSpec(self.data.path, self.split.images.name, self.split.start,
                          len(self.split), self.data.layout, unit, capacity,
                          (lo, hi) if self.cache else None)

    # --- memory -----------------------------------------------------------------------
    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.split.images.shape[1:])) * self.split.images.dtype.itemsize

    def held_bytes(self, kind: str) -> int:
        """Bytes the rows ``kind`` may read take as stored (what ``on_device`` holds)."""
        lo, hi = self.ranges(kind)
        return (hi - lo) * self.sample_bytes

    def cache_bytes(self, kind: str) -> int:
        """RAM that ``--cache`` will hold for ``kind`` once every row has been read."""
        lo, hi = self.ranges(kind)
        return (hi - lo) * self.sample_bytes if self.cache else 0

    def footprint(self, kind: str = "epoch") -> int:
        """Upper bound of the bytes this loader holds: unit store + batches in flight."""
        rows = self.batch if kind == "epoch" else EVAL_BATCH
        # queued, being read and being used: stored pixels, float and augmented copies
        batch_bytes = rows * (self.sample_bytes + 8 * int(np.prod(self.data.input_shape)))
        return self.spec(kind).store_bytes(self.sample_bytes) + \
            (self.prefetch + 3) * batch_bytes

    # --- reading ----------------------------------------------------------------------
    def source(self, kind: str):
        """The (lazily opened) source that reads rows for ``kind``."""
        if kind not in self.sources:
            spec = self.spec(kind)
            if self.prefetch > 0 and self.prefetch_mode == "process":
                slot_rows = self.batch if kind == "epoch" else EVAL_BATCH
                self.sources[kind] = ProcessSource(spec, self.prefetch, slot_rows,
                                                   self.data.input_shape,
                                                   self.split.images.dtype)
            else:
                read = spec.open(self.split.images).read
                self.sources[kind] = (ThreadSource(read, self.prefetch)
                                      if self.prefetch > 0 else InlineSource(read))
        return self.sources[kind]

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw images (N,C,H,W, stored dtype) and labels for sorted split rows."""
        images = self.spec("epoch").open(self.split.images).read(rows)
        return torch.from_numpy(images), torch.from_numpy(self.split.labels[rows])

    def resident_rows(self, kind: str) -> ResidentRows:
        """The rows ``kind`` may read, loaded onto the device on first use."""
        if kind not in self.resident:
            lo, hi = self.ranges(kind)
            read = self.spec(kind).open(self.split.images).read
            self.resident[kind] = ResidentRows(read, self.split.labels, lo, hi,
                                               self.data.input_shape,
                                               self.split.images.dtype, self.device)
        return self.resident[kind]

    def _resident_batches(self, kind: str, rows_list, epoch: int | None):
        """Batches gathered on the device: the plan and the augmentation draws of all the
        steps cross to it once, then every step is a few kernels and no host work."""
        if not rows_list:
            return
        rows = self.resident_rows(kind)
        sizes = [len(r) for r in rows_list]
        every = np.concatenate(rows_list)
        plan = to_device(every - rows.lo, self.device)
        draws = None
        if epoch is not None and self.augment:
            draws = to_device(self.augment.draws(every, epoch), self.device)
        for first, size in zip(np.cumsum([0] + sizes[:-1]), sizes):
            images, labels = rows.take(plan[first:first + size])
            x = self.normalize(images)
            if draws is not None:
                x = self.augment.apply(x, draws[first:first + size])
            yield x, labels

    def _batches(self, kind: str, rows_list, epoch: int | None, source=None):
        if self.on_device:
            yield from self._resident_batches(kind, rows_list, epoch)
            return
        cuda = self.device.type == "cuda"

        def host(images: np.ndarray, rows) -> torch.Tensor:
            tensor = torch.from_numpy(images)
            return tensor.pin_memory() if cuda else tensor

        def device(images: torch.Tensor, rows):
            x = self.normalize(images)
            if epoch is not None and self.augment:
                x = self.augment(x, rows, epoch)
            return x, to_device(self.split.labels[rows], self.device)

        source = source or self.source(kind)
        if cuda:       # batch k+1 goes to the GPU on a copy stream while step k computes
            yield from ahead_on_stream(device(images, rows) for rows, images in
                                       zip(rows_list, source.map(rows_list, host)))
        elif isinstance(source, ProcessSource):
            for rows, images in zip(rows_list, source.map(rows_list, host)):
                yield device(images, rows)
        else:       # the CPU is the device: the reader thread prepares whole batches
            yield from source.map(rows_list, lambda images, rows: device(host(images, rows),
                                                                         rows))

    def epoch(self, epoch: int, start_step: int = 0
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device, one pair per step of ``epoch`` from ``start_step``."""
        return self._batches("epoch", list(self.plan(epoch)[start_step:]), epoch)

    def rows_batch(self, rows: np.ndarray, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch of these sorted rows, as ``epoch`` would yield it (work handed
        out one batch at a time, e.g. by a parameter server).

        Read on the calling thread: there is nothing to read ahead, and a reader thread
        per batch costs its start-up and, on busy cores, a wait to be scheduled.
        """
        if self.on_device:
            return next(self._resident_batches("epoch", [rows], epoch))
        source = self.source("epoch")
        if isinstance(source, ThreadSource):
            source = InlineSource(source.read)
        return next(self._batches("epoch", [rows], epoch, source))

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous part of the split, in order, for evaluation."""
        lo, hi = self.ranges("eval")
        rows_list = [np.arange(a, min(hi, a + EVAL_BATCH)) for a in range(lo, hi, EVAL_BATCH)]
        return self._batches("eval", rows_list, None)

    def close(self) -> None:
        """Stop reader threads and processes; free the rows held on the device."""
        for source in self.sources.values():
            source.close()
        self.sources.clear()
        self.resident.clear()


def ahead_on_stream(batches):
    """Yield CUDA batches, preparing (copying, normalising, augmenting) the next one on a
    side stream before handing out the current one, so its copies overlap the step."""
    stream = torch.cuda.Stream()

    def prepare():
        with torch.cuda.stream(stream):
            return next(batches, None)

    upcoming = prepare()
    while upcoming is not None:
        compute = torch.cuda.current_stream()
        compute.wait_stream(stream)                 # the batch is complete before use
        for tensor in upcoming:
            tensor.record_stream(compute)           # its memory is not reused meanwhile
        current, upcoming = upcoming, prepare()
        yield current


def check_cache(loaders_kinds, local_size: int) -> None:
    """Fail clearly unless the node can hold what ``--cache`` will keep for these loaders."""
    need = sum(loader.cache_bytes(kind) for loader, kind in loaders_kinds)
    if need:
        shuffle = loaders_kinds[0][0].shuffle
        hint = " or with --shuffle local (each rank caches its shard only)" \
            if shuffle == "global" else ""
        check_cache_fits(need, local_size, hint=hint)


def make_loaders(settings, data: Dataset, world, batch_size: int, seed: int,
                 workers: int | None = None, index: int | None = None,
                 comm=None) -> tuple[Loader, Loader]:
    """The train and val loaders of this rank (``settings``: the data section).

    Checks that the node can hold what ``--cache`` keeps.

    ``workers``/``index``/``comm``: the ranks that read data, this rank's place among
    them and their communicator (default: all ranks of ``world``; servers read none).
    """
    workers = world.size if workers is None else workers
    index = world.rank if index is None else index
    from .augment import parse_augment

    options = dict(prefetch=settings.prefetch, prefetch_mode=settings.prefetch_mode,
                   cache=settings.cache, block=settings.shuffle_block,
                   window=settings.shuffle_window)
    train = Loader(data, data.train, world.device, batch_size, workers, index,
                   seed, settings.shuffle, augment=parse_augment(settings.augment), **options)
    val = Loader(data, data.val, world.device, batch_size, workers, index, **options)
    mib = 2 ** 20
    held = sum(loader.held_bytes(kind) for loader, kind in ((train, "epoch"), (val, "eval")))
    sharing = ranks_sharing(world.device, world.local_size)
    on_device = world.agree(lambda: keeps_on_device(settings.data_on_device, world.device,
                                                    held, sharing), comm)
    if on_device:
        train.on_device = val.on_device = True
        train.resident_rows("epoch"), val.resident_rows("eval")      # loaded before step 1
        world.log.info(f"data: {held / mib:.1f} MiB of the splits held on {world.device} as "
                       f"stored ({data.train.images.dtype}); every batch gathered there "
                       f"(--data-on-device {settings.data_on_device})")
        return train, val
    if settings.cache:
        world.agree(lambda: check_cache([(train, "epoch"), (val, "eval")], world.local_size),
                    comm)
    train.source("epoch"), val.source("eval")     # start reader processes before step 1
    cached = (train.cache_bytes("epoch") + val.cache_bytes("eval")) / mib
    world.log.info(
        f"data: blocks of {train.block} rows shuffled, then rows within {train.window}; "
        f"prefetch {settings.prefetch} ({settings.prefetch_mode}); cache "
        f"{f'{cached:.1f} MiB per rank' if settings.cache else 'off'}; "
        f"reader memory <= {train.footprint('epoch') / mib:.1f} MiB per rank"
        + ("" if data.stats_in_file else "; no mean/std in the file, using dtype defaults "
           "(python -m mpicnn.data inspect FILE --write-stats)"))
    return train, val
