"""``inspect``: validate a file as training would, describe it, and warn about slow layouts."""
from __future__ import annotations

import os

import numpy as np

from .chunks import block_rows, chunk_rows, row_bytes, unit_rows
from .layout import to_nchw
from .schema import Dataset, Split, label_warning, open_dataset
from .stats import ChannelStats

SMALL_CHUNK = 64 << 10          # below this, per-read overhead dominates
LARGE_CHUNK = 16 << 20          # above this, every unit read holds this much per rank
HEAVY_GZIP = 4                  # gzip levels above this cost much CPU for little gain
RUNS_FACTOR = 3                 # neighbours sharing labels this much above chance: sorted


def describe(data: Dataset) -> tuple[list[str], list[str]]:
    """(lines describing the file, warnings with a suggestion each)."""
    lines = [f"{data.path}: {os.path.getsize(data.path) / 2**20:.1f} MiB, layout "
             f"{data.layout}, samples {data.input_shape} (C, H, W), {data.num_classes} "
             f"classes{': ' + ', '.join(data.classes) if 0 < len(data.classes) <= 20 else ''}"]
    warnings = []
    if data.stats_in_file:
        lines.append(f"mean {rounded(data.mean)}, std {rounded(data.std)} (file attributes)")
    else:
        lines.append(f"no mean/std attributes: training uses mean {data.mean.tolist()}, "
                     f"std {data.std.tolist()}")
        warnings.append(f"no per-channel mean/std in the file; compute them with "
                        f"`python -m mpicnn.data inspect {data.path} --write-stats`")
    if label_warning(data):
        warnings.append(label_warning(data))
    for split in (data.train, data.val):
        split_lines, split_warnings = describe_split(data, split)
        lines += split_lines
        warnings += split_warnings
    return lines, warnings


def rounded(values) -> list:
    return [round(float(v), 3) for v in values]


def describe_split(data: Dataset, split: Split) -> tuple[list[str], list[str]]:
    images = split.images
    sample_bytes = row_bytes(images)
    rows = f"rows {split.start}..{split.start + len(split) - 1} of " if split.start or \
        len(split) != len(images) else ""
    lines = [f"/{split.name}: {len(split)} samples ({rows}{images.name} {images.shape} "
             f"{images.dtype}), {len(split) * sample_bytes / 2**20:.1f} MiB"]
    warnings = []
    fix = f"`python -m mpicnn.data convert {data.path} FIXED.h5` rewrites it"
    if images.chunks:
        chunk_bytes = int(np.prod(images.chunks)) * images.dtype.itemsize
        filters = describe_filters(images)
        lines.append(f"  chunks {images.chunks} = {chunk_bytes / 2**10:.0f} KiB; "
                     f"{filters or 'no compression'}")
        pieces = int(np.prod(np.ceil(np.divide(images.shape[1:], images.chunks[1:]))))
        if pieces > 1:
            warnings.append(f"/{split.name}: chunks {images.chunks} cut every sample into "
                            f"{pieces} pieces, so each sample read touches {pieces} chunks; "
                            f"use chunks of whole samples, e.g. "
                            f"({chunk_rows(sample_bytes)},) + {tuple(images.shape[1:])}: {fix}")
        if chunk_bytes < SMALL_CHUNK and images.chunks[0] < len(images):
            warnings.append(f"/{split.name}: chunks of {chunk_bytes / 2**10:.1f} KiB are "
                            f"small: reads pay per-chunk overhead; aim for about 1 MiB "
                            f"({chunk_rows(sample_bytes)} samples): {fix}")
        if chunk_bytes > LARGE_CHUNK:
            warnings.append(f"/{split.name}: chunks of {chunk_bytes / 2**20:.0f} MiB are "
                            f"large: each rank holds several whole chunks in memory and "
                            f"reads {chunk_bytes / 2**20:.0f} MiB for any sample in one; aim "
                            f"for about 1 MiB: {fix}")
        heavy = heavy_compression(images)
        if heavy:
            warnings.append(f"/{split.name}: {heavy}: decompression runs on the reading "
                            f"core and usually limits throughput; store uncompressed or "
                            f"with lzf (`convert --compression lzf`): {fix}")
    else:
        lines.append(f"  contiguous (not chunked): read in units of {unit_rows(images)} rows")
    if images.dtype == np.float64:
        warnings.append(f"/{split.name}: float64 images take 8x the bytes of uint8 and 2x "
                        f"float32 for no accuracy gain; {fix} (as float32)")
    lines += describe_labels(split, data.num_classes, warnings, fix)
    return lines, warnings


def describe_filters(images) -> str:
    parts = []
    if images.compression:
        opts = images.compression_opts
        parts.append(f"{images.compression}" + (f" level {opts}" if opts is not None else ""))
    if images.shuffle:
        parts.append("byte shuffle")
    if images.fletcher32:
        parts.append("fletcher32 checksums")
    return ", ".join(parts)


def heavy_compression(images) -> str:
    """A description of costly compression, or ''."""
    if images.compression == "gzip" and (images.compression_opts or 0) > HEAVY_GZIP:
        return f"gzip level {images.compression_opts}"
    if images.compression == "szip":
        return "szip compression"
    filters = images.id.get_create_plist()
    names = []
    for i in range(filters.get_nfilters()):
        code, _, _, name = filters.get_filter(i)
        if code not in (1, 2, 3, 32000):          # deflate, shuffle, fletcher32, lzf
            names.append(name.decode(errors="replace") if isinstance(name, bytes) else name)
    return f"filter {', '.join(names)}" if names else ""


def describe_labels(split: Split, classes: int, warnings: list, fix: str) -> list[str]:
    counts = np.bincount(split.labels, minlength=classes)
    shown = " ".join(f"{k}:{c}" for k, c in enumerate(counts)) if classes <= 20 else \
        f"min {counts.min()} (class {counts.argmin()}), max {counts.max()} " \
        f"(class {counts.argmax()})"
    lines = [f"  classes {shown}"]
    if counts.min() == 0:
        warnings.append(f"/{split.name}: classes {np.flatnonzero(counts == 0).tolist()[:10]} "
                        f"have no samples")
    elif counts.max() > 10 * counts.min():
        warnings.append(f"/{split.name}: classes are imbalanced ({counts.max()} vs "
                        f"{counts.min()} samples); consider class weights or resampling")
    if split.name == "train" and len(split) > 1:
        same = float(np.mean(split.labels[1:] == split.labels[:-1]))
        share = counts / counts.sum()
        chance = float(np.sum(share ** 2))
        lines.append(f"  neighbouring rows share a label {same:.1%} of the time "
                     f"(random order: {chance:.1%})")
        if same > 0.5 and same > RUNS_FACTOR * chance:
            warnings.append(f"/{split.name}: rows are grouped by label; the chunk-aware "
                            f"shuffle keeps neighbouring rows together, so batches would be "
                            f"class-skewed; {fix} in shuffled order (or train with "
                            f"--shuffle-block 1, at some read cost)")
    return lines


def write_stats(path: str, data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Compute per-channel mean/std of the train split (streamed) and store them in ``path``."""
    split = data.train
    stats = ChannelStats(data.input_shape[0])
    step = block_rows(row_bytes(split.images))
    for a in range(0, len(split), step):
        block = split.images[split.start + a: split.start + min(len(split), a + step)]
        stats.add(to_nchw(block, data.layout))
    mean, std = stats.result()
    data.close()
    import h5py

    with h5py.File(path, "r+", locking=False) as f:
        f.attrs["mean"], f.attrs["std"] = mean, std
    return mean, std


def inspect(path: str, images_key="images", labels_key="labels", layout="auto",
            val_fraction=0.1, stats=False, out=print) -> int:
    """Print the description and warnings; 0 when the file is usable for training."""
    data = open_dataset(path, images_key, labels_key, layout, val_fraction)
    try:
        lines, warnings = describe(data)
        if stats:
            mean, std = write_stats(path, data)
            lines.append(f"wrote mean {rounded(mean)}, std {rounded(std)} (train split) to "
                         f"{path}")
            warnings = [w for w in warnings if "--write-stats" not in w]
    finally:
        data.close()
    for line in lines:
        out(line)
    for warning in warnings:
        out(f"warning: {warning}")
    counted = f" ({len(warnings)} warning(s))" if warnings else ""
    out(f"ok: {path} passes the training checks{counted}")
    return 0
