"""``python -m mpicnn.report run.jsonl [more.jsonl ...] -o report.png``: runs side by side.

Panels: training/validation loss, validation accuracy, throughput, the time split per
step, and, when a run has them (parameter-server modes), the staleness histogram and
the updates applied by each server. One file holds one run (a resumed run appends to
its file and continues); every file given becomes one colour in every panel.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cluster.errors import MpicnnError, run_tool
from .steps import PHASES, WAIT_PHASES

SPLIT_ORDER = PHASES + WAIT_PHASES
SPLIT_LABELS = {"data": "data wait", "forward": "forward", "backward": "backward",
                "comm": "communication (not hidden)", "optimizer": "optimizer",
                "ps_push": "PS push wait", "ps_pull": "PS pull wait"}
PANEL_INCHES = (6.0, 4.5)
DPI = 100


@dataclass
class Run:
    """The records of one metrics file, by kind."""

    label: str
    config: dict = field(default_factory=dict)
    intervals: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    end: dict = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> float:
        return float(self.config.get("steps_per_epoch") or 0) or float("nan")

    def epoch_of(self, record: dict) -> float:
        """Where ``record`` lies in epochs (fractional within an epoch)."""
        per_epoch = self.steps_per_epoch
        return record["step"] / per_epoch if per_epoch == per_epoch else record["epoch"]

    def split_ms(self) -> dict:
        """Mean milliseconds per step in each phase, weighted by steps, over the run."""
        rows = [(r, r["steps"]) for r in self.intervals] or [(r, 1) for r in self.epochs]
        total = sum(w for _, w in rows)
        return {p: sum(r.get(f"{p}_ms", 0.0) * w for r, w in rows) / total
                for p in SPLIT_ORDER if total and any(f"{p}_ms" in r for r, _ in rows)}

    def last_with(self, name: str):
        """The newest value of ``name`` in the end record, else in the epoch records."""
        for record in [self.end, *reversed(self.epochs)]:
            if name in record:
                return record[name]
        return None


def load_run(path: str, label: str | None = None) -> Run:
    """Read one metrics JSONL file; raise MpicnnError when it is not one."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise MpicnnError(f"cannot read metrics file {path!r}: {exc.strerror}") from None
    run = Run(label or Path(path).stem)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise MpicnnError(f"{path}:{number}: not a JSON line; give files written by "
                              f"--metrics") from None
        kind = record.get("event") if isinstance(record, dict) else None
        if kind == "config":
            run.config = record
        elif kind == "interval":
            run.intervals.append(record)
        elif kind == "epoch":
            run.epochs.append(record)
        elif kind == "end":
            run.end = record
    if not (run.intervals or run.epochs):
        raise MpicnnError(f"{path}: no interval or epoch records; was it written by "
                          f"`python -m mpicnn.train --metrics {path}`?")
    return run


def describe(run: Run) -> str:
    """Legend text: label (mode, ranks)."""
    mode, ranks = run.config.get("mode"), run.config.get("world_size")
    count = ranks and f"{ranks} rank{'s' if ranks != 1 else ''}"
    extra = ", ".join(str(v) for v in (mode, count) if v)
    return f"{run.label} ({extra})" if extra else run.label


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_loss(ax, runs, colours) -> None:
    for run, colour in zip(runs, colours):
        if run.intervals:
            ax.plot([run.epoch_of(r) for r in run.intervals], [r["loss"] for r in run.intervals],
                    color=colour, label=f"{describe(run)} train")
        ax.plot([run.epoch_of(r) for r in run.epochs], [r["val_loss"] for r in run.epochs],
                color=colour, linestyle="--", marker="o", label=f"{describe(run)} validation")
    ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    ax.legend(fontsize="small")


def plot_accuracy(ax, runs, colours) -> None:
    for run, colour in zip(runs, colours):
        ax.plot([run.epoch_of(r) for r in run.epochs], [100 * r["val_acc"] for r in run.epochs],
                color=colour, marker="o", label=describe(run))
    ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax.legend(fontsize="small")


def plot_throughput(ax, runs, colours) -> None:
    for run, colour in zip(runs, colours):
        rows = run.intervals or run.epochs
        overall = run.end.get("images_per_s")
        label = describe(run) + (f": {overall:.0f} images/s overall" if overall else "")
        ax.plot([run.epoch_of(r) for r in rows], [r["images_per_s"] for r in rows],
                color=colour, marker=".", label=label)
    ax.set(title="Training throughput", xlabel="epoch", ylabel="images / s (all ranks)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="lower center")


def plot_split(ax, runs, colours) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    splits = [run.split_ms() for run in runs]
    names = [describe(run) for run in runs]
    lefts = [0.0] * len(runs)
    for index, phase in enumerate(SPLIT_ORDER):
        widths = [s.get(phase, 0.0) for s in splits]
        if not any(widths):
            continue
        bars = ax.barh(names, widths, left=lefts, color=cmap(index), label=SPLIT_LABELS[phase])
        ax.bar_label(bars, labels=[f"{w:.1f}" if w >= 0.08 * max(sum(s.values()) for s in splits)
                                   else "" for w in widths], label_type="center",
                     fontsize="small")
        lefts = [a + b for a, b in zip(lefts, widths)]
    ax.set(title="Where a training step's time goes",
           xlabel="milliseconds per step (mean over ranks)")
    ax.invert_yaxis()
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)


def _grouped_bars(ax, runs, colours, series) -> None:
    """Bars of ``series[i] = {x: y}`` side by side for the runs that have any."""
    present = [(run, colour, values) for run, colour, values in zip(runs, colours, series)
               if values]
    width = 0.8 / max(1, len(present))
    for i, (run, colour, values) in enumerate(present):
        xs = sorted(values)
        ax.bar([x + (i - (len(present) - 1) / 2) * width for x in xs], [values[x] for x in xs],
               width=width, color=colour, label=describe(run))
    ticks = sorted({x for _, _, values in present for x in values})
    if ticks:
        ax.set_xticks(ticks)


def plot_staleness(ax, runs, colours) -> None:
    series = []
    for run in runs:
        hist = run.last_with("staleness_hist") or {}
        series.append({int(k): v for k, v in hist.items()})
    _grouped_bars(ax, runs, colours, series)
    ax.set(title="Gradient staleness (parameter server)",
           xlabel="staleness (versions behind when applied)", ylabel="updates")
    if not any(series):
        _note(ax, "no staleness recorded")
    else:
        ax.legend(fontsize="small")


def plot_servers(ax, runs, colours) -> None:
    series = [dict(enumerate(run.last_with("updates_per_server") or [])) for run in runs]
    _grouped_bars(ax, runs, colours, series)
    ax.set(title="Updates applied per server", xlabel="server", ylabel="updates")
    if not any(series):
        _note(ax, "no per-server counts recorded")
    else:
        ax.legend(fontsize="small")


def render(runs: list[Run], out: str, title: str = "") -> list[str]:
    """Draw the report PNG; returns the panel titles, in reading order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [plot_loss, plot_accuracy, plot_throughput, plot_split]
    if any(run.last_with("staleness_hist") or run.last_with("updates_per_server")
           for run in runs):
        panels = [plot_loss, plot_accuracy, plot_throughput, plot_split, plot_staleness,
                  plot_servers]
    columns = len(panels) // 2
    fig, axes = plt.subplots(2, columns, figsize=(PANEL_INCHES[0] * columns,
                                                  PANEL_INCHES[1] * 2), dpi=DPI,
                             layout="constrained")
    colours = [matplotlib.colormaps["Set1"](i % 9) for i in range(len(runs))]
    axes = list(axes.flat)
    for panel, ax in zip(panels, axes):
        panel(ax, runs, colours)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "mpicnn run report: " + ", ".join(describe(r) for r in runs))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return [ax.get_title() for ax in axes]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpicnn.report",
                                     description="Plot one or more --metrics JSONL files "
                                                 "side by side (needs matplotlib: the "
                                                 "'plots' extra).")
    parser.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="metrics files")
    parser.add_argument("-o", "--output", default="report.png", help="PNG to write")
    parser.add_argument("--labels", default="", help="comma-separated names for the runs "
                                                     "(default: the file names)")
    parser.add_argument("--title", default="", help="figure title")
    return parser


def main(argv=None) -> int:
    return run_tool(_report, build_parser().parse_args(argv))


def _report(args) -> int:
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else []
    if labels and len(labels) != len(args.runs):
        raise MpicnnError(f"--labels names {len(labels)} runs but {len(args.runs)} files "
                          f"were given")
    runs = [load_run(path, labels[i] if labels else None) for i, path in enumerate(args.runs)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MpicnnError("the report needs matplotlib: pip install 'mpicnn[plots]'") from None
    titles = render(runs, args.output, args.title)
    print(f"mpicnn: wrote {args.output}: {', '.join(titles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
