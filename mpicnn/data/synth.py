"""``synth``: a learnable synthetic image dataset of any size, written in bounded memory.

Each class has its own smooth colour pattern (a few random plane waves per channel);
a sample is its class pattern, shifted by a few pixels, with random contrast and
brightness, plus uniform pixel noise. Classes are told apart by the pattern, not by
any single pixel, so a CNN learns them while a lookup cannot.
"""
from __future__ import annotations

import numpy as np

from ..cluster.errors import MpicnnError
from .chunks import block_rows
from .writer import SplitWriter, atomic_h5, write_attrs

WAVES = 3            # plane waves per class and channel
PIXEL_SCALE = 80     # pattern amplitude 1 -> 80 grey levels around 128


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3x32x32"`` (or ``3,32,32``, ``3×32×32``) -> (3, 32, 32)."""
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise MpicnnError(f"--shape takes CxHxW with positive sizes, e.g. 3x32x32; "
                          f"got {text!r}")
    return shape


def class_patterns(classes: int, shape, rng: np.random.Generator) -> np.ndarray:
    """(classes, C, H, W) float32 patterns in about [-1, 1]."""
    c, h, w = shape
    y, x = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    patterns = np.zeros((classes, c, h, w), np.float32)
    for k in range(classes):
        for ch in range(c):
            for _ in range(WAVES):
                fy, fx = rng.integers(-3, 4, 2)
                phase = rng.uniform(0, 2 * np.pi)
                patterns[k, ch] += np.cos(2 * np.pi * (fy * y + fx * x) + phase) / WAVES
    return patterns


def shifted_bank(patterns: np.ndarray, shift: int) -> np.ndarray:
    """int16 (shifts, classes, C, H, W): every pattern rolled by every (dy, dx), scaled."""
    steps = range(-shift, shift + 1)
    scaled = np.round(patterns * PIXEL_SCALE).astype(np.int16)
    return np.stack([np.roll(scaled, (dy, dx), axis=(2, 3)) for dy in steps for dx in steps])


def render(bank: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
           noise: float) -> np.ndarray:
    """uint8 (N, C, H, W) samples of ``labels`` (integer arithmetic: synth is I/O-bound)."""
    n = len(labels)
    images = bank[rng.integers(0, len(bank), n), labels]          # (N, C, H, W) int16
    images *= rng.integers(154, 257, (n, 1, 1, 1), dtype=np.int16)  # contrast 0.6..1
    images >>= 8
    images += rng.integers(128 - 16, 128 + 17, (n, 1, 1, 1), dtype=np.int16)  # brightness
    # uniform noise of standard deviation noise x PIXEL_SCALE
    half = int(round(noise * PIXEL_SCALE * np.sqrt(3)))
    wiggle = np.frombuffer(rng.bytes(images.size), np.uint8).reshape(images.shape)
    images += ((wiggle.astype(np.int16) - 128) * half) >> 7
    return np.clip(images, 0, 255).astype(np.uint8)


def write_synth(out: str, n: int, shape=(3, 32, 32), classes: int = 10,
                val_fraction: float = 0.1, seed: int = 0, noise: float = 0.5,
                shift: int = 2, compression: str | None = None, progress=None) -> dict:
    """Write ``n`` samples (train + val) to ``out``; returns the row counts per split."""
    if n < 2 or classes < 2:
        raise MpicnnError("synth needs --n of at least 2 and --classes of at least 2")
    if not 0 < val_fraction < 1:
        raise MpicnnError("--val-fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    bank = shifted_bank(class_patterns(classes, shape, rng), shift)
    n_val = max(1, int(round(n * val_fraction)))
    counts = {"train": n - n_val, "val": n_val}
    rows = block_rows(int(np.prod(shape)))
    with atomic_h5(out) as f:
        stats = None
        for name, count in counts.items():
            writer = SplitWriter(f.create_group(name), count, shape, np.uint8,
                                 compression, stats=name == "train")
            for start in range(0, count, rows):
                labels = rng.integers(0, classes, min(rows, count - start))
                writer.append(render(bank, labels, rng, noise), labels)
                if progress:
                    progress(len(labels))
            stats = writer.stats or stats
        write_attrs(f, stats, [f"class{k}" for k in range(classes)],
                    {"source": f"mpicnn synth: {classes} class patterns + noise {noise}, "
                               f"shift {shift}, seed {seed}"})
    return counts
