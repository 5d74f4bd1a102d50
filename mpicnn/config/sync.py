"""The sync section: mode, devices, the allreduce engine, parameter servers, stragglers."""
from __future__ import annotations

from dataclasses import dataclass

from .fields import at_least, must, non_negative, opt


@dataclass
class SyncConfig:
    """How ranks combine gradients and where they compute (``mpicnn.sync``)."""

    # --- distribution ---------------------------------------------------------
    mode: str = opt("allreduce", "how ranks combine gradients", "distributed",
                    ["allreduce", "ps-sync", "ps-async", "pipeline"])
    device: str = opt("auto", "compute device (GPU = node-local rank mod GPU count)",
                      "distributed", ["auto", "cpu", "cuda"])
    threads: int = opt(0, "torch CPU threads per rank (0: cores per node / ranks per node)",
                       "distributed")
    # --- gradient communication (the allreduce engine) ---
    bucket_mb: float = opt(25.0, "gradient bucket size in MB, reduced while backward goes on "
                           "(the first bucket is 1 MB); off: one blocking Allreduce of all "
                           "gradients after backward", "distributed", metavar="MB", off=0.0)
    compression: str = opt("none", "gradient precision on the wire (fp16/bf16 halve the bytes); "
                           "powersgd[:RANK]: matrices as rank-RANK factors with error feedback "
                           "(PowerSGD, as DDP's powerSGD_hook; rank 1 by default)",
                           "distributed", metavar="fp16|bf16|powersgd[:RANK]", off="none")
    powersgd_start: int = opt(1000, "--compression powersgd: steps averaged whole before "
                              "compressing (DDP's start_powerSGD_iter)", "distributed",
                              metavar="STEPS")
    mpi_wait: str = opt("busy", "how MPI waits for messages: busy (polls the core) or yield "
                        "(sleeps after ~1000 idle polls: for ranks that share cores with "
                        "compute). Read before MPI starts: command line or MPICNN_MPI_WAIT",
                        "distributed", choices=("busy", "yield"))
    cuda_aware: str = opt("auto", "CUDA buffers straight to MPI (on), staged through pinned "
                          "host memory (off), or probe the MPI library (auto)", "distributed",
                          ["auto", "on", "off"], off="off")
    hierarchical: bool = opt(False, "reduce within each node, allreduce across node leaders, "
                             "broadcast within the node", "distributed")
    shared_memory: str = opt("auto", "auto: ranks of one node average CPU buckets in MPI "
                             "shared-memory windows (and allreduce their slices across "
                             "nodes); off: always MPI Allreduce", "distributed",
                             ["auto", "off"], off="off")
    cross_node: str = opt("ring", "how large buckets are summed across 3 or more nodes: "
                          "mpicnn's ring (2(P-1)/P of a bucket through each node's link) or "
                          "the MPI library's Allreduce (mpi)", "distributed", ["ring", "mpi"])
    overlap_forward: bool = opt(False, "allreduce engine: the first buckets' exchange goes on "
                                "into the next forward, each layer's update landing as its "
                                "forward begins (the same training, bitwise)", "distributed")
    sufficient_factors: str = opt("auto", "allreduce engine: a fully connected layer whose "
                                  "gradient dwarfs its batch's inputs and output gradients "
                                  "sends those (Allgather) and every rank rebuilds the sum; "
                                  "auto: CPU ranks across nodes, where they move >= 2x fewer "
                                  "bytes; on: wherever they are fewer bytes, even on one node",
                                  "distributed", ["auto", "on", "off"], off="off")
    # parameter-server modes (ps-sync, ps-async) and straggler simulation
    servers: int = opt(1, "ps modes: ranks that hold the parameters (the last ones); the "
                       "others are workers", "distributed")
    staleness: str = opt("none", "ps-async: clocks the fastest worker may run ahead of the "
                         "slowest (SSP; 0 acts like ps-sync); off: unbounded (Downpour, "
                         "batches handed out on demand)", "distributed", metavar="S",
                         off="none")
    staleness_lr: bool = opt(False, "ps-async: divide each update's lr by its staleness",
                             "distributed")
    slow_rank: int = opt(-1, "straggler simulation: this worker computes --slow-factor times "
                         "slower", "distributed", metavar="RANK", off=-1)
    slow_factor: float = opt(2.0, "how many times slower --slow-rank computes", "distributed")
    # pipeline mode (model cut into --stages consecutive stages, replicas allreduce)
    stages: int = opt(1, "pipeline: stages the model is cut into (ranks form stages x "
                      "replicas; a pipeline's stages are consecutive ranks)", "distributed")
    micro_batches: int = opt(1, "pipeline: micro-batches each rank's batch is split into",
                             "distributed")
    pipeline_schedule: str = opt("1f1b", "pipeline: gpipe (all forward, then all backward) "
                                 "or 1f1b (activation memory bounded by the stages)",
                                 "distributed", ["gpipe", "1f1b"])
    balance: str = opt("time", "pipeline: cut points balance measured forward+backward time "
                       "of each layer, or parameter bytes", "distributed", ["time", "params"])
    split: str = opt("", "pipeline: the first layer index of stages 2..K (overrides "
                     "--balance), e.g. 4,9", "distributed", metavar="A,B,...", off="")

    def validate(self) -> None:
        non_negative(self, "threads", "powersgd_start")
        from ..sync.allreduce.codec import WIRE_DTYPES
        from ..sync.allreduce.powersgd import low_rank

        must(self.compression in WIRE_DTYPES or low_rank(self.compression) is not None,
             f"--compression: invalid choice {self.compression!r}; choose from off, "
             f"{', '.join(w for w in WIRE_DTYPES if w != 'none')}, powersgd or powersgd:RANK")
        must(low_rank(self.compression) is None or self.mode in ("allreduce", "pipeline"),
             "--compression powersgd needs --mode allreduce (or pipeline)")
        must(self.bucket_mb >= 0, "--bucket-mb must not be negative (off: one flat Allreduce)")
        at_least(1, self, "servers")
        from ..sync.ps.policy import staleness_bound

        staleness_bound(self.staleness)
        must(self.slow_rank >= -1 and self.slow_factor >= 1,
             "--slow-rank takes a worker rank (or off) and --slow-factor a number >= 1")
        at_least(1, self, "stages", "micro_batches")
        must(self.mode == "pipeline" or (self.stages == 1 and self.micro_batches == 1
                                         and not self.split),
             "--stages, --micro-batches and --split need --mode pipeline")
        from ..sync.pipeline.partition import parse_split

        parse_split(self.split)


def check_overlap_forward(cfg) -> None:
    """``--overlap-forward`` applies an update layer by layer: refuse what needs it whole."""
    if not cfg.sync.overlap_forward:
        return
    must(cfg.sync.mode == "allreduce" and cfg.sync.bucket_mb > 0,
         "--overlap-forward needs --mode allreduce and --bucket-mb > 0")
    must(cfg.training.clip_grad_norm == 0 and cfg.training.amp != "fp16"
         and cfg.failure.nan_policy == "abort",
         "--overlap-forward updates layers at different times, so it cannot take the whole "
         "gradient's norm (--clip-grad-norm) or skip a whole step (--amp fp16, --nan-policy "
         "skip)")


def check_powersgd(cfg) -> None:
    """PowerSGD carries each step's residual and Q into the next: refuse non-finite steps."""
    from ..sync.allreduce.powersgd import low_rank

    must(low_rank(cfg.sync.compression) is None or (cfg.training.amp != "fp16"
                                                     and cfg.failure.nan_policy == "abort"),
         "--compression powersgd carries each step's residual into the next, so a skipped "
         "non-finite step would spoil every later one: it cannot go with --amp fp16 or "
         "--nan-policy skip (--amp bf16 needs no loss scale)")
