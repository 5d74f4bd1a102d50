"""Run under ``mpirun -n 2``: chunked payloads arrive intact and drain() counts leftovers."""
import sys

import numpy as np
from mpi4py import MPI

from mpicnn.sync.ps import protocol as P

comm = MPI.COMM_WORLD.Dup()
rank = comm.Get_rank()
SIZES, MAX_BYTES = (0, 1, 5, 12, 1000), 20       # 20 bytes: 5 float32 per message
arrays = [np.arange(n, dtype=np.float32) + 0.5 for n in SIZES]
if rank == 0:
    requests = [r for a in arrays for r in P.isend_array(comm, a, 1, MAX_BYTES)]
    MPI.Request.Waitall(requests)
    comm.Send(P.header(), dest=1, tag=P.TAG_REQUEST)     # one message nobody receives
    comm.Barrier()
else:
    received = [np.full(n, np.nan, dtype=np.float32) for n in SIZES]
    requests = [r for a in received for r in P.irecv_array(comm, a, 0, MAX_BYTES)]
    MPI.Request.Waitall(requests)
    comm.Barrier()
    intact = all(np.array_equal(a, b) for a, b in zip(arrays, received))
    leftover, again = P.drain(comm), P.drain(comm)
    print(f"intact={intact} messages={len(requests)} leftover={leftover} again={again}")
    sys.stdout.flush()
comm.Free()
