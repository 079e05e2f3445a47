"""SIGINT/SIGTERM/SIGKILL to a grid: results kept, no process left behind."""

from __future__ import annotations

import os
import signal
import sys
import warnings

import pytest

from flatmin._io import FileLock
from flatmin.bench import RunSpec, read_records, run_grid
from flatmin.bench.execute import LOCK
from helpers.toy_tasks import (
    TASKS,
    DyingResolver,
    ToyResolver,
    _all_gone,
    _descendants,
    start_bench,
    toy_config,
)

# -- signals and orphans ---------------------------------------------------------------------------


_BENCH = ["bench", "--tasks", "digits", "--methods", "baseline", "swa", "sam", "--seeds", "2",
          "--epochs", "2", "--no-progress"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize(
    ("sig", "code", "jobs"),
    [(signal.SIGTERM, 143, 2), (signal.SIGINT, 130, 2), (signal.SIGKILL, -9, 2),
     (signal.SIGTERM, 143, 1)],
)  # fmt: skip
def test_a_signal_stops_a_grid_keeping_results_and_leaving_no_process(tmp_path, sig, code, jobs):
    proc = start_bench([*_BENCH, "--jobs", str(jobs)], tmp_path, timeout=120)
    results = tmp_path / "results.jsonl"
    try:
        family = _descendants(proc.pid)  # workers, the resource tracker, their children
        if jobs > 1:  # the workers and the resource tracker
            assert len(family) >= 3, family
        kept = results.read_text()
        if sig == signal.SIGINT:  # Ctrl-C in a terminal: the whole process group gets it
            os.killpg(proc.pid, sig)
        else:  # docker stop, Slurm, kill: the main process only
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert _all_gone(family) == set()
    assert "Traceback" not in err
    if sig != signal.SIGKILL:
        name = signal.Signals(sig).name
        assert f"flatmin bench: interrupted by {name}; finished runs are kept" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every record is whole and well-formed
        records = read_records(results)
    assert results.read_text().startswith(kept) and len(records) < 6
    assert all(r.status == "ok" for r in records)
    with FileLock(tmp_path / LOCK):  # free: released, or dropped by the kernel after SIGKILL
        pass


@pytest.mark.slow
def test_a_worker_that_dies_gives_an_error_record_and_the_grid_goes_on(tmp_path):
    cfg = toy_config(tmp_path / "out", tasks=("toy-a", "toy-b"), jobs=2)
    summary = run_grid(cfg, resolver=DyingResolver(tmp_path / "died", hook="dataset"))
    recs = read_records(tmp_path / "out" / "results.jsonl")
    errors = [r for r in recs if r.status == "error"]
    assert len(recs) == 4 and len(errors) == 1 and summary.failed == 1
    assert "worker process died (exit code -9)" in errors[0].reason
    # Recorded under the run's own hash, so the next invocation retries it.
    spec = RunSpec(errors[0].task, errors[0].method, 0)
    assert errors[0].hash == spec.config_hash(TASKS[spec.task])
    again = run_grid(cfg, resolver=ToyResolver())
    assert (again.ran, again.skipped, again.failed) == (1, 3, 0)


