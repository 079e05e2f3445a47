"""Shared test settings (single-threaded, deterministic CPU torch) and shared fixtures."""

import os
import textwrap
from pathlib import Path

import pytest
import torch

from flatmin.cli import main
from helpers.user_tasks import USER_MODULE

# On CI every dataset must be there: a data test that cannot fetch fails instead of skipping.
if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
    os.environ.setdefault("FLATMIN_REQUIRE_DATA", "1")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's package ``usertasks_p`` (``mod`` and a ``broken`` module) on sys.path."""
    (tmp_path / "usertasks_p").mkdir()
    (tmp_path / "usertasks_p" / "__init__.py").write_text("")
    (tmp_path / "usertasks_p" / "mod.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "usertasks_p" / "broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "usertasks_p.mod"


@pytest.fixture
def cli(capsys):
    """Run ``flatmin ARGV`` in-process: ``(exit code, stdout, stderr)``; no traceback allowed."""

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return code, out, err

    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint: digits, SWA (final and averaged weights), one epoch."""
    out = tmp_path_factory.mktemp("ckpt")
    argv = ["train", "--task", "digits", "--method", "swa", "--epochs", "1", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out / "checkpoint.pt"
