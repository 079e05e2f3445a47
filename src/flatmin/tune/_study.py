"""The study on disk: open or create it (locked), check its settings, recover from a kill.

A search's study is one Optuna study, :data:`STUDY_NAME`, in ``out/study.db`` (SQLite) or in
memory. Its settings (space, seeds, penalty and the caller's ``config``) are stored with it as
the user attribute ``identity``; a search with other settings is refused. A process killed
mid-trial leaves that trial ``RUNNING`` for ever: since ``out/study.lock`` (a
:class:`flatmin._io.FileLock`, holding the searcher's pid) guarantees a single searcher, every
running trial found on opening is stale, and is marked interrupted.

Before Optuna opens ``out/study.db`` (and would write into it), :func:`check_study_file` reads
it through SQLite read-only: a file that is not a flatmin study (random bytes, a damaged or
truncated database, another program's database, a directory) or that cannot be written is
refused with a message that names it and says what to do; flatmin never adds its tables to a
database it did not create.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flatmin._io import FileLock, LockedError
from flatmin.tune.result import Score, SeedRun, TrialRecord, TuneResult

__all__ = [
    "STUDY_FILE",
    "STUDY_NAME",
    "StudyConflictError",
    "best_score",
    "check_study_file",
    "collect",
    "open_study",
]

STUDY_NAME = "flatmin-tune"
STUDY_FILE = "study.db"
LOCK_FILE = "study.lock"
_SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database


class StudyConflictError(ValueError):
    """``out`` cannot hold this search: another search's study, a file, or a running search."""


@contextmanager
def open_study(
    out: Path | None,
    sampler: Any,
    pruner: Any,
    identity: Mapping[str, Any],
    startup: Sequence[Mapping[str, float | int]],
) -> Iterator[Any]:
    """The study of ``out`` (``None``: in memory), held locked; ``startup`` queued if new.

    Raises:
        StudyConflictError: ``out`` holds a study with other settings or one flatmin did not
            start, or another search holds its lock.
    """
    import optuna

    with _locked(out) if out is not None else _nolock():
        storage: Any
        if out is None:
            storage = optuna.storages.InMemoryStorage()
        else:
            check_study_file(out / STUDY_FILE)
            storage = optuna.storages.RDBStorage(f"sqlite:///{(out / STUDY_FILE).resolve()}")
        study = optuna.create_study(
            storage=storage, sampler=sampler, pruner=pruner, study_name=STUDY_NAME,
            direction="maximize", load_if_exists=True,
        )  # fmt: skip
        stored = study.user_attrs.get("identity")
        if stored is None:
            if study.trials:
                raise StudyConflictError(
                    f"Invalid out: {out} holds a study that flatmin did not start"
                )
            study.set_user_attr("identity", identity)
            for point in startup:
                study.enqueue_trial(dict(point))
        elif stored != identity:
            changed = sorted(
                k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k)
            )
            diff = "; ".join(
                f"{k} {stored.get(k)!r} there, {identity.get(k)!r} here" for k in changed
            )
            raise StudyConflictError(
                f"Invalid out: {out} holds a search with other settings ({diff}); "
                "use another directory"
            )
        _recover(study, storage)
        yield study


def check_study_file(path: Path) -> None:
    """Refuse ``path`` unless it is missing, empty or a flatmin study this process can write.

    Read-only: the file is opened through SQLite in read-only mode (read-write only when a
    journal left by a killed process must be rolled back first, as SQLite requires), so a
    refused file is left exactly as it was.

    Raises:
        StudyConflictError: (a ``ValueError``) ``path`` is a directory, not a SQLite database,
            damaged, another program's database, or read-only; the message names the file.
    """
    name = repr(str(path))
    other_dir = "move it away or use another directory"
    if path.is_dir():
        raise StudyConflictError(f"Invalid out: {name} is a directory, not a study ({other_dir})")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StudyConflictError(
            f"Invalid out: cannot write into {str(path.parent)!r}, where the study {name} lives "
            "(make the directory writable or use another one)"
        )
    if not path.exists():
        return
    if not os.access(path, os.R_OK | os.W_OK):
        raise StudyConflictError(
            f"Invalid out: {name} is not readable and writable (a search records every trial "
            "in it): chmod u+rw it, or use another directory"
        )
    with path.open("rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if not header:
        return  # empty: SQLite's own new database, nothing in it to damage
    if header != _SQLITE_HEADER:
        raise StudyConflictError(
            f"Invalid out: {name} is not a flatmin study (not a SQLite database: damaged, "
            f"truncated or another program's file); {other_dir} to start a new search"
        )
    names = _study_names(path, name, other_dir)
    if names is not None and names - {STUDY_NAME}:
        raise StudyConflictError(
            f"Invalid out: {name} is a database that is not a flatmin study (it holds "
            f"{', '.join(sorted(names - {STUDY_NAME}))}); flatmin does not write into it: "
            f"{other_dir}"
        )


def _study_names(path: Path, name: str, other_dir: str) -> set[str] | None:
    """The Optuna studies in the SQLite file ``path`` (``None``: no table at all).

    A database with tables but no Optuna ``studies`` table yields its table names (prefixed
    ``table``), so that the caller refuses it.
    """
    import sqlite3

    recover = any(path.with_name(path.name + s).exists() for s in ("-journal", "-wal"))
    uri = f"{path.resolve().as_uri()}?mode={'rw' if recover else 'ro'}"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {r[0] for r in rows}
            if not tables:
                return None
            if "studies" not in tables:
                return {f"table {t}" for t in tables}
            return {r[0] for r in con.execute("SELECT study_name FROM studies")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StudyConflictError(
            f"Invalid out: {name} is a damaged or foreign SQLite file (SQLite: {exc}); "
            f"{other_dir} to start a new search"
        ) from None


@contextmanager
def _nolock() -> Iterator[None]:
    yield


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out/study.lock`` for the search (released by the OS if the process dies).

    Raises:
        StudyConflictError: another live process holds the lock.
    """
    lock = FileLock(out / LOCK_FILE)
    try:
        lock.acquire()
    except LockedError as exc:
        holder = f"process {exc.pid}" if exc.pid is not None else "another process"
        raise StudyConflictError(
            f"Invalid out: another search is running in {out} ({holder} holds {LOCK_FILE}); "
            "wait for it to finish or use another directory"
        ) from None
    try:
        yield
    finally:
        lock.release()


def record(trial: Any) -> TrialRecord | None:
    """A :class:`TrialRecord` of an Optuna ``FrozenTrial`` (``None`` for a waiting one)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.WAITING:
        return None
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        state = "complete"
    elif trial.state == TrialState.PRUNED:
        state = "pruned"
    elif trial.state == TrialState.RUNNING:
        state = "running"
    else:  # FAIL: a result only when the objective itself said so
        state = "failed" if attrs.get("outcome") == "failed" else "interrupted"
    score = attrs.get("score")
    pruned_at = attrs.get("pruned_at")
    return TrialRecord(
        number=trial.number,
        state=state,
        params=dict(trial.params),
        runs=tuple(SeedRun.from_dict(d) for d in attrs.get("runs", [])),
        score=Score(**score) if state == "complete" and score is not None else None,
        reason=attrs.get("reason"),
        pruned_at=None if pruned_at is None else (int(pruned_at[0]), int(pruned_at[1])),
        retry_of=attrs.get("retry_of"),
    )


def _recover(study: Any, storage: Any) -> None:
    """Mark trials left running by a killed process as interrupted; queue them again (once).

    Every interrupted trial's hyper-parameters are enqueued once, as a trial with ``retry_of``.
    """
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "outcome", "interrupted")
        storage.set_trial_user_attr(trial_id, "reason", "the search process stopped mid-trial")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        rec = record(t)
        if rec is not None and rec.state == "interrupted" and t.number not in retried:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})


def collect(study: Any, result_args: dict[str, Any]) -> TuneResult:
    """The :class:`TuneResult` of every started trial of ``study``."""
    records = (record(t) for t in study.get_trials(deepcopy=False))
    return TuneResult(trials=tuple(r for r in records if r is not None), **result_args)


def best_score(study: Any) -> float | None:
    """The best score among the study's complete trials (``None``: none yet)."""
    from optuna.trial import TrialState

    scores = [
        t.user_attrs["score"]["value"]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "score" in t.user_attrs
    ]
    return max(scores, default=None)
