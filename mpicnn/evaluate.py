"""``mpirun -n N python -m mpicnn.evaluate CKPT [--data FILE] [--split val]``: no training.

The loss and accuracy of the model a checkpoint holds, computed as the run computes
them after each epoch (the loader's normalisation, the training loop's evaluation, the
run's ``--amp``), each rank reading a contiguous part of the split; on the run's
validation split they equal the run's ``val_loss`` and ``val_acc``. Any number of
ranks, one included (``python -m mpicnn.evaluate``).
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np

from .checkpoint.trained import load_trained, open_run_data
from .cluster.devices import bind_device
from .cluster.errors import Parser
from .cluster.world import run_guarded
from .data.loader import Loader
from .predict import add_model_options, check_fits, chosen_splits
from .training.loop import evaluate as evaluate_split
from .training.precision import Precision


def build_parser() -> Parser:
    return add_model_options(Parser(
        prog="python -m mpicnn.evaluate",
        description="Evaluate a checkpoint without training: loss and accuracy as the run "
                    "computes them. Launch with `mpirun -n N python -m mpicnn.evaluate`."))


def main(argv=None) -> int:
    return run_guarded(evaluate, sys.argv[1:] if argv is None else argv)


def evaluate(world, argv) -> int:
    args = build_parser().parse_args(argv)
    bind_device(world, args.device)
    trained = world.agree(lambda: load_trained(args.checkpoint, world.device, args.data))
    data = world.agree(lambda: open_run_data(trained.config, args.data))
    try:
        warning = world.agree(lambda: check_fits(trained.input, data))
        if warning:
            world.log.warning(warning)
        # the model's normalisation (the training file's statistics), whatever file is read
        record = trained.input
        inputs = dataclasses.replace(data, mean=np.asarray(record["mean"], np.float32),
                                     std=np.asarray(record["std"], np.float32))
        precision = Precision(trained.config.get("amp", "off"), world.device)
        for split in chosen_splits(data, args.split):
            # evaluation reads batches of its own size (EVAL_BATCH): the training batch
            # argument only plans epochs, which this loader never runs
            loader = Loader(inputs, split, world.device, 1, world.size, world.rank)
            try:
                loss, acc = evaluate_split(trained.model, loader, world.comm, precision)
            finally:
                loader.close()
            world.log.info(f"evaluate: {split.name}: loss {loss:.6f}, accuracy {acc:.6f} "
                           f"({round(acc * len(split))}/{len(split)} right)")
    finally:
        data.close()
    world.log.info(f"evaluate: {trained.name} from {trained.path} on {data.path}, "
                   f"{world.size} rank(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
