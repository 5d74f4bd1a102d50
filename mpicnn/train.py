"""``mpirun -n N python -m mpicnn.train``: config -> world -> data -> model -> sync -> loop."""
from __future__ import annotations

import sys
import time
from contextlib import ExitStack

from .checkpoint.checkpointer import Checkpointer
from .cluster.batchjob import job_defaults
from .cluster.devices import bind_device, describe
from .cluster.errors import MpicnnError
from .cluster.world import run_guarded
from .config import parse_config
from .data.schema import label_warning, open_dataset
from .observe import profile, timeline
from .resilience.preemption import Preemption
from .resilience.step_guard import StepGuard
from .sync import make_strategy
from .sync.ps.layout import serves
from .training.trainer import Trainer, build_parts


def main(argv=None) -> int:
    return run_guarded(train, sys.argv[1:] if argv is None else argv)


def check_mpi_wait(cfg, world) -> None:
    """``--mpi-wait`` must be what MPI started with: a config file is read too late."""
    if cfg.sync.mpi_wait != world.mpi_wait:
        raise MpicnnError(f"mpi_wait = {cfg.sync.mpi_wait!r} in a config file comes after MPI "
                          f"has started; give --mpi-wait {cfg.sync.mpi_wait} on the command "
                          f"line (or MPICNN_MPI_WAIT={cfg.sync.mpi_wait})", collective=True)


def train(world, argv) -> int:
    """Build the run, train (or serve the workers), close; local teardown written once.

    After a failure nothing collective runs here: other ranks may sit in a collective
    this rank never reaches, and ``run_guarded`` aborts the job instead.
    """
    started = time.perf_counter()
    cfg = parse_config(argv, defaults={**job_defaults(world.job),
                                       "mpi_wait": world.mpi_wait})
    check_mpi_wait(cfg, world)
    with ExitStack() as teardown:
        preempt = teardown.enter_context(Preemption(cfg.failure.stop_check_every))  # before setup
        timeline.start(world, cfg.output.timeline, cfg.output.timeline_steps)
        bind_device(world, cfg.sync.device, cfg.sync.threads,      # PS servers: on the CPU
                    server=serves(cfg.sync.mode, cfg.sync.servers, world.rank, world.size))
        world.log.info(describe(world))
        profile.start(world, cfg.output.profile, cfg.output.profile_steps)
        world.log.info(f"config: {cfg.summary()}")
        strategy = make_strategy(cfg, world)          # decides which ranks train
        source = cfg.data
        data = world.agree(lambda: open_dataset(source.data, source.images_key,
                                                source.labels_key, source.layout,
                                                source.val_fraction))
        teardown.callback(data.close)
        if label_warning(data):
            world.log.warning(f"warning: {label_warning(data)}")
        strategy.expect_samples(data.input_shape)
        parts = build_parts(cfg, world, data, strategy)
        checkpointer = Checkpointer(cfg, world, parts.model, parts.optimizer, parts.scheduler,
                                    parts.layout, parts.precision, data)
        checkpointer.prepare()
        guard = StepGuard(cfg.failure, world)
        strategy.watched_by(guard)          # stall reports name stages and their waits
        preempt.agree = strategy.agree_stop
        strategy.attach(parts.model, parts.optimizer, parts.scheduler)
        trainer = None
        if strategy.trains:
            trainer = Trainer(cfg, world, data, parts, strategy, guard, preempt, checkpointer)
            teardown.callback(trainer.close)
            outcome = trainer.run()
        else:
            guard.serving()
            strategy.serve()        # parameter servers answer the workers until they are done
        profile.finish(world.log)
        strategy.finish()
        guard.close()
        trace = timeline.finish(world, cfg.output.timeline)
        return trainer.conclude(outcome, trace, time.perf_counter() - started) if trainer else 0


if __name__ == "__main__":
    sys.exit(main())
