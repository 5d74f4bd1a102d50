"""``mpirun -n N python -m mpicnn.train``: config -> world -> data -> model -> sync -> loop."""
from __future__ import annotations

import sys
import time

import torch

from .checkpoint import files as checkpoint
from .checkpoint.checkpointer import save, save_config
from .checkpoint.state import restore
from .cluster.batchjob import job_defaults
from .cluster.devices import bind_device, describe
from .cluster.errors import run_guarded
from .config import parse_config
from .data import shard
from .data.loader import make_loaders
from .data.schema import open_dataset
from .observe import timeline
from .observe.progress import Progress
from .observe.records import MetricsWriter
from .observe.steps import IntervalLog
from .resilience.drills import slow_down
from .resilience.preemption import Preemption
from .resilience.supervisor import Supervised
from .sync import make_strategy
from .training.loop import Throughput, evaluate, train_epoch
from .training.models import build_model
from .training.optim import build_optimizer, build_scheduler, total_steps


def main(argv=None) -> int:
    return run_guarded(train, sys.argv[1:] if argv is None else argv)


def train(world, argv) -> int:
    started = time.perf_counter()
    cfg = parse_config(argv, defaults=job_defaults(world.job))
    preempt = Preemption(cfg.stop_check_every)
    preempt.install()                    # early, so a stop signal during setup is not fatal
    log = world.log
    timeline.start(world, cfg.timeline, cfg.timeline_steps)
    device = bind_device(world, cfg.device, cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    log.info(describe(world))
    log.info(f"config: {cfg.summary()}")
    strategy = make_strategy(cfg, world)     # decides which ranks train (workers)

    data = world.agree(lambda: open_dataset(cfg.data, cfg.images_key, cfg.labels_key,
                                            cfg.layout, cfg.val_fraction))
    steps_per_epoch = world.agree(lambda: shard.check_fits(
        len(data.train), cfg.batch_size, strategy.workers, cfg.shuffle))
    if cfg.checkpoint_dir:
        world.agree(lambda: world.is_root and save_config(cfg))
    global_batch = cfg.batch_size * strategy.workers
    run_steps = total_steps(cfg, steps_per_epoch)

    torch.manual_seed(cfg.seed)
    model = world.agree(lambda: build_model(cfg.model, data.input_shape,
                                            data.num_classes)).to(device)
    optimizer = build_optimizer(cfg, model.parameters(), global_batch)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, run_steps)
    state = restore(world, cfg, model, optimizer, scheduler)
    strategy = Supervised(strategy, cfg, world, state)   # NaN policy, stall watchdog
    preempt.agree = strategy.agree_stop
    strategy.attach(model, optimizer, scheduler)
    if world.rank == cfg.slow_rank:
        slow_down(model, cfg.slow_factor)

    train_loader, val_loader = make_loaders(cfg, data, world, strategy.workers,
                                            strategy.worker_index)
    metrics = MetricsWriter(cfg.metrics if world.is_root else "")
    metrics.write("config", **cfg.to_dict(), world_size=world.size,
                  steps_per_epoch=steps_per_epoch)
    log.info(f"{data.path}: {len(data.train)} train / {len(data.val)} val samples of "
             f"{data.input_shape}, {data.num_classes} classes; {cfg.model}, "
             f"{steps_per_epoch} steps/epoch at global batch {global_batch}")
    bar = Progress(world.is_root, cfg.progress, log)
    bar.start(run_steps, state.global_step, cfg.epochs, global_batch)
    intervals = IntervalLog(strategy.comm, metrics, bar, cfg.log_every, cfg.batch_size,
                            global_batch, steps_per_epoch, lambda: scheduler.get_last_lr()[0],
                            mid_epoch=strategy.lockstep)
    saved = None
    throughput = Throughput()
    val_loss = val_acc = train_loss = float("nan")
    last_epoch = min(cfg.epochs, cfg.stop_epoch or cfg.epochs)
    try:
        strategy.serve()       # parameter servers answer the workers here until they are done
        while strategy.trains and state.epoch < last_epoch and state.global_step < run_steps:
            intervals.begin()
            result = train_epoch(model, train_loader, strategy, state, run_steps, global_batch,
                                 throughput, on_step=intervals.on_step,
                                 accum_steps=cfg.accum_steps, should_stop=preempt.should_stop)
            intervals.flush(state)
            strategy.sync_buffers()
            if preempt.stopped:          # mid-epoch is fine: the loader skips done steps
                if cfg.checkpoint_dir and world.is_root:
                    saved = save(cfg, model, optimizer, scheduler, state,
                                 checkpoint.checkpoint_name(state.global_step))
                break
            with timeline.span("evaluate"):
                val_loss, val_acc = evaluate(model, val_loader, strategy.comm)
            train_loss = result.train_loss
            if state.step_in_epoch >= steps_per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            metrics.write("epoch", epoch=state.epoch, step=state.global_step,
                          train_loss=train_loss, val_loss=val_loss, val_acc=val_acc,
                          lr=scheduler.get_last_lr()[0], images_per_s=throughput.images_per_s,
                          **result.timer.snapshot_ms(), **strategy.timings_ms(),
                          **strategy.report())
            log.info(f"epoch {state.epoch}/{cfg.epochs} step {state.global_step}: train loss "
                     f"{train_loss:.4f}, val loss {val_loss:.4f}, val acc {val_acc:.4f}")
            done = state.epoch >= cfg.epochs or state.global_step >= run_steps
            due = state.epoch % cfg.checkpoint_every == 0 or state.epoch == last_epoch
            if cfg.checkpoint_dir and world.is_root and (done or due):
                name = checkpoint.FINAL if done else checkpoint.checkpoint_name(state.global_step)
                save(cfg, model, optimizer, scheduler, state, name)
        if strategy.trains and val_acc != val_acc and not preempt.stopped:  # finished run
            strategy.sync_buffers()
            val_loss, val_acc = evaluate(model, val_loader, strategy.comm)
    except BaseException:
        # No collective teardown here: other ranks may sit in a collective this rank never
        # reaches (freeing a shared window would hang); run_guarded aborts the job instead.
        preempt.restore()
        bar.close()
        raise
    preempt.restore()
    bar.close()
    strategy.finish()
    train_loader.close()
    val_loader.close()
    trace = timeline.finish(world, cfg.timeline)
    if trace:
        metrics.write("timeline", **trace)
        log.info(f"timeline: {trace['events']} events of steps {trace['steps'][0]}:"
                 f"{trace['steps'][1]} written to {cfg.timeline}")
    wall = time.perf_counter() - started
    if preempt.stopped:
        code = preempt.report(log, metrics, state, saved)
        metrics.close()
        data.close()
        return code
    metrics.write("end", val_acc=val_acc, val_loss=val_loss, train_loss=train_loss,
                  images_per_s=throughput.images_per_s, steps=state.global_step,
                  epochs=state.epoch, world_size=world.size, mode=cfg.mode, wall_s=wall,
                  **strategy.report())
    metrics.close()
    log.info(f"done: {world.size} rank(s), {cfg.mode}, {state.epoch} epoch(s), "
             f"{state.global_step} steps, val acc {val_acc:.4f}, val loss {val_loss:.4f}, "
             f"{throughput.images_per_s:.0f} images/s, {wall:.1f} s")
    data.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
