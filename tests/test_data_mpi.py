"""The data pipeline inside real training runs (mpirun)."""
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import DIGITS, mpirun, read_jsonl, run_command

from mpicnn.checkpoint import files as checkpoint
from mpicnn.config import parse_config

pytestmark = pytest.mark.mpi


def final_params(folder):
    return checkpoint.load(folder / "final.pt")["model"]


def test_parity_and_prefetch_do_not_change_training(tmp_path):
    """n=4 x 8 with augmentation and a reader process == n=1 x 32; prefetch and the splits
    held in device memory (--data-on-device on, here the CPU's) are exact."""
    common = ["--data", DIGITS, "--max-steps", 50, "--augment", "crop,flip", "--progress",
              "off", "--deterministic", "--threads", 1]
    runs = {"one": (1, 32, ["--prefetch", 0]),
            "four_process": (4, 8, ["--prefetch", 3, "--prefetch-mode", "process"]),
            "four_inline": (4, 8, ["--prefetch", 0]),
            "four_held": (4, 8, ["--data-on-device", "on"])}
    for name, (n, batch, extra) in runs.items():
        mpirun(n, common + ["--batch-size", batch, "--checkpoint-dir", tmp_path / name,
                            "--metrics", tmp_path / f"{name}.jsonl"] + extra, timeout=300)
    one, process, inline, held = (final_params(tmp_path / name) for name in runs)
    for key in one:
        assert torch.equal(process[key], inline[key]), key          # same world: bitwise
        assert torch.equal(held[key], inline[key]), key
        assert torch.allclose(one[key], process[key], rtol=1e-4, atol=1e-5), key
    ends = [read_jsonl(tmp_path / f"{name}.jsonl")[-1] for name in runs]
    assert ends[0]["steps"] == ends[1]["steps"] == 50
    assert abs(ends[0]["val_loss"] - ends[1]["val_loss"]) < 1e-3


def test_synth_file_trains_with_cache_and_local_shuffle(tmp_path):
    data = tmp_path / "synth.h5"
    made = run_command([sys.executable, "-m", "mpicnn.data", "synth", str(data), "--n",
                        "4000", "--shape", "3x16x16", "--classes", "4"], timeout=120)
    assert made.returncode == 0, made.stderr
    run = mpirun(2, ["--data", data, "--model", "kerasnet", "--epochs", 3, "--batch-size",
                     32, "--cache", "--shuffle", "local", "--augment", "flip", "--metrics",
                     tmp_path / "m.jsonl", "--progress", "off"], timeout=300)
    assert "cache 1.5 MiB per rank" in run.stdout    # shard 1800 x 768 B, val part 200 x 768 B
    end = read_jsonl(tmp_path / "m.jsonl")[-1]
    assert end["val_acc"] > 0.6, end                    # 4 classes: chance is 0.25


def test_cache_larger_than_the_node_stops_every_rank(tmp_path):
    """A file declaring ~190 GiB of images (sparse: no chunk is written) cannot be cached."""
    path = tmp_path / "huge.h5"
    n = 1_000_000
    with h5py.File(path, "w") as f:
        for name in ("train", "val"):
            f.create_dataset(f"{name}/images", shape=(n, 3, 128, 128), dtype=np.uint8,
                             chunks=(16, 3, 128, 128))
            f.create_dataset(f"{name}/labels", data=np.arange(n) % 10)
    run = mpirun(2, ["--data", path, "--cache", "--model", "kerasnet"], timeout=120,
                 check=False)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("mpicnn: error:")]
    assert len(errors) == 1, run.stderr
    assert "--cache needs" in errors[0] and "--shuffle local" in errors[0]


def test_pipeline_flags_parse():
    """(Their bad values are in test_config's table of rejected settings.)"""
    cfg = parse_config(["--augment", "crop,flip", "--cache", "--prefetch", "4"])
    assert (cfg.data.augment, cfg.data.cache, cfg.data.prefetch) == ("crop,flip", True, 4)
