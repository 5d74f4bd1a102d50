"""A built package works away from the checkout: the wheel and ``pip install .``.

Each install goes into a fresh venv (no system site-packages). The dependencies (torch,
mpi4py, h5py, ...) come from this interpreter's site-packages through a ``.pth`` line,
which adds that directory alone: the ``.pth`` files inside it, such as the editable
mpicnn of a development install, do not run there, so ``import mpicnn`` finds only the
installed copy (checked). Commands run from an empty directory, without PYTHONPATH.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_jsonl, run_command

from mpicnn import __version__
from mpicnn.cluster import jobs

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

# what a build reads from the checkout
SOURCES = ["setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md",
           "mpicnn", "data/digits.h5", "data/README.md"]
DEPENDENCIES = Path(torch.__file__).resolve().parents[1]      # the site-packages holding torch
NO_CHECKOUT = {"PYTHONPATH": ""}        # jobs put the checkout on PYTHONPATH: not these
TIMEOUT = 300


def source_copy(target: Path) -> Path:
    """The files a build reads, copied out of the checkout (builds leave theirs alone)."""
    for name in SOURCES:
        source, dest = ROOT / name, target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest)
    return target


def fresh_venv(path: Path) -> Path:
    """A new venv whose only way to this interpreter's packages is a .pth line; its python.

    The libraries that the mpich wheel installs beside the packages (``<prefix>/lib``,
    where mpi4py looks for ``libmpi``) are linked in as installing it would put them.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "dependencies.pth").write_text(f"{DEPENDENCIES}\n")
    libraries = DEPENDENCIES.parents[1]                   # <prefix>/lib
    for entry in libraries.iterdir():
        if not entry.name.startswith("python"):
            (path / "lib" / entry.name).symlink_to(entry)
    return python


def pip(*args, python=None):
    """This interpreter's pip (acting on ``python``'s environment when given)."""
    target = ["--python", str(python)] if python else []
    return run_command([sys.executable, "-m", "pip", *target, *map(str, args)], TIMEOUT,
                       check=True)


def run_in(work: Path, *command, n: int = 0):
    """``command`` (on ``n`` ranks when ``n``) from ``work``; fail the test on an error."""
    command = jobs.mpirun_command(n, command) if n else list(command)
    return run_command(command, TIMEOUT, env=NO_CHECKOUT, cwd=work, check=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source copy, wheel) built from the checkout's files."""
    tmp = tmp_path_factory.mktemp("build")
    source = source_copy(tmp / "src")
    pip("wheel", source, "--no-deps", "--no-build-isolation", "-w", tmp / "wheels")
    return source, next((tmp / "wheels").glob("mpicnn-*.whl"))


def test_the_wheel_carries_the_dataset_and_the_licence(built):
    names = zipfile.ZipFile(built[1]).namelist()
    assert {"mpicnn/data/digits.h5", "mpicnn/data/digits.md"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert zipfile.ZipFile(built[1]).read("mpicnn/data/digits.h5") == \
        (ROOT / "data" / "digits.h5").read_bytes()


def test_the_installed_wheel_trains_by_default_from_another_directory(built, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    # the .pth shows pip this checkout's development install: install beside it, not over it
    pip("install", "--no-deps", "--no-index", "--ignore-installed", built[1], python=python)
    work = tmp_path / "work"
    work.mkdir()
    where = run_in(work, python, "-c", "import mpicnn, mpicnn.config.data as d; "
                   "print(mpicnn.__file__); print(d.SHIPPED_DATA)").stdout.split()
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in where), where
    run = run_in(work, python, "-m", "mpicnn.train", "--epochs", 1, "--checkpoint-dir", "run",
                 "--metrics", "m.jsonl", "--progress", "off", n=2)
    assert "mpicnn: done: 2 rank(s)" in run.stdout, run.stdout
    end = read_jsonl(work / "m.jsonl")[-1]
    assert end["event"] == "end" and end["steps"] == 44 and end["val_acc"] > 0.5, end

    scripts = tmp_path / "venv" / "bin"
    assert run_in(work, scripts / "mpicnn", "--version").stdout.strip() == \
        f"mpicnn {__version__}"
    assert run_in(work, python, "-m", "mpicnn.train", "--version").stdout.strip() == \
        f"mpicnn {__version__}"
    assert "mpicnn.export" in run_in(work, python, "-m", "mpicnn").stdout
    helped = " ".join(run_in(work, scripts / "mpicnn-train", "--help").stdout.split())
    assert "(default: the shipped digits dataset)" in helped and "site-packages" \
        not in helped
    assert "as torchscript" in run_in(work, scripts / "mpicnn-export", "run/final.pt",
                                      "m.pt").stdout
    predicted = run_in(work, scripts / "mpicnn-predict", "run/final.pt").stdout
    evaluated = run_in(work, scripts / "mpicnn-evaluate", "run/final.pt").stdout
    right = round(end["val_acc"] * 359)
    assert f"({right}/359 right)" in predicted and f"({right}/359 right)" in evaluated
    assert (work / "predictions.csv").exists()


def test_pip_install_dot_finds_its_dataset(built, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed",
        built[0], python=python)
    work = tmp_path / "work"
    work.mkdir()
    found = run_in(work, python, "-c", "from mpicnn.config.data import SHIPPED_DATA as p; "
                   "from mpicnn.data.schema import open_dataset; d = open_dataset(str(p)); "
                   "print(p, len(d.train), len(d.val))").stdout.split()
    assert Path(found[0]).is_relative_to(tmp_path / "venv") and found[1:] == ["1438", "359"]
