"""The trained model a checkpoint holds, as users apply it: stored images in, logits out.

A checkpoint records the input its model was trained on (``input``: the sample shape,
the stored layout and dtype, the per-channel mean and std in stored pixel units, the
classes), so the model can be rebuilt without the dataset and fed images exactly as
the HDF5 file stores them. ``RawImageModel`` turns them into what the loader hands
the model (NCHW, float, normalised), then runs it: export, predict and evaluate start
here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..cluster.errors import MpicnnError
from ..training.models import build_model
from . import files

INPUT = "input"           # the checkpoint key of the input record


def input_record(data) -> dict:
    """What a checkpoint records of the input its model takes (``data``: the Dataset)."""
    return {"shape": [int(v) for v in data.input_shape], "layout": data.layout,
            "dtype": str(data.train.images.dtype), "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std], "num_classes": int(data.num_classes),
            "classes": [str(c) for c in data.classes]}


class RawImageModel(nn.Module):
    """``model`` fed images as stored (``layout``, uint8 or float): NCHW, float,
    ``(x - mean) / std`` as the loader computes it, then the model; returns logits."""

    def __init__(self, model: nn.Module, mean, std, layout: str = "nchw"):
        super().__init__()
        self.model, self.layout = model, layout
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":
            images = images.permute(0, 3, 1, 2)
        elif self.layout == "nhw":
            images = images.unsqueeze(1)
        # contiguous, like the loader's batches: the model's kernels see the same memory
        return self.model((images.float().contiguous() - self.mean) / self.std)


@dataclass
class Trained:
    """A checkpoint's model, rebuilt, with what the checkpoint says about it."""

    path: str
    name: str                # the model's name in the zoo, or package.module:Class
    model: nn.Module         # the bare model, in eval mode: it takes normalised NCHW floats
    input: dict              # see input_record
    config: dict             # the run's settings, by flat name
    device: torch.device

    def raw(self, layout: str | None = None) -> RawImageModel:
        """The model taking images as stored (in ``layout``; default: as in training)."""
        record = self.input
        return RawImageModel(self.model, record["mean"], record["std"],
                             layout or record["layout"]).to(self.device).eval()


def open_run_data(config: dict, path: str | None = None):
    """The dataset the run read (or ``path``) as the run read it: its keys, layout and
    validation share, so ``val`` holds the rows the run evaluated on."""
    from ..data.schema import open_dataset

    return open_dataset(path or config["data"], config.get("images_key", "images"),
                        config.get("labels_key", "labels"), config.get("layout", "auto"),
                        config.get("val_fraction", 0.1))


def _recorded_input(saved: dict, path, data_path: str | None) -> dict:
    """The checkpoint's input record; an older checkpoint's, from its dataset."""
    if INPUT in saved:
        return saved[INPUT]
    try:
        data = open_run_data(saved.get("config", {}), data_path)
    except (MpicnnError, KeyError) as exc:
        raise MpicnnError(f"checkpoint {str(path)!r} does not record the input its model "
                          f"takes (written by an older mpicnn), and its dataset cannot tell "
                          f"({exc}): pass --data FILE, the dataset it was trained on") from None
    try:
        return input_record(data)
    finally:
        data.close()


def load_trained(path: str | os.PathLike, device="cpu", data_path: str | None = None
                 ) -> Trained:
    """Rebuild the model of checkpoint ``path`` on ``device`` (a checkpoint without its
    input record takes it from ``data_path`` or the dataset the run read)."""
    try:
        saved = files.load(path)
    except files.Unloadable as exc:
        raise MpicnnError(f"cannot use checkpoint {str(path)!r}: {exc.problem}") from None
    record = _recorded_input(saved, path, data_path)
    name = saved["model_name"]
    model = build_model(name, tuple(record["shape"]), record["num_classes"])
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        raise MpicnnError(f"checkpoint {str(path)!r} does not fit model {name!r}: "
                          f"{str(exc).splitlines()[0]}") from None
    device = torch.device(device)
    return Trained(str(path), name, model.to(device).eval(), record, saved.get("config", {}),
                   device)


def load_model(path: str | os.PathLike, device="cpu") -> RawImageModel:
    """The model of checkpoint ``path``, taking images as the training file stores them."""
    return load_trained(path, device).raw()
