"""The documentation site: ``mkdocs build --strict`` passes and documents every public name.

Strict means a broken link, a missing reference or a docstring that does not render fails the
build; the negative tests below build a one-page site with each fault and require the failure.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("material")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "mkdocs.yml"
# Every package whose __all__ is public API (flatmin.integrations has submodules instead).
PACKAGES = [
    "flatmin", "flatmin.optim", "flatmin.optim.rules", "flatmin.optim.migrate",
    "flatmin.analysis", "flatmin.data", "flatmin.tasks", "flatmin.bench", "flatmin.bench.loggers",
    "flatmin.tune",
    "flatmin.integrations.lightning", "flatmin.integrations.transformers",
]  # fmt: skip


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _build(CONFIG, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr
    return out


def _inventory(site: Path) -> set[str]:
    """Object names in the site's objects.inv (Sphinx inventory v2: 4 header lines, then zlib)."""
    data = (site / "objects.inv").read_bytes()
    header, body = data.split(b"\n", 4)[:4], data.split(b"\n", 4)[4]
    assert header[0] == b"# Sphinx inventory version 2"
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_nav_page_is_built(site):
    pages = _nav_pages(yaml.safe_load(CONFIG.read_text())["nav"])
    assert len(pages) >= 30
    for page in pages:
        stem = page.removesuffix(".md").removesuffix("README").removesuffix("index").rstrip("/")
        assert (site / stem / "index.html").is_file(), page
    # Every guide page under docs/ is in the navigation (no orphan page).
    docs = {
        p.relative_to(ROOT / "docs").as_posix()
        for p in (ROOT / "docs").rglob("*.md")
        if not p.relative_to(ROOT / "docs").as_posix().startswith("_")
    }
    assert docs == set(pages)


def _public_names(package: str) -> list[tuple[str, object | None]]:
    """``package.__all__`` with each object; the integrations are read without importing their
    frameworks (seconds each) — their public names are classes, documented at their own path."""
    if package.startswith("flatmin.integrations."):
        path = ROOT / "src" / (package.replace(".", "/") + ".py")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__":
                return [(name, None) for name in ast.literal_eval(node.value)]
        raise AssertionError(f"{package} has no __all__")
    module = importlib.import_module(package)
    return [(name, getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_documented(site, package):
    names = _inventory(site)
    public = _public_names(package)
    assert public
    missing = []
    for name, obj in public:
        # A function named like its module (flatmin.bench.train) is documented at its own path.
        own = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        if f"{package}.{name}" not in names and not (inspect.isroutine(obj) and own in names):
            missing.append(name)
    assert not missing


def test_docstring_markup_is_rendered(site):
    page = (site / "api" / "optim" / "index.html").read_text()
    # reST roles became links, math blocks MathJax input, "Example:" sections code.
    assert ":class:`" not in page and ":func:`" not in page and ".. math::" not in page
    assert 'href="#flatmin.optim.SAM"' in page
    assert 'class="arithmatex"' in page
    assert '<span class="gp">&gt;&gt;&gt; </span>' in page
    # A "#:" comment documents a module attribute (AmpStepResult is an alias of StepResult).
    assert "did: <code>(loss, skipped)</code>" in page


def _one_page_site(tmp_path: Path, page: str, module: str | None = None) -> Path:
    """mkdocs.yml with the project's settings over a one-page site (and a module to document)."""
    config = yaml.safe_load(CONFIG.read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(page)
    handler = config["plugins"][-1]["mkdocstrings"]["handlers"]["python"]
    handler["paths"] = [str(ROOT / "src"), str(tmp_path)]
    handler["options"]["extensions"] = [str(ROOT / "docs/_ext/rst_docstrings.py:RstDocstrings")]
    if module is not None:
        (tmp_path / "faulty.py").write_text(module)
    config.update(docs_dir=str(tmp_path / "docs"), nav=["index.md"])
    config.pop("exclude_docs")
    out = tmp_path / "mkdocs.yml"
    out.write_text(yaml.safe_dump(config))
    return out


def test_the_one_page_site_builds(tmp_path):
    ok = "# Fine\n\n[SAM](#fine)\n\n::: flatmin.optim.rules.dual_exponent\n"
    proc = _build(_one_page_site(tmp_path, ok), tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("page", "module", "message"),
    [
        ("# Page\n\n[gone](missing.md)\n", None, "missing.md"),
        ("# Page\n\n::: flatmin.optim.NoSuchOptimizer\n", None, "NoSuchOptimizer"),
        (
            "# Page\n\n::: faulty\n",
            '"""Module.\n\nSee [the optimizer][flatmin.optim.NotThere]."""\n',
            "flatmin.optim.NotThere",
        ),
    ],
    ids=["broken-link", "missing-reference", "docstring-reference"],
)
def test_strict_build_fails_on(tmp_path, page, module, message):
    proc = _build(_one_page_site(tmp_path, page, module), tmp_path / "site")
    assert proc.returncode != 0
    assert message in proc.stderr


def _extension():
    path = ROOT / "docs" / "_ext" / "rst_docstrings.py"
    spec = importlib.util.spec_from_file_location("rst_docstrings", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rst_markup_rewritten_as_markdown():
    griffe = pytest.importorskip("griffe")
    ext = _extension()
    pkg = griffe.load("flatmin.optim", search_paths=[str(ROOT / "src")], resolve_aliases=False)
    text = (
        "Uses :class:`~flatmin.optim.SAM` and :meth:`SAM.step`.\n\n"
        ".. math:: a = b\n   + c\n\nAlgorithm::\n\n    x = 1\n\nExample:\n    >>> 1\n    1"
    )
    out = ext.to_markdown(text, pkg["sam"])
    assert out == (
        'Uses <autoref identifier="flatmin.optim.SAM" optional><code>SAM</code></autoref> and '
        '<autoref identifier="flatmin.optim.sam.SAM.step" optional><code>SAM.step()</code>'
        "</autoref>.\n\n$$\na = b\n+ c\n$$\n\nAlgorithm:\n\n    x = 1\n\nExamples:\n"
        "    >>> 1\n    1"
    )
