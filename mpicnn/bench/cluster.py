"""``python -m mpicnn.bench cluster``: mpicnn against DDP-gloo across emulated nodes (root).

Every shape (nodes x ranks per node) and link rate gets its own emulated cluster
(``mpicnn.cluster.netns``: each node its own cores where there are enough, links
limited by ``tc``); on it, for each per-rank batch, these run side by side in
rotating order, and the table reports medians of ``--reps``:

* ``mpicnn``            - ``mpicnn.train`` defaults: shared-memory windows within each
  node, each rank's slice allreduced across nodes (flat at 1 rank per node); from 3
  nodes on, large buffers cross nodes on mpicnn's ring;
* ``mpicnn MPI across`` - the same with ``--cross-node mpi``: the MPI library's Allreduce
  across nodes instead of the ring;
* ``mpicnn yield``     - the defaults with ``--mpi-wait yield``: MPI sleeps after a while
  without progress instead of polling the core its node's ranks compute on;
* ``mpicnn flat``       - ``--shared-memory off``: one Allreduce over every rank;
* ``mpicnn hier``       - ``--hierarchical``: Reduce, leaders' Allreduce, Bcast;
* ``mpicnn hier bf16``  - the same with bf16 on the wire;
* ``mpicnn bf16``       - the flat Allreduce with bf16 on the wire;
* ``mpicnn plain``      - ``--bucket-mb 0``: one blocking Allreduce after backward;
* ``mpicnn overlap``    - ``--overlap-forward`` (and ``mpicnn bf16 overlap``);
* ``mpicnn dense ...``  - the same with ``--sufficient-factors off``: every gradient
  travels whole (by default, across nodes, a fully connected layer at least 2x the size
  of its batch's factors sends those instead); ``mpicnn factors overlap``: ``on``, the
  factors wherever they are smaller;
* ``mpicnn powersgd``   - ``--compression powersgd:R --powersgd-start S`` (``--powersgd-rank``,
  ``--powersgd-start``): matrices as rank-R factors (two Allreduces a bucket, through the
  windows' flat fallback); ``mpicnn hier powersgd`` and ``mpicnn powersgd overlap`` with
  ``--hierarchical`` and ``--overlap-forward``;
* ``DDP gloo``          - PyTorch DDP over gloo across the same nodes (MASTER_ADDR on
  the bridge), mpicnn's own loop and loader;
* ``DDP gloo fp16``     - the same with DDP's ``fp16_compress_hook``;
* ``DDP gloo powersgd`` - the same with DDP's ``powerSGD_hook`` at the same rank and start
  (``PowerSGDState``'s other defaults, which mpicnn's are);
* ``no-comm ceiling``   - one independent single-rank run per rank at once, each inside
  its node: what the cores allow when nothing is communicated.

By default (``--variants``) the like-for-like pairs run, with the ceiling. Ratios compare
like with like: fp32 variants with ``DDP gloo``, bf16 ones with ``DDP gloo fp16``,
PowerSGD with ``DDP gloo powersgd`` (``x fp32``: every variant against ``DDP gloo``).
``comm_ms`` is the wait for communication that backward did not hide,
``comm_busy_ms`` the time the reductions ran, ``comm_cpu_ms`` the CPU time the threads
that ran them used meanwhile (near ``comm_busy_ms``: MPI polled a core while it waited). The link bound is the images/s at which
the busiest node link would be full: bytes a variant moves through one node's link per
step (ring model: a flat ring over p ranks moves 2(p-1)/p of the gradient each way
through every node's link; the leaders of n nodes 2(n-1)/n; a factored layer's factors
from the other nodes' ranks come in once; PowerSGD's share of the values from the
model's shapes) divided by the link rate. Images/s leave out the first 5 steps, so
PowerSGD (from ``--powersgd-start``, at least DDP's minimum of 2) is what is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..cluster import hydra, jobs
from ..cluster.errors import MpicnnError
from ..cluster.netns import Cluster, free_subnet, interrupted_by_signals, rate_bits
from ..observe.report import load_run
from ..sync.allreduce.factors import AUTO_BYTES_GAIN, factors_pay
from ..sync.allreduce.powersgd import wire_fraction
from .comm import write_data
from .launch import check, train_across
from .scale import gradient_bytes, linear_shapes, param_shapes

LOW_RANK = None                  # wire: PowerSGD's share, from the model's shapes and the rank
POWERSGD = ["--compression", "powersgd:{rank}", "--powersgd-start", "{start}"]
# name: (what runs, its flags, bytes on the wire per gradient byte, traffic pattern)
VARIANTS = {
    "mpicnn": ("train", [], 1.0, "nodes"),
    "mpicnn MPI across": ("train", ["--cross-node", "mpi"], 1.0, "nodes"),
    "mpicnn yield": ("train", ["--mpi-wait", "yield"], 1.0, "nodes"),
    "mpicnn flat": ("train", ["--shared-memory", "off"], 1.0, "ring"),
    "mpicnn hier": ("train", ["--hierarchical"], 1.0, "nodes"),
    "mpicnn hier bf16": ("train", ["--hierarchical", "--compression", "bf16"], 0.5, "nodes"),
    "mpicnn bf16": ("train", ["--compression", "bf16"], 0.5, "nodes"),
    "mpicnn flat bf16": ("train", ["--shared-memory", "off", "--compression", "bf16"], 0.5,
                         "ring"),
    "mpicnn plain": ("train", ["--bucket-mb", "0"], 1.0, "ring"),
    "mpicnn overlap": ("train", ["--overlap-forward"], 1.0, "nodes"),
    "mpicnn bf16 overlap": ("train", ["--compression", "bf16", "--overlap-forward"], 0.5,
                            "nodes"),
    "mpicnn dense": ("train", ["--sufficient-factors", "off"], 1.0, "nodes"),
    "mpicnn dense overlap": ("train", ["--sufficient-factors", "off", "--overlap-forward"],
                             1.0, "nodes"),
    "mpicnn bf16 dense overlap": ("train", ["--sufficient-factors", "off", "--compression",
                                            "bf16", "--overlap-forward"], 0.5, "nodes"),
    "mpicnn factors overlap": ("train", ["--sufficient-factors", "on", "--overlap-forward"],
                               1.0, "nodes"),
    "mpicnn bf16 factors overlap": ("train", ["--sufficient-factors", "on", "--compression",
                                              "bf16", "--overlap-forward"], 0.5, "nodes"),
    "mpicnn powersgd": ("train", POWERSGD, LOW_RANK, "ring"),
    "mpicnn hier powersgd": ("train", ["--hierarchical", *POWERSGD], LOW_RANK, "nodes"),
    "mpicnn powersgd overlap": ("train", [*POWERSGD, "--overlap-forward"], LOW_RANK, "ring"),
    "DDP gloo": ("ddp", [], 1.0, "ring"),
    "DDP gloo fp16": ("ddp", ["--ddp-hook", "fp16"], 0.5, "ring"),
    "DDP gloo powersgd": ("ddp", ["--ddp-hook", "powersgd", *POWERSGD], LOW_RANK, "ring"),
    "no-comm ceiling": ("ceiling", [], 0.0, None),
}
LIKE_FOR_LIKE = ["no-comm ceiling", "mpicnn", "DDP gloo", "mpicnn bf16", "DDP gloo fp16",
                 "mpicnn powersgd", "DDP gloo powersgd"]
CEILING = "no-comm ceiling"
UNSHAPED = "none"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpicnn.bench cluster",
                                description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2x2,4x1", help="NODESxRANKS_PER_NODE, comma-separated")
    p.add_argument("--rates", default="1gbit,10gbit",
                   help=f"link rates (tc), comma-separated; '{UNSHAPED}' for unlimited")
    p.add_argument("--batches", default="8,32", help="per-rank batch sizes, comma-separated")
    p.add_argument("--model", default="resnet18", help="zoo model on 3x32x32 synthetic data (default resnet18)")
    p.add_argument("--variants", default=",".join(LIKE_FOR_LIKE),
                   help="comma-separated subset of: " + ", ".join(VARIANTS) +
                   " (default: the like-for-like pairs and the ceiling)")
    p.add_argument("--powersgd-rank", type=int, default=2,
                   help="the PowerSGD variants' rank, mpicnn's and DDP's alike (default 2)")
    p.add_argument("--powersgd-start", type=int, default=2,
                   help="the PowerSGD variants' first compressed step (DDP's minimum: 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every run")
    p.add_argument("--steps", type=int, default=60,
                   help="training steps per run (images/s leaves out the first 5)")
    p.add_argument("--netmod", choices=sorted(hydra.NETMODS), default="ucx",
                   help="MPICH network module across nodes (default ucx)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    p.add_argument("--json", default="", help="also write every run's figures to this file")
    return p.parse_args(argv)


def shapes_of(text: str) -> list[tuple[int, int]]:
    """``"2x2,4x1"`` -> ``[(2, 2), (4, 1)]``."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        nodes, _, per_node = item.partition("x")
        if not (nodes.isdigit() and per_node.isdigit() and int(nodes) >= 2 and int(per_node)):
            raise MpicnnError(f"--shapes: {item!r} is not NODESxRANKS with 2+ nodes, e.g. 2x2")
        shapes.append((int(nodes), int(per_node)))
    return shapes


def variants_of(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise MpicnnError(f"--variants: unknown {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(VARIANTS)}")
    return names


def flags_of(variant: str, rank: int = 2, start: int = 2) -> list:
    """``variant``'s flags with the PowerSGD rank and start filled in."""
    return [f.format(rank=rank, start=start) if isinstance(f, str) else f
            for f in VARIANTS[variant][1]]


def peer_of(variant: str) -> str:
    """The DDP variant that ``variant`` compares with like for like."""
    wire = VARIANTS[variant][2]
    if wire is LOW_RANK:
        return "DDP gloo powersgd"
    return "DDP gloo fp16" if wire < 1 else "DDP gloo"


def link_bytes(pattern: str | None, nodes: int, per_node: int, nbytes: float) -> float:
    """Bytes one node's link carries each way per step (ring model; 0 without traffic)."""
    if pattern == "ring":
        ranks = nodes * per_node
        return 2 * (ranks - 1) / ranks * nbytes
    if pattern == "nodes":
        return 2 * (nodes - 1) / nodes * nbytes
    return 0.0


def factored(variant: str, nodes: int, per_node: int, batch: int, linears) -> list:
    """The (in, out) fully connected layers that ``variant`` sends as factors."""
    kind, flags, _, _ = VARIANTS[variant]
    setting = (flags[flags.index("--sufficient-factors") + 1]
               if "--sufficient-factors" in flags else "auto")
    if kind != "train" or "--bucket-mb" in flags or setting == "off":
        return []
    gain = AUTO_BYTES_GAIN if setting == "auto" else 1
    return [(i, o) for i, o in linears if factors_pay(i, o, nodes * per_node, batch, gain)]


def traffic(variant: str, nodes: int, per_node: int, batch: int, gradient: int,
            linears=()) -> tuple[int, int]:
    """(gradient bytes that travel whole, factor bytes that enter each node) per step,
    before the wire's compression; ``linears``: the model's fully connected (in, out)."""
    layers = factored(variant, nodes, per_node, batch, linears)
    dense = gradient - 4 * sum(i * o for i, o in layers)            # float32
    return dense, 4 * (nodes - 1) * per_node * batch * sum(i + o for i, o in layers)


def wire_of(variant: str, nodes: int, per_node: int, batch: int, linears=(), shapes=(),
            rank: int = 2) -> float:
    """Bytes on the wire per byte of gradient that travels whole (not as factors).

    For PowerSGD: its share of the values of ``shapes`` (every trained parameter's), less
    the fully connected weights that ``variant`` sends as factors.
    """
    wire = VARIANTS[variant][2]
    if wire is not LOW_RANK:
        return wire
    left = list(map(tuple, shapes))
    for i, o in factored(variant, nodes, per_node, batch, linears):
        left.remove((o, i))
    return wire_fraction(left, rank)


def link_bound(variant: str, nodes: int, per_node: int, gradient: int, batch: int,
               rate: str, linears=(), shapes=(), rank: int = 2) -> float | None:
    """Images/s at which ``variant`` fills the busiest node link (None: no limit known)."""
    pattern = VARIANTS[variant][3]
    wire = wire_of(variant, nodes, per_node, batch, linears, shapes, rank)
    dense, factors = traffic(variant, nodes, per_node, batch, gradient, linears)
    moved = link_bytes(pattern, nodes, per_node, wire * dense) + (
        wire * factors if pattern else 0)
    if rate == UNSHAPED or moved == 0:
        return None
    return rate_bits(rate) / 8 / moved * nodes * per_node * batch


class Bench:
    """The runs of one shape on one emulated cluster."""

    def __init__(self, cluster: Cluster, per_node: int, opts, data: Path, work: Path):
        self.cluster, self.per_node, self.opts, self.data, self.work = \
            cluster, per_node, opts, data, work
        cores = len(cluster.node_list[0].cpus) or max(1, (os.cpu_count() or 1) // cluster.nodes)
        self.threads = max(1, cores // per_node)

    def train_args(self, batch: int) -> list:
        return ["--model", self.opts.model, "--data", self.data, "--batch-size", batch,
                "--epochs", 1, "--max-steps", self.opts.steps, "--progress", "off",
                "--device", "cpu", "--threads", self.threads]

    def run(self, variant: str, batch: int) -> dict:
        kind = VARIANTS[variant][0]
        flags = flags_of(variant, self.opts.powersgd_rank, self.opts.powersgd_start)
        args = self.train_args(batch)
        if kind == "ceiling":
            return self.ceiling(args)
        ranks = self.cluster.nodes * self.per_node
        if kind == "ddp":
            command = jobs.python_command("-m", "mpicnn.bench._ddp_peer", *flags, *args)
            env = {"MASTER_ADDR": self.cluster.hosts[0], "GLOO_SOCKET_IFNAME": "eth0"}
            done = hydra.run(self.cluster, command, self.per_node, ranks, self.opts.netmod,
                             self.opts.timeout, capture=True, env=env)
            check(done, variant)
            line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
            return {"images_per_s": json.loads(line)["images_per_s"]}
        metrics = self.work / f"run-{time.monotonic_ns()}.jsonl"
        run = train_across(self.cluster, ranks, [*args, *flags], metrics, self.opts.netmod,
                           self.per_node, self.opts.timeout)
        epoch = run.epochs[-1] if run.epochs else {}
        return {"images_per_s": run.end["images_per_s"], "comm_ms": epoch.get("comm_ms"),
                "comm_busy_ms": epoch.get("comm_busy_ms"), "comm_cpu_ms": epoch.get("comm_cpu_ms"),
                "comm_in_forward_ms": epoch.get("comm_in_forward_ms")}

    def ceiling(self, args) -> dict:
        """Independent single-rank runs, ``per_node`` inside each node at once, summed."""
        def solo(index: int) -> float:
            node = self.cluster.node_list[index // self.per_node]
            metrics = self.work / f"solo-{time.monotonic_ns()}-{index}.jsonl"
            argv = jobs.mpirun_command(1, jobs.python_command("-m", "mpicnn.train", *args,
                                                              "--metrics", metrics))
            done = jobs.run([self.cluster.wrapper, node.address, shlex.join(argv)],
                            self.opts.timeout)
            check(done, f"{CEILING} on {node.hostname}")
            return load_run(str(metrics)).end["images_per_s"]

        ranks = self.cluster.nodes * self.per_node
        with ThreadPoolExecutor(ranks) as pool:
            return {"images_per_s": sum(pool.map(solo, range(ranks)))}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(medians: dict, variant: str, against: str):
    """``variant``'s images/s over ``against``'s (None where either is missing)."""
    if variant == CEILING or not medians.get(variant) or not medians.get(against):
        return None
    return medians[variant] / medians[against]


def summarize(runs: dict, nodes: int, per_node: int, rate: str, batch: int,
              gradient: int, linears=(), shapes=(), rank: int = 2) -> list[dict]:
    """One row per variant: medians, ratios to DDP and to the ceiling, the link bound.

    ``shapes``: every trained parameter's, for PowerSGD's share of the wire at ``rank``.
    """
    med = {v: median([r["images_per_s"] for r in rs]) for v, rs in runs.items()}
    rows = []
    for variant, rs in runs.items():
        wire = wire_of(variant, nodes, per_node, batch, linears, shapes, rank)
        peer = peer_of(variant)
        bound = link_bound(variant, nodes, per_node, gradient, batch, rate, linears, shapes,
                           rank)
        dense, factors = traffic(variant, nodes, per_node, batch, gradient, linears)
        row = {"nodes": nodes, "ranks_per_node": per_node, "rate": rate, "batch": batch,
               "variant": variant, "pattern": VARIANTS[variant][3], "wire": wire,
               "images_per_s": med[variant],
               "runs": [r["images_per_s"] for r in rs if r["images_per_s"] is not None],
               "comm_ms": median([r.get("comm_ms") for r in rs]),
               "comm_busy_ms": median([r.get("comm_busy_ms") for r in rs]),
               "comm_cpu_ms": median([r.get("comm_cpu_ms") for r in rs]),
               "comm_in_forward_ms": median([r.get("comm_in_forward_ms") for r in rs]),
               "x_ddp": ratio(med, variant, peer),
               "x_ddp_fp32": ratio(med, variant, "DDP gloo"),
               "of_ceiling": ratio(med, variant, CEILING),
               "link_bound": bound,
               "of_link_bound": med[variant] / bound if bound and med[variant] else None,
               "failed": [r["error"].split(": ", 1)[1] for r in rs if "error" in r],
               "dense_bytes": dense, "factor_bytes": factors}
        rows.append(row)
    return rows


def _cell(value, form: str) -> str:
    return "" if value is None else format(value, form)


def runs_text(runs) -> str:
    return "/".join(f"{x:.0f}" for x in runs)


def table(rows: list[dict]) -> str:
    head = (f"{'shape':>5} {'rate':>7} {'batch':>5}  {'variant':<23} {'images/s':>9} "
            f"{'x DDP':>6} {'x fp32':>6} {'x ceil':>6} {'comm ms':>8} {'fwd wait':>8} "
            f"{'busy ms':>8} {'cpu ms':>7} {'link bound':>10} {'x bound':>7}  runs")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['nodes']}x{r['ranks_per_node']:<3} {r['rate']:>7} {r['batch']:>5}  "
            f"{r['variant']:<23} {_cell(r['images_per_s'], '9.1f'):>9} "
            f"{_cell(r['x_ddp'], '6.2f'):>6} "
            f"{_cell(r.get('x_ddp_fp32'), '6.2f'):>6} "
            f"{_cell(r['of_ceiling'], '6.3f'):>6} {_cell(r['comm_ms'], '8.2f'):>8} "
            f"{_cell(r.get('comm_in_forward_ms'), '8.2f'):>8} "
            f"{_cell(r['comm_busy_ms'], '8.2f'):>8} {_cell(r.get('comm_cpu_ms'), '7.1f'):>7} "
            f"{_cell(r['link_bound'], '10.0f'):>10} "
            f"{_cell(r['of_link_bound'], '7.3f'):>7}  {runs_text(r['runs'])}"
            + (f"  failed: {r['failed'][0]}" if r.get("failed") else ""))
    return "\n".join(lines)


def attempt(bench: Bench, variant: str, batch: int) -> dict:
    """One run; a run that fails is reported and left out, and the benchmark goes on."""
    try:
        return bench.run(variant, batch)
    except MpicnnError as failed:
        return {"images_per_s": None, "error": " FAILED: " + str(failed).splitlines()[0]}


def bench_shape(nodes: int, per_node: int, rate: str, opts, variants, batches, data: Path,
                work: Path, gradient: int, linears, shapes) -> tuple[list[dict], str]:
    """All runs of one shape at one link rate on a cluster of its own; (rows, its line)."""
    cluster = Cluster(f"b{os.getpid() % 100000}", nodes, free_subnet(os.getpid() % 256),
                      rate=None if rate == UNSHAPED else rate).up()
    try:
        described = cluster.describe(per_node)
        print(f"bench cluster: {described}", file=sys.stderr, flush=True)
        bench = Bench(cluster, per_node, opts, data, work)
        runs = {b: {v: [] for v in variants} for b in batches}
        for rep in range(opts.reps):
            for batch in batches:
                shift = rep % len(variants)          # rotate: no variant always first
                for variant in variants[shift:] + variants[:shift]:
                    result = attempt(bench, variant, batch)
                    runs[batch][variant].append(result)
                    print(f"  {nodes}x{per_node} {rate} rep {rep + 1} batch {batch:>3} "
                          f"{variant:<23} {_cell(result['images_per_s'], '8.1f'):>8} "
                          f"images/s{result.get('error', '')}", file=sys.stderr, flush=True)
    finally:
        cluster.down()
    rows = [row for b in batches
            for row in summarize(runs[b], nodes, per_node, rate, b, gradient, linears, shapes,
                                 opts.powersgd_rank)]
    return rows, described


def main(argv=None) -> int:
    """Run the benchmark; Ctrl-C, SIGTERM and SIGHUP take each cluster down on the way out."""
    with interrupted_by_signals():
        return run(parse_args(sys.argv[1:] if argv is None else argv))


def run(opts) -> int:
    shapes, variants = shapes_of(opts.shapes), variants_of(opts.variants)
    rates = [r.strip() for r in opts.rates.split(",") if r.strip()]
    for rate in rates:
        if rate != UNSHAPED:
            rate_bits(rate)
    batches = [int(b) for b in opts.batches.split(",")]
    if opts.reps < 1 or opts.steps < 8:
        raise MpicnnError("--reps must be at least 1 and --steps at least 8 (images/s "
                          "leaves out the first 5 steps)")
    if opts.powersgd_rank < 1 or not 2 <= opts.powersgd_start <= 5:
        raise MpicnnError("--powersgd-rank must be at least 1 and --powersgd-start 2 to 5 "
                          "(DDP's hook starts at 2 at the earliest; images/s begin at 5)")
    rows, shapes_seen = [], []
    with tempfile.TemporaryDirectory(prefix="mpicnn-bench-cluster-") as tmp:
        work = Path(tmp)
        data = work / "synthetic.h5"
        ranks = max(n * k for n, k in shapes)
        write_data(data, samples=(opts.steps + 1) * max(batches) * ranks)
        gradient = gradient_bytes(str(data), opts.model)
        linears = linear_shapes(str(data), opts.model)
        tensors = param_shapes(str(data), opts.model)
        print(f"bench cluster: {opts.model} ({gradient / 2 ** 20:.2f} MiB of gradients), "
              f"shapes {opts.shapes}, links {opts.rates}, batches {batches} per rank, "
              f"{opts.steps} steps, {opts.reps} rotating repetitions, netmod {opts.netmod}, "
              f"PowerSGD rank {opts.powersgd_rank} from step {opts.powersgd_start}",
              file=sys.stderr, flush=True)
        for nodes, per_node in shapes:
            for rate in rates:
                found, described = bench_shape(nodes, per_node, rate, opts, variants, batches,
                                               data, work, gradient, linears, tensors)
                rows += found
                shapes_seen.append(described)
                if opts.json:                      # after every cluster: an hour is not lost
                    write_json(opts, gradient, linears, shapes_seen, rows)
    print(table(rows))
    print("\n" + "\n".join(shapes_seen))
    failed = [r for r in rows if r["failed"]]
    for r in failed:
        print(f"bench cluster: {r['nodes']}x{r['ranks_per_node']} {r['rate']} batch "
              f"{r['batch']} {r['variant']}: {len(r['failed'])} run(s) failed: "
              f"{r['failed'][0]}", file=sys.stderr)
    return 1 if failed else 0


def write_json(opts, gradient: int, linears, clusters, rows) -> None:
    Path(opts.json).write_text(json.dumps({
        "model": opts.model, "gradient_bytes": gradient, "linear_shapes": linears,
        "powersgd_rank": opts.powersgd_rank, "powersgd_start": opts.powersgd_start,
        "steps": opts.steps, "netmod": opts.netmod, "clusters": clusters, "rows": rows},
        indent=1))


if __name__ == "__main__":
    sys.exit(main())
