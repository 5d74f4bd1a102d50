"""Defaults inside a batch job: one output directory per job id, resumed after a requeue."""
from __future__ import annotations

import re
from pathlib import Path

RUNS_DIR = "runs"
METRICS_FILE = "metrics.jsonl"


def job_dir(job) -> str:
    """``runs/<job name>-<job id>``: the same directory again when the job is requeued."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", job.name).strip("._") or job.scheduler
    return str(Path(RUNS_DIR) / f"{name}-{job.job_id}")


def job_defaults(job) -> dict:
    """Config defaults for a run inside ``job`` (a ``world.BatchJob``, or None).

    Checkpoints and metrics go to the job's own directory; a requeued job resumes from
    its latest checkpoint. The first run of a job never resumes by default, so a second
    training in the same job cannot silently continue the first one's final checkpoint.
    A config file or flags override these (``--checkpoint-dir ''`` writes none).
    """
    if job is None:
        return {}
    defaults = {"checkpoint_dir": job_dir(job),
                "metrics": str(Path(job_dir(job)) / METRICS_FILE)}
    if job.restarts > 0:
        defaults["resume"] = "auto"
    return defaults
