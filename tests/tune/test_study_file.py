"""``out/study.db`` that is not a flatmin study: refused by name, never written (issue 21.5)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from flatmin import cli  # noqa: E402
from flatmin.tune import Param, StudyConflictError, search  # noqa: E402
from helpers.faults import python_obeying_permissions  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
RHO = Param("rho", 0.01, 2.0, log=True)


def _train(params, seed, report):
    for epoch in (1, 2):
        report(epoch, 0.9 - abs(params["rho"] - 0.1))


@pytest.fixture(scope="module")
def good_study(tmp_path_factory) -> bytes:
    """The bytes of a real study.db (one finished trial)."""
    out = tmp_path_factory.mktemp("good")
    search(_train, [RHO], n_trials=1, out=out, pruner="none")
    return (out / "study.db").read_bytes()


def _foreign_sqlite(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.execute("INSERT INTO notes VALUES ('precious')")
    con.commit()
    con.close()


def _other_optuna_study(path: Path) -> None:
    optuna.create_study(storage=f"sqlite:///{path}", study_name="their-study")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, good: p.write_bytes(os.urandom(4096)), "is not a flatmin study (not a SQLite"),
        (lambda p, good: p.write_bytes(good[: len(good) // 2]),
         "is a damaged or foreign SQLite file (SQLite: database disk image is malformed)"),
        (lambda p, good: p.write_bytes(good[:10]), "is not a flatmin study (not a SQLite"),
        (lambda p, good: _foreign_sqlite(p),
         "is a database that is not a flatmin study (it holds table notes); flatmin does not "
         "write into it"),
        (lambda p, good: _other_optuna_study(p),
         "is a database that is not a flatmin study (it holds their-study)"),
    ],
    ids=["random-bytes", "truncated", "truncated-header", "foreign-sqlite", "other-optuna-study"],
)  # fmt: skip
def test_a_file_that_is_not_a_flatmin_study_is_refused_untouched(
    tmp_path, good_study, make, message
):
    db = tmp_path / "study.db"
    make(db, good_study)
    before = _digest(db)
    with pytest.raises(StudyConflictError) as info:
        search(_train, [RHO], n_trials=1, out=tmp_path)
    text = str(info.value)
    assert text.startswith(f"Invalid out: {str(db)!r} ") and message in text, text
    assert "\n" not in text and "move it away or use another directory" in text
    assert _digest(db) == before  # not one byte written
    assert not (tmp_path / "tune.json").exists()


def test_a_directory_named_study_db_is_refused(tmp_path):
    (tmp_path / "study.db").mkdir()
    with pytest.raises(StudyConflictError, match=r"study.db' is a directory, not a study \(move"):
        search(_train, [RHO], n_trials=1, out=tmp_path)
    assert list((tmp_path / "study.db").iterdir()) == []


def test_an_empty_file_and_a_flatmin_study_are_accepted(tmp_path, good_study):
    (tmp_path / "study.db").write_bytes(b"")  # SQLite's own new database: nothing to damage
    assert search(_train, [RHO], n_trials=1, out=tmp_path, pruner="none").finished == 1
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "study.db").write_bytes(good_study)
    result = search(_train, [RHO], n_trials=2, out=resumed, pruner="none")
    assert result.finished == 2 and [t.number for t in result.trials] == [0, 1]


def test_cli_tune_names_the_file_and_exits_2(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "study.db").write_bytes(b"not a database at all, just text\n" * 10)
    argv = ["tune", "--task", "digits", "--method", "sam", "--trials", "1", "--seeds", "1",
            "--epochs", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"flatmin tune: error: Invalid out: {str(out / 'study.db')!r} is not a flatmin study"
    )
    assert err.count("\n") == 1 and "Traceback" not in err


_READ_ONLY = textwrap.dedent("""
    import json, sys
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from flatmin.tune import Param, StudyConflictError, search

    def train(params, seed, report):
        report(1, 0.5)

    try:
        search(train, [Param("rho", 0.01, 2.0, log=True)], n_trials=2, out=sys.argv[1])
        print(json.dumps(["ran", ""]))
    except StudyConflictError as exc:
        print(json.dumps(["refused", str(exc)]))
""")


def test_a_read_only_study_is_refused_by_name(tmp_path, good_study):
    db = tmp_path / "study.db"
    db.write_bytes(good_study)
    db.chmod(0o444)
    before = _digest(db)
    # As root, in a child without the capabilities that bypass file modes.
    proc = python_obeying_permissions(_READ_ONLY, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    outcome, message = json.loads(proc.stdout)
    assert outcome == "refused", proc.stdout
    assert message.startswith(f"Invalid out: {str(db)!r} is not readable and writable")
    assert "chmod u+rw" in message
    assert _digest(db) == before


_KILLED_MID_WRITE = textwrap.dedent("""
    import os, signal, sqlite3, sys
    con = sqlite3.connect(sys.argv[1])
    con.execute("PRAGMA cache_size = 1")  # spill the changed pages into the file mid-transaction
    con.execute("BEGIN")
    con.execute("UPDATE studies SET study_name = 'half-written'")
    con.execute("CREATE TABLE junk AS SELECT * FROM trial_values")
    for _ in range(6):
        con.execute("INSERT INTO junk SELECT * FROM junk")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_study_killed_mid_write_is_rolled_back_and_resumed(tmp_path, good_study):
    db = tmp_path / "study.db"
    db.write_bytes(good_study)
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(db)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "study.db-journal").stat().st_size > 0  # left for the next opener
    result = search(_train, [RHO], n_trials=2, out=tmp_path, pruner="none")
    assert result.finished == 2 and [t.number for t in result.trials] == [0, 1]
