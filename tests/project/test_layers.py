"""The layering of docs/architecture.md: import-linter's contracts and no import cycle.

``lint-imports`` checks the contracts of ``[tool.importlinter]`` in pyproject.toml (layers, and
what optim, analysis and bench never import). The cycle check walks the sources with ``ast``:
an import inside a function counts (it runs sooner or later), one under ``TYPE_CHECKING`` does
not (it never runs).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).parents[2]
SRC = ROOT / "src"
PYPROJECT = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

def _contract_ids() -> list[str]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return [c["id"] for c in config["contracts"]]


def _lint_imports(src: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package under ``src`` (not whatever flatmin is installed)."""
    path = [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    argv = [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(PYPROJECT)]
    for c in contracts:
        argv += ["--contract", c]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_are_the_documented_ones():
    assert _contract_ids() == ["layers", "optim", "analysis", "bench"]


@pytest.mark.parametrize(
    "contract",
    _contract_ids(),
)
def test_import_contract_is_kept(contract):
    proc = _lint_imports(SRC, contract)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_lint_imports_catches_an_upward_import_inside_a_function(tmp_path):
    # The same contracts on a copy of the sources where optim imports the CLI lazily.
    src = tmp_path / "src"
    shutil.copytree(SRC / "flatmin", src / "flatmin", ignore=shutil.ignore_patterns("__pycache__"))
    with (src / "flatmin" / "optim" / "bn.py").open("a") as f:
        f.write("\n\ndef _upward():\n    from flatmin.cli import main\n\n    return main\n")
    proc = _lint_imports(src, "optim")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "flatmin.optim.bn -> flatmin.cli" in proc.stdout


# --- import cycles --------------------------------------------------------------------------------


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for f in (root / package).rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere (TYPE_CHECKING blocks excluded)."""

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(filter(None, (resolve(a.name) for a in child.names)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    parts = parts[: len(parts) - (child.level - 1)]
                    base = ".".join([*parts, *([child.module] if child.module else [])])
                for a in child.names:
                    full = f"{base}.{a.name}"
                    found.add(full if full in modules else resolve(base) or "")
            stack.append(child)
    found.discard("")
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def import_cycles(root: Path, package: str) -> tuple[list[list[str]], list[list[str]]]:
    """Cycles between modules, and between the top-level subpackages (``flatmin.bench``, ...)."""
    modules = _modules(root, package)
    graph = {m: _imports(m, p, modules) & set(modules) for m, p in modules.items()}

    def top(m: str) -> str:
        return ".".join(m.split(".")[:2])

    packages: dict[str, set[str]] = {top(m): set() for m in graph}
    for m, targets in graph.items():
        packages[top(m)].update(top(t) for t in targets if top(t) != top(m))
    return _cycles(graph), _cycles(packages)


def test_the_cycle_check_counts_function_local_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")  # hidden in a function
    (pkg / "c.py").write_text(
        textwrap.dedent("""
            from typing import TYPE_CHECKING
            from pkg.sub import d
            if TYPE_CHECKING:
                from pkg import c_user
        """)
    )  # fmt: skip
    (pkg / "sub" / "d.py").write_text("import pkg.c\n")
    (pkg / "c_user.py").write_text("")
    modules, packages = import_cycles(tmp_path, "pkg")
    assert modules == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]
    assert packages == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub"]]
    (pkg / "sub" / "d.py").write_text("")
    (pkg / "c_user.py").write_text("from pkg import c\n")  # c -> c_user only under TYPE_CHECKING
    assert import_cycles(tmp_path, "pkg")[0] == [["pkg.a", "pkg.b"]]


def test_no_import_cycle():
    assert import_cycles(SRC, "flatmin") == ([], [])
