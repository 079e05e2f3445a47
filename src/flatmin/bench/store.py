"""``results.jsonl``: one JSON record per finished run, appended atomically.

Writing: each record is serialised to one line and written with a single ``os.write`` on a file
descriptor opened with ``O_APPEND``, then ``fsync``-ed. A process killed between runs leaves only
whole lines; a line cut short by a crash or power loss mid-write is the last line of the file and
is ignored on reading (and a newline is added before the next record, so it never glues onto it).

Reading: invalid lines are skipped; when a configuration hash appears several times (it should
not), the last record wins.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["append_record", "latest_by_hash", "read_records"]


def _json_default(obj: object) -> object:
    raise TypeError(f"Invalid record value of type {type(obj).__name__}: {obj!r}")


def _clean(value: Any) -> Any:
    """NaN/inf → ``None`` (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append ``record`` as one line of ``path`` (created if missing) in one ``os.write``."""
    line = json.dumps(_clean(record), sort_keys=True, default=_json_default, allow_nan=False)
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
    """All valid records of ``path`` in file order (``[]`` if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a torn line from an interrupted write
        if isinstance(rec, dict) and "hash" in rec:
            out.append(rec)
    return out


def latest_by_hash(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of every configuration hash."""
    return {rec["hash"]: rec for rec in records}
