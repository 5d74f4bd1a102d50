"""The peer for ``bench tta``: the training script a PyTorch user would write instead.

DDP over gloo, an h5py ``Dataset`` read sample by sample through a ``DataLoader`` with a
``DistributedSampler``, the same augmentation applied per sample, evaluation after every
epoch. From mpicnn it borrows only what must be identical for a fair race: the flags,
the model, the optimizer and the lr schedule; it writes the same metrics records
(config, epoch, end) so that ``bench tta`` and ``python -m mpicnn.report`` read both alike.

``mpirun -n N python -m mpicnn.bench._tta_ddp [--loader-workers K] [train flags] --metrics FILE``
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cluster.devices import bind_device
from ..cluster.world import run_guarded
from ..config import parse_config
from ..observe.records import MetricsWriter
from ..observe.steps import PhaseTimer
from ..training.models import build_model
from ..training.optim import build_optimizer, build_scheduler, total_steps
from ._gloo import exit_skipping_finalization, gloo_group


class H5Images(torch.utils.data.Dataset):
    """One split of an mpicnn HDF5 file, one sample per ``__getitem__``, normalised."""

    def __init__(self, path: str, split: str, augment: bool):
        import h5py

        self.path, self.split, self.augment, self.file = path, split, augment, None
        with h5py.File(path, "r") as f:
            self.labels = torch.from_numpy(f[f"{split}/labels"][:].astype(np.int64))
            self.mean = torch.tensor(f.attrs["mean"], dtype=torch.float32).view(-1, 1, 1)
            self.std = torch.tensor(f.attrs["std"], dtype=torch.float32).view(-1, 1, 1)
            self.pad = max(1, min(f[f"{split}/images"].shape[2:]) // 8)   # as mpicnn's crop

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import h5py

        if self.file is None:      # opened in the process that reads (a DataLoader worker)
            self.file = h5py.File(self.path, "r")
        x = (torch.from_numpy(self.file[f"{self.split}/images"][i]).float() - self.mean) / self.std
        if self.augment:
            _, h, w = x.shape
            padded = F.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = padded[:, dy: dy + h, dx: dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(2)
        return x, self.labels[i]


def train_seconds(timer: PhaseTimer) -> float:
    return sum(timer.totals.values())



@torch.no_grad()
def evaluate(model, loader) -> tuple[float, float]:
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for x, y in loader:
        logits = model(x)
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                              (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def split_loader_workers(argv: list) -> tuple[int, list]:
    """(``--loader-workers N``, the other flags): DataLoader worker processes per rank."""
    argv = list(argv)
    if "--loader-workers" not in argv:
        return 0, argv
    at = argv.index("--loader-workers")
    return int(argv[at + 1]), argv[:at] + argv[at + 2:]


def run(world, argv) -> int:
    loader_workers, argv = split_loader_workers(argv)
    cfg = parse_config(argv)
    bind_device(world, "cpu", cfg.sync.threads)       # the same threads per rank as mpicnn
    with gloo_group(world):
        train(world, cfg, loader_workers)
    return 0


def train(world, cfg, loader_workers: int) -> None:
    """The DDP training run, writing mpicnn's metrics records."""
    training = cfg.training
    augment = bool(cfg.data.augment)
    train_set = H5Images(cfg.data.data, "train", augment)
    val_set = H5Images(cfg.data.data, "val", False)
    sampler = torch.utils.data.DistributedSampler(train_set, seed=training.seed,
                                                  drop_last=True)
    train_loader = torch.utils.data.DataLoader(train_set, training.batch_size,
                                               sampler=sampler, drop_last=True,
                                               num_workers=loader_workers)
    val_loader = torch.utils.data.DataLoader(
        val_set, training.batch_size,
        sampler=torch.utils.data.DistributedSampler(val_set, shuffle=False))
    steps_per_epoch = len(train_loader)
    run_steps = total_steps(training, steps_per_epoch)
    global_batch = training.batch_size * world.size
    torch.manual_seed(training.seed)
    classes = int(train_set.labels.max()) + 1
    model = build_model(training.model, train_set[0][0].shape, classes)
    ddp = torch.nn.parallel.DistributedDataParallel(model)   # broadcasts rank 0's weights
    optimizer = build_optimizer(training, ddp.parameters(), global_batch)
    scheduler = build_scheduler(training, optimizer, steps_per_epoch, run_steps)
    metrics = MetricsWriter(cfg.output.metrics if world.is_root else "")
    metrics.write("config", **cfg.to_dict(), world_size=world.size,
                  steps_per_epoch=steps_per_epoch, program="ddp-gloo+DataLoader")
    step, timer, started = 0, PhaseTimer(), time.perf_counter()
    val_loss = val_acc = float("nan")
    for epoch in range(training.epochs):
        if step >= run_steps:
            break
        sampler.set_epoch(epoch)
        timer.reset()
        loss_sum = count = 0.0
        batches = iter(train_loader)
        while step < run_steps:
            with timer.phase("data"):
                batch = next(batches, None)
            if batch is None:
                break
            x, y = batch
            with timer.phase("forward"):
                loss = F.cross_entropy(ddp(x), y, label_smoothing=training.label_smoothing)
            with timer.phase("backward"):          # DDP's allreduce runs inside
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with timer.phase("optimizer"):
                optimizer.step()
                scheduler.step()
            timer.steps += 1
            step += 1
            loss_sum += loss.item() * len(y)
            count += len(y)
        val_loss, val_acc = evaluate(ddp, val_loader)
        metrics.write("epoch", epoch=epoch + 1, step=step, train_loss=loss_sum / count,
                      val_loss=val_loss, val_acc=val_acc, lr=scheduler.get_last_lr()[0],
                      images_per_s=count * world.size / max(1e-9, train_seconds(timer)),
                      **timer.snapshot_ms())
    metrics.write("end", val_acc=val_acc, val_loss=val_loss, train_loss=float("nan"),
                  images_per_s=0.0, steps=step, epochs=epoch + 1, world_size=world.size,
                  mode="ddp-gloo", wall_s=time.perf_counter() - started)
    metrics.close()


if __name__ == "__main__":
    exit_skipping_finalization(run_guarded(run, sys.argv[1:]))
