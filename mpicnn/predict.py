"""``python -m mpicnn.predict CKPT [--data FILE] [--split val] [--out predictions.csv]``.

Classes and probabilities for the images of an HDF5 file, one CSV row each, from the
model a checkpoint holds; the accuracy, which equals the run's on its validation split.
Images are fed as the file stores them, through the model that ``mpicnn.export`` writes
(``checkpoint.trained.RawImageModel``), in float32.
"""
from __future__ import annotations

import csv
import sys

import numpy as np
import torch

from .checkpoint.trained import load_trained, open_run_data
from .cluster.errors import MpicnnError, Parser, run_tool
from .data.loader import EVAL_BATCH

SPLITS = ("val", "train", "all")


def add_model_options(parser: Parser) -> Parser:
    """The options of commands that apply a checkpoint's model to a dataset's splits."""
    parser.add_argument("checkpoint", help="a checkpoint written by mpicnn.train (final.pt)")
    parser.add_argument("--data", help="HDF5 dataset (default: the one the run trained on, "
                        "read as the run read it)")
    parser.add_argument("--split", choices=SPLITS, default="val",
                        help="which split (default: val, the run's validation split)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default: auto, a GPU if there is one)")
    return parser


def chosen_splits(data, which: str) -> list:
    """The dataset's splits that ``--split`` names."""
    return [data.train, data.val] if which == "all" else [getattr(data, which)]


def build_parser() -> Parser:
    parser = Parser(prog="python -m mpicnn.predict",
                    description="Predict classes with a checkpoint's model; print the "
                                "accuracy. The CSV has one row per image: split, row (its "
                                "row in the file's images dataset), label, predicted, and "
                                "one softmax probability per class (p_<class>).")
    add_model_options(parser)
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH,
                        help="images per forward (default: %(default)s)")
    parser.add_argument("--out", default="predictions.csv",
                        help="CSV file to write (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    return run_tool(predict, sys.argv[1:] if argv is None else argv)


def predict(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise MpicnnError("--batch-size must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MpicnnError("--device cuda asked for, but torch sees no CUDA GPU")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available()
                          else "cpu")
    trained = load_trained(args.checkpoint, device, args.data)
    data = open_run_data(trained.config, args.data)
    try:
        warning = check_fits(trained.input, data)
        if warning:
            print(f"mpicnn: {warning}", file=sys.stderr)
        model = trained.raw(data.layout)          # the file's layout, the model's statistics
        classes = trained.input["classes"] or list(map(str, range(trained.input["num_classes"])))
        with open(args.out, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["split", "row", "label", "predicted", *(f"p_{c}" for c in classes)])
            for split in chosen_splits(data, args.split):
                right = write_predictions(out, model, split, args.batch_size, device)
                print(f"mpicnn: predict: {split.name}: accuracy {right / len(split):.6f} "
                      f"({right}/{len(split)} right)", flush=True)
    except OSError as exc:
        raise MpicnnError(f"cannot write {args.out!r}: {exc.strerror or exc}") from None
    finally:
        data.close()
    print(f"mpicnn: predict: {trained.name} from {trained.path} on {data.path}; predictions "
          f"in {args.out}")
    return 0


def check_fits(record: dict, data) -> str:
    """Fail clearly when ``data``'s images do not fit the model; a warning when their
    dtype is not the one it was trained on (else "")."""
    shape = tuple(record["shape"])
    if tuple(data.input_shape) != shape:
        raise MpicnnError(f"{data.path!r} holds images of {tuple(data.input_shape)} (C, H, W); "
                          f"the model takes {shape}")
    if str(data.train.images.dtype) != record["dtype"]:
        return (f"warning: the model was trained on {record['dtype']} images, {data.path!r} "
                f"stores {data.train.images.dtype}: its normalisation (in stored pixel units) "
                f"may not fit")
    return ""


@torch.inference_mode()
def write_predictions(out, model, split, batch: int, device) -> int:
    """One CSV row per image of ``split``; returns how many predictions match the label."""
    right = 0
    first = split.start
    for a in range(0, len(split), batch):
        b = min(len(split), a + batch)
        images = torch.from_numpy(np.asarray(split.images[first + a: first + b]))
        logits = model(images.to(device)).float()
        predicted = logits.argmax(1).cpu().numpy()          # as the run's evaluation counts
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        labels = split.labels[a:b]
        right += int((predicted == labels).sum())
        for i, row in enumerate(range(first + a, first + b)):
            out.writerow([split.name, row, int(labels[i]), int(predicted[i]),
                          *(f"{p:.6g}" for p in probs[i])])
    return right


if __name__ == "__main__":
    sys.exit(main())
