"""What ``--channels-last`` and ``--sync-bn`` make of a built model, before its optimizer."""
from __future__ import annotations

import torch

from ..cluster.errors import MpicnnError


def _channels_last_batch(module, args):
    """Hand the model its 4-D batch in channels_last (the loop stays format-agnostic)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """4-D weights in channels_last, and every 4-D input converted on the way in."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_batch)
    return model


def adapt_model(model: torch.nn.Module, training, mode: str, trains: bool, comm, log=None):
    """``model`` in the memory format and with the BatchNorm that ``training`` asks for.

    ``comm`` is the communicator of the training ranks (the workers in ps modes); SyncBN
    gets its own duplicate of it. Ranks that do not train (parameter servers) keep plain
    BatchNorm: they never run a forward.
    """
    if training.sync_bn:
        if mode == "ps-async":
            raise MpicnnError("--sync-bn needs workers in lockstep (every forward is a "
                              "collective): use --mode allreduce or ps-sync", collective=True)
        if trains:
            from .syncbn import convert, has_sync_bn

            model = convert(model, comm.Dup() if comm is not None else None)
            # every rank must run each forward, also on an empty batch (the loop reads this)
            model.collective_forward = has_sync_bn(model)
            if log is not None and has_sync_bn(model):
                log(f"sync-bn: BatchNorm statistics over the batches of all "
                    f"{comm.Get_size() if comm is not None else 1} training rank(s)")
    if training.channels_last:
        model = to_channels_last(model)
    return model
