"""The CNN zoo: every model is built from the data's (C, H, W) and class count."""
from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from ..cluster.errors import MpicnnError


def _flat_features(body: nn.Module, input_shape) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, *input_shape)).flatten(1).shape[1]


class ConvClassifier(nn.Module):
    """A convolutional body followed by a fully connected head."""

    def __init__(self, body: nn.Module, head_sizes, input_shape, num_classes: int,
                 dropout: float = 0.0):
        super().__init__()
        self.body = body
        sizes = [_flat_features(body, input_shape), *head_sizes]
        drop = [nn.Dropout(dropout)] if dropout else []
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [*drop, nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers += [*drop, nn.Linear(sizes[-1], num_classes)]
        self.head = nn.Sequential(nn.Flatten(), *layers)

    def forward(self, x):
        return self.head(self.body(x))

    def layers(self) -> list:
        """The sequential form: applied in order, these modules compute ``forward``."""
        return [*self.body, *self.head]


def digitnet(input_shape, num_classes):
    """Small default net for 8x8 digits: conv32-conv64-pool-fc128."""
    c = input_shape[0]
    body = nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))
    return ConvClassifier(body, [128], input_shape, num_classes)


def seednet(input_shape, num_classes):
    """The seed article's Net: conv64-pool-conv64-pool-fc512-fc10 (2.14 M params on 3x32x32)."""
    c = input_shape[0]
    body = nn.Sequential(nn.Conv2d(c, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))
    return ConvClassifier(body, [512], input_shape, num_classes)


def kerasnet(input_shape, num_classes):
    """The Keras example: Conv 32 3x3 ReLU -> MaxPool 2 -> Flatten -> Dense."""
    body = nn.Sequential(nn.Conv2d(input_shape[0], 32, 3), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))
    return ConvClassifier(body, [], input_shape, num_classes)


def lenet(input_shape, num_classes):
    """LeNet-5 (padded so that 8x8 inputs fit too): conv6-pool-conv16-pool-fc120-fc84."""
    body = nn.Sequential(nn.Conv2d(input_shape[0], 6, 5, padding=2), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))
    return ConvClassifier(body, [120, 84], input_shape, num_classes)


def conv_bn(cin: int, cout: int) -> list:
    """3x3 convolution, BatchNorm, ReLU (no conv bias: BatchNorm's shift replaces it)."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def _fashion_body(channels: int, fifth_conv: bool) -> nn.Sequential:
    """conv32-pool-conv64-conv64-pool-conv128[-conv128]-pool, each conv with BatchNorm."""
    fifth = conv_bn(128, 128) if fifth_conv else []
    return nn.Sequential(*conv_bn(channels, 32), nn.MaxPool2d(2),
                         *conv_bn(32, 64), *conv_bn(64, 64), nn.MaxPool2d(2),
                         *conv_bn(64, 128), *fifth, nn.MaxPool2d(2))


def fashionnet(input_shape, num_classes):
    """A small Fashion-MNIST net: conv32-pool-conv64-conv64-pool-conv128-pool, BatchNorm,
    dropout, one linear layer; sized for two CPU cores (about 15 M multiply-adds a sample)."""
    return ConvClassifier(_fashion_body(input_shape[0], False), [], input_shape, num_classes,
                          dropout=0.3)


def fashionnet5(input_shape, num_classes):
    """fashionnet with a fifth convolution (conv128 at 1/4 resolution, where it is cheap)
    and no dropout: the Fashion-MNIST recipe's net (about 22 M multiply-adds a sample on
    28x28)."""
    return ConvClassifier(_fashion_body(input_shape[0], True), [], input_shape, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, four stages of two basic blocks."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))

    def layers(self) -> list:
        """The sequential form: applied in order, these modules compute ``forward``."""
        return [*self.stem, *self.stages, self.pool, nn.Flatten(), self.fc]


def sequential_form(model: nn.Module, name: str) -> list:
    """``model`` as a list of modules that, applied in order, compute its forward.

    Zoo models give theirs; a ``module:Class`` model must be an ``nn.Sequential`` or
    have a ``stages()`` method returning the modules in order.
    """
    if isinstance(model, (ConvClassifier, ResNet18)):
        return model.layers()
    if isinstance(model, nn.Sequential):
        return list(model)
    stages = getattr(model, "stages", None)
    if inspect.ismethod(stages):
        return list(stages())
    raise MpicnnError(f"model {name!r} has no sequential form to cut into pipeline stages: "
                      f"make it an nn.Sequential or give it a stages() method returning its "
                      f"modules in order", collective=True)


MODELS = {"digitnet": digitnet, "seednet": seednet, "kerasnet": kerasnet, "lenet": lenet,
          "fashionnet": fashionnet, "fashionnet5": fashionnet5, "resnet18": ResNet18}


def _import_model(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise MpicnnError(f"cannot import model {spec!r}: {exc}", collective=True) from None


def _fits(signature, args: tuple, kwargs: dict) -> bool:
    """Whether a constructor of ``signature`` takes ``args`` and ``kwargs``.

    Positional arguments go only to parameters without defaults: in ``Net(in_channels=3,
    num_classes=10)`` a positional input shape would land in the wrong place.
    """
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    params = list(signature.parameters.values())[:len(args)]
    return all(p.default is p.empty and p.kind != p.VAR_POSITIONAL for p in params)


def construct(factory, name: str, input_shape, num_classes: int, log=None) -> nn.Module:
    """Call ``factory`` as ``(input_shape, num_classes)``, ``(num_classes=N)`` or ``()``.

    The signature decides, not a ``TypeError`` from a trial call: an error raised inside
    a constructor that does accept the arguments must surface as what it is.
    """
    calls = {"positional": ((tuple(input_shape), num_classes), {}),
             "num_classes": ((), {"num_classes": num_classes}), "none": ((), {})}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):          # no signature to read: the documented shape
        signature = None
    for shape, (args, kwargs) in calls.items():
        if signature is None or _fits(signature, args, kwargs):
            if log is not None and ":" in name:
                shown = ", ".join([*map(repr, args), *(f"{k}={v}" for k, v in kwargs.items())])
                log(f"model {name}: built as {getattr(factory, '__name__', name)}({shown})")
            return factory(*args, **kwargs)
    raise MpicnnError(f"model {name!r} cannot be constructed: its signature is {signature}; "
                      f"mpicnn calls Class(input_shape, num_classes), Class(num_classes=N) or "
                      f"Class(): give its constructor one of these shapes", collective=True)


def build_model(name: str, input_shape, num_classes: int, log=None) -> nn.Module:
    """Build a zoo model, or ``package.module:Class`` in a constructor shape it accepts.

    ``log`` (a callable taking a line) hears which constructor shape was used.
    """
    if ":" in name:
        factory = _import_model(name)
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise MpicnnError(f"unknown model {name!r}; choose from {', '.join(MODELS)} or give "
                          f"package.module:Class", collective=True)
    try:
        model = construct(factory, name, input_shape, num_classes, log)
    except (RuntimeError, ValueError) as exc:
        raise MpicnnError(f"model {name!r} cannot be built for inputs {tuple(input_shape)}: "
                          f"{exc}; choose a model that fits this input size",
                          collective=True) from None
    if not isinstance(model, nn.Module):
        raise MpicnnError(f"--model {name!r} gave a {type(model).__name__}, not a "
                          f"torch.nn.Module; name a zoo model or an nn.Module class",
                          collective=True)
    check_model_accepts(model, name, input_shape, num_classes)
    return model


PROBE_BATCH = 2          # samples run through a new model to check its output shape


def check_model_accepts(model: nn.Module, name: str, input_shape, num_classes: int) -> None:
    """Run two dummy samples through the model; fail clearly when shapes do not fit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(PROBE_BATCH, *input_shape))
    except RuntimeError as exc:
        raise MpicnnError(f"model {name!r} does not accept inputs of shape "
                          f"{tuple(input_shape)}: {str(exc).splitlines()[0]}; choose a model "
                          f"that fits this input size", collective=True) from None
    finally:
        model.train(was_training)
    if out.ndim == 0 or out.shape[0] != PROBE_BATCH:
        rows = out.shape[0] if out.ndim else 0
        per = f" ({rows / PROBE_BATCH:g} per sample)" if rows else ""
        raise MpicnnError(
            f"model {name!r} changed the batch dimension: {PROBE_BATCH} samples in, {rows} "
            f"rows out{per}, output shape {tuple(out.shape)}; this usually comes from a "
            f"flatten like x.view(-1, K) where K is not the features per sample at inputs "
            f"{tuple(input_shape)} (a missing pooling layer, or a net written for another "
            f"image size): flatten with x.flatten(1) and size the next layer to match",
            collective=True)
    if tuple(out.shape) != (PROBE_BATCH, num_classes):
        raise MpicnnError(f"model {name!r} outputs shape {tuple(out.shape[1:])} per sample; "
                          f"the data has {num_classes} classes, so it should output "
                          f"({num_classes},)", collective=True)
