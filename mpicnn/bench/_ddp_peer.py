"""The peer for ``bench comm``: PyTorch DDP over gloo, driven by mpicnn's own loop and loader.

``mpirun -n N python -m mpicnn.bench._ddp_peer [--ddp-hook fp16|powersgd] [train flags]``
prints one JSON line (rank 0) with the training images/s, measured exactly as
``mpicnn.train`` does. MPI serves only to number the ranks and share the rendezvous port;
across nodes the rendezvous is rank 0's ``MASTER_ADDR`` (and gloo's ``GLOO_SOCKET_IFNAME``).
``--ddp-hook fp16`` compresses gradients with DDP's own ``fp16_compress_hook``;
``--ddp-hook powersgd`` with its ``powerSGD_hook``, at the rank and start of mpicnn's
``--compression powersgd:RANK`` and ``--powersgd-start`` (``PowerSGDState``'s other
defaults, which are mpicnn's), each bucket on a gloo group of its own (``_ddp_powersgd``:
over one group the stock hook's collectives interleave differently on different ranks).
"""
from __future__ import annotations

import json
import sys

import torch

from ..checkpoint.state import RunState
from ..cluster.devices import bind_device
from ..cluster.errors import MpicnnError
from ..cluster.world import run_guarded
from ..config import parse_config
from ..data import shard
from ..data.loader import Loader
from ..data.schema import open_dataset
from ..observe.steps import StepStats
from ..sync.allreduce.powersgd import low_rank
from ..sync.contract import Strategy
from ..training.loop import train_epoch
from ..training.models import build_model
from ..training.optim import build_optimizer, build_scheduler, total_steps
from ._gloo import exit_skipping_finalization, gloo_group


class DDPStrategy(Strategy):
    """DDP reduces inside backward; the loop's after_backward has nothing left to do."""

    name = "ddp-gloo"


def split_hook(argv) -> tuple[str, list[str]]:
    """(``--ddp-hook`` value or "none", the other arguments)."""
    argv = list(argv)
    if "--ddp-hook" in argv:
        at = argv.index("--ddp-hook")
        return argv[at + 1], argv[:at] + argv[at + 2:]
    return "none", argv


def run(world, argv) -> int:
    hook, argv = split_hook(argv)
    cfg = parse_config(argv)
    device = bind_device(world, cfg.sync.device, cfg.sync.threads)
    with gloo_group(world):
        train(world, cfg, device, hook)
    return 0


def register_hook(ddp, hook: str, cfg) -> None:
    """Give ``ddp`` the communication hook named by ``--ddp-hook`` (none: plain allreduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        rank = low_rank(cfg.sync.compression)
        if rank is None:
            raise MpicnnError("--ddp-hook powersgd takes its rank from --compression "
                              "powersgd:RANK", collective=True)
        from . import _ddp_powersgd   # the stock hook, a gloo group a bucket

        _ddp_powersgd.register(ddp, ddp.parameters(), matrix_approximation_rank=rank,
                               start_powerSGD_iter=cfg.sync.powersgd_start)
    elif hook != "none":
        raise MpicnnError(f"--ddp-hook: {hook!r} is not fp16, powersgd or none",
                          collective=True)


def train(world, cfg, device, hook: str) -> None:
    """DDP over the same loop, loader and model as mpicnn; rank 0 prints the step figures."""
    data = open_dataset(cfg.data.data)
    steps_per_epoch = shard.check_fits(len(data.train), cfg.training.batch_size, world.size,
                                       cfg.data.shuffle)
    global_batch = cfg.training.batch_size * world.size
    run_steps = total_steps(cfg.training, steps_per_epoch)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.training.model, data.input_shape, data.num_classes).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)   # broadcasts rank 0's weights
    register_hook(ddp, hook, cfg)
    optimizer = build_optimizer(cfg.training, ddp.parameters(), global_batch)
    strategy = DDPStrategy(world, cfg)
    scheduler = build_scheduler(cfg.training, optimizer, steps_per_epoch, run_steps)
    strategy.attach(ddp, optimizer, scheduler)
    loader = Loader(data, data.train, device, cfg.training.batch_size, world.size, world.rank,
                    cfg.training.seed, cfg.data.shuffle)
    stats = StepStats()
    train_epoch(ddp, loader, strategy, strategy, RunState(), run_steps, stats,
                scheduler=scheduler, global_batch=global_batch,
                label_smoothing=cfg.training.label_smoothing)
    if world.is_root:
        print(json.dumps({"images_per_s": stats.images_per_s, "steps": stats.timer.steps,
                          **stats.timer.snapshot_ms()}), flush=True)
    data.close()


if __name__ == "__main__":
    exit_skipping_finalization(run_guarded(run, sys.argv[1:]))
