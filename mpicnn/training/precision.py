"""Mixed precision (``--amp``) and what happens to a step's gradient before the update.

Autocast runs forward and loss (and evaluation) in bf16 or fp16; parameters, their
gradients and the gradient buckets stay fp32. fp16 adds a dynamic loss scale: the loss
is scaled before backward, the (scaled) gradients are averaged as usual, then
``finalize`` unscales them, checks them for NaN/Inf and clips them (``--clip-grad-norm``),
all on the device, and ``update`` moves the scale by the step's outcome. Strategies call
``finalize`` on the gradient the update uses: after averaging (allreduce), or before
pushing it (parameter-server workers), so every rank that shares an update decides alike.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..resilience.nan_policy import nonfinite_flag
from ..resilience.step_guard import step_code

DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def clip_grad_norm(grads: list, max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place so their joint 2-norm is at most ``max_norm``; the norm before.

    ``torch.nn.utils.clip_grad_norm_``'s arithmetic on gradient tensors (bucket views
    included), without a host read: the factor stays on the device.
    """
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


class LossScale:
    """The dynamic loss scale of ``torch.amp.GradScaler``, kept on the device.

    Uses GradScaler's own kernels (unscale with a found-inf flag, the scale update) but
    reads nothing back on the host: a step that overflowed is skipped by the optimizer's
    ``found_inf`` or by the loop, never by a host-side branch here.
    """

    def __init__(self, device, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.overflows = torch.zeros((), dtype=torch.int64, device=device)

    def unscale_(self, grads: list, found: torch.Tensor) -> None:
        """Divide ``grads`` by the scale in place; set ``found`` to 1 where one is not finite."""
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found,
                                                             self.scale.reciprocal())

    def update(self, found: torch.Tensor) -> None:
        """Back off after a non-finite step, grow after ``growth_interval`` finite ones."""
        self.overflows += found.to(torch.int64)
        torch._amp_update_scale_(self.scale, self.growth_tracker, found, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        """Plain numbers in ``GradScaler.state_dict``'s keys (reads the device: checkpoints only)."""
        return {"scale": self.scale.item(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self.growth_tracker.item()),
                "overflows": int(self.overflows.item())}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["_growth_tracker"])
        self.overflows.fill_(state.get("overflows", 0))
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]


class Precision:
    """``--amp`` and ``--clip-grad-norm`` of one rank: autocast, loss scale, gradient finalize."""

    def __init__(self, amp: str = "off", device="cpu", clip: float = 0.0):
        self.amp, self.device, self.clip = amp, torch.device(device), clip
        self.dtype = DTYPES[amp]
        self.scaler = LossScale(self.device) if amp == "fp16" else None
        # this step's verdicts, device tensors set by finalize (None before the first)
        self.found = self.loss_bad = None

    def autocast(self):
        """Forward and loss in the run's low precision (a no-op with ``--amp off``)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (scaled under fp16)."""
        return loss * self.scaler.scale if self.scaler is not None else loss

    def finalize(self, params) -> torch.Tensor:
        """Unscale, check and clip the gradients of ``params`` in place; the non-finite flag.

        Returns (and keeps as ``found``) a float 0-d device tensor, 1.0 when some gradient
        element is NaN or Inf: that update must not land. Under fp16 the unscale is the
        check; otherwise one multi-tensor pass is (a few kernels for any model).
        """
        grads = [p.grad for p in params if p.grad is not None]
        if self.scaler is not None:
            found = torch.zeros((), dtype=torch.float32, device=self.device)
            self.scaler.unscale_(grads, found)
        else:
            found = nonfinite_flag(grads, self.device)
        if self.clip > 0:
            clip_grad_norm(grads, self.clip)
        self.found = found
        return found

    def verdict(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """This step's ``step_code`` for the NaN policy (a device tensor, nothing read).

        Without a loss scale every non-finite gradient is the policy's, and the code is
        the flag itself (FINE 0, NONFINITE 1): no kernel. Under fp16 a non-finite gradient
        with a finite loss is a loss-scale overflow: the scale backs off, the update is
        skipped, and the NaN policy does not count it; a non-finite loss (this rank's, in
        fp32) is the data's or the run's fault and counts.
        """
        if self.scaler is None:
            return self.found
        loss_bad = (~torch.isfinite(loss_sum)).to(self.found.dtype)
        return step_code(self.found, self.found * loss_bad)

    def update(self, found: torch.Tensor) -> None:
        """Move the loss scale by whether the update was skipped (``found``, the same on every
        rank that shares the update)."""
        if self.scaler is not None:
            self.scaler.update(found)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)

    def report(self) -> dict:
        """The loss scale's figures for the epoch record (reads the device: epoch ends only)."""
        if self.scaler is None:
            return {}
        return {"amp_scale": self.scaler.scale.item(),
                "amp_overflows": int(self.scaler.overflows.item())}

    def describe(self) -> str:
        parts = [f"amp {self.amp}" + (" (dynamic loss scale)" if self.scaler else "")]
        if self.clip > 0:
            parts.append(f"gradient norm clipped to {self.clip:g}")
        return ", ".join(parts)
