"""Bounded memory: writing and reading files far larger than the pipeline's footprint."""
import json
import os
import sys

import pytest
from conftest import run_command

MIB = 2 ** 20
BIG_N = 100_000          # 3x32x32 uint8: about 300 MiB, 15x the loader's footprint
SLACK = 48 * MIB         # HDF5's chunk cache (16 MiB), allocator pools, torch scratch

PROBE = r"""
import json, os, sys
import torch
from mpicnn.data.loader import Loader
from mpicnn.data.schema import open_dataset

def rss(pid="self"):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

path, mode, cache = sys.argv[1], sys.argv[2], sys.argv[3] == "cache"
torch.set_num_threads(1)
data = open_dataset(path)
loader = Loader(data, data.train, torch.device("cpu"), 64, world=4 if cache else 1, rank=0,
                shuffle="local" if cache else "global", prefetch=3, prefetch_mode=mode,
                cache=cache)
batches = loader.epoch(0)
before = rss()
next(batches)                                  # threads, pools and buffers exist now
source = loader.sources["epoch"]
child = getattr(source, "proc", None)
base, child_base = rss(), rss(child.pid) if child else 0
peak, child_peak, steps = base, child_base, 1
for _ in batches:
    steps += 1
    peak = max(peak, rss())
    if child:
        child_peak = max(child_peak, rss(child.pid))
print(json.dumps({"growth": peak - base, "child_growth": child_peak - child_base,
                  "growth_from_start": peak - before,
                  "footprint": loader.footprint("epoch"), "steps": steps,
                  "cached": loader.cache_bytes("epoch"),
                  "read": steps * 64 * loader.sample_bytes}))
loader.close()
"""


def peak_rss_of(cmd, tmp_path):
    """Run ``cmd`` under a tiny wrapper that reports its children's peak RSS in bytes."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    run = run_command([sys.executable, "-c", wrapper, *cmd], timeout=300)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A ~300 MiB synthetic file, written by the tool; its writer's memory must not grow."""
    folder = tmp_path_factory.mktemp("big")
    synth = [sys.executable, "-m", "mpicnn.data", "synth", "--shape", "3x32x32"]
    small = peak_rss_of(synth + [str(folder / "small.h5"), "--n", str(BIG_N // 10)], folder)
    large = peak_rss_of(synth + [str(folder / "big.h5"), "--n", str(BIG_N)], folder)
    size = os.path.getsize(folder / "big.h5")
    assert size > 290 * MIB
    # ten times the samples, (almost) the same peak memory: synth writes block by block
    assert large - small < 0.1 * size, (small, large)
    return folder / "big.h5"


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_reading_an_epoch_stays_within_the_footprint(big_file, mode):
    run = run_command([sys.executable, "-c", PROBE, str(big_file), mode, "nocache"],
                      timeout=400)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["read"] > 250 * MIB                  # a whole epoch went through
    bound = result["footprint"] + SLACK
    assert result["footprint"] < 32 * MIB
    assert result["growth"] < bound, result
    assert result["child_growth"] < bound, result


def test_cache_holds_the_shard_in_memory(big_file):
    """The same probe sees the cache grow: the measurement is not blind."""
    run = run_command([sys.executable, "-c", PROBE, str(big_file), "thread", "cache"],
                      timeout=400)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["cached"] > 60 * MIB
    assert result["growth_from_start"] > 0.8 * result["cached"], result
