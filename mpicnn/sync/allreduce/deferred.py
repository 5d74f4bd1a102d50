"""``--overlap-forward``: the update of the first-sent buckets lands during the next forward.

Backward finishes the last layers' gradients first, so their buckets leave first; the first
layers' bucket is finished last and is the first one the next forward needs. With a
deferred update a step applies what has arrived and leaves the rest in flight: a parameter
whose average is still travelling is updated when the module that owns it starts its next
forward (a forward pre-hook), or before anything else reads the model (zero_grad,
evaluation, buffers, the end). Each parameter gets its step's own update with that step's
hyperparameters (the lr the schedule had then), so the training is bitwise the one without
overlap, for optimizers that update each parameter on its own (torch's, LARS, LAMB).
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from functools import partial

from ...cluster.errors import MpicnnError
from ...training.precision import nonfinite_flag


class DeferredUpdate:
    """Holds back the update of parameters whose averaged gradient is still in flight.

    ``wait()`` returns once every pending average is in ``.grad``; ``watch()`` is the
    context that wait runs in (the stall watch's mark). A parameter is made current when
    the module that owns it starts its forward: one used outside its own module's forward
    (weights tied across modules) would be read stale.
    """

    def __init__(self, model, optimizer, wait, watch=nullcontext):
        self.optimizer, self.wait, self.watch = optimizer, wait, watch
        self.pending, self.pending_ids, self.settings = [], frozenset(), []
        self.wait_seconds = 0.0
        self._hooks = []
        for module in model.modules():
            own = frozenset(id(p) for p in module.parameters(recurse=False) if p.requires_grad)
            if own:
                self._hooks.append(module.register_forward_pre_hook(partial(self._before, own)))

    def hold(self, params) -> None:
        """``params``' averages are still travelling: their update waits for them."""
        self.pending = list(params)
        self.pending_ids = frozenset(map(id, self.pending))

    def step(self, step) -> None:
        """Run ``step()`` (the optimizer's) for every parameter but the pending ones."""
        self.settings = [{k: v for k, v in group.items() if k != "params"}
                         for group in self.optimizer.param_groups]
        with _hidden(self.pending):
            step()

    def land(self) -> None:
        """Wait for the pending averages and apply their update with its step's settings."""
        if not self.pending:
            return
        start = time.perf_counter()
        with self.watch():
            self.wait()
        self.wait_seconds += time.perf_counter() - start
        pending, ids = self.pending, self.pending_ids
        self.hold([])
        if bool(nonfinite_flag([p.grad for p in pending], pending[0].device)):
            raise MpicnnError("non-finite gradient in the update that --overlap-forward "
                              "deferred: training diverged or the data holds NaN/Inf; lower "
                              "--lr or check the data", collective=True)
        groups = self.optimizer.param_groups
        others = [p for group in groups for p in group["params"] if id(p) not in ids]
        now = [{k: group[k] for k in saved} for group, saved in zip(groups, self.settings)]
        try:
            for group, saved in zip(groups, self.settings):
                group.update(saved)
            with _hidden(others):
                self.optimizer.step()
        finally:
            for group, current in zip(groups, now):
                group.update(current)

    def drop(self) -> None:
        """Wait for the pending averages and discard their update (a skipped step)."""
        if self.pending:
            with self.watch():
                self.wait()
            self.hold([])

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _before(self, own: frozenset, _module, _inputs) -> None:
        if self.pending and not own.isdisjoint(self.pending_ids):
            self.land()


@contextmanager
def _hidden(params):
    """Hide ``params``' gradients from the optimizer, which skips a parameter without one."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
