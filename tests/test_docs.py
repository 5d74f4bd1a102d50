"""The docs hold together: the train flags they show exist, every page is linked, every link
resolves.

Pages are README.md and docs/*.md. A train command is a line that runs ``mpicnn.train``
(or ``mpicnn-train``, or a job script whose arguments go to it), in a code block (with its
``\\`` continuation lines) or in inline code; only the flags after that point count, so
``mpirun``, ``sbatch``, ``python -m mpicnn.run`` and ``python -m mpicnn.cluster`` flags
before it are left alone. A benchmark's flags after ``--`` go to ``mpicnn.train`` too.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpicnn.config import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# where the arguments that go to mpicnn.train begin
TRAIN = re.compile(r"mpicnn\.train\b|mpicnn-train\b|jobs/\S+\.(?:sbatch|pbs)\b"
                   r"|mpicnn\.bench\b.*?\s--\s")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
COMMAND_END = re.compile(r"&&|\|\||[;|]")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_and_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text)."""
    prose, code, fenced = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            code.append((number, line))
        else:
            prose.append((number, line))
    return prose, code


def code_commands(code: list[tuple[int, str]]):
    """Shell commands of code blocks, continuation lines joined, comments dropped."""
    pending, start = "", 0
    for number, line in code:
        line = re.sub(r"(^|\s)#.*$", "", line)
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def inline_commands(prose: list[tuple[int, str]]):
    """Inline code spans of the prose."""
    for number, line in prose:
        for match in INLINE.finditer(line):
            yield number, match.group(2)


def train_flags(command: str) -> list[str]:
    """The flags a command passes to mpicnn.train (none when it does not run it)."""
    found = TRAIN.search(command)
    if not found:
        return []
    rest = COMMAND_END.split(command[found.end():], maxsplit=1)[0]
    return FLAG.findall(rest)


def shown_train_flags(page: Path):
    """(line, flag) for every flag the page shows in a train command."""
    prose, code = prose_and_code(page.read_text())
    for number, command in [*code_commands(code), *inline_commands(prose)]:
        for flag in train_flags(command):
            yield number, flag


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link reads as its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ...)."""
    prose, _ = prose_and_code(page.read_text())
    seen, result = {}, set()
    for _, line in prose:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(page: Path):
    """(line, target) for every link of the prose that points into the repository."""
    prose, _ = prose_and_code(page.read_text())
    for number, line in prose:
        line = INLINE.sub("", line)       # code spans hold examples, not links
        for target in LINK.findall(line):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):
                yield number, target


def train_options() -> set[str]:
    """Every option string ``python -m mpicnn.train`` accepts."""
    return {option for action in build_parser()._actions for option in action.option_strings}


def test_the_docs_show_train_commands():
    shown = [flag for page in PAGES for _, flag in shown_train_flags(page)]
    assert len(shown) > 50, shown   # the extraction really finds the commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_train_flag_shown_exists(page):
    options = train_options()
    unknown = [f"{page.name}:{number}: {flag}" for number, flag in shown_train_flags(page)
               if flag not in options]
    assert not unknown, "flags that python -m mpicnn.train does not have:\n" + \
        "\n".join(unknown)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve()
              for _, target in relative_links(README) if target.split("#")[0]}
    missing = [str(page.relative_to(ROOT)) for page in PAGES[1:] if page.resolve() not in linked]
    assert PAGES[1:], "no docs/*.md pages"
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", [*PAGES, ROOT / "CHANGELOG.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for number, target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}:{number}: {target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{page.name}:{number}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slugs_follow_github():
    assert slug("Wildcard receives across nodes (UCX)") == "wildcard-receives-across-nodes-ucx"
    assert slug("`python -m mpicnn.bench gpu`") == "python--m-mpicnnbench-gpu"
    assert slug("2 nodes x 2 ranks at 1 Gbit/s") == "2-nodes-x-2-ranks-at-1-gbits"


def test_train_flags_are_read_only_from_train_commands():
    assert train_flags("sbatch --nodes=4 jobs/slurm/train.sbatch --epochs 90") == ["--epochs"]
    assert train_flags("python -m mpicnn.run --max-restarts 3 -- mpirun -n 8 "
                       "python -m mpicnn.train --checkpoint-dir ckpt") == ["--checkpoint-dir"]
    assert train_flags("python -m mpicnn.bench tta --reps 1 -- --epochs 4") == ["--epochs"]
    assert train_flags("python -m mpicnn.bench scale --link 1gbit --compare c.json") == []
    assert train_flags("mpirun -n 2 python -m mpicnn.train --amp bf16 && "
                       "python -m mpicnn.report r.jsonl --labels a") == ["--amp"]
