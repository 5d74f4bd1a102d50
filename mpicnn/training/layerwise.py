"""LARS and LAMB: updates scaled per tensor by a trust ratio, for large global batches.

Both follow their papers' algorithms: LARS is You, Gitman and Ginsburg (2017), Algorithm 1
(the lr-scaled update accumulates in the momentum buffer); LAMB is You et al. (2019),
Algorithm 2 with phi the identity. Tensors of one dimension (biases, BatchNorm and other
norm weights) are excluded from adaptation and weight decay: they take the plain
momentum-SGD or Adam update. The rule reads only a tensor's shape, so a parameter
server holding whole tensors as views of its flat range applies it alike.
"""
from __future__ import annotations

import torch


def adapts(p: torch.Tensor) -> bool:
    """Whether the trust ratio and weight decay apply to ``p`` (not to biases and norms)."""
    return p.ndim > 1


def trust_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where both are positive, else 1 (a zero tensor moves)."""
    ok = (numerator > 0) & (denominator > 0)
    return torch.where(ok, numerator / torch.where(ok, denominator, 1.0), 1.0)


class LARS(torch.optim.Optimizer):
    """Momentum SGD whose step for each tensor is scaled by eta * ||w|| / (||g|| + wd * ||w||).

    Per tensor: ``v = momentum * v + lr * ratio * (g + wd * w)``, ``w = w - v``.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if adapts(p):
                    w_norm, g_norm = p.norm(), p.grad.norm()
                    ratio = trust_ratio(group["trust_coefficient"] * w_norm,
                                        g_norm + decay * w_norm)
                    update = (p.grad + decay * p) * ratio
                if momentum > 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    update = state["momentum_buffer"].mul_(momentum).add_(update, alpha=lr)
                    p.sub_(update)
                else:
                    p.sub_(update, alpha=lr)
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam whose step for each tensor, ``r + wd * w``, is scaled by ||w|| / ||r + wd * w||."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            (beta1, beta2), decay = group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # the step as a float tensor, as torch's Adam keeps it (checkpoints alike)
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]         # a tensor: the bias corrections need no host sync
                m = state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v = state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                r = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                if adapts(p):
                    r.add_(p, alpha=decay)
                    r.mul_(trust_ratio(p.norm(), r.norm()))
                p.sub_(r, alpha=group["lr"])
        return loss
