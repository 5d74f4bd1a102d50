"""Run under ``mpirun -n P``: mpicnn's ring allreduce sums like MPI and ends bitwise equal.

Sizes below, at and above P elements (a segment may be empty), fp32 and bf16 (the wire
dtype of --compression bf16). Prints one line per case from rank 0.
"""
import sys

import numpy as np
import torch
from mpi4py import MPI

from mpicnn.sync.allreduce.ring import ring_allreduce
from mpicnn.sync.allreduce.transport import mpi_buffer

comm = MPI.COMM_WORLD.Dup()
rank, size = comm.Get_rank(), comm.Get_size()
DATATYPES = {torch.float32: MPI.FLOAT, torch.bfloat16: MPI.UINT16_T}
failures = 0
for dtype, datatype in DATATYPES.items():
    for n in (0, 1, size - 1, size, size + 1, 1000003):
        gen = torch.Generator().manual_seed(1000 * rank + n)
        mine = torch.randn(n, generator=gen).to(dtype)
        everyone = comm.allgather(mine.float().numpy())
        expected = np.sum(np.stack(everyone), axis=0, dtype=np.float64) if n else np.zeros(0)
        buf = mine.clone()
        ring_allreduce(comm, buf, datatype, mpi_buffer)
        got = buf.float().numpy().astype(np.float64)
        scale = np.abs(np.stack(everyone)).sum(axis=0) if n else np.zeros(0)
        tolerance = 1e-6 if dtype == torch.float32 else 2 ** -7 * size
        close = bool(np.all(np.abs(got - expected) <= tolerance * np.maximum(scale, 1e-30)))
        bits = buf.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy()
        same = all(np.array_equal(bits, other) for other in comm.allgather(bits))
        failures += not (close and same)
        if rank == 0:
            print(f"{str(dtype).split('.')[-1]} n={n}: close={close} same_on_all={same}")
if rank == 0:
    print(f"failures={failures}")
sys.stdout.flush()
comm.Free()
