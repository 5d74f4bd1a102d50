"""Defaults inside a batch job: one output directory per job id, resumed after a requeue."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

RUNS_DIR = "runs"
METRICS_FILE = "metrics.jsonl"


def job_dir(job) -> str:
    """``runs/<job name>-<job id>``: the same directory again when the job is requeued."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", job.name).strip("._") or job.scheduler
    return str(Path(RUNS_DIR) / f"{name}-{job.job_id}")


def apply_job_defaults(cfg, job):
    """Fill unset --checkpoint-dir/--metrics from the job; resume when it was requeued.

    Resuming only after a requeue (not on the first run) keeps a second training in
    the same job from silently continuing the first one's final checkpoint.
    """
    if job is None or not cfg.job_dirs:
        return cfg
    changes = {}
    if not cfg.checkpoint_dir:
        changes["checkpoint_dir"] = job_dir(job)
        if not cfg.resume and job.restarts > 0:
            changes["resume"] = "auto"
    if not cfg.metrics:
        changes["metrics"] = str(Path(job_dir(job)) / METRICS_FILE)
    return dataclasses.replace(cfg, **changes)
