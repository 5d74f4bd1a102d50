"""PowerSGD on 2 ranks, two ways, each writing every step's averaged bucket to a file.

``mpirun -n 2 python tests/powersgd_check.py mpicnn OUT``: mpicnn's PowerSGD through real
reducers on each collective (flat Allreduce, hierarchical with each rank a node, the
shared-memory windows, whose bucket lives in a window).
``python tests/powersgd_check.py ddp OUT``: DDP's ``powerSGD_hook`` on a 2-process gloo
group (torch.multiprocessing), fed the same bucket of the same gradients; then, on three
buckets a step, the stock hook against ``mpicnn.bench._ddp_powersgd``'s.
Both write ``{name: tensor[steps, numel]}`` with ``torch.save`` (rank 0 for mpicnn).
``mpirun -n 2 python tests/powersgd_check.py train OUT [mpicnn.train flags]``: a real
``mpicnn.train`` run whose ranks each save their final parameters to ``OUT.rank<r>``.
"""
import sys
import tempfile

import torch

RANK, START, STEPS = 2, 2, 7
# conv weights twice (one group, two random draws), biases, matrices that compress and
# one that does not (3 x 4 at rank 2: (3 + 4) x 2 x 2 > 12)
SHAPES = [(16, 8, 3, 3), (16,), (32, 16), (3, 4), (10, 32), (10,), (16, 8, 3, 3)]
NUMEL = sum(torch.Size(s).numel() for s in SHAPES)
BUCKETS = [SHAPES[4:], SHAPES[2:4], SHAPES[:2]]     # as DDP buckets them: the last layers first


def gradient(rank: int, step: int) -> torch.Tensor:
    """This rank's bucket at ``step``: a shared slow part plus its own noise."""
    common = torch.randn(NUMEL, generator=torch.Generator().manual_seed(7))
    own = torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * rank + step))
    return common + 0.5 * own


def mpicnn_side(out: str) -> None:
    from mpi4py import MPI

    from mpicnn.sync.allreduce.codec import Codec
    from mpicnn.sync.allreduce.collectives import (
        FlatAllreduce,
        HierarchicalAllreduce,
        SharedMemoryAllreduce,
    )
    from mpicnn.sync.allreduce.powersgd import PowerSGD
    from mpicnn.sync.allreduce.reducer import Reducer

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    own_node = comm.Split(rank, rank)
    one_node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    collectives = {"flat": FlatAllreduce(comm),
                   "hierarchical": HierarchicalAllreduce(comm, own_node),
                   "windows": SharedMemoryAllreduce(one_node, comm)}
    results = {}
    for name, collective in collectives.items():
        reducer = Reducer(collective, Codec("none", size), torch.device("cpu"))
        powersgd = PowerSGD(RANK, START, size)
        flat = collective.allocate(NUMEL, torch.float32, "cpu")
        rows = []
        for step in range(STEPS):
            flat.copy_(gradient(rank, step))
            if powersgd.compressing:
                powersgd.job((0, 1), flat, SHAPES, reducer)()
            else:
                reducer(0, flat)
            powersgd.step_done()
            rows.append(flat.clone())
        results[name] = torch.stack(rows)
        same = comm.allgather(results[name])
        results[name + " equal on ranks"] = torch.tensor(all(torch.equal(same[0], s)
                                                             for s in same))
        collective.release(flat)
        collective.free()
    if rank == 0:
        torch.save(results, out)
    for c in (own_node, one_node):
        c.Free()


def ddp_rank(rank: int, size: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook

    dist.init_process_group("gloo", rank=rank, world_size=size, init_method=init)
    state = hook.PowerSGDState(None, matrix_approximation_rank=RANK, start_powerSGD_iter=START)
    rows = []
    for step in range(STEPS):
        bucket = FakeBucket(gradient(rank, step), SHAPES)
        hook.powerSGD_hook(state, bucket).wait()
        rows.append(bucket.flat.clone())        # the hook averages the bucket in place
    results = {"ddp": torch.stack(rows)}
    results.update(bucketed_runs(rank))
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def bucketed_runs(rank: int) -> dict:
    """Three buckets a step, each hook waited for in bucket order: the stock hook on one
    state, and ``_ddp_powersgd``'s with a gloo group a bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook

    from mpicnn.bench._ddp_powersgd import PowerSGDPerBucketGroup

    import torch.distributed as dist

    args = {"matrix_approximation_rank": RANK, "start_powerSGD_iter": START}
    stock = hook.PowerSGDState(None, **args)
    grouped = PowerSGDPerBucketGroup([dist.new_group(backend="gloo") for _ in BUCKETS], **args)
    runs = {"stock hook": lambda bucket: hook.powerSGD_hook(stock, bucket),
            "a group a bucket": grouped}
    results = {}
    for name, run in runs.items():
        rows = []
        for step in range(STEPS):
            for index, shapes in enumerate(BUCKETS):
                bucket = FakeBucket(gradient(rank, step)[:numel(shapes)] * (index + 1),
                                    shapes, index, last=index == len(BUCKETS) - 1)
                run(bucket).wait()
                rows.append(bucket.flat.clone())
        results[name] = torch.cat(rows)
    return results


def numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


class FakeBucket:
    """The part of ``dist.GradBucket`` the hook reads: one flat bucket (the last by default)."""

    def __init__(self, flat: torch.Tensor, shapes, index: int = 0, last: bool = True):
        self.flat, self.shapes, self._index, self._last = flat, shapes, index, last

    def buffer(self) -> torch.Tensor:
        return self.flat

    def gradients(self) -> list:
        sizes = [torch.Size(s).numel() for s in self.shapes]
        return [piece.view(s) for piece, s in zip(self.flat.split(sizes), self.shapes)]

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


def ddp_side(out: str) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(ddp_rank, args=(2, f"file://{tmp}/rendezvous", out), nprocs=2)


def train_side(out: str, argv: list) -> int:
    """Run ``mpicnn.train``; as the strategy finishes, each rank saves its parameters."""
    from mpicnn import train
    from mpicnn.sync.allreduce.strategy import AllreduceStrategy

    finish = AllreduceStrategy.finish

    def save_then_finish(self):
        torch.save(self.model.state_dict(), f"{out}.rank{self.world.rank}")
        finish(self)

    AllreduceStrategy.finish = save_then_finish
    return train.main(argv)


if __name__ == "__main__":
    side, target = sys.argv[1], sys.argv[2]
    if side == "train":
        sys.exit(train_side(target, sys.argv[3:]))
    (mpicnn_side if side == "mpicnn" else ddp_side)(target)
