"""CUDA buffers handed straight to a CUDA-aware MPI: the same training as the staged path,
and never read before the kernels writing them have finished.

GPU tests (marked ``gpu``) skip without CUDA; those that hand device pointers to MPI also
skip unless the MPI library says it is CUDA-aware (``jobs/gpu/build_cuda_mpi.sh`` builds
one, ``source jobs/gpu/cuda_mpi_env.sh`` puts it on the paths). The stream-check script's
host-buffer path runs everywhere, and the MPI that script built is checked wherever it
lies in ``build/cuda-mpi``.

Where the CUDA-aware path applies: the flat Allreduce, the hierarchical collective
(Reduce, Allreduce across node leaders, Bcast) and mpicnn's ring across 3 or more nodes
all take whatever buffer the transport gives them, device memory included. The
shared-memory windows do not: ``MPI_Win_allocate_shared`` returns host memory, which the
backward kernels cannot write gradients into, so ``_make_reducer`` chooses them for CPU
ranks only and GPU ranks on one node take the flat (or hierarchical) path. Neither does a
2-byte wire (``--compression``): its sum is mpicnn's Python operation, which MPI would
call on device pointers, so such runs stage whatever ``--cuda-aware`` says.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import DIGITS, ROOT, mpirun, param_difference, run_command, trained_params

from mpicnn.sync.allreduce.transport import probe_cuda_support

STREAM_CHECK = Path(__file__).resolve().parent / "cuda_stream_check.py"
BUILT = ROOT / "build" / "cuda-mpi"          # jobs/gpu/build_cuda_mpi.sh's default prefix
ALLREDUCE = ("from mpi4py import MPI; import numpy as n; c = MPI.COMM_WORLD; "
             "b = n.full(1 << 20, c.rank + 1.0); c.Allreduce(MPI.IN_PLACE, b); "
             "c.rank or print('allreduce', b.min(), b.max(), MPI.Get_library_version()[:20])")
DIRECT = "CUDA buffers to MPI directly"
STAGED = "CUDA buffers staged through pinned host memory"
# fp32 arithmetic on every rank (Hopper convolves in TF32 by default) and deterministic
# kernels: what differs between the two runs is only how the buckets reach MPI
COMMON = ["--data", DIGITS, "--model", "fashionnet", "--batch-size", 32, "--seed", 1,
          "--device", "cuda", "--epochs", 1, "--max-steps", 12, "--optimizer", "sgd",
          "--lr", 0.05, "--deterministic", "--progress", "off"]
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}
EXACT = 1e-6
# name: (ranks, flags, environment, what the --cuda-aware on run's log must say)
CASES = {
    "fp32": (2, [], {}, DIRECT),
    "amp-bf16-channels-last": (2, ["--amp", "bf16", "--channels-last"], {}, DIRECT),
    # a 2-byte wire is staged in both runs: the same arithmetic, well inside fp16's bound
    "compression-fp16": (2, ["--compression", "fp16"], {},
                         "2-byte floats are summed by a host-side MPI operation"),
    # two emulated nodes of two ranks: Reduce, leaders' Allreduce and Bcast on device memory
    "hierarchical": (4, ["--hierarchical"], {"MPICNN_RANKS_PER_NODE": "2"},
                     "hierarchical (2 node(s)"),
    # three emulated nodes: resnet18's buckets (over 1 MB) go around mpicnn's ring
    "ring": (3, ["--model", "resnet18", "--cross-node", "ring"],
             {"MPICNN_RANKS_PER_NODE": "1"}, "flat ring"),
}


def stream_check(n: int, paths: list[str], device: str) -> dict:
    """Run cuda_stream_check.py on n ranks; {path: [min, max, expected]}."""
    run = mpirun(n, [*paths, "--device", device], script=STREAM_CHECK, timeout=180)
    return json.loads(run.stdout.strip().splitlines()[-1])


def require_cuda_aware_mpi() -> str:
    """Skip unless the MPI library says it takes CUDA buffers; its answer otherwise."""
    supported, how = probe_cuda_support()
    if not supported:
        pytest.skip(f"needs a CUDA-aware MPI ({how}): build one with "
                    f"jobs/gpu/build_cuda_mpi.sh, then source jobs/gpu/cuda_mpi_env.sh")
    return how


@pytest.mark.mpi
def test_the_built_mpi_takes_the_mpi4py_wheel_and_was_built_with_cuda():
    """build/cuda-mpi, relocated through cuda_mpi_env.sh: mpi4py runs on it, and the probe
    gives one answer in and out of mpirun (yes only where the CUDA driver loads)."""
    if not (BUILT / "bin" / "mpirun").exists():
        pytest.skip(f"no CUDA-aware MPI built at {BUILT} (jobs/gpu/build_cuda_mpi.sh)")
    script = ("source jobs/gpu/cuda_mpi_env.sh && bash jobs/gpu/check_cuda_mpi.sh && "
              f"mpirun -n 2 --oversubscribe {sys.executable} -c \"{ALLREDUCE}\"")
    run = run_command(["bash", "-c", script], timeout=240, env={"PYTHON": sys.executable},
                      check=True)
    assert "Open MPI built with CUDA support: true" in run.stdout, run.stdout
    assert "allreduce 3.0 3.0 Open MPI v5.0.7" in run.stdout, run.stdout
    if "accelerator plug-ins found: cuda" in run.stdout:     # a CUDA driver was loaded
        assert "CUDA-aware: yes" in run.stdout, run.stdout


@pytest.mark.mpi
def test_the_stream_check_averages_host_buckets_through_the_reducer():
    """The script's hand-over on the CPU: no streams to wait for, the same Reducer."""
    found = stream_check(2, ["direct", "staged"], "cpu")
    assert found == {"direct": [1.5, 1.5, 1.5], "staged": [1.5, 1.5, 1.5]}


@pytest.mark.gpu
@pytest.mark.mpi
def test_gpu_staged_buckets_are_copied_out_only_after_the_kernels_writing_them():
    found = stream_check(2, ["staged"], "cuda")
    assert found["staged"] == [1.5, 1.5, 1.5], found


@pytest.mark.gpu
@pytest.mark.mpi
def test_gpu_cuda_aware_mpi_reads_a_bucket_only_after_the_kernels_writing_it():
    require_cuda_aware_mpi()
    found = stream_check(2, ["direct", "control"], "cuda")
    assert found["direct"] == [1.5, 1.5, 1.5], found
    # handed over with no wait, MPI read the bucket before the delayed write: the check
    # above would see a reducer that forgot to wait
    low, high, expected = found["control"]
    assert not low == high == expected, found


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_cuda_aware_training_reaches_the_staged_parameters(tmp_path, case):
    how = require_cuda_aware_mpi()
    ranks, flags, env, said = CASES[case]
    env = {**NO_TF32, **env}
    aware, direct, _ = trained_params(tmp_path, "on", ranks, [*COMMON, *flags, "--cuda-aware",
                                                              "on"], env)
    staged, host, _ = trained_params(tmp_path, "off", ranks, [*COMMON, *flags, "--cuda-aware",
                                                              "off"], env)
    assert said in aware.stdout, (how, aware.stdout[-2000:])
    assert STAGED in staged.stdout, staged.stdout[-2000:]
    assert param_difference(direct, host) <= EXACT
