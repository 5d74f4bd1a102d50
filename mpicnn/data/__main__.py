"""Dataset tools: ``python -m mpicnn.data <command> --help``."""
from __future__ import annotations

import argparse
import sys


def cmd_digits(args) -> int:
    from .digits import write_digits

    counts = write_digits(args.out)
    print(f"wrote {args.out}: {counts['train']} train, {counts['val']} val samples")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpicnn.data",
                                     description="Create and check mpicnn HDF5 datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digits", help="write the UCI handwritten digits (needs scikit-learn)")
    p.add_argument("out", help="output .h5 path, e.g. data/digits.h5")
    p.set_defaults(run=cmd_digits)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
