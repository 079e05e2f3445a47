"""The Ray executor (flatmin.bench.ray_executor) on a local Ray instance and the toy tasks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from flatmin._io import FileLock
from flatmin.bench import BenchConfig, RunSpec, read_records, run_grid
from flatmin.bench.execute import LOCK
from flatmin.cli import main
from helpers.toy_tasks import (
    TASKS,
    DyingResolver,
    ToyResolver,
    _all_gone,
    _descendants,
    start_bench,
)

TESTS = Path(__file__).parents[1]  # the tests' root: helpers.* importable
NO_RAY = "Ray is not installed (pip install 'flatmin[ray]'; CI installs it with the test extra)"


@pytest.fixture(scope="module")
def ray():
    """One local Ray instance (2 CPUs) for the module; its workers import the toy tasks."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}},
    )  # fmt: skip
    for s, h in handlers.items():  # ray.init makes SIGTERM call sys.exit
        signal.signal(s, h)
    yield ray
    ray.shutdown()


def _cfg(out: Path, **kw) -> BenchConfig:
    base = dict(
        out=out, tasks=("toy-a", "toy-b"), methods=("baseline", "sam"), seeds=(0, 1), epochs=2,
        progress=False,
    )  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


def _by_hash(out: Path) -> dict[str, dict]:
    """The records of ``out`` by hash, without their wall-clock times."""
    records = {}
    for r in read_records(out / "results.jsonl"):
        records[r.hash] = {k: v for k, v in r.to_dict().items() if k != "wall_time"}
    return records


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The grid of :func:`_cfg` on the local executor (in-process)."""
    out = tmp_path_factory.mktemp("local")
    run_grid(_cfg(out), resolver=ToyResolver())
    return _by_hash(out)


@pytest.mark.slow  # with the module's Ray instance (~10 s to start, workers to warm)
def test_ray_grid_equals_the_local_executor_and_a_rerun_adds_nothing(
    ray, reference, tmp_path, capfd
):
    cfg = _cfg(tmp_path, executor="ray", progress=True)
    summary = run_grid(cfg, resolver=ToyResolver())
    assert (summary.planned, summary.ran, summary.skipped, summary.failed) == (8, 8, 0, 0)
    # Same configuration hashes, same metrics and curves, bit for bit.
    assert _by_hash(tmp_path) == reference
    assert len(reference) == 8 and all(r["status"] == "ok" for r in reference.values())
    # Progress as for the local executor: the grid's bar and each run's epochs.
    lines = capfd.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("benchmark: 100%") and "8/8" in line for line in lines)
    for r in reference.values():
        label = f"{r['task']} {r['method']} s{r['seed']}"
        assert any(line.startswith(label) and "| 2/2 [" in line for line in lines), label
    # A connection made before the grid is the caller's: it stays open.
    assert ray.is_initialized()
    lines = (tmp_path / "results.jsonl").read_text()
    again = run_grid(cfg, resolver=ToyResolver())
    assert (again.ran, again.skipped) == (0, 8)
    assert (tmp_path / "results.jsonl").read_text() == lines


@pytest.mark.slow
def test_a_killed_worker_loses_only_its_run_which_the_next_invocation_redoes(
    ray, reference, tmp_path
):
    out = tmp_path / "out"
    cfg = _cfg(out, executor="ray")
    summary = run_grid(cfg, resolver=DyingResolver(tmp_path / "died", hook="task"))
    assert (tmp_path / "died").exists()
    recs = read_records(out / "results.jsonl")
    errors = [r for r in recs if r.status == "error"]
    assert len(recs) == 8 and len(errors) == 1 and summary.failed == 1
    assert "WorkerCrashedError" in errors[0].reason
    # Recorded under the run's own hash, so the next invocation retries it and nothing else.
    died = errors[0]
    spec = RunSpec(died.task, died.method, died.seed, epochs=2)
    assert died.hash == spec.config_hash(TASKS[spec.task])
    assert {r.hash for r in recs if r.status == "ok"} == set(reference) - {died.hash}
    again = run_grid(cfg, resolver=ToyResolver())
    assert (again.ran, again.skipped, again.failed) == (1, 7, 0)
    recs = read_records(out / "results.jsonl")
    assert len(recs) == 9 and recs[-1].hash == died.hash
    assert _by_hash(out) == reference


@pytest.mark.slow
def test_the_validation_grid_runs_on_ray_with_the_same_choices(ray, tmp_path):
    kw = dict(tasks=("toy-a",), seeds=(0,), tune=True, tune_seeds=(100,), epochs=1)
    local = run_grid(_cfg(tmp_path / "local", **kw), resolver=ToyResolver())
    on_ray = run_grid(_cfg(tmp_path / "ray", executor="ray", **kw), resolver=ToyResolver())
    assert on_ray.hypers == local.hypers and on_ray.ran == local.ran > 6
    assert _by_hash(tmp_path / "ray") == _by_hash(tmp_path / "local")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_cli_runs_on_an_existing_cluster_and_leaves_it_running(ray, tmp_path):
    """``--ray-address``: the runs are tasks of the running instance (this module's)."""
    address = ray.get_runtime_context().gcs_address
    exe = Path(sys.executable).with_name("flatmin")
    argv = [str(exe), "bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "2",
            "--epochs", "1", "--no-progress", "--executor", "ray", "--ray-address", address,
            "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours, theirs = set(), set()  # commands under this process's Ray instance / under the CLI
    while proc.poll() is None:
        mine = _descendants(os.getpid())
        cli = _descendants(proc.pid)
        ours |= {_cmdline(p).strip() for p in mine - cli - {proc.pid}}
        theirs |= {_cmdline(p).strip() for p in cli}
        time.sleep(0.05)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "ray::flatmin-bench-run" in ours  # a run's task, on this module's instance
    assert not any("raylet" in c or "gcs_server" in c for c in theirs)  # no instance of its own
    assert [r.status for r in read_records(tmp_path / "results.jsonl")] == ["ok", "ok"]
    assert ray.is_initialized() and ray.get(ray.put(7)) == 7  # the cluster is still up


# -- signals ------------------------------------------------------------------------------------

_BENCH = ["bench", "--tasks", "digits", "--methods", "baseline", "swa", "sam", "--seeds", "3",
          "--epochs", "2", "--no-progress", "--executor", "ray"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_a_ray_grid_keeping_results_and_its_local_ray_instance_goes(
    tmp_path, sig, code
):
    pytest.importorskip("ray", reason=NO_RAY)
    proc = start_bench(_BENCH, tmp_path, timeout=180)
    results = tmp_path / "results.jsonl"
    try:
        family = _descendants(proc.pid)  # the Ray instance: GCS, raylet, agents, workers
        assert any("raylet" in _cmdline(p) for p in family), family
        kept = results.read_text()
        if sig == signal.SIGINT:  # Ctrl-C in a terminal: the whole process group gets it
            os.killpg(proc.pid, sig)
        else:  # docker stop, Slurm, kill: the driver only
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert _all_gone(family, timeout=30) == set()
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    assert f"flatmin bench: interrupted by {name}; finished runs are kept" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every record is whole and well-formed
        records = read_records(results)
    assert results.read_text().startswith(kept) and len(records) < 6
    assert all(r.status == "ok" for r in records)
    with FileLock(tmp_path / LOCK):  # released
        pass


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path):
    """Ray's agents (DashboardAgent, RuntimeEnvAgent) outlived a SIGKILL-ed driver.

    Every process seen under the driver must go, and so must any other process holding a file in
    the driver's Ray session directory: an agent started just before the kill is reparented and
    renames itself, so it is in neither list the test could take before the kill.
    """
    pytest.importorskip("ray", reason=NO_RAY)
    exe = Path(sys.executable).with_name("flatmin")
    proc = subprocess.Popen([str(exe), *_BENCH, "--out", str(tmp_path)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        wanted = ("raylet", "dashboard/agent.py", "runtime_env/agent")
        while not all(any(w in _cmdline(p) for p in family) for w in wanted):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            family |= _descendants(proc.pid)
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _all_gone(family | _in_ray_session(proc.pid), timeout=30) == set()
    assert _all_gone(_in_ray_session(proc.pid), timeout=5) == set()


@pytest.mark.slow
def test_a_run_no_node_can_host_is_refused_instead_of_waiting_forever(tmp_path):
    pytest.importorskip("ray", reason=NO_RAY)
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has a GPU")
    exe = Path(sys.executable).with_name("flatmin")
    argv = [str(exe), "bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1",
            "--epochs", "1", "--no-progress", "--executor", "ray", "--gpus-per-run", "1",
            "--out", str(tmp_path)]  # fmt: skip
    # The timeout bounds the test if the refusal regresses into Ray's endless wait.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Invalid cpus/gpus per run: 1/1 (no node of the Ray cluster has them" in proc.stderr
    # One line of ours (Ray may log its own warnings before it).
    assert proc.stderr.splitlines()[-1].startswith("flatmin bench: error: Invalid cpus/gpus")
    assert "Traceback" not in proc.stderr


def _in_ray_session(driver: int) -> set[int]:
    """The processes with a file open in the Ray session directory that ``driver`` started."""
    session = re.compile(rf"/session_[0-9_-]+_{driver}(/|$)")
    out = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if session.search(os.readlink(f"/proc/{entry}/fd/{fd}")):
                    out.add(int(entry))
                    break
            except OSError:
                continue
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"executor": "dask"}, r"Invalid executor: 'dask' \(expected one of \('local', 'ray'\)\)"),
        ({"ray_address": "auto"}, r"Invalid options for executor 'local': ray_address='auto'"),
        ({"gpus_per_run": 1.0}, r"Invalid options for executor 'local': gpus_per_run=1.0"),
        ({"cpus_per_run": 0.0}, r"Invalid cpus_per_run: 0.0 \(expected a finite number > 0\)"),
        ({"cpus_per_run": float("nan")}, r"Invalid cpus_per_run: nan"),
        ({"gpus_per_run": -1.0}, r"Invalid gpus_per_run: -1.0 \(expected a finite number >= 0\)"),
    ],
)
def test_bad_executor_options_are_rejected(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw).validate(ToyResolver())


def test_ray_without_ray_installed_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    argv = ["bench", "--executor", "ray", "--tasks", "digits", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatmin bench: error: Invalid executor: 'ray'")
    assert "pip install 'flatmin[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ray-address", "auto"], "Invalid options for executor 'local': ray_address='auto'"),
        (["--executor", "ray", "--cpus-per-run", "0"], "argument --cpus-per-run: 0"),
        (["--executor", "ray", "--gpus-per-run", "-1"], "argument --gpus-per-run: -1"),
        (["--executor", "spark"], "argument --executor: invalid choice: 'spark'"),
    ],
)
def test_cli_executor_options(tmp_path, capsys, extra, message):
    argv = ["bench", "--tasks", "digits", "--out", str(tmp_path / "o"), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
