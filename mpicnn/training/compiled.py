"""``--compile MODE``: the model's forward and backward compiled by torch.compile.

The module is compiled in place (``nn.Module.compile``): its parameters, hooks and
state-dict keys stay those of the eager model, so checkpoints, the gradient buckets
and ``--resume`` are unchanged. AOTAutograd runs the compiled backward as one node:
every gradient is ready when it ends, so the allreduce engine's buckets all launch then
(the exchange no longer overlaps backward; a run across nodes may prefer eager). On a
GPU, ``reduce-overhead`` and ``max-autotune`` replay the step's kernels as CUDA graphs;
the loop marks each step's start for them (``marks_steps``).
"""
from __future__ import annotations

import torch

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_model(model: torch.nn.Module, mode: str, device: torch.device, log=None):
    """Compile ``model`` in place for ``mode`` (``off``: leave it eager)."""
    if mode == "off":
        return model
    model.compile(mode=None if mode == "default" else mode)
    model.marks_steps = device.type == "cuda" and mode in CUDA_GRAPH_MODES
    if log is not None:
        graphs = "; steps replayed as CUDA graphs" if model.marks_steps else ""
        log(f"compile: torch.compile mode {mode} (the first steps and the first evaluation "
            f"compile){graphs}")
    return model


def mark_step(model) -> None:
    """Tell CUDA-graph trees a new step begins (only for a model compiled to use them)."""
    if getattr(model, "marks_steps", False):
        torch.compiler.cudagraph_mark_step_begin()
