"""The benchmark's seams: typed records, the executors, the tuner (Optuna through the executor)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from flatmin.bench import (
    BenchConfig,
    ErrorRecord,
    EvalRecord,
    GridTuner,
    PoolExecutor,
    SerialExecutor,
    TuneRecord,
    get_suite,
    parse_record,
    read_records,
    run_grid,
)
from flatmin.bench.executors import Progress
from flatmin.bench.records import InvalidRecordError
from flatmin.bench.train import RunSpec
from helpers.toy_tasks import ToyResolver

ROOT = Path(__file__).parents[2]
COMMITTED = ROOT / "docs" / "results" / "results.jsonl"


def _cfg(out: Path, **kw) -> BenchConfig:
    base = dict(out=out, tasks=("toy-a",), methods=("baseline", "sam"), seeds=(0,), epochs=1,
                progress=False, report=False)  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


# -- typed records ---------------------------------------------------------------------------------


def test_the_committed_results_parse_into_typed_records_unchanged():
    lines = [json.loads(line) for line in COMMITTED.read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one record skipped
        records = read_records(COMMITTED)
    assert len(records) == len(lines) > 0
    assert sum(isinstance(r, TuneRecord) for r in records) == sum(
        rec["stage"] == "tune" for rec in lines
    )
    assert sum(isinstance(r, EvalRecord) for r in records) == sum(
        rec["stage"] == "eval" for rec in lines
    )
    assert [r.to_dict() for r in records] == lines  # the on-disk format, as read
    first = records[0]
    assert first.final.val_acc == lines[0]["final"]["val_acc"]
    assert first.averages["0.5"].val_acc == lines[0]["averages"]["0.5"]["val_acc"]


def test_replanning_the_full_suite_on_the_committed_results_trains_nothing(tmp_path):
    shutil.copy(COMMITTED, tmp_path / "results.jsonl")
    suite = get_suite("full")
    cfg = BenchConfig.from_suite(suite, tmp_path, run=False, report=False, progress=False,
                                 analysis_task=None)  # fmt: skip
    summary = run_grid(cfg)
    hashes = {json.loads(line)["hash"] for line in COMMITTED.read_text().splitlines()}
    assert summary.ran == 0 and summary.failed == 0
    # Every planned run is in the file, and every run in the file is planned (none is stale).
    assert summary.planned == summary.skipped == len(hashes)
    # Every task x method x seed has its result, read from the records found.
    grid = sum(len(cfg.methods_of(t)) * len(cfg.seeds_of(t)) for t in cfg.tasks)
    assert len(summary.records) == grid and all(r.ok for r in summary.records)


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"hash": "h", "status": "error", "reason": "boom"}, ErrorRecord),
        ({"hash": "h", "status": "failed", "task": "t", "method": "sam", "seed": 0}, EvalRecord),
        ({"hash": "h", "status": "failed", "task": "t", "method": "sam", "seed": 0,
          "stage": "tune"}, TuneRecord),
    ],
)  # fmt: skip
def test_each_status_and_stage_parses_to_its_kind(record, kind):
    parsed = parse_record(record)
    assert type(parsed) is kind and parsed.to_dict() == record
    assert parsed.finished is (kind is not ErrorRecord)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1], "not an object but list"),
        ({"hash": "", "status": "ok"}, "'hash' is '' (expected a non-empty string)"),
        ({"hash": "h", "status": "done"}, "'status' is 'done' (expected one of"),
        ({"hash": "h", "status": "failed", "task": "t", "method": "m", "seed": True},
         "'seed' is True (expected an int)"),
        ({"hash": "h", "status": "ok", "task": "t", "method": "m", "seed": 0, "final": {}},
         "'final.test_acc' is None (expected a number)"),
    ],
)  # fmt: skip
def test_a_malformed_record_is_refused_naming_the_problem(record, message):
    with pytest.raises(InvalidRecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_record(record)


def test_a_line_nested_too_deep_is_skipped_as_corrupt_and_kept_in_the_file(tmp_path):
    """A 200,000-deep line made every later bench die with RecursionError."""
    results = tmp_path / "results.jsonl"
    cfg = _cfg(tmp_path, methods=("baseline",))
    run_grid(cfg, resolver=ToyResolver())
    with open(results, "a") as f:
        f.write('{"hash": "x", "a": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    size = results.stat().st_size
    corrupt = r"results\.jsonl:2: skipped a corrupt record \(nested too deep to parse\)"
    with pytest.warns(UserWarning, match=corrupt):
        records = read_records(results)
    assert [r.method for r in records] == ["baseline"]
    with pytest.warns(UserWarning, match="nested too deep"):
        again = run_grid(cfg, resolver=ToyResolver())
    assert (again.ran, again.skipped) == (0, 1)
    assert results.stat().st_size == size  # nothing lost, nothing rewritten


# -- executors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("executor", [SerialExecutor, PoolExecutor])
def test_every_executor_hands_each_spec_its_record_from_the_one_run_function(executor):
    specs = [RunSpec("toy-a", "baseline", s, epochs=1) for s in (0, 1)]
    got = {}
    with executor(ToyResolver(), 1) as ex:
        ex.run(specs, lambda spec, rec: got.setdefault(spec.seed, rec), Progress(2, "x", False))
    assert set(got) == {0, 1}
    for seed, rec in got.items():
        parsed = parse_record(rec)
        assert isinstance(parsed, EvalRecord) and parsed.seed == seed and parsed.status == "ok"


# -- tuners --------------------------------------------------------------------------------------


def test_the_grid_tuner_is_the_default():
    assert BenchConfig(out=Path("x"), tasks=("t",), methods=("baseline",), seeds=(0,)).tuner == (
        GridTuner()
    )


def test_optuna_trials_go_through_the_executor_and_are_recorded_exactly_once(tmp_path):
    pytest.importorskip("optuna")
    from flatmin.tune.bench import OptunaTuner

    cfg = _cfg(tmp_path, tune=True, tune_seeds=(100, 101), jobs=2,
               tuner=OptunaTuner(trials=3, batch=2))  # fmt: skip
    summary = run_grid(cfg, resolver=ToyResolver())
    trials = [r for r in read_records(tmp_path / "results.jsonl") if isinstance(r, TuneRecord)]
    # 3 trials x 2 tuning seeds of SAM's search, each its own run (baseline has nothing to tune).
    assert len(trials) == 6 and {r.method for r in trials} == {"sam"}
    assert len({r.hash for r in trials}) == 6 and {r.seed for r in trials} == {100, 101}
    (search,) = summary.searches
    assert search.trials == {"complete": 3, "failed": 0}
    by_rho: dict[float, list[float]] = {}
    for r in trials:
        by_rho.setdefault(r.hyper["rho"], []).append(r.final.val_acc)
    scores = {rho: sum(v) / 2 - abs(v[0] - v[1]) / 2 for rho, v in by_rho.items()}  # mean - std
    assert search.chosen["rho"] == max(scores, key=scores.get)
    assert summary.hypers[("toy-a", "sam")].rho == search.chosen["rho"]
    # A rerun replays the search on the records: nothing is trained again, the same choice.
    lines = (tmp_path / "results.jsonl").read_text()
    again = run_grid(cfg, resolver=ToyResolver())
    assert again.ran == 0 and again.hypers == summary.hypers
    assert (tmp_path / "results.jsonl").read_text() == lines


# -- Ray: bounded failures -------------------------------------------------------------------------


def _bench(tmp_path: Path, *extra: str, env: dict[str, str] | None = None):
    exe = Path(sys.executable).with_name("flatmin")
    argv = [str(exe), "bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1",
            "--epochs", "1", "--no-progress", "--executor", "ray", "--out", str(tmp_path / "o"),
            *extra]  # fmt: skip
    # The timeout bounds the test if the refusal regresses into a hang.
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_an_unreachable_ray_address_is_refused_with_one_line(tmp_path, how):
    pytest.importorskip("ray")
    import os

    if how == "option":
        proc = _bench(tmp_path, "--ray-address", "127.0.0.1:1")
        option = "--ray-address"
    else:
        proc = _bench(tmp_path, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
        option = "RAY_ADDRESS"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"flatmin bench: error: Invalid {option}: '127.0.0.1:1' (no Ray")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@contextlib.contextmanager
def _listener(answer: bytes | None):
    """A TCP server that accepts and writes ``answer`` (``None``: silent; ``b""``: hangs up)."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                conns.append(conn)
                if answer is not None:
                    conn.sendall(answer)
                if answer == b"":  # read the client's bytes first: a clean close, not a reset
                    conn.recv(1024)
                    conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in conns:
            conn.close()


def test_an_address_where_something_else_listens_is_refused_with_one_line(tmp_path):
    """A web server on the address: ray.init waited there for minutes, retrying."""
    pytest.importorskip("ray")
    with _listener(b"HTTP/1.0 400 Bad Request\r\n\r\n") as address:
        proc = _bench(tmp_path, "--ray-address", address)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"flatmin bench: error: Invalid --ray-address: {address!r} (something listens there, "
        "but not a Ray cluster: it does not answer as a gRPC server; its first bytes: "
        "b'HTTP/1.0 ')\n"
    )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (None, "no Ray cluster answers there: timed out"),
        (b"", "something listens there, but not a Ray cluster"),  # accepts, then hangs up
        (b"\0\0\x12\x01\0\0\0\0\0", "something listens there, but not a Ray cluster"),
    ],
    ids=["silent", "hangs-up", "not-settings"],
)
def test_a_silent_or_foreign_listener_is_refused_within_the_timeout(answer, reason):
    from flatmin.bench.ray_executor import RayUnavailableError, check_reachable

    with _listener(answer) as address, pytest.raises(RayUnavailableError, match=re.escape(reason)):
        check_reachable(address, "--ray-address", timeout=0.5)


def test_a_grpc_server_passes_the_probe():
    """What a gRPC server (Ray's GCS) sends first: an empty SETTINGS frame."""
    from flatmin.bench.ray_executor import check_reachable

    with _listener(bytes((0, 0, 0, 4, 0, 0, 0, 0, 0))) as address:
        check_reachable(address, "--ray-address", timeout=2.0)
