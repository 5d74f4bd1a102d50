"""Models loaded by import path in the tests."""
import os

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
                raise ValueError("injected failure on one rank")
        return super().forward(x)


class DataParallelNet(nn.Module):
    """The DataParallel example of the design notes, as written there: no arguments, and a
    flatten sized for 8x8 feature maps that 32x32 inputs without pooling do not have."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = self.conv2(self.conv1(x).relu()).relu()
        x = x.view(-1, 64 * 8 * 8)
        return self.fc2(self.fc1(x).relu())


class KeywordNet(nn.Sequential):
    """Takes the class count by keyword only, with defaults that a positional call would
    misplace."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__(nn.Flatten(), nn.LazyLinear(num_classes))


class NeedsDepth(nn.Module):
    def __init__(self, depth, width, activation):
        super().__init__()


class Drill(nn.Module):
    """A zoo model (``DRILL_MODEL``, default kerasnet) with test hooks in training forwards.

    ``SAMPLE_LOG=prefix``: each training forward appends the ids of its samples, one line
    per step, to ``prefix.<rank>``; an id is the value of pixel (0, 0, 0), which the data
    of the test sets to the row number and which is zeroed before the model sees it.
    ``STOP_AFTER=k``: rank 0 sends itself SIGUSR1 in its k-th training forward, so the run
    stops (checkpoint, exit 75) after step k. ``CRASH_AFTER=k``: rank 1 (the last rank on
    one rank) kills itself with SIGKILL in its k-th training forward, every run, or only
    once with ``CRASH_STAMP=file`` (created then), so a restarted run goes on.
    """

    calls = 0

    def __init__(self, input_shape, num_classes):
        from mpicnn.training.models import build_model

        super().__init__()
        self.inner = build_model(os.environ.get("DRILL_MODEL", "kerasnet"), input_shape,
                                 num_classes)
        self.ids = bool(os.environ.get("SAMPLE_LOG"))

    def forward(self, x):
        if self.training:
            self._hooks(x)
        if self.ids:
            x = x.clone()
            x[:, 0, 0, 0] = 0
        return self.inner(x)

    def _hooks(self, x):
        import signal

        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        Drill.calls += 1
        log = os.environ.get("SAMPLE_LOG")
        if log:
            with open(f"{log}.{rank}", "a") as fh:
                fh.write(" ".join(str(int(v)) for v in x[:, 0, 0, 0].tolist()) + "\n")
        if rank == 0 and Drill.calls == int(os.environ.get("STOP_AFTER", "0")):
            os.kill(os.getpid(), signal.SIGUSR1)
        stamp = os.environ.get("CRASH_STAMP", "")
        victim = min(1, comm.Get_size() - 1)
        if rank == victim and Drill.calls == int(os.environ.get("CRASH_AFTER", "0")) and \
                not (stamp and os.path.exists(stamp)):
            if stamp:
                open(stamp, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


class Branchy(nn.Module):
    """Two branches added: no sequential form, so it cannot be cut into pipeline stages."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        c, h, w = input_shape
        self.a = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))

    def forward(self, x):
        return self.a(x) + self.b(x)


class WideNet(nn.Sequential):
    """A wide hidden layer (2.4 MB of fp32 gradients on 1x8x8): buckets big enough for the
    cross-node ring."""

    def __init__(self, input_shape, num_classes):
        c, h, w = input_shape
        super().__init__(nn.Flatten(), nn.Linear(c * h * w, 8192), nn.ReLU(),
                         nn.Linear(8192, num_classes))


class ScaleProbe(nn.Module):
    """kerasnet for fp16 loss-scale drills: overflows where asked, logs each rank's updates.

    Its backward shrinks the gradient of its output 1000-fold, so the scaled gradients stay
    far below fp16's limit: no overflow but the injected ones. ``OVERFLOW=rank:step,...``:
    that rank's step-th training backward makes its gradients non-finite (a loss-scale
    overflow: the loss stays finite). ``SCALE_LOG=prefix``: after every update the rank
    appends "its own verdict, the verdict applied, the loss scale" to ``prefix.<rank>``.
    """

    calls = 0

    def __init__(self, input_shape, num_classes):
        from mpi4py import MPI

        from mpicnn.training.models import build_model

        super().__init__()
        self.inner = build_model("kerasnet", input_shape, num_classes)
        self.rank = MPI.COMM_WORLD.Get_rank()
        self.overflows = {int(step) for rank, step in (
            item.split(":") for item in filter(None, os.environ.get("OVERFLOW", "").split(",")))
            if int(rank) == self.rank}
        if os.environ.get("SCALE_LOG"):
            _log_updates(f"{os.environ['SCALE_LOG']}.{self.rank}")

    def forward(self, x):
        out = self.inner(x)
        if self.training and out.requires_grad:
            ScaleProbe.calls += 1
            factor = float("inf") if ScaleProbe.calls in self.overflows else 1e-3
            out.register_hook(lambda grad: grad * factor)
        return out


def _log_updates(path: str) -> None:
    """Append every loss-scale update of this process to ``path`` (see ScaleProbe)."""
    from mpicnn.training.precision import Precision

    update = Precision.update
    if getattr(update, "logs", None):
        return

    def logged(self, found):
        update(self, found)
        with open(path, "a") as fh:
            fh.write(f"{int(self.found.item())} {int(found.item())} "
                     f"{self.scaler.scale.item():g}\n")

    logged.logs = path
    Precision.update = logged
