"""Dataset tools: ``python -m mpicnn.data <command> --help``."""
from __future__ import annotations

import argparse
import os
import sys

from ..cluster.errors import run_tool
from .layout import CHOICES as LAYOUT_CHOICES
from .writer import COMPRESSIONS


def cmd_digits(args) -> int:
    from .digits import write_digits

    counts = write_digits(args.out)
    print(f"wrote {args.out}: {counts['train']} train, {counts['val']} val samples")
    return 0


def progress_bar(total: int, what: str):
    """A tqdm update callback when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit=" samples", desc=what, leave=False)
    return bar.update


def cmd_synth(args) -> int:
    from .synth import parse_shape, write_synth

    shape = parse_shape(args.shape)
    counts = write_synth(args.out, args.n, shape, args.classes, args.val_fraction, args.seed,
                         args.noise, args.shift, args.compression,
                         progress_bar(args.n, "synth"))
    print(f"wrote {args.out}: {counts['train']} train, {counts['val']} val samples of "
          f"{'x'.join(map(str, shape))}, {args.classes} classes")
    return 0


def cmd_convert(args) -> int:
    from .convert import write_source
    from .formats import open_source

    size = None
    if args.size:
        from .synth import parse_shape

        size = parse_shape("1x" + args.size)[1:]
    source = open_source(args.source, args.labels, (args.images_key, args.labels_key,
                                                    args.val_images_key, args.val_labels_key),
                         args.layout, size, args.channels or None, args.coarse_labels)
    classes = [c for c in args.classes.split(",") if c] if args.classes else None
    total = sum(len(p.labels) for p in source.parts.values())
    counts = write_source(source, args.out, args.val_fraction, args.seed, not args.keep_order,
                          args.compression, classes, progress_bar(total, "convert"))
    names = classes or source.classes
    print(f"wrote {args.out}: {counts['train']} train, {counts['val']} val samples"
          + (f"; classes {', '.join(names)}" if names else ""))
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect

    return inspect(args.file, args.images_key, args.labels_key, args.layout,
                   args.val_fraction, args.write_stats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpicnn.data",
                                     description="Create and check mpicnn HDF5 datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digits", help="write the UCI handwritten digits (needs scikit-learn)")
    p.add_argument("out", help="output .h5 path, e.g. data/digits.h5")
    p.set_defaults(run=cmd_digits)

    p = sub.add_parser("synth", help="write a learnable synthetic image dataset",
                       description="Class patterns + shifts + contrast + noise, written "
                                   "block by block (bounded memory for any --n).")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--n", type=int, required=True, help="samples in total (train + val)")
    p.add_argument("--shape", default="3x32x32", help="CxHxW (default 3x32x32)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share in /val (0.1)")
    p.add_argument("--noise", type=float, default=0.5,
                   help="pixel noise relative to the pattern amplitude (0.5; higher is harder)")
    p.add_argument("--shift", type=int, default=2, help="random shift in pixels (2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", choices=COMPRESSIONS, default="none")
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("convert", help="convert IDX, CIFAR, .npz/.npy/.h5 arrays or an "
                                       "image folder",
                       description="SOURCE: a folder of IDX files (MNIST, Fashion-MNIST, "
                                   "KMNIST, EMNIST; plain or .gz; train-* and t10k-* pairs "
                                   "become /train and /val), one IDX images file (labels found "
                                   "beside it or given with --labels), CIFAR-10/100 python "
                                   "batches (their folder or the .tar.gz), a .npz (any key "
                                   "names), a .npy of images with --labels, an .h5 file, or a "
                                   "folder with one subfolder per class (optionally inside "
                                   "train/ and val/; needs Pillow). NCHW, NHWC and NHW images "
                                   "are accepted. Rows are written in a seeded random order.")
    p.add_argument("source")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--labels", default="", help="labels .npy for a .npy images source, or "
                                                "the labels IDX file of an IDX images file")
    p.add_argument("--images-key", default="", help="images array name (default: guessed)")
    p.add_argument("--labels-key", default="", help="labels array name (default: guessed)")
    p.add_argument("--val-images-key", default="", help="validation images array, if any")
    p.add_argument("--val-labels-key", default="", help="validation labels array, if any")
    p.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="stratified validation share when the source has no val part (0.1)")
    p.add_argument("--classes", default="", help="comma-separated class names")
    p.add_argument("--size", default="", help="image folders: resize every image to HxW")
    p.add_argument("--channels", type=int, choices=[1, 3], default=0,
                   help="image folders: 1 (grey) or 3 (RGB); default from the first image")
    p.add_argument("--coarse-labels", action="store_true",
                   help="CIFAR-100: the 20 coarse superclasses instead of the 100 fine classes")
    p.add_argument("--keep-order", action="store_true", help="keep the source row order")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and row order")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("inspect", help="validate a file and warn about slow layouts",
                       description="Runs the checks training runs, prints shapes, dtypes, "
                                   "class balance, chunking and compression, and warns "
                                   "about layouts that read slowly.")
    p.add_argument("file")
    p.add_argument("--images-key", default="images")
    p.add_argument("--labels-key", default="labels")
    p.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="for flat files, as in training (0.1)")
    p.add_argument("--write-stats", action="store_true",
                   help="compute per-channel mean/std of the train split and store them")
    p.set_defaults(run=cmd_inspect)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_tool(args.run, args)
    except BrokenPipeError:          # output piped into head & co.
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
