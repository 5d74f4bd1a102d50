"""The training section: model, epochs and batch, optimizer and schedule, seed."""
from __future__ import annotations

from dataclasses import dataclass

from .fields import at_least, must, non_negative, opt


@dataclass
class TrainingConfig:
    """What one rank computes and how the optimizer moves (``mpicnn.training``)."""

    # --- model ----------------------------------------------------------------
    model: str = opt("digitnet", "model name from the zoo, or package.module:Class", "model")
    # --- training -------------------------------------------------------------
    epochs: int = opt(20, "passes over the training split", "training")
    batch_size: int = opt(16, "samples per rank per step (global batch = this x workers)",
                          "training")
    max_steps: int = opt(0, "stop after this many optimizer steps in total (off: no limit)",
                         "training", metavar="STEPS", off=0)
    stop_epoch: int = opt(0, "end this invocation after this epoch with a checkpoint, keeping "
                          "the schedule of --epochs (split a long run over several jobs; "
                          "continue with --resume auto; off: run to --epochs)", "training",
                          metavar="EPOCH", off=0)
    optimizer: str = opt("adamw", "optimizer; lars and lamb scale each layer's step by a "
                         "trust ratio, for large global batches", "training",
                         ["sgd", "adamw", "lars", "lamb"])
    lr: float = opt(0.002, "peak learning rate (after warmup, before scaling); for SGD try "
                    "0.05", "training")
    momentum: float = opt(0.9, "SGD and LARS momentum", "training")
    nesterov: bool = opt(True, "Nesterov momentum for SGD", "training")
    weight_decay: float = opt(0.01, "weight decay (decoupled for AdamW; for SGD try 5e-4)",
                              "training")
    betas: tuple = opt((0.9, 0.999), "AdamW and LAMB betas", "training", metavar="B1,B2")
    trust_coefficient: float = opt(0.001, "LARS trust coefficient eta: a layer's step is "
                                   "lr x eta x |w| / (|g| + weight decay x |w|)", "training")
    label_smoothing: float = opt(0.0, "share of the target spread evenly over all classes "
                                 "(training loss only)", "training")
    schedule: str = opt("cosine", "learning-rate schedule after warmup", "training",
                        ["cosine", "step", "constant"])
    warmup_epochs: float = opt(1.0, "linear warmup length in epochs", "training")
    lr_milestones: tuple = opt((), "epochs at which the step schedule multiplies the lr by "
                               "--lr-gamma", "training", metavar="E1,E2,...", off=())
    lr_gamma: float = opt(0.1, "step schedule factor", "training")
    min_lr_ratio: float = opt(0.0, "cosine floor as a fraction of the peak lr", "training")
    scale_lr: bool = opt(False, "linear lr scaling: lr x global batch / --base-batch",
                         "training")
    base_batch: int = opt(32, "global batch that --lr is tuned for (with --scale-lr)",
                          "training")
    seed: int = opt(0, "seed for initialisation and sample order", "training")
    deterministic: bool = opt(False, "bit-reproducible runs on CPU", "training")
    accum_steps: int = opt(1, "splits each rank's --batch-size batch into K micro-batches, "
                           "run one after another, their gradients summed locally and sent "
                           "once: the global batch and the optimizer steps stay the same, "
                           "activation memory shrinks. Lightning's accumulate_grad_batches and "
                           "DeepSpeed's gradient_accumulation_steps multiply the batch instead: "
                           "their batch B accumulated K times is --batch-size B*K "
                           "--accum-steps K here", "distributed", metavar="K")
    # --- precision and gradient clipping (mpicnn.training.precision) ----------
    amp: str = opt("off", "mixed precision: forward and loss (and evaluation) under autocast "
                   "in bf16 or fp16; parameters and gradients stay fp32; fp16 adds a dynamic "
                   "loss scale (overflowing steps are skipped, not counted by --nan-policy; "
                   "the scale is checkpointed)", "training", ["off", "bf16", "fp16"],
                   off="off")
    clip_grad_norm: float = opt(0.0, "clip the gradient, after unscaling, to this total 2-norm "
                                "(or off): in allreduce the averaged gradient (the same on "
                                "every rank); in ps-sync and ps-async each worker's gradient "
                                "before it is sent (the servers average clipped gradients)",
                                "training", metavar="NORM", off=0.0)
    # --- memory format and normalisation across ranks (issue 13) ---
    channels_last: bool = opt(False, "model weights and input batches in the channels_last "
                              "memory format (faster convolutions on GPU tensor cores)",
                              "training")
    compile: str = opt("off", "torch.compile the model (forward and backward): default, "
                       "reduce-overhead (on a GPU: steps replayed as CUDA graphs) or "
                       "max-autotune; the first steps compile; the allreduce engine's "
                       "buckets then launch when backward ends", "training",
                       ["off", "default", "reduce-overhead", "max-autotune"])
    sync_bn: bool = opt(False, "BatchNorm statistics over the global batch: each forward and "
                        "backward allreduces them over the training ranks (not ps-async)",
                        "training")

    def validate(self) -> None:
        at_least(1, self, "epochs", "batch_size", "base_batch")
        non_negative(self, "max_steps", "stop_epoch", "warmup_epochs", "weight_decay",
                     "momentum", "min_lr_ratio")
        must(self.lr > 0, f"--lr must be positive, got {self.lr}")
        must(len(self.betas) == 2, "--betas takes two numbers, e.g. 0.9,0.999")
        must(self.trust_coefficient > 0,
             f"--trust-coefficient must be positive, got {self.trust_coefficient}")
        non_negative(self, "clip_grad_norm", hint="off turns it off")
        must(0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        must(self.accum_steps >= 1 and self.batch_size % self.accum_steps == 0,
             f"--accum-steps {self.accum_steps} must be at least 1 and divide --batch-size "
             f"{self.batch_size} (each micro-batch is batch-size / accum-steps samples)")


def check_compile(cfg) -> None:
    """``--compile`` compiles the whole model's forward: refuse what runs it otherwise."""
    if cfg.training.compile == "off":
        return
    must(cfg.sync.mode != "pipeline", "--compile applies to the whole model, and --mode "
         "pipeline runs it in stages: use --compile off with pipelines")
    must(not cfg.sync.overlap_forward, "--compile and --overlap-forward: the deferred updates "
         "hook each layer's forward, which a compiled forward would break into pieces; use "
         "one of them")
