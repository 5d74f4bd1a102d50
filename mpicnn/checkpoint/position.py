"""Where a run stands in samples, and where a run with another layout continues from there.

A checkpoint records the layout that wrote it (per-rank batch, world size, shuffle), the
layout whose order the current epoch follows, and how many samples of that order are
trained. The order of an epoch depends on the global batch, never on how many ranks
share it (``data.shard``), so a run resumed at another world size or global batch
continues the same order from the first sample not yet trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.shard import Layout, step_sizes
from .state import Continued, RunState


def record(state: RunState, layout: Layout) -> dict:
    """The checkpoint fields saying where ``state`` stands, for a run cut by ``layout``."""
    order = state.continued.order if state.continued else layout
    return {"layout": layout.as_dict(), "epoch_order": order.as_dict(),
            "samples_in_epoch": state.samples_in_epoch(layout.global_batch)}


@dataclass
class Resume:
    """Where a resumed run starts, and what it continues."""

    state: RunState
    saved: Layout | None         # the layout that wrote the checkpoint (None: not recorded)
    order: Layout                # the layout whose order the resumed epoch follows
    done: int                    # samples of that epoch already trained
    samples: int                 # samples that epoch trains in all


def resume_point(saved: dict, layout: Layout, n: int) -> Resume:
    """Where a run cut by ``layout`` over ``n`` samples continues the checkpoint ``saved``.

    Where the epoch's order is this layout's and the samples done fill whole steps of
    it, the run takes up its plan at the next step; otherwise the epoch becomes a
    ``Continued`` one: the rest of its order, in global batches of this layout.
    Checkpoints that predate the layout record resume by steps, as they always did.
    """
    epoch, step, global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
    if "layout" not in saved:
        return Resume(RunState(epoch, step, global_step), None, layout,
                      step * layout.global_batch, layout.samples(n))
    order = Layout(**saved["epoch_order"])
    done, samples = int(saved["samples_in_epoch"]), order.samples(n)
    batch = layout.global_batch
    if done == 0:                       # the epoch has not begun: it takes this layout's order
        order, samples = layout, layout.samples(n)
    if order.same_order(layout) and done % batch == 0:
        state = RunState(epoch, done // batch, global_step)
    else:
        steps = len(step_sizes(samples - done, batch))
        state = RunState(epoch, 0, global_step, Continued(order, done, samples, steps))
    return Resume(state, Layout(**saved["layout"]), order, done, samples)


def describe_change(resume: Resume, layout: Layout, lr_before: float, lr_after: float,
                    peak: float | None, run_steps: int) -> str:
    """One log line: what differs from the run that wrote the checkpoint, and what follows."""
    old, state = resume.saved, resume.state
    changes = [f"{what} {a} -> {b}" for what, a, b in (
        ("world size", old.world_size, layout.world_size),
        ("global batch", old.global_batch, layout.global_batch),
        ("shuffle", old.shuffle, layout.shuffle)) if a != b]
    if state.continued is not None:
        where = (f"epoch {state.epoch} continues its order at sample {resume.done} of "
                 f"{resume.samples} ({state.continued.steps} step(s) of {layout.global_batch})")
    else:
        where = f"epoch {state.epoch} continues at step {state.step_in_epoch}"
    lr = f"lr {lr_before:.6g} -> {lr_after:.6g}" + (" (--scale-lr)" if peak is not None else "")
    return (f"resume: {', '.join(changes) or 'same layout'}; {where}; {lr}; the schedule "
            f"follows training progress and ends at step {run_steps}")
