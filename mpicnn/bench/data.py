"""``python -m mpicnn.bench data``: loader throughput and data wait on a large HDF5 file.

1. writes a synthetic 3x32x32 file of ``--size-gb`` under ``--dir`` (deleted at the end);
2. reads the same number of samples in one process: a raw contiguous h5py read
   (16 MiB slices); the loader as rank 0 of ``--ranks``, as host uint8 batches (inline,
   prefetch thread, prefetch process) and as normalised float batches; and an
   in-memory uint8 tensor indexed with the same kind of plan; the OS page cache of the
   file is dropped before each disk read (posix_fadvise);
3. trains seednet with ``mpirun -n --ranks`` from the file for ``--train-steps`` steps
   per prefetch setting and reports the data-wait share of the step time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import launch

SAMPLE_SHAPE = (3, 32, 32)
SAMPLE_BYTES = int(np.prod(SAMPLE_SHAPE))
RAW_SLICE_BYTES = 16 << 20
MEMORY_SAMPLES = 100_000        # the in-memory baseline holds this many samples


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0, help="file size (default 2 GB)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the file is written")
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch (64)")
    p.add_argument("--ranks", type=int, default=2, help="ranks sharing each global batch (2)")
    p.add_argument("--samples", type=int, default=0,
                   help="samples read per measurement (0: this rank's share of one epoch)")
    p.add_argument("--train-steps", type=int, default=200, help="training steps per run")
    p.add_argument("--prefetch", type=int, default=4, help="prefetch depth (4)")
    p.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none",
                   help="compress the synthetic file (decompression load on the reader)")
    p.add_argument("--keep", action="store_true", help="keep the file")
    p.add_argument("--file", default="", help="use this 3x32x32 file instead of writing one")
    p.add_argument("--skip-train", action="store_true", help="only the read measurements")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def drop_page_cache(path) -> bool:
    """Evict the file from the OS page cache so the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def raw_read(path, samples: int) -> float:
    """Samples/s of contiguous h5py reads of the first ``samples`` train rows."""
    import h5py

    step = RAW_SLICE_BYTES // SAMPLE_BYTES
    with h5py.File(path, "r", locking=False) as f:
        images = f["train/images"]
        start = time.perf_counter()
        for a in range(0, samples, step):
            images[a: min(samples, a + step)]
        return samples / (time.perf_counter() - start)


def loader_read(path, args, samples: int, normalise: bool, **options) -> float:
    """Samples/s of rank 0's batches: host uint8 tensors, or normalised float tensors."""
    import torch

    from mpicnn.data.loader import Loader
    from mpicnn.data.schema import open_dataset

    data = open_dataset(str(path))
    loader = Loader(data, data.train, torch.device("cpu"), args.batch_size, args.ranks, 0,
                    **options)
    plan = loader.plan(0)[: -(-samples // args.batch_size)]
    loader.source("epoch")                    # a reader process starts outside the timing
    done, start = 0, time.perf_counter()
    batches = (x for x, _ in loader.epoch(0)) if normalise else \
        loader.source("epoch").map(list(plan))
    for x in batches:
        done += len(x)
        if done >= samples:
            break
    seconds = time.perf_counter() - start
    loader.close()
    data.close()
    return done / seconds


def memory_read(path, args, samples: int, normalise: bool) -> float:
    """Samples/s of the same kind of plan, indexing a uint8 tensor held in memory."""
    import h5py
    import torch

    from mpicnn.data import shard
    from mpicnn.data.loader import Normalizer

    with h5py.File(path, "r", locking=False) as f:
        held = torch.from_numpy(f["train/images"][:MEMORY_SAMPLES])
        mean, std = f.attrs["mean"], f.attrs["std"]
    normalize = Normalizer(mean, std, torch.device("cpu")) if normalise else (lambda x: x)
    plan = shard.rank_batches(len(held), args.batch_size, args.ranks, 0, 0, 0)
    done, start = 0, time.perf_counter()
    while done < samples:
        for rows in plan:
            normalize(held[torch.from_numpy(rows)])
            done += len(rows)
            if done >= samples:
                break
    return done / (time.perf_counter() - start)


def train_run(path, args, folder: Path, name: str, extra: list) -> dict:
    """Train seednet from the file; mean per-step milliseconds of each phase."""
    train = ["--data", path, "--model", "seednet", "--batch-size", args.batch_size,
             "--max-steps", args.train_steps, "--epochs", 1, "--progress", "off", *extra]
    epoch = launch.train(args.ranks, train, folder / f"{name}.jsonl").epochs[-1]
    from mpicnn.observe.steps import PHASES

    phases = {name: epoch[f"{name}_ms"] for name in PHASES if f"{name}_ms" in epoch}
    step = sum(phases.values())
    return {"step_ms": round(step, 2), "data_ms": phases["data"],
            "data_share": round(phases["data"] / step, 4), "phases_ms": phases,
            "images_per_s": round(epoch["images_per_s"], 1)}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    # as one of --ranks ranks on this node would (see world.cpu_threads_per_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    folder = Path(tempfile.mkdtemp(prefix="mpicnn-bench-data-", dir=args.dir))
    path = Path(args.file) if args.file else folder / "synth.h5"
    results = {"size_gb": args.size_gb, "batch_size": args.batch_size, "ranks": args.ranks,
               "compression": args.compression, "cpus": os.cpu_count()}
    try:
        if not args.file:
            from mpicnn.data.synth import write_synth

            n = int(args.size_gb * 1e9 / SAMPLE_BYTES)
            start = time.perf_counter()
            write_synth(str(path), n, SAMPLE_SHAPE, 10, val_fraction=0.01,
                        compression=args.compression)
            results["synth_s"] = round(time.perf_counter() - start, 1)
        results["file_bytes"] = os.path.getsize(path)
        import h5py

        with h5py.File(path, "r") as f:
            n_train = len(f["train/labels"])
        samples = args.samples or n_train // args.ranks
        results["samples_per_measurement"] = samples
        reads = {}
        results["page_cache_dropped"] = drop_page_cache(path)
        reads["raw_h5py_contiguous"] = raw_read(path, samples)
        for name, normalise, options in [
                ("loader_uint8_inline", False, dict(prefetch=0)),
                ("loader_uint8_thread", False, dict(prefetch=args.prefetch)),
                ("loader_uint8_process", False, dict(prefetch=args.prefetch,
                                                     prefetch_mode="process")),
                ("loader_normalised_thread", True, dict(prefetch=args.prefetch))]:
            drop_page_cache(path)
            reads[name] = loader_read(path, args, samples, normalise, **options)
        reads["in_memory_uint8"] = memory_read(path, args, samples, False)
        reads["in_memory_normalised"] = memory_read(path, args, samples, True)
        raw = reads["raw_h5py_contiguous"]
        results["vs_raw"] = {k: round(v / raw, 3) for k, v in reads.items()}
        print(f"read {samples} samples of 3x32x32 as rank 0 of {args.ranks} "
              f"(file {results['file_bytes'] / 1e9:.2f} GB, page cache dropped: "
              f"{results['page_cache_dropped']}):")
        for name, value in reads.items():
            print(f"  {name:26s} {value:10.0f} samples/s  {value * SAMPLE_BYTES / 1e6:8.1f} "
                  f"MB/s  ({value / raw:.2f}x raw)")
        if not args.skip_train:
            runs = {}
            for name, extra in [("no_prefetch", ["--prefetch", "0"]),
                                ("thread", ["--prefetch", str(args.prefetch)]),
                                ("process", ["--prefetch", str(args.prefetch),
                                             "--prefetch-mode", "process"])]:
                drop_page_cache(path)
                runs[name] = train_run(path, args, folder, name, extra)
                r = runs[name]
                print(f"train seednet, {args.ranks} ranks, prefetch {name:11s}: step "
                      f"{r['step_ms']:7.1f} ms, data wait {r['data_ms']:6.2f} ms = "
                      f"{100 * r['data_share']:5.2f} % of the step")
            results["training"] = runs
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"kept {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
