"""``results.jsonl``: one JSON record per finished run, appended atomically.

Writing: each record is serialised to one line and written with a single ``os.write`` on a file
descriptor opened with ``O_APPEND``, then ``fsync``-ed. A process killed between runs leaves only
whole lines; a line cut short by a crash or power loss mid-write is the last line of the file and
is ignored on reading (and a newline is added before the next record, so it never glues onto it).

Reading: lines that are not JSON (a torn write) are skipped silently; JSON lines that are not a
well-formed record (see :func:`record_problem`: a hand edit, another tool, an old bug) are
skipped with a warning naming the file and line, so their runs are redone instead of crashing
every later ``bench``. When a configuration hash appears several times (a retried ``error``
run), the last record wins.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flatmin._io import finite_json

__all__ = ["STATUSES", "append_record", "latest_by_hash", "read_records", "record_problem"]


def _json_default(obj: object) -> object:
    raise TypeError(f"Invalid record value of type {type(obj).__name__}: {obj!r}")


STATUSES = ("ok", "failed", "error")
# What the runner and the report read from an "ok" record: (section, keys that must be numbers).
_OK_NUMBERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("final", ("test_acc", "val_acc", "train_acc")),
    ("recipe", ("lr", "weight_decay", "batch_size", "epochs")),
)
_AVERAGE_NUMBERS = ("test_acc", "val_acc", "train_acc")
# A tuning run is chosen on its validation accuracy and evaluates nothing else.
_TUNE_NUMBERS = ("val_acc",)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def record_problem(rec: Any) -> str | None:
    """Why ``rec`` is not a well-formed run record (``None``: it is).

    Every record needs a non-empty string ``hash``, a ``status`` in :data:`STATUSES` and
    ``hyper`` (if present) an object. An ``ok`` record also needs what the runner and the report
    compute with: string ``task`` and ``method``, an int ``seed``, the numbers of
    :data:`_OK_NUMBERS` (``final`` accuracies, the ``recipe``), the same accuracies for each
    entry of ``averages`` (if present), ``curves`` as lists of numbers and a numeric
    ``wall_time``. A tuning run (``stage == "tune"``) needs only its validation accuracies.
    """
    if not isinstance(rec, dict):
        return f"not an object but {type(rec).__name__}"
    if not isinstance(rec.get("hash"), str) or not rec["hash"]:
        return f"'hash' is {rec.get('hash')!r} (expected a non-empty string)"
    if rec.get("status") not in STATUSES:
        return f"'status' is {rec.get('status')!r} (expected one of {STATUSES})"
    if not isinstance(rec.get("hyper", {}), dict):
        return f"'hyper' is {rec['hyper']!r} (expected an object)"
    if rec["status"] != "ok":
        return None
    for key in ("task", "method"):
        if not isinstance(rec.get(key), str) or not rec[key]:
            return f"{key!r} is {rec.get(key)!r} (expected a non-empty string)"
    if not isinstance(rec.get("seed"), int) or isinstance(rec["seed"], bool):
        return f"'seed' is {rec.get('seed')!r} (expected an int)"
    tune = rec.get("stage") == "tune"
    for section, section_keys in _OK_NUMBERS:
        keys: tuple[str, ...] = _TUNE_NUMBERS if tune and section == "final" else section_keys
        part = rec.get(section)
        if not isinstance(part, dict):
            return f"{section!r} is {part!r} (expected an object)"
        for key in keys:
            if not _is_number(part.get(key)):
                return f"'{section}.{key}' is {part.get(key)!r} (expected a number)"
    averages = rec.get("averages", {})
    if not isinstance(averages, dict):
        return f"'averages' is {averages!r} (expected an object)"
    for start, part in averages.items():
        if not isinstance(part, dict):
            return f"'averages.{start}' is {part!r} (expected an object)"
        for key in _TUNE_NUMBERS if tune else _AVERAGE_NUMBERS:
            if not _is_number(part.get(key)):
                return f"'averages.{start}.{key}' is {part.get(key)!r} (expected a number)"
    curves = rec.get("curves")
    if not isinstance(curves, dict) or not all(
        isinstance(c, list) and all(_is_number(v) for v in c) for c in curves.values()
    ):
        return "'curves' is not an object of number lists"
    if not _is_number(rec.get("wall_time")):
        return f"'wall_time' is {rec.get('wall_time')!r} (expected a number)"
    return None


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append ``record`` as one line of ``path`` (created if missing) in one ``os.write``."""
    clean = finite_json(record)[0]  # NaN/inf -> null: strict JSON
    line = json.dumps(clean, sort_keys=True, default=_json_default, allow_nan=False)
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size > 0:
            # A torn last line (crash mid-write) must not swallow this record.
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover - regular files write fully or raise
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All well-formed records of ``path`` in file order (``[]`` if it does not exist).

    A malformed record is skipped with a :class:`UserWarning` naming ``path:line`` and the
    problem (:func:`record_problem`); a line that is not JSON (a torn write) silently.
    """
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for number, line in enumerate(p.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a torn line from an interrupted write
        problem = record_problem(rec)
        if problem is not None:
            warnings.warn(
                f"{p}:{number}: skipped a malformed record ({problem}); its run will be redone",
                stacklevel=2,
            )
            continue
        out.append(rec)
    return out


def latest_by_hash(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of every configuration hash."""
    return {rec["hash"]: rec for rec in records}
