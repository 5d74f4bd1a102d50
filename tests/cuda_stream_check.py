"""Run under mpirun: the stream contract. MPI never reads a bucket before the kernels
writing it have finished.

Each rank writes ``rank + 1`` into a bucket on a side stream (PyTorch's are non-blocking:
nothing MPI runs on CUDA's legacy default stream waits for them) behind a GPU delay, then
hands the bucket to the real Reducer with the event recorded after the write, as backward's
hooks do. Every element must come back as the mean of what the ranks wrote. The
``control`` path hands the same delayed bucket straight to MPI with no wait: it must come
back wrong, which shows that the delay exposes a reader that does not wait.

argv: the paths to check, of ``direct`` (CUDA buffers to MPI: a CUDA-aware MPI),
``staged`` (through pinned host memory) and ``control`` (direct, no wait); ``--device
cpu`` runs ``direct`` and ``staged`` on host buffers (no streams, nothing delayed).
Rank 0 prints one JSON line: {path: [the smallest and largest value, what was expected]}.
"""
import json
import sys

import torch

from mpicnn.cluster.world import init_world
from mpicnn.sync.allreduce.codec import Codec
from mpicnn.sync.allreduce.collectives import FlatAllreduce
from mpicnn.sync.allreduce.reducer import Reducer
from mpicnn.sync.allreduce.transport import StagedBuffers, mpi_buffer

NUMEL = 1 << 20                  # 4 MB: several of MPI's pipeline fragments
DELAY_CYCLES = 2_000_000_000     # about 1 s of GPU clock: MPI would read long before


def delayed_write(bucket: torch.Tensor, value: float, reducer: Reducer):
    """Write ``value`` into ``bucket`` behind a GPU delay on a side stream; return the
    event recorded after the write (None on the CPU)."""
    if bucket.device.type != "cuda":
        bucket.fill_(value)
        return None
    with torch.cuda.stream(torch.cuda.Stream(bucket.device)):
        torch.cuda._sleep(DELAY_CYCLES)
        bucket.fill_(value)
        return reducer.ready_event()


def through_the_reducer(world, device, staged: bool) -> torch.Tensor:
    """The bucket after the real Reducer averaged it (direct, or staged through host memory)."""
    reducer = Reducer(FlatAllreduce(world.comm), Codec("none", world.size), device,
                      aware=not staged)
    if staged:
        reducer.buffers = StagedBuffers(reducer.stream, pin=device.type == "cuda")
    bucket = torch.zeros(NUMEL, device=device)
    ready = delayed_write(bucket, world.rank + 1.0, reducer)
    Reducer.consume(reducer("bucket", bucket, ready))
    reducer.collective.free()
    return bucket


def without_waiting(world, device) -> torch.Tensor:
    """The bucket after MPI summed it the moment its write was launched (no wait)."""
    from mpi4py import MPI

    reducer = Reducer(FlatAllreduce(world.comm), Codec("none", world.size), device, True)
    bucket = torch.zeros(NUMEL, device=device)
    delayed_write(bucket, world.rank + 1.0, reducer)
    reducer.collective(bucket, MPI.FLOAT, MPI.SUM, mpi_buffer)
    torch.cuda.synchronize(device)
    reducer.collective.free()
    return bucket * (1.0 / world.size)          # what a mean would have been


def main(argv) -> int:
    device = torch.device("cpu")
    if "--device" in argv:
        device = torch.device(argv[argv.index("--device") + 1])
        argv = [a for a in argv if a not in ("--device", device.type)]
    world = init_world()
    if device.type == "cuda":
        torch.cuda.set_device(0)                 # the ranks share one GPU
        device = torch.device("cuda", 0)
    expected = (world.size + 1) / 2              # the mean of 1 .. size
    checks = {"direct": lambda: through_the_reducer(world, device, staged=False),
              "staged": lambda: through_the_reducer(world, device, staged=True),
              "control": lambda: without_waiting(world, device)}
    found = {}
    for path in argv:
        bucket = checks[path]()
        found[path] = [float(bucket.min()), float(bucket.max()), expected]
    if world.rank == 0:
        print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
