"""Optimizer state as flat vectors over all parameters, to shard it over servers.

A server runs the optimizer on one range of the flat parameter vector; checkpoints keep
the usual per-parameter ``optimizer.state_dict()`` so they do not depend on --servers
and have the same layout as allreduce checkpoints.
"""
from __future__ import annotations

import torch

from ..flat import flatten, views


def state_keys(training) -> tuple[str, ...]:
    """The per-element state tensors of ``--optimizer`` (each as long as the parameters)."""
    if training.optimizer in ("adamw", "lamb"):
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if training.momentum > 0 else ()     # sgd, lars


def has_step(training) -> bool:
    """Whether the optimizer keeps a step counter in its state (Adam's bias correction)."""
    return training.optimizer in ("adamw", "lamb")


def flat_state(optimizer, params, training):
    """(step, {key: flat vector}) of a per-parameter optimizer, or None before its first step."""
    states = [optimizer.state.get(p) for p in params]
    if not all(states):
        return None
    step = int(states[0]["step"]) if has_step(training) else 0
    return step, {k: flatten([s[k] for s in states], device="cpu") for k in state_keys(training)}


def set_flat_state(optimizer, params, training, step: int, vectors: dict) -> None:
    """Fill a per-parameter optimizer's state from flat vectors (inverse of flat_state)."""
    by_key = {k: views(v, params) for k, v in vectors.items()}
    for i, p in enumerate(params):
        state = {k: pieces[i].clone().to(p.device) for k, pieces in by_key.items()}
        if has_step(training):
            state["step"] = torch.tensor(float(step))
        optimizer.state[p] = state
