"""Activations forward and their gradients back between neighbouring stages.

Buffer-based nonblocking point-to-point on the pipeline's own communicator: every
receive lands in a host buffer preallocated once for the agreed per-sample shape (two
per direction, so the next receive is posted while the current one is used); sends
are ``Isend`` of contiguous host tensors, kept alive until they complete. One tag per
direction: messages from one sender on one tag arrive in the order they were sent, and
both schedules use micro-batches in increasing order in each direction.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext

import torch

FORWARD, BACKWARD, EVAL = 11, 12, 13
SLOTS = 2


class Transport:
    """Point-to-point of one stage with the stages before (``prev``) and after (``next``)."""

    def __init__(self, comm, stage: int, stages: int, in_shape, out_shape, rows: int,
                 eval_rows: int, dtype, device, waiting=nullcontext):
        self.comm, self.device = comm, device
        self.waiting = waiting             # marks each wait for the stall watch
        self.prev = stage - 1 if stage > 0 else None
        self.next = stage + 1 if stage < stages - 1 else None
        self.buffers, self.expected, self.posted, self.turn = {}, {}, {}, {}
        if self.prev is not None:
            self.buffers[FORWARD] = [torch.empty(rows, *in_shape, dtype=dtype)
                                     for _ in range(SLOTS)]
            self.buffers[EVAL] = [torch.empty(eval_rows, *in_shape, dtype=dtype)]
        if self.next is not None:
            self.buffers[BACKWARD] = [torch.empty(rows, *out_shape, dtype=dtype)
                                      for _ in range(SLOTS)]
        for tag in self.buffers:
            self.expected[tag], self.posted[tag], self.turn[tag] = deque(), deque(), 0
        self.sends = []                    # (request, tensor kept alive until it is sent)
        self.wait_seconds = 0.0

    def source(self, tag: int) -> int:
        return self.prev if tag in (FORWARD, EVAL) else self.next

    def expect(self, tag: int, rows: list[int]) -> None:
        """Announce the sizes of the next messages on ``tag``; post the first receives."""
        self.expected[tag].extend(rows)
        self._post(tag)

    def _post(self, tag: int) -> None:
        slots = self.buffers[tag]
        while self.expected[tag] and len(self.posted[tag]) < len(slots):
            rows = self.expected[tag].popleft()
            if rows > len(slots[0]):            # the agreed sizes bound every message
                raise RuntimeError(f"pipeline: a message of {rows} rows exceeds the "
                                   f"{len(slots[0])}-row receive buffer of tag {tag}")
            view = slots[self.turn[tag]][:rows]
            self.turn[tag] = (self.turn[tag] + 1) % len(slots)
            request = self.comm.Irecv(view, source=self.source(tag), tag=tag)
            self.posted[tag].append((request, view))

    def take(self, tag: int) -> torch.Tensor:
        """The next message on ``tag`` as a tensor of its own on the device (waits for it)."""
        request, view = self.posted[tag].popleft()
        start = time.perf_counter()
        with self.waiting():
            request.Wait()
        self.wait_seconds += time.perf_counter() - start
        tensor = view.to(self.device, copy=True)
        self._post(tag)                    # the slot is free again
        return tensor

    def receive(self, tag: int, rows: int) -> torch.Tensor:
        """Post and take one message of ``rows`` rows (evaluation: sizes come one by one)."""
        self.expect(tag, [rows])
        return self.take(tag)

    def send(self, tensor: torch.Tensor, tag: int) -> None:
        """Start sending ``tensor`` to the neighbour this tag goes to."""
        host = tensor.detach().to("cpu").contiguous()
        if tensor.device.type == "cuda":
            torch.cuda.current_stream(tensor.device).synchronize()
        dest = self.next if tag in (FORWARD, EVAL) else self.prev
        self.sends.append((self.comm.Isend(host, dest=dest, tag=tag), host))
        self.progress()

    def progress(self) -> None:
        """Let MPI move messages along; drop the sends that completed."""
        from mpi4py import MPI

        if self.sends and MPI.Request.Testall([r for r, _ in self.sends]):
            self.sends = []

    def flush(self) -> None:
        """Wait for every send still in flight."""
        from mpi4py import MPI

        start = time.perf_counter()
        with self.waiting():
            MPI.Request.Waitall([r for r, _ in self.sends])
        self.wait_seconds += time.perf_counter() - start
        self.sends = []

    @property
    def idle(self) -> bool:
        return not self.sends and not any(self.posted.values())
