"""The bare PyTorch loop the GPU benchmarks race: one batch resident on the device, eager.

It trains the same zoo model with the same optimizer settings as the ``mpicnn.train``
flags it is compared with (``config_flags``), in the same precision and memory format,
and nothing else: no loader, no schedule, no checks, no metrics.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..cluster.devices import cpu_threads_per_rank
from ..config import parse_config
from ..observe.profile import profiler_events, summarize
from ..training.models import build_model
from ..training.optim import build_optimizer

WARMUP = 5          # as mpicnn.train's end record: the first 5 steps stay out of images/s
# The optimizer both sides use (mpicnn.train flags; the bare loop builds the same one).
OPTIMIZER_FLAGS = ["--optimizer", "sgd", "--lr", "0.05"]


class BareLoop:
    """A plain training loop over one device-resident random batch."""

    def __init__(self, model: str, shape, classes: int, device: str, batch: int,
                 amp: str = "off", channels_last: bool = False):
        training = parse_config([*OPTIMIZER_FLAGS, "--batch-size", str(batch)]).training
        torch.manual_seed(0)
        self.device = torch.device(device)
        if self.device.type == "cpu":          # the threads a single mpicnn rank takes
            torch.set_num_threads(cpu_threads_per_rank(1))
        self.model = build_model(model, shape, classes).to(self.device)
        self.x = torch.randn(batch, *shape, device=self.device)
        self.y = torch.randint(0, classes, (batch,), device=self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(training, self.model.parameters(), batch)
        self.dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.batch = batch

    def run(self, steps: int) -> None:
        for _ in range(steps):
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype is not None):
                loss = F.cross_entropy(self.model(self.x), self.y)
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def images_per_s(self, steps: int) -> float:
        """Images/s over ``steps`` steps after ``WARMUP`` untimed ones."""
        self.run(WARMUP)
        self.sync()
        started = time.perf_counter()
        self.run(steps)
        self.sync()
        return self.batch * steps / (time.perf_counter() - started)

    def profile(self, steps: int) -> dict:
        """``observe.profile.summarize`` of ``steps`` steps (after a warm-up)."""
        from torch.profiler import ProfilerActivity, profile

        self.run(WARMUP)
        self.sync()
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            self.run(steps)
            self.sync()
        return summarize(profiler_events(prof), steps)

    def close(self) -> None:
        del self.model, self.optimizer, self.x, self.y
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
