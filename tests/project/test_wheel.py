"""The release artefacts: sdist and wheel build, pass ``twine check`` and work once installed.

The wheel is installed (not editable) into a fresh virtual environment without pip or
setuptools of its own; the environment sees the running interpreter's site-packages (torch,
numpy, scikit-learn) through a ``.pth`` file written *after* the install, so pip never sees —
and never touches — the packages of the environment running the tests, and no torch is
downloaded or unpacked again. The commands then run from a directory outside the checkout, so
only the installed copy of flatmin can answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import flatmin

pytest.importorskip("build")
pytest.importorskip("twine")

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = sorted(
    p.parent.relative_to(ROOT / "src").as_posix()
    for p in (ROOT / "src" / "flatmin").rglob("__init__.py")
)
# What a source checkout holds but a source distribution must not (caches, runs, builds).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "runs", "out", "build", "dist", "site", "*.egg-info", "__pycache__",
    ".*_cache", "*.pt",
)  # fmt: skip


# The fresh environment must not see the checkout (the tests run with PYTHONPATH=src).
_CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel built from it, from a copy of the source tree (no build/ left)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    # --no-isolation: the build backend is the test environment's setuptools (offline, fast);
    # the default sdist-then-wheel order proves the wheel builds from the sdist alone.
    _run([sys.executable, "-m", "build", "--no-isolation", "-o", str(tmp / "out"), "."], src)
    (sdist,) = (tmp / "out").glob("*.tar.gz")
    (wheel,) = (tmp / "out").glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_version_has_one_source(dists):
    version = flatmin.__version__
    assert dists["wheel"].name == f"flatmin-{version}-py3-none-any.whl"
    assert dists["sdist"].name == f"flatmin-{version}.tar.gz"
    pyproject = (ROOT / "pyproject.toml").read_text()
    # No literal version in pyproject.toml: setuptools reads flatmin.__version__.
    assert re.search(r'^version\s*=\s*"', pyproject, re.MULTILINE) is None
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.MULTILINE)
    assert re.search(r'^version = \{ attr = "flatmin.__version__" \}$', pyproject, re.MULTILINE)


def test_twine_check_passes(dists):
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dists.values())],
               ROOT)  # fmt: skip
    assert out.count("PASSED") == 2


def test_wheel_carries_every_subpackage_and_py_typed(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    assert "flatmin/py.typed" in names
    assert len(SUBPACKAGES) >= 9  # flatmin, optim, optim/rules, analysis, bench, ...
    for package in SUBPACKAGES:
        assert f"{package}/__init__.py" in names, package
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("*.py")}
    assert modules <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)


def test_sdist_carries_tests_docs_and_licence(dists):
    with tarfile.open(dists["sdist"]) as tar:
        top = f"flatmin-{flatmin.__version__}/"
        names = {n.removeprefix(top) for n in tar.getnames()}
    tracked = ["LICENSE", "CHANGELOG.md", "README.md", "mkdocs.yml", "src/flatmin/py.typed"]
    tracked += [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")]
    tracked += [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")]
    missing = [n for n in tracked if n not in names]
    assert not missing
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A venv holding only the wheel's flatmin; torch & co. from the running environment."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # The running pip installs into the fresh venv; --no-deps because torch is not visible yet.
    out = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                "--no-deps", "--no-compile", str(wheel)], root, _CLEAN_ENV)  # fmt: skip
    assert "Successfully installed flatmin" in out
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   root, _CLEAN_ENV).strip()  # fmt: skip
    # Only now the running environment's packages become visible (after the venv's own).
    Path(purelib, "_test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_installed_wheel_runs_outside_the_checkout(dists, tmp_path):
    python = _fresh_venv(tmp_path, dists["wheel"])
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _CLEAN_ENV
    flatmin_cli = str(python.parent / "flatmin")

    code = (
        "import json, flatmin, torch, flatmin.optim, flatmin.analysis, flatmin.bench, "
        "flatmin.tasks, flatmin.data, flatmin.tune, flatmin.integrations\n"
        "print(json.dumps({'file': flatmin.__file__, 'version': flatmin.__version__, "
        "'torch': torch.__version__, 'all': sorted(flatmin.__all__), "
        "'missing': [n for n in flatmin.__all__ if not hasattr(flatmin, n)]}))"
    )
    info = json.loads(_run([str(python), "-c", code], work, env))
    assert Path(info["file"]).is_relative_to(tmp_path / "venv")
    assert info["version"] == flatmin.__version__
    assert info["torch"] == torch.__version__
    assert info["all"] == sorted(flatmin.__all__) and info["missing"] == []

    tasks = _run([flatmin_cli, "tasks"], work, env)
    assert tasks.splitlines()[0].split()[:2] == ["task", "domain"]
    assert any(line.split()[0] == "digits" for line in tasks.splitlines()[1:])

    _run([flatmin_cli, "train", "--task", "digits", "--method", "baseline", "--budget", "quick",
          "--epochs", "1", "--out", "run", "--no-progress"], work, env)  # fmt: skip
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs"] == 1
    assert metrics["versions"]["flatmin"] == flatmin.__version__
    assert (work / "run" / "checkpoint.pt").is_file()
