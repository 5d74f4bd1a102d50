"""The parameter-server wire protocol: message kinds, tags, header layout, chunked payloads.

Every request is a fixed-size int64 header from a worker; PUSH carries a gradient slice
after it. Every reply is a header followed by float payloads (parameters, or optimizer
state for STATE). All messages are buffer-based on the dedicated parameter-server
communicator; messages of one sender and tag never overtake each other, so a payload
always belongs to the header received just before it from the same rank.
"""
from __future__ import annotations

import numpy as np

from ..messages import MAX_MESSAGE_BYTES, chunks

# request kinds (worker -> server), in header[KIND]
PUSH = 1     # a gradient slice follows; reply: parameters (+ next batch when dispatching)
PULL = 2     # reply: parameters; EPOCH >= 0 also asks the dispatcher for a batch
STATE = 3    # reply: optimizer-state slices (for checkpoints)
STATS = 4    # reply: the server's counters and staleness histogram (int64, for metrics)
DONE = 5     # no reply: this worker sends nothing more

TAG_REQUEST, TAG_REPLY, TAG_PAYLOAD = 101, 102, 103

HEADER_LEN = 7
KIND, CLOCK, EPOCH, FIRST, END, BASE, FLAGS = range(HEADER_LEN)    # request fields
VERSION, ITEM, STEP, COUNT, STOP_AT, SKIPPED = range(6)   # reply fields (COUNT: arrays or
# length; SKIPPED: the update the worker's last push went into was dropped as non-finite)
NO_ITEM = -1         # no batch for you: this epoch's batches are all handed out
NONFINITE, STOP = 1, 2    # request flags: the gradient holds NaN/Inf; a stop signal arrived


def header() -> np.ndarray:
    return np.zeros(HEADER_LEN, dtype=np.int64)


def isend_array(comm, array: np.ndarray, dest: int,
                max_bytes: int = MAX_MESSAGE_BYTES) -> list:
    """Start sending a contiguous 1-D array as one or more payload messages."""
    return [comm.Isend(part, dest=dest, tag=TAG_PAYLOAD) for part in chunks(array, max_bytes)]


def irecv_array(comm, array: np.ndarray, source: int,
                max_bytes: int = MAX_MESSAGE_BYTES) -> list:
    """Start receiving into a contiguous 1-D array, chunked exactly as the sender chunks it."""
    return [comm.Irecv(part, source=source, tag=TAG_PAYLOAD) for part in chunks(array, max_bytes)]


def drain(comm) -> int:
    """Receive and count messages still waiting on ``comm`` (0 after a clean shutdown)."""
    from mpi4py import MPI

    status, count = MPI.Status(), 0
    while (message := comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)) is not None:
        message.Recv([bytearray(status.Get_count(MPI.BYTE)), MPI.BYTE])
        count += 1
    return count
