"""The SLURM or PBS job a run belongs to, and the defaults that follow from it.

Inside a batch job, checkpoints and metrics go to one directory per job id, resumed
after a requeue.
"""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

# What schedulers and users send before a job must stop: SLURM's warning (sbatch --signal),
# preemption, scancel and the time limit (SIGTERM), Ctrl-C. SLURM and PBS signal every
# process of the job.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class BatchJob:
    """The batch-scheduler job (SLURM or PBS) this process runs in."""

    scheduler: str                   # "slurm" or "pbs"
    job_id: str                      # array tasks: "<array job id>_<task index>"
    name: str = ""
    restarts: int = 0                # times the scheduler requeued the job

    def __str__(self) -> str:
        again = f", restart {self.restarts}" if self.restarts else ""
        return f"{self.scheduler.upper()} job {self.job_id} ({self.name or 'unnamed'}{again})"


def batch_job(env=None) -> BatchJob | None:
    """The SLURM or PBS job from the launcher's environment; None outside a batch job."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        job_id = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        restarts = env.get("SLURM_RESTART_COUNT", "0")
        return BatchJob("slurm", job_id, env.get("SLURM_JOB_NAME", ""),
                        int(restarts) if restarts.isdigit() else 0)
    if env.get("PBS_JOBID"):
        # "1234.server" or, for an array task, "1234[5].server"
        job_id = env["PBS_JOBID"].split(".", 1)[0].replace("[]", "")
        if "[" in job_id:
            job_id = job_id.replace("[", "_").rstrip("]")
        elif env.get("PBS_ARRAY_INDEX"):
            job_id = f"{job_id}_{env['PBS_ARRAY_INDEX']}"
        return BatchJob("pbs", job_id, env.get("PBS_JOBNAME", ""))
    return None

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
