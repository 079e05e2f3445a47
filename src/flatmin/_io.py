"""Crash-safe file output shared by every layer: atomic writes, advisory locks, strict JSON.

Atomic write (:func:`atomic_open` and its wrappers): the content goes to a temporary file in the
destination's directory (so the rename never crosses a file system), is flushed and ``fsync``-ed,
renamed over the destination with :func:`os.replace` (atomic on POSIX and Windows), and the
directory is ``fsync``-ed so the rename itself survives a power loss. A reader therefore sees
either the old file or the complete new one, never a mix; a write that fails (disk full, a
signal, an exception in the caller) leaves the old file untouched and removes the temporary one.
The temporary file is created with mode ``0o666`` filtered by the process umask, like
:func:`open` (``tempfile.mkstemp`` would give ``0o600`` and make shared caches unreadable).

Lock (:class:`FileLock`): an advisory ``fcntl.flock`` on a file holding the holder's pid. The
kernel drops the lock when the holder dies, however it dies, so a stale lock file left by a dead
process is simply taken over.

Strict JSON (:func:`finite_json`): NaN and ±inf become ``null`` and their dotted paths are
returned, so the caller can flag them (``json.dumps`` would write the non-standard ``NaN``).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FileLock",
    "LockedError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "finite_json",
    "fsync_directory",
    "save_figure",
]


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so that a rename inside it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; its renames are durable on their own
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and all of Windows) refuse fsync on a directory
    finally:
        os.close(fd)


def _create_temp(dest: Path) -> tuple[int, Path]:
    """Open a new temporary file next to ``dest`` (mode ``0o666`` & ~umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it is replaced atomically when the block ends.

    Args:
        path: the destination; its directory must exist.
        mode: ``"wb"`` or ``"w"`` (text; ``kwargs`` such as ``encoding`` or ``newline`` are
            passed to :func:`open`).
        **kwargs: passed to :func:`os.fdopen`.

    Yields:
        The file object of the temporary file.

    Raises:
        ValueError: a mode that does not write a whole file.
        OSError: the write, ``fsync`` or rename failed; ``path`` is then unchanged.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with atomic_open(os.path.join(d, "x.txt"), "w") as f:
        ...     _ = f.write("hello")
        >>> open(os.path.join(d, "x.txt")).read()
        'hello'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"Invalid mode: {mode!r} (expected 'w' or 'wb')")
    dest = Path(path)
    fd, tmp = _create_temp(dest)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(dest.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Replace ``path`` atomically with ``data``."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` atomically with ``text``."""
    with atomic_open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """``fig.savefig`` into ``path`` atomically (the format is the file's suffix)."""
    dest = Path(path)
    fmt = kwargs.pop("format", dest.suffix.lstrip(".") or None)
    with atomic_open(dest, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def finite_json(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """Replace NaN/±inf floats by ``None``, recursively; return the value and the dotted paths.

    Example:
        >>> finite_json({"a": 1.0, "b": [2.0, float("nan")], "c": {"d": float("inf")}})
        ({'a': 1.0, 'b': [2.0, None], 'c': {'d': None}}, ['b.1', 'c.d'])
    """
    bad: list[str] = []

    def walk(v: Any, where: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(where)
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{where}.{i}" if where else str(i)) for i, x in enumerate(v)]
        return v

    return walk(value, path), bad


class LockedError(RuntimeError):
    """The lock file is held by another live process (``pid``: its pid, if it wrote one)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is locked by {holder}")
        self.path = path
        self.pid = pid


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class FileLock:
    """An exclusive advisory lock on ``path`` (created if missing), usable as a context manager.

    The holder's pid is written into the file and emptied on release (the file stays: removing
    it would let a waiting process and a new one lock two different files). Without ``fcntl``
    (Windows) the lock is a no-op.

    Args:
        path: the lock file.
        blocking: wait for the holder (``False``: :meth:`acquire` raises :class:`LockedError`).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "lock")
        >>> with FileLock(path):
        ...     FileLock(path).acquire()
        Traceback (most recent call last):
        ...
        flatmin._io.LockedError: ... is locked by process ...
    """

    def __init__(self, path: str | os.PathLike[str], *, blocking: bool = False) -> None:
        self.path = Path(path)
        self.blocking = blocking
        self._fd: int | None = None
        self._writable = False

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            LockedError: ``blocking=False`` and a live process holds the lock.
            OSError: the file cannot be created or opened (e.g. a read-only directory).
        """
        if fcntl is None:  # pragma: no cover - Windows: no advisory locks, run unguarded
            return
        try:
            fd, writable = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # another user's lock file: flock needs only read access
            fd, writable = os.open(self.path, os.O_RDONLY), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockedError(self.path, _read_pid(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._writable = fd, writable

    def release(self) -> None:
        """Empty the file and drop the lock (a no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._writable:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
