"""``python -m mpicnn.export CKPT OUT --format torchscript|onnx|state_dict``.

The model a checkpoint holds, for use without mpicnn's training code. TorchScript and
ONNX take a batch of images as the HDF5 file stores them (its dtype and layout, any
batch size) and normalise inside; ``state_dict`` is the weights with what rebuilds the
model (``model_name``, ``input``), read by ``mpicnn.checkpoint.trained.load_model``.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings

import numpy as np
import torch

from .checkpoint import files
from .checkpoint.trained import INPUT, Trained, load_trained
from .cluster.errors import MpicnnError, Parser, run_tool

FORMATS = ("torchscript", "onnx", "state_dict")
EXAMPLE_BATCH = 2          # images the model is traced with (the batch stays free)


def build_parser() -> Parser:
    parser = Parser(prog="python -m mpicnn.export",
                    description="Export a checkpoint's model. torchscript and onnx take "
                                "images as the training file stores them and return logits; "
                                "state_dict holds the weights and what rebuilds the model.")
    parser.add_argument("checkpoint", help="a checkpoint written by mpicnn.train (final.pt)")
    parser.add_argument("out", help="file to write")
    parser.add_argument("--format", choices=FORMATS, default="torchscript",
                        help="what to write (default: %(default)s)")
    parser.add_argument("--data", help="only for checkpoints of older mpicnn versions, which "
                        "do not record their input: the dataset the run trained on")
    return parser


def main(argv=None) -> int:
    return run_tool(export, sys.argv[1:] if argv is None else argv)


def export(argv) -> int:
    args = build_parser().parse_args(argv)
    trained = load_trained(args.checkpoint, "cpu", args.data)
    try:
        with quiet_exporters():
            WRITERS[args.format](trained, args.out)
    except OSError as exc:
        raise MpicnnError(f"cannot write {args.out!r}: {exc.strerror or exc}") from None
    record = trained.input
    print(f"mpicnn: export: {trained.name} from {trained.path} as {args.format} to "
          f"{args.out}" + ("" if args.format == "state_dict" else
                           f"; input: {record['dtype']} images, {stored_shape(record)} "
                           f"({record['layout']}); output: {record['num_classes']} logits"))
    return 0


def stored_dims(record: dict) -> tuple:
    """The dimensions of one image as the training file stores it."""
    c, h, w = record["shape"]
    return {"nchw": (c, h, w), "nhwc": (h, w, c), "nhw": (h, w)}[record["layout"]]


def stored_shape(record: dict) -> str:
    """The shape of a batch as the file stores it, e.g. ``(N, 1, 8, 8)``."""
    return "(N, " + ", ".join(map(str, stored_dims(record))) + ")"


def example_images(record: dict) -> torch.Tensor:
    """A batch of zeros shaped and typed as the training file stores images."""
    return torch.from_numpy(np.zeros((EXAMPLE_BATCH, *stored_dims(record)), record["dtype"]))


@contextlib.contextmanager
def quiet_exporters():
    """Keep the exporters' notices to torch developers (deprecations, skipped torchvision
    operators) out of the user's terminal; errors still raise."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        onnx_log.setLevel(level)


def write_torchscript(trained: Trained, out: str) -> None:
    traced = torch.jit.trace(trained.raw(), example_images(trained.input))
    traced.save(out)


def write_onnx(trained: Trained, out: str) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MpicnnError(f"--format onnx needs the onnx packages ({exc}): "
                          f"pip install 'mpicnn[onnx]'") from None
    torch.onnx.export(trained.raw(), (example_images(trained.input),), out, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                      external_data=False, verbose=False)


def write_state_dict(trained: Trained, out: str) -> None:
    files.atomic_save({"model": trained.model.state_dict(), "model_name": trained.name,
                       INPUT: trained.input, "config": trained.config}, out)


WRITERS = {"torchscript": write_torchscript, "onnx": write_onnx,
           "state_dict": write_state_dict}


if __name__ == "__main__":
    sys.exit(main())
