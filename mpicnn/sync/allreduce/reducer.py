"""Average one flat buffer over all ranks: encode, hand to MPI, sum, decode."""
from __future__ import annotations

from functools import partial

import torch

from .transport import mpi_buffer


class Reducer:
    """The whole journey of one bucket; safe to call from the communication thread.

    On CUDA it works on its own stream, which first waits for the event recorded
    where the gradients were produced; it returns an event that the consumer's
    stream waits on before using the averaged values.
    """

    def __init__(self, collective, codec, device: torch.device, aware: bool = False):
        from .transport import make_buffers

        self.collective, self.codec, self.device = collective, codec, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.buffers = make_buffers(aware, device, self.stream)

    def ready_event(self):
        """Mark, on the producing thread's current stream, that a bucket's gradients are written."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def __call__(self, key, flat: torch.Tensor, ready=None):
        """Replace ``flat`` by its average over ranks; returns a CUDA event or None."""
        return self.run(partial(self._reduce, key, flat), ready)

    def run(self, work, ready=None):
        """Run ``work()`` where reductions run: on CUDA, on this reducer's stream after
        ``ready``; returns the event that marks its end there (None on CPU)."""
        if self.stream is None:
            work()
            return None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            work()
            done = torch.cuda.Event()
            done.record(self.stream)
            return done

    def _reduce(self, key, flat: torch.Tensor) -> None:
        if self.collective.averages(flat):
            self.collective.average(flat, self.codec)
            return
        wire = self.codec.encode(key, flat)
        self.sum(key, wire)
        self.codec.decode(wire, flat)

    def sum(self, key, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over ranks in place, in its own dtype, through the collective."""
        buf = self.buffers.to_mpi(key, tensor)
        datatype, op = self.codec.mpi_spec(buf.dtype)
        self.collective(buf, datatype, op, mpi_buffer)
        self.buffers.from_mpi(buf, tensor)

    @staticmethod
    def consume(done) -> None:
        """Make the current stream wait for a reduction's result (no-op on CPU)."""
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
