"""A write that fails (full disk, read-only, no permission): one line, the last checkpoint kept.

The disks are real: small tmpfs mounts (root only; the tests skip, saying so, where
mounting is not permitted).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DIGITS, QUIET, ROOT, mpirun, mpirun_command, run_command

from mpicnn.checkpoint import files as checkpoint
from mpicnn.cluster.errors import MpicnnError
from mpicnn.observe.records import MetricsWriter
from mpicnn.resilience.write_failure import EXIT_CODE, WriteFailed

ERROR = "mpicnn: error:"
# digitnet with AdamW: a checkpoint is 1.8 MB, so the second one does not fit in 3 MB
FULL_AFTER_ONE = ["--data", DIGITS, "--model", "digitnet", "--epochs", 3, *QUIET]


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, size, *options)``: a tmpfs under tmp_path, unmounted at the end."""
    mounted = []

    def mount(name: str, size: str, *options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}",
                                                                        *options]),
                               "tmpfs", str(where)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs as the small disk (needs root): "
                        f"{done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=True)


def the_error(stderr: str) -> str:
    """The one ``mpicnn: error:`` line of a run (fails the test unless there is exactly one)."""
    lines = [line for line in stderr.splitlines() if ERROR in line]
    assert len(lines) == 1 and stderr.count(ERROR) == 1, stderr[-3000:]
    return lines[0]


def assert_stopped_at_the_second_checkpoint(run, ckpt: Path) -> None:
    """Exit 74, one line naming the failed file, the cause and the kept checkpoint, which loads."""
    assert run.returncode == EXIT_CODE, run.stdout[-3000:] + run.stderr[-3000:]
    kept, failed = ckpt / checkpoint.checkpoint_name(44), ckpt / checkpoint.checkpoint_name(88)
    line = the_error(run.stderr)
    assert (f"cannot write checkpoint {str(failed)!r}: No space left on device; "
            f"last good checkpoint: {str(kept)!r}") in line, line
    assert "Traceback" not in run.stderr and "inline_container" not in run.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == [kept.name, "config.toml"]  # no leftover
    state = checkpoint.load(kept)                                # its checksum holds
    assert state["global_step"] == 44 and state["model"]


@pytest.mark.mpi
def test_a_full_checkpoint_disk_is_one_line_and_the_supervisor_does_not_retry(tmpfs):
    ckpt = tmpfs("disk", "3m")
    command = mpirun_command(2, [str(a) for a in [*FULL_AFTER_ONE, "--checkpoint-dir", ckpt]])
    run = run_command([sys.executable, "-m", "mpicnn.run", "--backoff", "0", "--", *command],
                      timeout=300)
    assert_stopped_at_the_second_checkpoint(run, ckpt)
    assert run.stdout.count("mpicnn: run: launch ") == 1
    assert "not restarting: exit 74 is a write that failed for good" in run.stdout


@pytest.mark.mpi
def test_a_full_disk_under_background_writes_is_the_same_line_from_rank_0(tmpfs):
    """The writer thread's error surfaces at the next checkpoint; every rank ends."""
    ckpt = tmpfs("disk", "3m")
    run = mpirun(2, [*FULL_AFTER_ONE, "--checkpoint-dir", ckpt, "--checkpoint-async"],
                 timeout=300, check=False)
    assert_stopped_at_the_second_checkpoint(run, ckpt)
    assert "rank 0: cannot write checkpoint" in run.stderr


@pytest.mark.mpi
def test_a_read_only_metrics_path_is_one_line_before_any_checkpoint(tmpfs):
    metrics = tmpfs("ro", "1m", "ro") / "m.jsonl"
    run = mpirun(2, ["--data", DIGITS, "--model", "lenet", "--epochs", 1, *QUIET,
                     "--metrics", metrics], timeout=300, check=False)
    assert run.returncode == EXIT_CODE
    assert (f"cannot write metrics file {str(metrics)!r}: Read-only file system; no "
            f"checkpoint written yet") in the_error(run.stderr)


def test_metrics_filling_the_disk_name_the_file_and_the_last_checkpoint(tmpfs):
    disk = tmpfs("disk", "64k")
    (disk / "filler").write_bytes(b"x" * (64 * 1024 - 100))
    writer = MetricsWriter(str(disk / "m.jsonl"), last_checkpoint=lambda: "/ckpt/c-9.pt")
    with pytest.raises(WriteFailed) as failed:
        for step in range(1000):
            writer.write("interval", step=step, note="x" * 200)
    assert str(failed.value) == (f"cannot write metrics file {str(disk / 'm.jsonl')!r}: No "
                                 f"space left on device; last good checkpoint: '/ckpt/c-9.pt'")
    assert failed.value.exit_code == EXIT_CODE
    writer.close()                                 # the file is dropped: closing is quiet


def test_a_metrics_path_without_permission_names_the_cause(tmp_path):
    """As a user who may not write there (root may write anywhere: the child drops to nobody)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the writer as another user")
    tmp_path.chmod(0o755)
    code = ("import os, sys\nfrom mpicnn.observe.records import MetricsWriter\n"
            "from mpicnn.cluster.errors import MpicnnError\nos.setgid(65534); os.setuid(65534)\n"
            "try:\n    MetricsWriter(sys.argv[1])\nexcept MpicnnError as exc:\n"
            "    print(exc); sys.exit(exc.exit_code)\n")
    path = tmp_path / "m.jsonl"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == EXIT_CODE, done.stderr
    assert done.stdout.strip() == (f"cannot write metrics file {str(path)!r}: Permission "
                                   f"denied; no checkpoint written yet")


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_says_why(tmpfs):
    import torch

    from mpicnn.checkpoint.writer import Writer

    disk = tmpfs("disk", "1m")
    writer = Writer()
    writer.save({"w": torch.zeros(1000)}, disk / "final.pt")
    with pytest.raises(MpicnnError, match=r"cannot write checkpoint '.*/final\.pt': No space "
                                          r"left on device; last good checkpoint: '.*final"):
        writer.save({"w": torch.ones(1_000_000)}, disk / "final.pt")
    assert checkpoint.load(disk / "final.pt")["w"].sum() == 0       # the old one, whole
    assert [p.name for p in disk.iterdir()] == ["final.pt"]
