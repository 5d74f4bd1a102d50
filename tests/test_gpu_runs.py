"""Whole runs on a real GPU (marked ``gpu``: they skip without CUDA; ``bench gpu`` runs them).

Two ranks sharing one GPU through the staged path in each precision and memory format,
with SyncBatchNorm; a checkpoint written on the GPU resumed on the CPU and back; ps-sync
with GPU workers. The CPU tests prove these paths equal; here they must run on a GPU.
"""
from __future__ import annotations

import math

import pytest
from conftest import DIGITS, final, mpirun, records, train

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

COMMON = ["--data", DIGITS, "--model", "fashionnet", "--batch-size", 32, "--seed", 1]


@pytest.mark.parametrize("flags", [["--amp", "bf16", "--channels-last"],
                                   ["--amp", "fp16", "--sync-bn", "--clip-grad-norm", 1.0],
                                   ["--amp", "off", "--bucket-mb", 0]])
def test_two_ranks_share_one_gpu_and_train(tmp_path, flags):
    out, end = train(tmp_path, "run", 2, *COMMON, "--device", "cuda", "--epochs", 2, *flags)
    assert end["event"] == "end" and end["world_size"] == 2 and end["val_acc"] > 0.5, end
    assert all(math.isfinite(r["train_loss"]) for r in records(out, "epoch"))


def test_a_gpu_checkpoint_resumes_on_the_cpu_and_back(tmp_path):
    out = tmp_path / "run"
    legs = [("cuda", 1), ("cpu", 2), ("cuda", 3)]
    for device, stop in legs:
        mpirun(2, [*COMMON, "--device", device, "--epochs", 3, "--stop-epoch", stop,
                   "--checkpoint-dir", out, "--metrics", out / "m.jsonl", "--resume", "auto",
                   "--progress", "off"], check=False, timeout=300)
        epochs = [r["epoch"] for r in records(out, "epoch")]
        assert epochs == list(range(1, stop + 1)), (device, epochs)
    state = final(out)
    assert all(t.device.type == "cpu" for t in state["model"].values())   # loads anywhere


def test_ps_sync_with_gpu_workers_and_cpu_servers():
    run = mpirun(3, [*COMMON, "--device", "cuda", "--mode", "ps-sync", "--servers", 1,
                     "--epochs", 1, "--progress", "off"], timeout=300)
    log = run.stdout + run.stderr
    assert "devices cpu, cuda:0" in log and "mpicnn: done:" in log


def test_the_split_held_on_the_gpu_trains_bitwise_as_streamed(tmp_path):
    """--data-on-device on (uint8 in GPU memory, crop and flip there) and off (pinned
    batches streamed) give the same parameters bit for bit, deterministic kernels on."""
    import torch
    from conftest import trained_params

    args = [*COMMON, "--device", "cuda", "--max-steps", 30, "--epochs", 1, "--augment",
            "crop,flip", "--deterministic", "--progress", "off"]
    held_run, held, _ = trained_params(tmp_path, "held", 2, [*args, "--data-on-device", "on"])
    _, streamed, _ = trained_params(tmp_path, "streamed", 2, [*args, "--data-on-device",
                                                              "off"])
    assert "held on cuda" in held_run.stdout + held_run.stderr
    assert all(torch.equal(held[k], streamed[k]) for k in held)


def test_compiled_with_cuda_graphs_trains_like_eager(tmp_path):
    """--compile reduce-overhead (CUDA graphs) at 2 ranks against eager, TF32 off."""
    from conftest import job_env, param_difference, trained_params

    args = [*COMMON, "--device", "cuda", "--max-steps", 30, "--epochs", 1, "--optimizer",
            "sgd", "--lr", 0.05, "--progress", "off"]
    env = job_env({"NVIDIA_TF32_OVERRIDE": "0"})
    run, compiled, records_ = trained_params(tmp_path, "graphs", 2,
                                             [*args, "--compile", "reduce-overhead"], env=env)
    assert "steps replayed as CUDA graphs" in run.stdout + run.stderr
    _, eager, _ = trained_params(tmp_path, "eager", 2, args, env=env)
    assert param_difference(compiled, eager) < 1e-3
    assert records_[-1]["val_acc"] > 0.5
