"""The package's shape, read from the source with ``ast`` (no import runs).

The import graph has no cycle, a package's ``__init__`` names each of its modules, the top
level holds few concepts, the sync path forwards nothing through ``__getattr__``, and
``python -m mpicnn`` lists commands that each answer ``--help``.

Every import counts, also those inside functions (a deferred import hides a cycle from
the interpreter, not from a reader); ``if TYPE_CHECKING:`` blocks, which never run, are
left out of the first check and counted by a second. Importing a submodule does not count as importing its parent
package's ``__init__`` (the interpreter does that, but it is no design dependency).
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import job_env

from mpicnn.__main__ import COMMANDS

PACKAGE = "mpicnn"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE



def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST, hints: bool = False):
    """Every import statement of ``tree``, at any depth; under ``if TYPE_CHECKING`` only with
    ``hints``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and is_type_checking(node.test) and not hints:
            yield from (n for child in node.orelse for n in import_nodes_of(child, hints))
            continue
        yield from import_nodes_of(node, hints)


def import_nodes_of(node: ast.AST, hints: bool = False):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from import_nodes(node, hints)


def imported_modules(name: str, path: Path, modules: dict, hints: bool = False) -> set[str]:
    """The package's modules that module ``name`` (stored at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in import_nodes(ast.parse(path.read_text(), str(path)), hints):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        for target in targets:
            while target and target not in modules:   # ``import a.b.c`` of a non-module c
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT, hints: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``hints``: also for type hints alone)."""
    modules = module_files(root)
    return {name: imported_modules(name, path, modules, hints)
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(found: list[list[str]]) -> str:
    return "\n".join(" <-> ".join(component) for component in found)


def test_the_graph_sees_relative_absolute_and_function_level_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    import mpicnn.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from .a import x\n"
                                      "from ..sub import a\n")
    (pkg / "d.py").write_text("from mpicnn.sub.a import y\nfrom mpicnn import sub\n")
    graph = import_graph(pkg)
    assert graph == {"mpicnn": set(), "mpicnn.sub": {"mpicnn.sub.a"},
                     "mpicnn.sub.a": {"mpicnn.sub.b"}, "mpicnn.sub.b": {"mpicnn.sub.c"},
                     "mpicnn.sub.c": {"mpicnn.sub.a"},
                     "mpicnn.d": {"mpicnn.sub.a", "mpicnn.sub"}}
    assert cycles(graph) == [["mpicnn.sub.a", "mpicnn.sub.b", "mpicnn.sub.c"]]
    assert import_graph(pkg, hints=True)["mpicnn.sub.c"] == {"mpicnn.sub.a"}
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from .b import x\n")
    assert import_graph(pkg)["mpicnn.sub.c"] == set()
    assert cycles(import_graph(pkg, hints=True)) == [["mpicnn.sub.b", "mpicnn.sub.c"]]


def test_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles:\n{describe(found)}"


def test_no_cycle_even_through_type_hints():
    # a cycle only type hints close still ties the modules together for a reader
    # (cluster's errors, world and startup once did)
    found = cycles(import_graph(hints=True))
    assert not found, f"import cycles through type hints:\n{describe(found)}"


def unnamed_modules(package: Path) -> list[str]:
    """Modules and subpackages of ``package`` that its ``__init__`` docstring does not name."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    names = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__") + \
        sorted(p.name for p in package.iterdir() if (p / "__init__.py").exists())
    return [name for name in names if not re.search(rf"``{re.escape(name)}``", doc)]


def test_every_package_init_names_every_module():
    packages = [p.parent for p in ROOT.rglob("__init__.py") if "__pycache__" not in p.parts]
    unnamed = {str(p.relative_to(ROOT.parent)): unnamed_modules(p) for p in packages}
    assert not {k: v for k, v in unnamed.items() if v}, unnamed


def test_python_m_mpicnn_lists_commands_that_each_answer_help():
    listing = subprocess.run([sys.executable, "-m", "mpicnn"], capture_output=True, text=True,
                             env=job_env(), cwd=ROOT.parent)
    assert listing.returncode == 0
    for module in COMMANDS:
        assert module in listing.stdout
        helped = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                                text=True, env=job_env(), cwd=ROOT.parent)
        assert helped.returncode == 0, (module, helped.stderr)
        assert "usage" in (helped.stdout + helped.stderr).lower()


def test_top_level_holds_few_entries_each_a_concept():
    entries = [p for p in ROOT.iterdir() if p.name != "__pycache__"]
    # the entries of the commands python -m mpicnn lists, each a module of its own
    entry_modules = {"__init__.py", "__main__.py"} | \
        {module.split(".")[1] + ".py" for module in COMMANDS}
    concepts = [p.name for p in entries if p.name not in entry_modules]
    assert len(concepts) <= 10, sorted(concepts)


def test_the_sync_path_forwards_nothing_implicitly():
    for path in [*(ROOT / "sync").rglob("*.py"), *(ROOT / "resilience").rglob("*.py"),
                 *(ROOT / "training").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert "__getattr__" not in names, path
