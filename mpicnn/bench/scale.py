"""``python -m mpicnn.bench scale``: measure here, fit alpha/beta, predict 1..1024 ranks.

Measured on this machine: the compute time of one training step (a real 1-rank run of
``mpicnn.train``, from its phase split), the gradient bytes of the model, and the cost
of MPI Allreduce at several message sizes between 2 ranks. The sizes are fitted to the
ring model ``t = 2(p-1) alpha + 2(p-1)/p * bytes * beta``, minimising the largest
relative error. From these the report predicts throughput and efficiency (per-rank
batch fixed, communication not overlapped) for:

- ring allreduce:           2(p-1) a + 2(p-1)/p M b (the slower link's a, b once p
                            spans nodes)
- hierarchical allreduce:   intra-node reduce-scatter and all-gather over g ranks with
                            the intra-node a, b, and a ring over the n nodes of M/g bytes
- parameter server, S servers (extra ranks): push then pull, each limited by the busiest
                            link: 2 (S a + max(M, p M / S) b)

``--alpha/--beta`` (or ``--bandwidth GB/s``) replace the inter-node values to model a
real interconnect; the intra-node values default to the measured ones. The prediction
is compared with real training runs at 1 and 2 ranks.

``--link RATE --compare RESULTS.json`` checks the model against ``bench cluster``
instead: alpha/beta are measured across two emulated nodes whose links run at RATE
(and within one of them), and each run of RESULTS at that rate is predicted from the
no-comm ceiling of its shape (compute, with the cores shared as in the run) plus the
communication of its collective; the ranks of an emulated node share its one link.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..cluster import hydra, jobs
from ..cluster.errors import MpicnnError
from ..cluster.netns import BURST_BYTES, Cluster, free_subnet
from . import launch

MIN_PROBE_BYTES = 64 * 1024     # below this, MPI's eager protocol follows another line
SUFFIX = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


# ---- cost models (pure functions: seconds of communication per step) -----------------

def ring_seconds(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Ring allreduce of ``nbytes`` over ``p`` ranks."""
    return 0.0 if p <= 1 else 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta


def hierarchical_seconds(p: int, nbytes: float, per_node: int, inter: tuple,
                         intra: tuple) -> float:
    """Reduce-scatter in the node, ring over nodes on 1/g of the data, all-gather in the node."""
    local = min(p, per_node)
    nodes = math.ceil(p / local)
    # reduce-scatter + all-gather inside the node cost what a ring allreduce does there
    return ring_seconds(local, nbytes, *intra) + ring_seconds(nodes, nbytes / local, *inter)


def flat_ring_seconds(p: int, nbytes: float, per_node: int, inter: tuple,
                      intra: tuple) -> float:
    """One ring over all ranks, paced by its slowest link once p spans nodes."""
    if p <= per_node:
        return ring_seconds(p, nbytes, *intra)
    return ring_seconds(p, nbytes, max(inter[0], intra[0]), max(inter[1], intra[1]))


def shared_link_seconds(pattern: str, nodes: int, per_node: int, nbytes: float,
                        inter: tuple, intra: tuple) -> float:
    """Communication per step when a node's ranks share its one link (emulated nodes).

    ``ring``: one ring over every rank, paced by the node links; ``nodes``: a ring
    within the node, then the node sums over a ring of the nodes (hierarchical, or
    shared-memory windows whose slices cross together: the link carries the whole
    gradient either way).
    """
    if pattern == "ring":
        return flat_ring_seconds(nodes * per_node, nbytes, per_node, inter, intra)
    return ring_seconds(per_node, nbytes, *intra) + ring_seconds(nodes, nbytes, *inter)


def ps_seconds(workers: int, nbytes: float, servers: int, alpha: float, beta: float) -> float:
    """Synchronous parameter server: every worker pushes M/S to each server, then pulls it."""
    return 2 * (servers * alpha + max(nbytes, workers * nbytes / servers) * beta)


def fit_alpha_beta(sizes, seconds, ranks: int = 2, iterations: int = 200):
    """(alpha, beta) of the ring model minimising the largest relative error (Lawson)."""
    sizes = np.asarray(sizes, dtype=float)
    seconds = np.asarray(seconds, dtype=float)
    scale = sizes.mean()          # columns of similar size keep the solve well conditioned
    # the ring model is linear: t = c0 + c1 * m with c0 = 2(p-1) alpha, c1 = 2(p-1)/p beta
    design = np.stack([np.ones_like(sizes), sizes / scale], axis=1) / seconds[:, None]
    weights = np.full(len(sizes), 1.0 / len(sizes))
    best, best_error = np.zeros(2), np.inf
    for _ in range(iterations):
        root = np.sqrt(weights)
        coef = np.linalg.lstsq(design * root[:, None], root, rcond=None)[0]
        error = np.abs(design @ coef - 1.0)
        if error.max() < best_error:
            best, best_error = coef, error.max()
        if best_error < 1e-12:
            break
        weights = weights * error / (weights * error).sum()
    c0, c1 = best[0], best[1] / scale
    if c0 < 0 or c1 <= 0:      # no latency visible: slope alone, extremes balanced
        ratio = sizes / seconds
        c0, c1 = 0.0, 2.0 / (ratio.min() + ratio.max())
    steps = 2 * (ranks - 1)
    return c0 / steps, c1 / (steps / ranks)


def parse_bytes(text: str) -> int:
    """``64K``, ``4M``, ``1G`` or a plain number of bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in SUFFIX else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * SUFFIX[unit])
    except ValueError:
        raise MpicnnError(f"--sizes: {text!r} is not a size like 64K or 4M") from None


def probe_sizes(gradient_bytes: int, short: bool) -> list[int]:
    """Message sizes around the model's gradient, doubling (quadrupling when short)."""
    low = max(MIN_PROBE_BYTES, gradient_bytes // 32)
    high = max(gradient_bytes, 16 * low)
    factor = 4 if short else 2
    sizes = [low]
    while sizes[-1] * factor <= high:
        sizes.append(sizes[-1] * factor)
    return sizes


def link_probe_sizes(gradient_bytes: int, short: bool) -> list[int]:
    """Sizes for a shaped link: from 4 tbf bursts or a quarter gradient up to 2 gradients.

    tbf passes its burst unshaped: smaller messages would show the line rate, not the link's.
    """
    low = max(4 * BURST_BYTES, gradient_bytes // 4)
    sizes, factor = [low], 4 if short else 2
    while sizes[-1] * factor <= max(2 * gradient_bytes, factor * low):
        sizes.append(sizes[-1] * factor)
    return sizes


# ---- measurements ------------------------------------------------------------------

def probe(argv) -> int:
    """Under mpirun: time Allreduce at each size; rank 0 prints one JSON line.

    Sizes are visited round-robin and each keeps its fastest round, so a burst of
    load from other processes spoils one sample of every size rather than one size;
    rounds go on until ``seconds`` have passed (at least ``min_rounds``).
    """
    from mpi4py import MPI

    sizes, seconds, min_rounds = argv[0], float(argv[1]), int(argv[2])
    sizes = [int(s) for s in sizes.split(",")]
    comm = MPI.COMM_WORLD
    buffers = [np.ones(max(1, n // 4), dtype=np.float32) for n in sizes]
    best = np.full(len(sizes), np.inf)
    samples = [[] for _ in sizes]
    start, rounds = time.perf_counter(), 0
    while True:
        for i, buf in enumerate(buffers):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            took = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if rounds >= 2:    # the first rounds set up connections and caches
                best[i] = min(best[i], took)
                samples[i].append(took)
        rounds += 1
        done = rounds >= min_rounds + 2 and time.perf_counter() - start > seconds
        if comm.bcast(done, root=0):
            break
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "sizes": sizes, "seconds": best.tolist(),
                          "median": [float(np.median(s)) for s in samples],
                          "rounds": rounds - 2}))
    return 0


def measure_allreduce(sizes, seconds: float, min_rounds: int, timeout: float) -> dict:
    """Allreduce times at ``sizes`` between 2 ranks (this module's ``--probe`` under mpirun)."""
    return launch.json_result(2, "mpicnn.bench", ["scale", "--probe", ",".join(map(str, sizes)),
                                                  seconds, min_rounds], timeout)


def measure_training(n: int, opts, workdir: str, timeout: float) -> dict:
    """A real ``mpicnn.train`` run: its end record and median phase split per step."""
    from ..observe.steps import PHASES

    every = max(1, opts.steps // 6)
    run = launch.train(n, ["--data", opts.data, "--model", opts.model,
                           "--batch-size", opts.batch_size, "--threads", opts.threads,
                           "--max-steps", opts.steps, "--epochs", 1000, "--log-every", every,
                           "--progress", "off"], os.path.join(workdir, f"train-{n}.jsonl"),
                       timeout)
    intervals = run.intervals[1:] or run.intervals      # the first holds the warm-up
    step_ms = [sum(r[f"{p}_ms"] for p in PHASES if p != "comm") for r in intervals]
    return {"ranks": n, "images_per_s": run.end["images_per_s"],
            "compute_ms": float(np.median(step_ms)),
            "comm_ms": float(np.median([r["comm_ms"] for r in intervals]))}


def _model(data_path: str, model_name: str):
    from ..data.schema import open_dataset
    from ..training.models import build_model

    data = open_dataset(data_path)
    try:
        return build_model(model_name, data.input_shape, data.num_classes)
    finally:
        data.close()


def gradient_bytes(data_path: str, model_name: str) -> int:
    """Bytes of all trainable gradients of ``model_name`` on ``data_path``'s shape."""
    return sum(p.numel() * p.element_size() for p in _model(data_path, model_name).parameters()
               if p.requires_grad)


def param_shapes(data_path: str, model_name: str) -> list[tuple[int, ...]]:
    """The shape of every trainable parameter of ``model_name`` on ``data_path``'s shape."""
    return [tuple(p.shape) for p in _model(data_path, model_name).parameters()
            if p.requires_grad]


def linear_shapes(data_path: str, model_name: str) -> list[tuple[int, int]]:
    """(in, out) of every trained fully connected layer of ``model_name``."""
    from torch import nn

    return [(m.in_features, m.out_features) for m in _model(data_path, model_name).modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad]


# ---- prediction and output -----------------------------------------------------------

def predict(compute_s: float, batch: int, nbytes: float, inter: tuple, intra: tuple,
            per_node: int, servers: int, max_ranks: int) -> list[dict]:
    """Throughput and efficiency of each scheme at p = 1, 2, 4, ... max_ranks."""
    rows, p = [], 1
    while p <= max_ranks:
        comm = {"ring": flat_ring_seconds(p, nbytes, per_node, inter, intra),
                "hierarchical": hierarchical_seconds(p, nbytes, per_node, inter, intra),
                "ps": ps_seconds(p, nbytes, servers, *inter) if p > 1 else 0.0}
        row = {"ranks": p}
        for name, seconds in comm.items():
            row[f"{name}_images_per_s"] = p * batch / (compute_s + seconds)
            row[f"{name}_efficiency"] = compute_s / (compute_s + seconds)
        rows.append(row)
        p *= 2
    return rows


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us"


def format_report(result: dict) -> str:
    r = result
    lines = [f"scaling report: {r['model']}, batch {r['batch']}/rank, gradient "
             f"{r['gradient_bytes'] / 2 ** 20:.2f} MiB, compute {r['compute_ms']:.2f} ms/step "
             f"(1 rank, {r['threads']} thread(s))",
             f"allreduce between 2 ranks here (fastest of {r['probe']['rounds']} rounds): "
             f"alpha {_us(r['alpha'])}, beta {r['beta'] * 1e9:.3f} ns/B "
             f"({1e-9 / r['beta']:.2f} GB/s); largest fit error {r['fit_error']:.0%}",
             f"  {'bytes':>10} {'measured':>12} {'fitted':>12} {'error':>7}"]
    for size, measured, fitted in zip(r["probe"]["sizes"], r["probe"]["seconds"], r["fitted"]):
        lines.append(f"  {size:>10,} {_us(measured):>12} {_us(fitted):>12} "
                     f"{fitted / measured - 1:>+7.0%}")
    lines.append(f"model: inter-node alpha {_us(r['inter'][0])}, {1e-9 / r['inter'][1]:.2f} GB/s"
                 f"{' (given)' if r['inter_given'] else ' (measured here)'}; intra-node alpha "
                 f"{_us(r['intra'][0])}, {1e-9 / r['intra'][1]:.2f} GB/s; "
                 f"{r['per_node']} ranks/node; PS with {r['servers']} server rank(s) beside the "
                 f"workers; no overlap")
    head = (f"  {'ranks':>5} | {'ring img/s':>11} {'eff':>5} | {'hier img/s':>11} {'eff':>5} | "
            f"{'ps img/s':>11} {'eff':>5}")
    lines += [head, "  " + "-" * (len(head) - 2)]
    for row in r["predictions"]:
        cells = " | ".join(f"{row[f'{k}_images_per_s']:>11,.0f} {row[f'{k}_efficiency']:>5.0%}"
                           for k in ("ring", "hierarchical", "ps"))
        lines.append(f"  {row['ranks']:>5} | {cells}")
    lines.append("measured here vs predicted (ring allreduce, this machine's alpha/beta; the "
                 "measured comm includes waiting for the slower rank):")
    for m in r["measured"]:
        ratio = m["predicted"] / m["images_per_s"]
        lines.append(f"  {m['ranks']} rank(s): measured {m['images_per_s']:,.0f} img/s, "
                     f"predicted {m['predicted']:,.0f} img/s ({ratio:.2f}x); comm "
                     f"{m['comm_ms']:.2f} ms/step measured vs {m['predicted_comm_ms']:.2f} ms "
                     f"predicted")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["predictions"]
    ranks = [row["ranks"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=100, layout="constrained")
    ideal = [p * rows[0]["ring_images_per_s"] for p in ranks]
    left.plot(ranks, ideal, color="0.6", linestyle=":", label="linear scaling")
    labels = {"ring": "ring allreduce", "hierarchical":
              f"hierarchical allreduce ({result['per_node']}/node)",
              "ps": f"parameter server ({result['servers']} servers)"}
    for key, label in labels.items():
        left.plot(ranks, [row[f"{key}_images_per_s"] for row in rows], marker=".", label=label)
        right.plot(ranks, [100 * row[f"{key}_efficiency"] for row in rows], marker=".",
                   label=label)
    measured = result["measured"]
    left.scatter([m["ranks"] for m in measured], [m["images_per_s"] for m in measured],
                 color="black", zorder=5, label="measured here")
    left.set(xscale="log", yscale="log", xlabel="ranks (per-rank batch fixed)",
             ylabel="images / s", title="Predicted throughput")
    right.set(xscale="log", xlabel="ranks", ylabel="scaling efficiency (%)", ylim=(0, 105),
              title="Predicted efficiency")
    for ax in (left, right):
        ax.set_xticks(ranks, [str(p) for p in ranks])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    inter = result["inter"]
    fig.suptitle(f"{result['model']}, batch {result['batch']}/rank, "
                 f"{result['gradient_bytes'] / 2 ** 20:.2f} MiB gradients, "
                 f"{result['compute_ms']:.1f} ms compute; inter-node alpha "
                 f"{inter[0] * 1e6:.1f} us, {1e-9 / inter[1]:.2f} GB/s")
    fig.savefig(path)
    plt.close(fig)


def probe_across(cluster: Cluster, sizes, seconds: float, rounds: int, same_node: bool,
                 timeout: float) -> dict:
    """Allreduce times between 2 ranks on two emulated nodes (or on one of them)."""
    command = jobs.python_command("-m", "mpicnn.bench", "scale", "--probe",
                                  ",".join(map(str, sizes)), seconds, rounds)
    done = hydra.run(cluster, command, 2 if same_node else 1, 2, timeout=timeout,
                     capture=True)
    if done.returncode != 0 or done.hung:
        raise MpicnnError(done.describe("(allreduce probe across emulated nodes) failed"))
    return json.loads([x for x in done.stdout.splitlines() if x.startswith("{")][-1])


def predict_cluster_runs(rows: list[dict], nbytes: int, inter: tuple, intra: tuple,
                         rate: str) -> list[dict]:
    """Predicted images/s of each ``bench cluster`` row at ``rate``, beside the measured.

    A row's ``pattern`` says how its traffic crosses the links (none: the no-comm
    ceiling, whose images/s give the compute time), ``wire`` its bytes per gradient byte,
    ``dense_bytes`` what of the gradient travels whole and ``factor_bytes`` the factors
    that enter each node (an Allgather: one message's latency, then the link).
    """
    rows = [r for r in rows if r["images_per_s"]]          # runs that failed: nothing to check
    ceilings = {(r["nodes"], r["ranks_per_node"], r["batch"]): r["images_per_s"]
                for r in rows if r["pattern"] is None and r["rate"] == rate}
    out = []
    for r in rows:
        key = (r["nodes"], r["ranks_per_node"], r["batch"])
        if r["rate"] != rate or r["pattern"] is None or key not in ceilings:
            continue
        ranks = r["nodes"] * r["ranks_per_node"]
        compute = ranks * r["batch"] / ceilings[key]
        comm = shared_link_seconds(r["pattern"], r["nodes"], r["ranks_per_node"],
                                   r["wire"] * r.get("dense_bytes", nbytes), inter, intra)
        if r.get("factor_bytes"):
            comm += inter[0] + r["wire"] * r["factor_bytes"] * inter[1]
        predicted = ranks * r["batch"] / (compute + comm)
        out.append({**{k: r[k] for k in ("nodes", "ranks_per_node", "batch", "variant")},
                    "measured": r["images_per_s"], "predicted": predicted,
                    "error": predicted / r["images_per_s"] - 1,
                    "compute_ms": 1000 * compute, "comm_ms": 1000 * comm})
    return out


def check_cluster(opts) -> dict:
    """Measure alpha/beta on emulated links at ``--link`` and predict ``--compare``'s runs."""
    try:
        results = json.loads(Path(opts.compare).read_text())
        rows, nbytes = results["rows"], results["gradient_bytes"]
    except (OSError, ValueError, KeyError) as exc:
        raise MpicnnError(f"--compare {opts.compare}: not a file written by bench cluster "
                          f"--json ({exc})") from None
    sizes = [parse_bytes(x) for x in opts.sizes.split(",") if x.strip()]
    sizes = sizes or link_probe_sizes(nbytes, opts.short)
    seconds = min(opts.probe_seconds, 3.0) if opts.short else opts.probe_seconds
    rounds = 3 if opts.short else 20
    cluster = Cluster(f"m{os.getpid() % 100000}", 2, free_subnet(os.getpid() % 256 + 128),
                      rate=opts.link).up()
    try:
        across = probe_across(cluster, sizes, seconds, rounds, False, 600)
        within = probe_across(cluster, sizes, seconds, rounds, True, 600)
    finally:
        cluster.down()
    inter = fit_alpha_beta(across["sizes"], across["seconds"], 2)
    intra = fit_alpha_beta(within["sizes"], within["seconds"], 2)
    return {"link": opts.link, "inter": inter, "intra": intra, "across": across,
            "within": within, "model": results.get("model"), "gradient_bytes": nbytes,
            "runs": predict_cluster_runs(rows, nbytes, inter, intra, opts.link)}


def format_check(check: dict) -> str:
    inter, intra = check["inter"], check["intra"]
    title = (f"scaling model vs bench cluster at {check['link']} ({check['model']}, "
             f"{check['gradient_bytes'] / 2 ** 20:.2f} MiB of gradients): across nodes alpha "
             f"{_us(inter[0])}, {1e-9 / inter[1]:.3f} GB/s; within a node alpha "
             f"{_us(intra[0])}, {1e-9 / intra[1]:.2f} GB/s (2 ranks each, emulated)")
    head = (f"  {'shape':>5} {'batch':>5}  {'variant':<17} {'measured':>9} {'predicted':>9} "
            f"{'error':>7} {'compute ms':>10} {'comm ms':>8}")
    lines = [title, head]
    for r in check["runs"]:
        lines.append(f"  {r['nodes']}x{r['ranks_per_node']:<3} {r['batch']:>5}  "
                     f"{r['variant']:<17} {r['measured']:>9.1f} {r['predicted']:>9.1f} "
                     f"{r['error']:>+7.0%} {r['compute_ms']:>10.1f} {r['comm_ms']:>8.1f}")
    if not check["runs"]:
        lines.append(f"  (no run at {check['link']} in the results)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpicnn.bench scale",
                                     description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--model", default="digitnet", help="zoo name (default: digitnet)")
    parser.add_argument("--data", default=str(launch.ROOT / "data" / "digits.h5"),
                        help="HDF5 dataset (default: the shipped digits)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per rank per step")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank in the training runs (default 1, so "
                             "that 2 ranks do not fight over the cores of a small machine)")
    parser.add_argument("--steps", type=int, default=120, help="steps per training run")
    parser.add_argument("--sizes", default="",
                        help="allreduce message sizes, e.g. 64K,256K,1M,4M (default: around "
                             "the model's gradient size)")
    parser.add_argument("--probe-seconds", type=float, default=10.0,
                        help="time spent timing allreduce")
    parser.add_argument("--alpha", type=float, help="inter-node latency in seconds "
                                                    "(default: measured here)")
    parser.add_argument("--beta", type=float, help="inter-node seconds per byte "
                                                   "(default: measured here)")
    parser.add_argument("--bandwidth", type=float, help="inter-node bandwidth in GB/s "
                                                        "(sets --beta = 1 / bandwidth)")
    parser.add_argument("--intra-alpha", type=float, help="intra-node latency (default: "
                                                          "measured here)")
    parser.add_argument("--intra-beta", type=float, help="intra-node seconds per byte "
                                                         "(default: measured here)")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--servers", type=int, default=4, help="parameter-server ranks")
    parser.add_argument("--max-ranks", type=int, default=1024)
    parser.add_argument("--short", action="store_true",
                        help="quick run: fewer sizes, steps and probe time (for tests)")
    parser.add_argument("--plot", default="scale.png", help="PNG to write ('' for none)")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    parser.add_argument("--reuse", default="", metavar="JSON",
                        help="skip measuring: take the measurements of an earlier --json "
                             "file (e.g. to model another interconnect)")
    parser.add_argument("--link", metavar="RATE",
                        help="with --compare: measure alpha/beta across two emulated nodes "
                             "with links at RATE (tc, e.g. 1gbit; needs root)")
    parser.add_argument("--compare", metavar="JSON",
                        help="with --link: predict the runs of a bench cluster --json file")
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    return parser


def measure(opts) -> dict:
    """What this machine shows: gradient bytes, allreduce costs, 1- and 2-rank runs."""
    if opts.short:
        opts.steps, opts.probe_seconds = min(opts.steps, 24), min(opts.probe_seconds, 3.0)
    nbytes = gradient_bytes(opts.data, opts.model)
    sizes = [parse_bytes(s) for s in opts.sizes.split(",") if s.strip()]
    sizes = sizes or probe_sizes(nbytes, opts.short)
    if len(sizes) < 2:
        raise MpicnnError("--sizes needs at least two sizes to fit alpha and beta")
    timeout = 600.0
    probe_result = measure_allreduce(sizes, opts.probe_seconds, 5 if opts.short else 20,
                                     timeout)
    with tempfile.TemporaryDirectory(prefix="mpicnn-scale-") as workdir:
        runs = [measure_training(n, opts, workdir, timeout) for n in (1, 2)]
    return {"model": opts.model, "batch": opts.batch_size, "threads": opts.threads,
            "gradient_bytes": nbytes, "probe": probe_result, "measured": runs}


def reuse(path: str) -> dict:
    """The measurements of an earlier ``--json`` file, to model other interconnects."""
    try:
        saved = json.loads(Path(path).read_text())
        return {k: saved[k] for k in ("model", "batch", "threads", "gradient_bytes", "probe",
                                      "measured")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MpicnnError(f"--reuse {path}: not a file written by --json ({exc})") from None


def model(found: dict, opts) -> dict:
    """Fit alpha/beta to the measurements and predict every scheme at every size."""
    probe_result, nbytes, batch = found["probe"], found["gradient_bytes"], found["batch"]
    alpha, beta = fit_alpha_beta(probe_result["sizes"], probe_result["seconds"],
                                 probe_result["ranks"])
    fitted = [ring_seconds(probe_result["ranks"], s, alpha, beta) for s in probe_result["sizes"]]
    fit_error = max(abs(f / m - 1) for f, m in zip(fitted, probe_result["seconds"]))
    if opts.bandwidth:
        opts.beta = 1e-9 / opts.bandwidth
    inter = (alpha if opts.alpha is None else opts.alpha, beta if opts.beta is None else opts.beta)
    intra = (alpha if opts.intra_alpha is None else opts.intra_alpha,
             beta if opts.intra_beta is None else opts.intra_beta)
    runs = found["measured"]
    compute_s = runs[0]["compute_ms"] / 1000
    here = predict(compute_s, batch, nbytes, (alpha, beta), (alpha, beta),
                   opts.ranks_per_node, opts.servers, 2)
    for measured, row in zip(runs, here):
        measured["predicted"] = row["ring_images_per_s"]
        measured["predicted_comm_ms"] = 1000 * ring_seconds(row["ranks"], nbytes, alpha, beta)
    return {**found, "compute_ms": runs[0]["compute_ms"], "alpha": alpha, "beta": beta,
            "fitted": fitted, "fit_error": fit_error, "inter": inter, "intra": intra,
            "inter_given": opts.alpha is not None or opts.beta is not None,
            "per_node": opts.ranks_per_node, "servers": opts.servers,
            "predictions": predict(compute_s, batch, nbytes, inter, intra,
                                   opts.ranks_per_node, opts.servers, opts.max_ranks)}


def run(opts) -> dict:
    """Measure (or reuse earlier measurements), fit and predict."""
    for name in ("batch_size", "threads", "steps", "ranks_per_node", "servers", "max_ranks"):
        if getattr(opts, name) < 1:
            raise MpicnnError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("alpha", "beta", "bandwidth", "intra_alpha", "intra_beta"):
        value = getattr(opts, name)
        if value is not None and not value > 0:
            raise MpicnnError(f"--{name.replace('_', '-')} must be positive")
    return model(reuse(opts.reuse) if opts.reuse else measure(opts), opts)


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.probe:
        return probe(opts.probe)
    if bool(opts.link) != bool(opts.compare):
        raise MpicnnError("--link and --compare go together: --link 1gbit --compare "
                          "cluster.json")
    if opts.link:
        check = check_cluster(opts)
        print(format_check(check))
        if opts.json:
            Path(opts.json).write_text(json.dumps(check, indent=1))
        return 0
    result = run(opts)
    print(format_report(result))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))
    if opts.plot:
        plot(result, opts.plot)
        print(f"plot written to {opts.plot}")
    return 0
