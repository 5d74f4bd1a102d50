"""Gradient precision on the wire, and where the average's division by the rank count happens.

* ``none``: a bucket travels in its own dtype and is divided once, after the sum
  (post-divide): the same arithmetic as the plain path, so results are bitwise
  equal wherever MPI sums in the same order (always at 2 ranks).
* ``fp16`` / ``bf16``: the bucket is divided by the rank count while it is cast
  (pre-divide, so a sum over many ranks cannot overflow fp16's 65504) and the
  2-byte values are summed by a user-defined MPI operation that adds them in
  their own precision, on any MPI (MPI has no standard half-precision type). The
  wire carries half the bytes; each element's relative error stays within about
  ``ranks x 2**-11`` (fp16) or ``ranks x 2**-8`` (bf16) of the largest summand,
  plus fp16's underflow of 6e-8.
"""
from __future__ import annotations

import torch

from .scratch import reusable

WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def sum_into(dtype: torch.dtype):
    """The body of a user-defined MPI sum over buffers of 2-byte ``dtype`` values."""
    def op(inbuf, inoutbuf, _datatype):
        torch.frombuffer(inoutbuf, dtype=dtype).add_(torch.frombuffer(inbuf, dtype=dtype))
    return op


class Codec:
    """Casts buckets for the wire and back, and divides them by the rank count once."""

    def __init__(self, name: str, ranks: int):
        self.name, self.ranks = name, ranks
        self.wire_dtype = WIRE_DTYPES[name]
        self._wires, self._ops = {}, {}

    def encode(self, key, flat: torch.Tensor) -> torch.Tensor:
        """The buffer to reduce for bucket ``key`` (``flat`` itself when not compressing)."""
        if self.wire_dtype is None or flat.dtype == self.wire_dtype:
            return flat
        wire = reusable(self._wires, key, flat.numel(), self.wire_dtype, flat.device)
        torch.div(flat, self.ranks, out=wire)
        return wire

    def decode(self, wire: torch.Tensor, flat: torch.Tensor) -> None:
        """Turn the reduced ``wire`` into the average in ``flat``."""
        if wire is flat:
            flat.div_(self.ranks)
        else:
            flat.copy_(wire)

    def mpi_spec(self, dtype: torch.dtype):
        """(MPI datatype, MPI op) that sum a buffer of ``dtype``."""
        from mpi4py import MPI

        if dtype == torch.float32:
            return MPI.FLOAT, MPI.SUM
        if dtype == torch.float64:
            return MPI.DOUBLE, MPI.SUM
        if dtype in HALF_DTYPES:
            if dtype not in self._ops:
                self._ops[dtype] = MPI.Op.Create(sum_into(dtype), commute=True)
            return MPI.UINT16_T, self._ops[dtype]
        raise TypeError(f"cannot reduce gradients of dtype {dtype}")

    def close(self) -> None:
        for op in self._ops.values():
            op.Free()
        self._ops, self._wires = {}, {}
