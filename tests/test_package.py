"""The package's shape: the command list, the top level, the sync path without forwarding."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT, job_env

from mpicnn.__main__ import COMMANDS

PACKAGE = ROOT / "mpicnn"
ENTRY_MODULES = {"__init__.py", "__main__.py", "train.py", "report.py"}


def test_python_m_mpicnn_lists_commands_that_each_answer_help():
    listing = subprocess.run([sys.executable, "-m", "mpicnn"], capture_output=True, text=True,
                             env=job_env(), cwd=ROOT)
    assert listing.returncode == 0
    for module in COMMANDS:
        assert module in listing.stdout
        helped = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                                text=True, env=job_env(), cwd=ROOT)
        assert helped.returncode == 0, (module, helped.stderr)
        assert "usage" in (helped.stdout + helped.stderr).lower()


def test_top_level_holds_few_entries_each_a_concept_with_a_docstring():
    entries = [p for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    concepts = [p for p in entries if p.name not in ENTRY_MODULES]
    assert len(concepts) <= 10, sorted(p.name for p in concepts)
    for package in (p for p in PACKAGE.rglob("__init__.py") if "__pycache__" not in p.parts):
        docstring = ast.get_docstring(ast.parse(package.read_text()))
        assert docstring, f"{package.relative_to(ROOT)} has no docstring listing its files"
        listed = {p.stem for p in package.parent.iterdir()
                  if p.suffix == ".py" and p.stem != "__init__" and not p.stem.startswith("_")}
        listed |= {p.name for p in package.parent.iterdir()
                   if p.is_dir() and (p / "__init__.py").exists()}
        missing = [name for name in listed if name not in docstring]
        assert not missing, f"{package.relative_to(ROOT)} does not list {missing}"


def test_the_sync_path_forwards_nothing_implicitly():
    for path in [*(PACKAGE / "sync").rglob("*.py"), *(PACKAGE / "resilience").rglob("*.py"),
                 *(PACKAGE / "training").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert "__getattr__" not in names, path
