"""One epoch of training steps and one evaluation pass; no mode-specific branches."""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..cluster.world import reduce_sums
from ..observe import timeline


def follow_schedule(scheduler, global_step: int) -> None:
    """Move the lr schedule to ``global_step`` (the loop, not the strategy, owns it)."""
    with warnings.catch_warnings():   # PS workers' local optimizer never steps: only lr moves
        warnings.simplefilter("ignore", UserWarning)
        while scheduler.last_epoch < global_step:
            scheduler.step()


def forward_backward(model, sync, stats, images, labels, accum_steps: int,
                     label_smoothing: float = 0.0, weight: float = 1.0) -> float:
    """Forward and backward of one rank's batch; returns the summed loss of its samples.

    With ``accum_steps`` k the batch runs as k consecutive slices (micro-batches): the
    loss of each is scaled by its share of the batch and the gradients summed locally,
    and only the last backward communicates, so the step sees the gradient of the whole
    batch. ``weight`` scales the batch's mean loss (a rank's share of an uneven global
    batch, see ``Loader.weight``); a rank with no samples only takes part in the exchange.
    """
    loss_sum, zeroed = 0.0, False
    every = getattr(model, "collective_forward", False)     # --sync-bn: all ranks take part
    pieces = zip(images.tensor_split(accum_steps), labels.tensor_split(accum_steps))
    for i, (x, y) in enumerate(pieces):
        if not len(y) and not every:   # an uneven last step: fewer samples than micro-batches
            continue
        with stats.phase("forward"):
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing) if len(y) \
                else out.sum() * 0.0
        with stats.phase("backward"):
            if not zeroed:
                sync.zero_grad()
                zeroed = True
            if weight == 1.0 and len(y) * accum_steps == len(labels):
                scaled = loss / accum_steps if accum_steps > 1 else loss
            else:
                scaled = loss * (weight * len(y) / max(1, len(labels)))
            with sync.no_sync() if i < accum_steps - 1 else nullcontext():
                scaled.backward()
        loss_sum += loss.item() * len(y)
    if not zeroed:
        sync.zero_grad()
    return loss_sum


def train_epoch(model, loader, sync, work, state, run_steps: int, stats, *, scheduler,
                global_batch: int, guard=None, accum_steps: int = 1, should_stop=None,
                label_smoothing: float = 0.0) -> None:
    """Run the remaining steps of ``state.epoch``, counting them in ``state`` and ``stats``.

    ``sync`` is the gradient side of the strategy and ``work`` its work plan (one
    object for mpicnn's modes); ``guard`` the stall heartbeats and NaN policy (None:
    neither). ``should_stop(state)``, called after every step but the run's last on
    every rank, ends the epoch early when it returns True (the same on all ranks).
    ``label_smoothing`` applies to the training loss; evaluation reports plain cross-entropy.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = work.batches(loader, state, run_steps)
    while state.global_step < run_steps:
        timeline.step(state.global_step)
        with stats.phase("data"):
            batch = next(batches, None)
        state.move_to(work.position())
        if batch is None:
            break
        images, labels = batch
        loss_sum, counted = sync.forward_backward(model, stats, images, labels, accum_steps,
                                                  label_smoothing, work.weight(loader, state))
        step = state.global_step + 1
        with stats.phase("comm"):
            if guard is not None:
                guard.exchanging(step)
            sync.after_backward()
        with stats.phase("optimizer"):
            lr = sync.optimizer.param_groups[0]["lr"]
            if guard is None or guard.allows_update(params, step, lr, sync.synced_grads):
                sync.step()
            else:
                sync.skip_step()
            if guard is not None:
                guard.computing(step)
        state.advance(work.position())
        follow_schedule(scheduler, state.global_step)
        stats.step_done(state, loss_sum, counted, work.trained_images(global_batch))
        if should_stop is not None and state.global_step < run_steps and should_stop(state):
            break


@torch.no_grad()
def evaluate(model, loader, comm) -> tuple[float, float]:
    """(loss, accuracy) on the whole split, equal to a single-process evaluation."""
    model.eval()
    loss_sum = correct = count = 0.0
    for images, labels in loader.eval_batches():
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    loss_sum, correct, count = reduce_sums(comm, [loss_sum, correct, count])
    return loss_sum / count, correct / count
