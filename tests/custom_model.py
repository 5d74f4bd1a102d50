"""Models loaded by import path in the tests."""
import os
import time

from torch import nn


class TinyNet(nn.Sequential):
    def __init__(self, input_shape, num_classes):
        c, h, w = input_shape
        super().__init__(nn.Flatten(), nn.Linear(c * h * w, num_classes))


class Fixed32(nn.Sequential):
    """Only fits 3x32x32 inputs."""

    def __init__(self, input_shape, num_classes):
        super().__init__(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


class FailOnRankOne(TinyNet):
    """Raises in the forward pass of rank 1's fourth training step (an error on one rank)."""

    calls = 0

    def forward(self, x):
        from mpi4py import MPI

        if self.training:
            FailOnRankOne.calls += 1
            if MPI.COMM_WORLD.Get_rank() == 1 and FailOnRankOne.calls == 4:
                stamp = os.environ.get("FAIL_STAMP")
                if stamp:
                    with open(stamp, "w") as fh:
                        fh.write(repr(time.time()))
                raise ValueError("injected failure on one rank")
        return super().forward(x)
