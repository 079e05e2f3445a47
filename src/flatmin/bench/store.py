"""``results.jsonl``: one JSON record per finished run, appended atomically.

Writing: each record is serialised to one line and written with a single ``os.write`` on a file
descriptor opened with ``O_APPEND``, then ``fsync``-ed. A process killed between runs leaves only
whole lines; a line cut short by a crash or power loss mid-write is the last line of the file and
is ignored on reading (and a newline is added before the next record, so it never glues onto it).

Reading: lines that are not JSON (a torn write) are skipped silently; JSON lines that are not a
well-formed record (see :func:`flatmin.bench.records.parse_record`: a hand edit, another
tool, an old bug, a line nested too deep to parse) are skipped with a warning naming the file
and line, so their runs are redone instead of crashing
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
from flatmin.bench.records import STATUSES, InvalidRecordError, Record, parse_record

__all__ = ["STATUSES", "append_record", "latest_by_hash", "read_records", "record_problem"]


def _json_default(obj: object) -> object:
    raise TypeError(f"Invalid record value of type {type(obj).__name__}: {obj!r}")


def record_problem(rec: object) -> str | None:
    """Why ``rec`` is not a well-formed run record (``None``: it is); see :func:`parse_record`."""
    try:
        parse_record(rec)
    except InvalidRecordError as exc:
        return str(exc)
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


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """All well-formed records of ``path`` in file order (``[]`` if it does not exist).

    A malformed record (:func:`~flatmin.bench.records.parse_record`), or a line nested too deep
    to parse, is skipped with a :class:`UserWarning` naming ``path:line`` and the problem; a
    line that is not JSON (a torn write) silently. The file itself is left as it is.
    """
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for number, line in enumerate(p.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = parse_record(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a torn line from an interrupted write
        except InvalidRecordError as exc:
            _skipped(p, number, f"a malformed record ({exc})")
            continue
        except RecursionError:  # json's parser recurses once per level
            _skipped(p, number, "a corrupt record (nested too deep to parse)")
            continue
        out.append(rec)
    return out


def _skipped(path: Path, number: int, what: str) -> None:
    warnings.warn(f"{path}:{number}: skipped {what}; its run will be redone", stacklevel=3)


def latest_by_hash(records: Iterable[Record]) -> dict[str, Record]:
    """The last record of every configuration hash."""
    return {rec.hash: rec for rec in records}
