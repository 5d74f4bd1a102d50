"""examples/*.toml: each recipe parses and validates, is laid out like --print-config, and
says how to run it; the digits one trains."""
from __future__ import annotations

import tomllib

import pytest
from conftest import QUIET, ROOT, mpirun, read_jsonl

from mpicnn.config import FIELDS, SECTIONS, Config, parse_config

EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def test_the_readme_recipes_are_there():
    assert {p.stem for p in EXAMPLES} >= {"digits", "fashion-mnist", "slurm", "ps-async",
                                          "pipeline", "restarts"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_parses_in_its_sections_and_says_how_to_run_it(example):
    given, defaults = parse_config(["--config", str(example)]).to_dict(), Config().to_dict()
    assert {name for name in given if given[name] != defaults[name]} - {"config"}
    table = tomllib.loads(example.read_text())
    for section, settings in table.items():
        assert section in SECTIONS and isinstance(settings, dict), section
        for name in settings:                 # current names, where --print-config puts them
            assert name in FIELDS and FIELDS[name][0] == section, f"[{section}] {name}"
    header = example.read_text().split("\n\n", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"--config examples/{example.name}" in header


@pytest.mark.mpi
def test_the_digits_example_trains_with_flags_on_top(tmp_path):
    out = tmp_path / "run"
    mpirun(2, ["--config", ROOT / "examples" / "digits.toml", "--max-steps", 2,
               "--checkpoint-dir", out, "--metrics", out / "m.jsonl", *QUIET], timeout=300)
    config = read_jsonl(out / "m.jsonl")[0]
    assert (config["event"], config["model"], config["max_steps"]) == ("config", "digitnet", 2)
    assert (out / "final.pt").exists()
