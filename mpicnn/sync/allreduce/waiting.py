"""How the reductions wait for MPI (``--comm-wait``): spinning inside MPI, or testing and
sleeping.

A blocking MPI call spins: the library polls its network and shared-memory queues until
the operation completes, and the calling thread keeps a core busy all along. Where backward
needs every core (CPU training: torch's threads fill the cores, or ranks outnumber them),
those cycles are taken from backward, and the reduction meant to hide behind it slows it
instead. ``Yielding`` starts the nonblocking form of each operation and tests it every
``PAUSE_S``, sleeping in between: the core goes to backward, and every test still moves the
transfer on (the kernel's socket buffers carry the bytes between tests). ``Spinning`` keeps
the blocking calls: the lowest latency where a core is free, as beside a GPU.
"""
from __future__ import annotations

import time

PAUSE_S = 0.0002        # 8 MB at 1 Gbit/s takes 64 ms: some 300 tests


def _reduce_buffers(buf, root: bool) -> tuple:
    """(send, receive) of a Reduce to rank 0 that sums into ``buf`` in place at the root."""
    from mpi4py import MPI

    return (MPI.IN_PLACE, buf) if root else (buf, None)


class Spinning:
    """MPI's blocking calls."""

    name = "spin"
    describe = "waits spin in MPI"

    def allreduce(self, comm, buf, op) -> None:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, buf, op=op)

    def reduce(self, comm, buf, op, root: bool) -> None:
        comm.Reduce(*_reduce_buffers(buf, root), op=op, root=0)

    def bcast(self, comm, buf) -> None:
        comm.Bcast(buf, root=0)

    def barrier(self, comm) -> None:
        comm.Barrier()

    def sendrecv(self, comm, send, dest: int, receive, source: int, tag: int) -> None:
        comm.Sendrecv(send, dest=dest, sendtag=tag, recvbuf=receive, source=source, recvtag=tag)


class Yielding(Spinning):
    """The nonblocking forms, tested every ``PAUSE_S`` with the thread asleep in between."""

    name = "yield"
    describe = "waits test and sleep (the core goes to backward)"

    def allreduce(self, comm, buf, op) -> None:
        from mpi4py import MPI

        settle([comm.Iallreduce(MPI.IN_PLACE, buf, op=op)])

    def reduce(self, comm, buf, op, root: bool) -> None:
        settle([comm.Ireduce(*_reduce_buffers(buf, root), op=op, root=0)])

    def bcast(self, comm, buf) -> None:
        settle([comm.Ibcast(buf, root=0)])

    def barrier(self, comm) -> None:
        settle([comm.Ibarrier()])

    def sendrecv(self, comm, send, dest: int, receive, source: int, tag: int) -> None:
        settle([comm.Irecv(receive, source=source, tag=tag), comm.Isend(send, dest=dest, tag=tag)])


def settle(requests) -> None:
    """Wait for every request in ``requests``, sleeping ``PAUSE_S`` between tests."""
    from mpi4py import MPI

    while not MPI.Request.Testall(requests):
        time.sleep(PAUSE_S)


WAITS = {"spin": Spinning, "yield": Yielding}


def choose_wait(setting: str, device_type: str):
    """The wait for ``--comm-wait setting``; ``auto`` yields on CPU, spins beside a GPU."""
    if setting == "auto":
        setting = "yield" if device_type == "cpu" else "spin"
    return WAITS[setting]()
