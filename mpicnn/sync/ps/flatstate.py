"""Optimizer state as flat vectors over all parameters, to shard it over servers.

A server runs the optimizer on one range of the flat parameter vector; checkpoints keep
the usual per-parameter ``optimizer.state_dict()`` so they do not depend on --servers
and have the same layout as allreduce checkpoints.
"""
from __future__ import annotations

import torch


def state_keys(training) -> tuple[str, ...]:
    """The per-element state tensors of ``--optimizer`` (each as long as the parameters)."""
    if training.optimizer in ("adamw", "lamb"):
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if training.momentum > 0 else ()     # sgd, lars


def has_step(training) -> bool:
    """Whether the optimizer keeps a step counter in its state (Adam's bias correction)."""
    return training.optimizer in ("adamw", "lamb")


def flatten_params(params, out: torch.Tensor | None = None) -> torch.Tensor:
    """The parameters (or any same-shaped tensors) as one flat CPU vector."""
    numel = sum(p.numel() for p in params)
    out = torch.empty(numel, dtype=params[0].dtype) if out is None else out
    offset = 0
    for p in params:
        out[offset: offset + p.numel()].copy_(p.detach().reshape(-1))
        offset += p.numel()
    return out


def unflatten_into(flat: torch.Tensor, tensors) -> None:
    """Copy consecutive pieces of ``flat`` into ``tensors`` (on their devices)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def flat_state(optimizer, params, training):
    """(step, {key: flat vector}) of a per-parameter optimizer, or None before its first step."""
    states = [optimizer.state.get(p) for p in params]
    if not all(states):
        return None
    step = int(states[0]["step"]) if has_step(training) else 0
    return step, {k: flatten_params([s[k] for s in states]) for k in state_keys(training)}


def set_flat_state(optimizer, params, training, step: int, vectors: dict) -> None:
    """Fill a per-parameter optimizer's state from flat vectors (inverse of flat_state)."""
    offset = 0
    for p in params:
        state = {k: v[offset: offset + p.numel()].view_as(p).clone().to(p.device)
                 for k, v in vectors.items()}
        if has_step(training):
            state["step"] = torch.tensor(float(step))
        optimizer.state[p] = state
        offset += p.numel()
