"""A damaged results.jsonl: a malformed record is a warning, its run redone; NaN is null."""

from __future__ import annotations

import json
import warnings

import pytest

from flatmin.bench import read_records, run_grid
from flatmin.bench.store import append_record, record_problem
from helpers.faults import (
    strict_json,
)
from helpers.toy_tasks import ToyResolver, toy_config

# -- results.jsonl ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: {k: v for k, v in r.items() if k != "final"},
        lambda r: {**r, "final": {**r["final"], "test_acc": "97%"}},
        lambda r: {**r, "seed": "zero"},
        lambda r: {**r, "status": "done"},
        lambda r: {**r, "curves": {"test_acc": [0.5, "x"]}},
        lambda r: {**r, "hash": 17},
        lambda r: {**r, "averages": {"0.5": {**r["averages"]["0.5"], "val_acc": None}}},
        lambda r: {**r, "averages": [1]},
        lambda r: [r],
    ],
)
def test_a_malformed_record_is_skipped_with_a_warning_and_redone(tmp_path, damage):
    run_grid(toy_config(tmp_path), resolver=ToyResolver())
    results = tmp_path / "results.jsonl"
    good = results.read_text().splitlines()
    sam = json.loads(good[1])
    bad = damage(sam)
    assert record_problem(bad) is not None
    results.write_text(good[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.warns(UserWarning, match=r"results\.jsonl:2: skipped a malformed record"):
        summary = run_grid(toy_config(tmp_path), resolver=ToyResolver())
    assert (summary.ran, summary.skipped) == (1, 1)  # the damaged run is redone
    with warnings.catch_warnings(record=True):
        recs = read_records(results)
    assert [r.method for r in recs] == ["baseline", "sam"]
    assert recs[1].to_dict()["final"] == sam["final"]  # deterministic: the same result again


def test_a_malformed_record_is_a_warning_line_in_the_cli(tmp_path, cli):
    argv = ["bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1", "--epochs",
            "1", "--jobs", "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert cli(*argv)[0] == 0
    results = tmp_path / "results.jsonl"
    rec = json.loads(results.read_text())
    results.write_text(json.dumps({**rec, "final": None}) + "\n")
    code, out, err = cli(*argv)
    assert code == 0 and "1 runs: 1 trained, 0 already done" in out
    assert f"flatmin bench: warning: {results}:1: skipped a malformed record ('final'" in err


def test_nan_in_a_record_is_written_as_null(tmp_path):
    append_record(tmp_path / "r.jsonl", {"hash": "h", "status": "failed", "loss": float("nan")})
    assert strict_json((tmp_path / "r.jsonl").read_text()) == {
        "hash": "h", "status": "failed", "loss": None,
    }  # fmt: skip


