"""``--mpi-wait``: how MPI waits, decided before MPI starts and handed to the library."""
from __future__ import annotations

import pytest
from conftest import DIGITS, QUIET, mpirun
from drill import assert_one_clean_error, run_job

from mpicnn.cluster import mpi_wait

PROBE = """import os, sys
from mpicnn.train import main
code = main(sys.argv[1:])
with open("{out}" + os.environ["PMI_RANK"], "w") as seen:
    seen.write(os.environ.get("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "-"))
sys.exit(code)
"""
TRAIN = [*QUIET, "--data", str(DIGITS), "--epochs", "1", "--max-steps", "2"]


def test_the_command_line_wins_over_the_environment():
    env = {mpi_wait.ENV: "busy"}
    assert mpi_wait.requested(["--lr", "0.1", "--mpi-wait", "yield"], env) == "yield"
    assert mpi_wait.requested(["--mpi-wait=busy"], {mpi_wait.ENV: "yield"}) == "busy"
    assert mpi_wait.requested(["--lr", "0.1"], env) == "busy"
    assert mpi_wait.requested([], {}) == "busy"
    assert mpi_wait.requested(["--mpi-wait"], {}) == "busy"       # argparse says the rest


def test_yield_sets_the_libraries_variables_but_keeps_the_users():
    env = {"MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "50"}
    assert mpi_wait.prepare(["--mpi-wait", "yield"], env) == "yield"
    assert env["MPIR_CVAR_CH4_PROGRESS_THROTTLE"] == "1"
    assert env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] == "1"
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert env["MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT"] == "50"
    busy = {}
    assert mpi_wait.prepare(["--mpi-wait", "busy"], busy) == "busy" and busy == {}


@pytest.mark.mpi
@pytest.mark.parametrize("flags,env,line,throttle", [
    ([], {}, "MPI waits: busy", None),
    (["--mpi-wait", "yield"], {}, "MPI waits: yield", "1"),
    ([], {mpi_wait.ENV: "yield"}, "MPI waits: yield", "1")])
def test_each_rank_starts_mpi_with_the_choice(tmp_path, flags, env, line, throttle):
    probe = tmp_path / "probe.py"                 # mpicnn.train, then what this rank's MPI got
    probe.write_text(PROBE.format(out=tmp_path / "env"))
    run = mpirun(2, [*TRAIN, *flags], script=probe, env=env)
    assert line in run.stdout + run.stderr
    for rank in (0, 1):
        assert (tmp_path / f"env{rank}").read_text() == (throttle or "-")


@pytest.mark.mpi
def test_a_config_file_cannot_set_it_after_mpi_has_started(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[sync]\nmpi_wait = "yield"\n')
    outcome = run_job(2, [*TRAIN, "--config", str(config)], timeout=120)
    assert_one_clean_error(outcome, "give --mpi-wait yield on the command line")
