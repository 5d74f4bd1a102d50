"""One epoch of training steps and one evaluation pass; no mode-specific branches.

Between log intervals a step reads nothing back from the device: the loss stays a
device tensor (``StepStats`` reads it at intervals), and where the optimizer can skip a
non-finite update itself (``skips_on_device``) the NaN policy's verdict is deferred to
the next interval (``StepGuard.settle``).
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..cluster.world import reduce_sums
from ..observe import profile, timeline
from .compiled import mark_step
from .precision import Precision


def follow_schedule(scheduler, global_step: int) -> None:
    """Move the lr schedule to ``global_step`` (the loop, not the strategy, owns it)."""
    if getattr(scheduler, "_step_count", 0) > 1:      # torch warns at the first step only
        _advance(scheduler, global_step)
        return
    with warnings.catch_warnings():   # PS workers' local optimizer never steps: only lr moves
        warnings.simplefilter("ignore", UserWarning)
        _advance(scheduler, global_step)


def _advance(scheduler, global_step: int) -> None:
    while scheduler.last_epoch < global_step:
        scheduler.step()


def forward_backward(model, sync, stats, images, labels, accum_steps: int,
                     label_smoothing: float = 0.0, weight: float = 1.0,
                     precision: Precision | None = None) -> torch.Tensor:
    """Forward and backward of one rank's batch; the summed loss of its samples (on the device).

    With ``accum_steps`` k the batch runs as k consecutive slices (micro-batches): the
    loss of each is scaled by its share of the batch and the gradients summed locally,
    and only the last backward communicates, so the step sees the gradient of the whole
    batch. ``weight`` scales the batch's mean loss (a rank's share of an uneven global
    batch, see ``Loader.weight``); a rank with no samples only takes part in the exchange.
    ``precision`` runs forward and loss under autocast and scales the loss for backward.
    """
    precision = precision or Precision()
    loss_sum, zeroed = None, False
    every = getattr(model, "collective_forward", False)     # --sync-bn: all ranks take part
    pieces = zip(images.tensor_split(accum_steps), labels.tensor_split(accum_steps)) \
        if accum_steps > 1 else [(images, labels)]
    for i, (x, y) in enumerate(pieces):
        if not len(y) and not every:   # an uneven last step: fewer samples than micro-batches
            continue
        with stats.phase("forward"), precision.autocast():
            mark_step(model)
            out = model(x)
            loss = (F.cross_entropy(out, y, label_smoothing=label_smoothing) if len(y)
                    else out.sum() * 0.0)
            if loss.dtype != torch.float32:
                loss = loss.float()
        with stats.phase("backward"):
            if not zeroed:
                sync.zero_grad()
                zeroed = True
            if weight == 1.0 and len(y) * accum_steps == len(labels):
                scaled = loss / accum_steps if accum_steps > 1 else loss
            else:
                scaled = loss * (weight * len(y) / max(1, len(labels)))
            with sync.no_sync() if i < accum_steps - 1 else nullcontext():
                precision.scale(scaled).backward()
        summed = loss.detach() * len(y)
        loss_sum = summed if loss_sum is None else loss_sum + summed
    if not zeroed:
        sync.zero_grad()
    return loss_sum if loss_sum is not None else torch.zeros((), device=labels.device)


def train_epoch(model, loader, sync, work, state, run_steps: int, stats, *, scheduler,
                global_batch: int, guard=None, accum_steps: int = 1, should_stop=None,
                label_smoothing: float = 0.0, precision: Precision | None = None) -> None:
    """Run the remaining steps of ``state.epoch``, counting them in ``state`` and ``stats``.

    ``sync`` is the gradient side of the strategy and ``work`` its work plan (one
    object for mpicnn's modes); ``guard`` the stall heartbeats and NaN policy (None:
    neither). ``should_stop(state)``, called after every step but the run's last on
    every rank, ends the epoch early when it returns True (the same on all ranks).
    ``label_smoothing`` applies to the training loss; evaluation reports plain cross-entropy.
    ``precision``: ``--amp`` and ``--clip-grad-norm`` (None: neither).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    precision = precision or Precision("off", params[0].device if params else "cpu")
    batches = work.batches(loader, state, run_steps)
    while state.global_step < run_steps:
        timeline.step(state.global_step)
        profile.step(state.global_step)
        with stats.phase("data"):
            batch = next(batches, None)
        state.move_to(work.position())
        if batch is None:
            break
        images, labels = batch
        step = state.global_step + 1
        if guard is not None:
            guard.forwarding(step)
        loss_sum, counted = sync.forward_backward(model, stats, images, labels, accum_steps,
                                                  label_smoothing, work.weight(loader, state),
                                                  precision)
        with stats.phase("comm"):
            if guard is not None:
                guard.exchanging(step)
            precision.found = None
            sync.after_backward(precision.finalize)
            if precision.found is None:       # a strategy that does not finalize
                precision.finalize(params)
        with stats.phase("optimizer"):
            apply_update(sync, guard, precision, step, loss_sum)
            if guard is not None:
                guard.computing(step)
        state.advance(work.position())
        follow_schedule(scheduler, state.global_step)
        stats.step_done(state, loss_sum, counted, work.trained_images(global_batch))
        if guard is not None and stats.read_due(state):
            guard.settle()
        if should_stop is not None and state.global_step < run_steps and should_stop(state):
            break
    profile.pause()
    if guard is not None:
        guard.settle()


def apply_update(sync, guard, precision: Precision, step: int, loss_sum) -> None:
    """Apply step ``step``'s update unless its gradient is not finite; move the loss scale.

    Where the optimizer can drop the update on the device, the NaN policy's verdict is
    read later (``guard.defer``); otherwise it is read now and the update skipped here.
    """
    found = precision.found
    skipped = sync.agreed_skip(found)
    lr = sync.optimizer.param_groups[0]["lr"]
    # Under a loss scale the policy looks at this rank's own loss: its verdict (and error)
    # is this rank's, and a stop ends the job from here instead of collectively.
    agreed = sync.synced_grads and precision.scaler is None
    code = precision.verdict(loss_sum) if guard is not None else None
    if sync.skips_on_device:
        if code is not None:
            guard.defer(code, step, lr, agreed)
        sync.step(found_inf=skipped)
    else:
        apply = not bool(skipped)
        if code is not None:
            apply = guard.allows_update(code, step, lr, agreed) and apply
        if apply:
            sync.step()
        else:
            sync.skip_step()
    precision.update(skipped)


@torch.no_grad()
def evaluate(model, loader, comm, precision: Precision | None = None) -> tuple[float, float]:
    """(loss, accuracy) on the whole split, equal to a single-process evaluation.

    Sums stay on the device until the split is done (one read); ``precision`` runs the
    forward under the training's autocast.
    """
    model.eval()
    precision = precision or Precision()
    sums, count = None, 0
    for images, labels in loader.eval_batches():
        with precision.autocast():
            logits = model(images)
        batch = torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum"),
                             (logits.argmax(1) == labels).sum().to(torch.float32)])
        sums = batch if sums is None else sums + batch
        count += len(labels)
    loss_sum, correct = sums.tolist() if sums is not None else (0.0, 0.0)
    loss_sum, correct, count = reduce_sums(comm, [loss_sum, correct, float(count)])
    return loss_sum / count, correct / count
