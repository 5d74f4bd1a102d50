"""Shared test helpers: launching real MPI jobs and reading what they wrote."""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from mpicnn.cluster import jobs
from mpicnn.cluster.startup import SHM_DIR

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits.h5"
QUIET = ["--progress", "off"]


def read_jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def mpirun_command(n: int, args, module: str = "mpicnn.train", script=None) -> list[str]:
    """``python -m module args`` (or ``python script args``) on n ranks; skip without MPI."""
    program = jobs.python_command(*([script] if script else ["-m", module]), *args)
    try:
        return jobs.mpirun_command(n, program)
    except jobs.LauncherMissing as exc:
        pytest.skip(str(exc))


def job_env(extra: dict | None = None) -> dict:
    """The environment every job gets, with ``extra`` on top."""
    return jobs.job_environment(extra)


def run_command(cmd: list, timeout: float, env: dict | None = None, cwd=ROOT,
                check: bool = False) -> jobs.Finished:
    """Run ``cmd`` in its own process group; fail the test on a hang or (check) an error."""
    try:
        finished = jobs.run(cmd, timeout, env, cwd, check)
    except jobs.JobFailed as exc:
        pytest.fail(str(exc))
    if finished.hung:
        pytest.fail(finished.describe(f"hung for {timeout:.0f} s"))
    return finished


def mpirun(n: int, args, timeout: float = 240, module: str = "mpicnn.train",
           env: dict | None = None, check: bool = True, script=None) -> jobs.Finished:
    """Run ``python -m module args`` on n ranks; fail the test on a hang or (check) an error."""
    return run_command(mpirun_command(n, args, module, script), timeout, env, check=check)


def fail_with_output(what: str, stdout: str, stderr: str):
    """Fail the test, showing the tails of what the job printed."""
    pytest.fail(f"{what}:\n{stdout[-3000:]}\n{stderr[-3000:]}")


def train(tmp_path, name, n, *args, start=mpirun) -> tuple:
    """Launch one run of n ranks writing into tmp_path/name; return (checkpoint dir, end record).

    ``start(n, args)`` starts the ranks and fails the test unless they succeed.
    """
    from mpicnn.observe.records import check_record

    out = tmp_path / name
    start(n, [*args, "--checkpoint-dir", out, "--metrics", out / "m.jsonl", *QUIET])
    records = read_jsonl(out / "m.jsonl")
    assert not [p for r in records for p in check_record(r)]      # schema-valid metrics
    return out, records[-1]


class ListLoader:
    """A loader over a list of (images, labels) batches: every step a whole global batch."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, epoch, start_step=0):
        return iter(self.batches[start_step:])

    def weight(self, epoch, step, worker=None):
        return 1.0


def records(directory, event: str) -> list[dict]:
    """The metrics records of one event type that a :func:`train` run wrote."""
    return [r for r in read_jsonl(directory / "m.jsonl") if r["event"] == event]


def final(directory) -> dict:
    """The final checkpoint a :func:`train` run wrote."""
    import torch

    return torch.load(directory / "final.pt", weights_only=True)


def trained_params(tmp_path, name, n, args, env=None) -> tuple:
    """Run ``mpicnn.train`` on n ranks into tmp_path/name: (the run, its final parameters
    in float64, its metrics records)."""
    import torch

    ckpt, metrics = tmp_path / name, tmp_path / f"{name}.jsonl"
    run = mpirun(n, [*args, "--checkpoint-dir", ckpt, "--metrics", metrics], env=env)
    params = {k: v.double() for k, v in
              torch.load(ckpt / "final.pt", weights_only=True)["model"].items()}
    return run, params, read_jsonl(metrics)


def initial_params(model: str, seed: int, input_shape=(1, 8, 8), classes: int = 10) -> dict:
    """The parameters (float64) a run of ``--model model --seed seed`` starts from.

    The trainer seeds torch and then builds the model; so does this (leaving this
    process's random state as it was): an unseeded model is some other random start.
    Parameters only: buffers such as BatchNorm's statistics move without any training.
    """
    import torch

    from mpicnn.training.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        built = build_model(model, input_shape, classes)
    return {k: v.detach().double() for k, v in built.named_parameters()}


def param_difference(a: dict, b: dict) -> float:
    """Largest difference between two parameter dicts over the names in ``a``."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def max_diff(a: dict, b: dict) -> float:
    """Largest difference between two checkpoints' parameters and optimizer states."""
    import torch

    diffs = [(a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]]
    for i, state in a["optimizer"]["state"].items():
        diffs += [(torch.as_tensor(v) - torch.as_tensor(b["optimizer"]["state"][i][k]))
                  .abs().max().item() for k, v in state.items()]
    return max(diffs)


@pytest.fixture(scope="session")
def digits() -> Path:
    return DIGITS


# The tiers that need root or system packages (emulated nodes, SLURM, Debian's
# Fashion-MNIST) skip where this machine cannot run them, naming what it lacks. In CI
# (CI=true), or with this variable set to 1, they must run: a missing package or a tier
# that fails to start is then a failure, never a skip that a green run would hide.
REQUIRE_TIERS = "MPICNN_REQUIRE_TIERS"
NODE_TOOLS = ("ip", "tc", "unshare", "taskset")     # iproute2 and util-linux


def tiers_required() -> bool:
    """Whether the system tiers must run here (CI, or ``MPICNN_REQUIRE_TIERS=1``)."""
    return (os.environ.get("CI", "").lower() == "true"
            or os.environ.get(REQUIRE_TIERS, "") == "1")


def skip_unless_required(reason: str):
    """Skip naming ``reason``; where the system tiers are required, fail with it instead."""
    if tiers_required():
        pytest.fail(f"{reason} (a required tier here: CI=true or {REQUIRE_TIERS}=1)",
                    pytrace=False)
    pytest.skip(f"{reason} (CI=true or {REQUIRE_TIERS}=1 makes this a failure)")


def need_node_emulation() -> None:
    """Skip unless this machine can emulate nodes: root, network namespaces, iproute2.

    Only what the machine lacks skips everywhere (not root, no namespaces); programs that
    ``.ci/run`` installs are missing only outside CI.
    """
    from mpicnn.cluster.netns import ClusterError, check_tools

    if os.geteuid() != 0:
        pytest.skip("cannot emulate nodes here: not root (namespaces, veth and bridges "
                    "need it)")
    try:
        check_tools(NODE_TOOLS)
    except ClusterError as exc:
        skip_unless_required(f"cannot emulate nodes here: {exc}")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot emulate nodes here: no network namespaces (unshare --net: "
                    f"{probe.stderr.strip() or f'exit {probe.returncode}'})")


def cluster_failed(exc: Exception):
    """A machine that can emulate nodes could not: mpicnn's own cluster code failed.

    A failure where the tier is required; elsewhere a skip that names the error.
    """
    skip_unless_required(f"the emulated cluster failed: {exc}")


@contextmanager
def slurm_tier():
    """Around starting a test SLURM cluster: skip where this is not root; where SLURM is
    not installed, skip outside CI and fail where the tier is required."""
    from slurm_cluster import NotRoot, Unavailable

    try:
        yield
    except NotRoot as exc:
        pytest.skip(f"SLURM cannot run here: {exc}")
    except Unavailable as exc:
        skip_unless_required(f"SLURM not available: {exc}")


def private_cluster(tag: str, **settings):
    """An emulated cluster this test session alone uses: its name and subnet carry our pid.

    Sessions of other checkouts run at the same time; ``up`` removes whatever runs under
    its own name, so a shared name would kill their jobs. Skip where nodes cannot be made
    (fail where the tier is required and the machine could make them).
    """
    from mpicnn.cluster.netns import Cluster, ClusterError, SubnetTaken, free_subnet

    need_node_emulation()
    seed = os.getpid() % 256
    for attempt in range(8):          # another session may take a free subnet meanwhile
        try:
            cluster = Cluster(name=f"{tag}{os.getpid() % 100000}",
                              subnet=free_subnet(seed + 31 * attempt), **settings)
            return cluster.up()
        except SubnetTaken:
            continue
        except ClusterError as exc:
            cluster_failed(exc)
    cluster_failed(SubnetTaken("no free subnet in 10.77.0.0/16 after 8 tries"))


def cluster_while_used(tag: str, **settings):
    """Yield a private emulated cluster (see private_cluster), removed afterwards."""
    cluster = private_cluster(tag, **settings)
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def emulated_cluster():
    """Two emulated nodes for the session, each on cores of its own where there are two."""
    yield from cluster_while_used("t", nodes=2)


@pytest.fixture(scope="session", autouse=True)
def no_mpich_memory_left_behind():
    """Remove the MPICH shared-memory files this session's crashed and killed jobs left.

    A rank that dies without ``MPI_Finalize`` leaves its node's ``/dev/shm/mpich_*`` file,
    which holds memory until the machine reboots (hundreds of megabytes over many
    sessions). Only files new since the session began and mapped by no process go:
    other sessions' live jobs keep theirs.
    """
    before = set(SHM_DIR.glob("mpich_*"))
    yield
    in_use = mapped_files()
    for path in set(SHM_DIR.glob("mpich_*")) - before:
        if str(path) not in in_use:
            path.unlink(missing_ok=True)


def mapped_files() -> set[str]:
    """Paths of the files some process of this machine has mapped."""
    paths = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:                 # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            fields = line.split(None, 5)    # address perms offset device inode [path]
            if len(fields) == 6:
                paths.add(fields[5].strip())
    return paths


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Tests run on CPU unless marked ``gpu``: the jobs they start see no GPU."""
    if "gpu" not in request.keywords:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests cleanly on machines without CUDA (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
