"""The CUDA-support probe: one answer for one MPI library, in a test process or in a job."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpicnn.sync.allreduce.transport import probe_cuda_support

PROBE_CHECK = Path(__file__).resolve().parent / "probe_check.py"


class _Library:
    """A stand-in libmpi with the given query functions (ctypes-callable)."""

    def __init__(self, **queries):
        self.__dict__.update(queries)


def test_a_library_known_only_by_its_alloc_kinds_answers_through_them():
    assert probe_cuda_support(_Library(), "mpi,system,cuda:device,cuda:host") == \
        (True, "mpi_memory_alloc_kinds lists cuda:device,cuda:host")
    supported, how = probe_cuda_support(_Library(), "mpi,system")
    assert supported is None and "mpi,system" in how          # unlisted may still be asked for
    assert probe_cuda_support(_Library(), None)[0] is None
    # the library's own query outranks the kinds it lists
    no = _Library(MPIX_Query_cuda_support=lambda: 0)
    assert probe_cuda_support(no, "cuda:device") == (False, "MPIX_Query_cuda_support() = 0")


@pytest.mark.mpi
def test_the_probe_answers_alike_in_this_process_and_in_every_rank_of_a_job():
    """pytest's process was not started by mpirun: it must still ask the loaded library."""
    from conftest import mpirun

    pytest.importorskip("mpi4py")
    here = probe_cuda_support()
    assert "could not be asked" not in here[1], here              # the library was reached
    assert here[0] is not None or "no CUDA-support query" in here[1]
    run = mpirun(2, [], script=PROBE_CHECK, timeout=120)
    answers = json.loads(run.stdout.strip().splitlines()[-1])
    assert answers == [list(here)] * 2, (here, run.stdout[-2000:])
