"""One grid per --out: a second one refuses, naming the holder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flatmin._io import FileLock, LockedError
from flatmin.bench import run_grid
from flatmin.bench.execute import LOCK, OutputLockedError
from helpers.toy_tasks import ToyResolver, toy_config

# -- the lock on --out -----------------------------------------------------------------------------

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_bench_on_the_same_out_refuses_naming_the_holder(tmp_path, cli):
    tmp_path.joinpath(LOCK).touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / LOCK)], stdout=subprocess.PIPE, text=True
    )
    bench = ["bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1", "--epochs",
             "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        match = rf"in use by another flatmin bench \(pid {holder.pid}\)"
        with pytest.raises(OutputLockedError, match=match):
            run_grid(toy_config(tmp_path), resolver=ToyResolver())
        code, _, err = cli(*bench)
        assert code == 1
        assert err.startswith("flatmin bench: error: Output directory")
        assert f"(pid {holder.pid})" in err
        assert not (tmp_path / "results.jsonl").exists()  # nothing ran
        # --report-only does not take the lock: it only reads results.jsonl (empty: exit 1).
        code, out, err = cli(*bench, "--report-only")
        assert code == 1 and "1 runs: 0 trained" in out and "in use" not in err
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead; its pid is still in the file: the stale lock is taken over.
    assert (tmp_path / LOCK).read_text().strip() == str(holder.pid)
    summary = run_grid(toy_config(tmp_path), resolver=ToyResolver())
    assert summary.ran == 2
    assert (tmp_path / LOCK).read_text() == ""  # released


def test_file_lock_reports_the_holder_and_is_released(tmp_path):
    path = tmp_path / "lock"
    with FileLock(path):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError) as info:
            FileLock(path).acquire()
        assert info.value.pid == os.getpid()
    with FileLock(path):  # free again
        pass


