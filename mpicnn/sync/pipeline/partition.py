"""Where the sequential form is cut: per-layer costs, balanced cut points, ``--split``.

Pure functions on lists of numbers, plus two measurements of a model's layers (forward+
backward seconds, parameter bytes) and the activation shape between every two layers.
"""
from __future__ import annotations

import itertools
import time

import torch

from ...cluster.errors import MpicnnError

MEASURE_REPEATS = 3          # timed forward+backward passes per layer (after one warm-up)


def parse_split(text: str) -> list[int]:
    """``--split 4,9`` as [4, 9]: the first layer of stages 2, 3, ...; "" as []."""
    if not text.strip():
        return []
    try:
        cuts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MpicnnError(f"--split takes increasing layer indices like 4,9, got {text!r}",
                          collective=True) from None
    if any(b <= a for a, b in itertools.pairwise(cuts)) or (cuts and cuts[0] < 1):
        raise MpicnnError(f"--split takes increasing layer indices >= 1 like 4,9, got {text!r}",
                          collective=True)
    return cuts


def check_cuts(cuts: list[int], stages: int, layers: int) -> list[int]:
    """``cuts`` if they make ``stages`` non-empty stages of ``layers`` layers; else one line."""
    if stages > layers:
        raise MpicnnError(f"--stages {stages} is more than the model's {layers} layers in "
                          f"sequential form: use at most {layers} stages", collective=True)
    if len(cuts) != stages - 1 or (cuts and cuts[-1] >= layers):
        raise MpicnnError(f"--split {','.join(map(str, cuts))} does not cut {layers} layers "
                          f"into {stages} stages: give {stages - 1} increasing indices "
                          f"between 1 and {layers - 1}", collective=True)
    return cuts


def balanced_cuts(costs: list[float], stages: int) -> list[int]:
    """Cut points splitting ``costs`` into ``stages`` consecutive non-empty parts whose
    largest sum is smallest (the linear partition problem, by dynamic programming)."""
    n = len(costs)
    if stages > n:
        check_cuts([], stages, n)            # raises: more stages than layers
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest largest part cutting the first i layers into k parts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], arg[k][i] = value, j
    cuts, i = [], n
    for k in range(stages, 1, -1):
        i = arg[k][i]
        cuts.append(i)
    return sorted(cuts)


def bounds(cuts: list[int], layers: int) -> list[tuple[int, int]]:
    """[(first, end)] layer ranges of the stages."""
    edges = [0, *cuts, layers]
    return list(itertools.pairwise(edges))


def stage_sums(costs: list[float], cuts: list[int]) -> list[float]:
    return [sum(costs[a:b]) for a, b in bounds(cuts, len(costs))]


def activation_shapes(layers, input_shape) -> list[tuple]:
    """Per-sample shape of the input of every layer and of the output (len(layers) + 1)."""
    shapes = [tuple(input_shape)]
    x = torch.zeros(2, *input_shape)
    with torch.no_grad():
        for layer in layers:
            was = layer.training
            layer.eval()
            x = layer(x)
            layer.train(was)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def param_bytes(layers) -> list[float]:
    """Parameter bytes of every layer."""
    return [float(sum(p.numel() * p.element_size() for p in layer.parameters()))
            for layer in layers]


def measure_times(layers, input_shape, batch: int, device, repeats: int = MEASURE_REPEATS):
    """Seconds of one forward+backward of every layer at ``batch`` samples on ``device``.

    Leaves the layers as they were: parameters' gradients and buffers (BatchNorm running
    statistics) are restored, and the global random state (dropout) does not move.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):     # dropout must not move the seed
        return _measure(layers, input_shape, batch, device, repeats)


def _measure(layers, input_shape, batch: int, device, repeats: int) -> list[float]:
    shapes = activation_shapes(layers, input_shape)
    generator = torch.Generator().manual_seed(0)
    times = []
    for layer, shape in zip(layers, shapes):
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        grads = [(p, p.grad) for p in layer.parameters()]
        x = torch.randn(batch, *shape, generator=generator).to(device).requires_grad_()
        best = float("inf")
        for r in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = layer(x.clone())           # a non-leaf input: in-place layers are allowed
            out.backward(torch.ones_like(out))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r:
                best = min(best, time.perf_counter() - start)
        times.append(best)
        layer.load_state_dict(saved)
        for p, g in grads:
            p.grad = g
    return times
