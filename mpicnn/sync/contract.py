"""What the training loop calls: the gradient side and the work side of a sync strategy.

The loop never branches on the mode. It calls a ``GradientSync`` around each step
(attach, forward_backward, zero_grad, no_sync, after_backward with the gradient's
finalize, agreed_skip, step -- with a device found_inf where ``skips_on_device`` -- or
skip_step, sync_buffers, evaluate, finish, timings) and asks a ``WorkPlan`` who trains,
which batches this worker gets (and the weight of each in its step), where the run
stands, whether to stop, and what to report.
A strategy implements both (``Strategy``); the loop owns the run's counters and the
learning-rate schedule.
"""
from __future__ import annotations

from contextlib import nullcontext

from ..cluster.world import reduce_sums
from ..training import loop


class GradientSync:
    """attach -> (zero_grad, backward, after_backward, step | skip_step)* -> finish."""

    def __init__(self, world, cfg):
        self.world, self.cfg = world, cfg
        self.model = self.optimizer = self.scheduler = None

    def attach(self, model, optimizer, scheduler) -> None:
        """Take the model and its optimizer; make all ranks start from the same state."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def zero_grad(self) -> None:
        """Clear gradients before backward."""
        self.optimizer.zero_grad(set_to_none=False)

    def forward_backward(self, model, stats, images, labels, accum_steps: int = 1,
                         label_smoothing: float = 0.0, weight: float = 1.0, precision=None):
        """Forward and backward of this rank's batch: (summed loss on the device, samples it
        counts); ``precision`` is ``--amp`` (autocast, loss scale)."""
        return loop.forward_backward(model, self, stats, images, labels, accum_steps,
                                     label_smoothing, weight, precision), len(labels)

    def evaluate(self, model, loader, precision=None) -> tuple[float, float]:
        """(loss, accuracy) on the whole split, equal to a single-process evaluation."""
        return loop.evaluate(model, loader, self.comm, precision)

    def no_sync(self):
        """Context for a micro-batch whose gradients are only accumulated locally."""
        return nullcontext()

    def after_backward(self, finalize=None) -> None:
        """Make every rank's ``.grad`` the average over ranks (may wait for communication).

        ``finalize(params)`` (``Precision.finalize``: unscale, check, clip) runs on the
        gradient the update uses: here after averaging, so every rank gets the same result.
        """
        if finalize is not None:
            finalize([p for group in self.optimizer.param_groups for p in group["params"]])

    @property
    def synced_grads(self) -> bool:
        """Whether ``.grad`` after after_backward() is equal on all ranks (NaN checks agree)."""
        return True

    def agreed_skip(self, found):
        """The flag (device tensor) by which this step's update is dropped, as every rank
        sharing the update sees it; ``found`` is this rank's verdict on its gradient (after
        averaging it is everyone's)."""
        return found

    @property
    def skips_on_device(self) -> bool:
        """Whether ``step(found_inf)`` can drop a non-finite update without a host read.

        The fused optimizers take a ``found_inf`` tensor; until every parameter has its
        optimizer state they are not trusted with it (a skipped first fused SGD step
        would leave its momentum buffer uninitialised).
        """
        opt = self.optimizer
        return bool(opt.defaults.get("fused")) and \
            len(opt.state) == sum(len(g["params"]) for g in opt.param_groups)

    def step(self, found_inf=None) -> None:
        """Apply the averaged gradients (the loop moves the schedule).

        ``found_inf``: a device flag; where it is 1 the fused optimizer leaves parameters
        and state as they are (only with ``skips_on_device``).
        """
        if found_inf is None:
            self.optimizer.step()
            return
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def skip_step(self) -> None:
        """Drop this step's update (its gradient was not finite)."""
        self.optimizer.zero_grad(set_to_none=False)

    def sync_buffers(self) -> None:
        """Make non-parameter state (e.g. BatchNorm running statistics) equal on all ranks."""

    def timings_ms(self) -> dict:
        """Extra per-step timings for the metrics records, since the last call."""
        return {}

    def finish(self) -> None:
        """Release communication resources; called once, also after errors."""


class WorkPlan:
    """Which ranks train, on which batches, where the run stands, when it stops."""

    def __init__(self, world, cfg):
        self.world, self.cfg = world, cfg

    @property
    def trains(self) -> bool:
        """Whether this rank runs the training loop (parameter servers do not)."""
        return True

    @property
    def lockstep(self) -> bool:
        """Whether all training ranks run the same steps, so collectives between steps match."""
        return True

    @property
    def comm(self):
        """Communicator of the ranks that train (for metrics and evaluation)."""
        return self.world.comm

    @property
    def workers(self) -> int:
        """How many ranks train: the data-parallel world size."""
        return self.world.size

    @property
    def worker_index(self) -> int:
        """This rank's index among the ranks that train (which data shard it reads)."""
        return self.world.rank

    def expect_samples(self, input_shape) -> None:
        """Learn the per-sample input shape before ``attach`` (pipeline stages need it)."""

    def serve(self) -> None:
        """Answer the ranks that train until they are done (parameter servers only)."""

    def batches(self, loader, state, run_steps: int):
        """This rank's batches for the rest of ``state.epoch``: its fixed shard plan."""
        return loader.epoch(state.epoch, start_step=state.step_in_epoch)

    def weight(self, loader, state) -> float:
        """The weight of this rank's mean loss in the step being taken (``Loader.weight``)."""
        return loader.weight(state.epoch, state.step_in_epoch)

    def position(self) -> int | None:
        """The global step the run stands at by this plan; None: the loop's own count."""
        return None

    def trained_images(self, global_batch: int) -> int:
        """Images all workers trained on since the last call (one global batch per step)."""
        return global_batch

    def agree_stop(self, wanted: bool, step: int) -> bool:
        """Whether any training rank wants to stop at global ``step``; the same answer on all.

        Called after every ``--stop-check-every``-th step on every rank that trains, so
        a collective over those ranks fits when they run the same steps. Override where
        the training ranks are not all of ``world.comm`` (parameter-server workers), or
        do not run in lockstep (carry the flag through the strategy's own messages).
        """
        return bool(reduce_sums(self.world.comm, [float(wanted)])[0] > 0)

    def rank_labels(self) -> list[str] | None:
        """What each rank of the world is, for stall reports (None: ranks are alike)."""
        return None

    def watched_by(self, guard) -> None:
        """Show the stall watch what each rank is (and, where a mode waits for other ranks
        within a step, let it mark those waits: ``guard.waiting_for_peer``)."""
        guard.name_ranks(self.rank_labels())

    def report(self) -> dict:
        """Mode-specific fields for the epoch and end metrics records."""
        return {}


class Strategy(GradientSync, WorkPlan):
    """A sync mode: both sides of the contract in one object per rank."""

    name = "base"
