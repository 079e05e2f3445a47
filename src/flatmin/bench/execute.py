"""The output directory's lock, and which executor a grid's runs train on.

* **Lock**: :func:`exclusive_output` holds an advisory lock on ``<out>/.flatmin-bench.lock``
  (holder's pid inside) while a grid runs, so a second ``flatmin bench`` on the same directory
  refuses at once (:class:`OutputLockedError`) instead of training every run twice. The kernel
  drops the lock when its holder dies, so a lock file left by a killed process is taken over.
* **Executors**: ``executor="local"`` trains in this process (``jobs == 1``) or in ``jobs``
  worker processes (:class:`~flatmin.bench.executors.PoolExecutor`); ``"ray"`` as one Ray task
  per run (:class:`~flatmin.bench.ray_executor.RayExecutor`). All run the same function and
  hand each record to the runner, which appends it to ``results.jsonl``: the records, the resume
  rules and the progress bars are the same (:mod:`flatmin.bench.executors`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from flatmin._io import FileLock, LockedError
from flatmin.bench.executors import Executor, PoolExecutor, SerialExecutor
from flatmin.bench.ray_executor import RayExecutor, import_ray
from flatmin.bench.resolver import Resolver

__all__ = [
    "EXECUTORS",
    "LOCK",
    "ExecutorSettings",
    "OutputLockedError",
    "check_executor",
    "exclusive_output",
    "make_executor",
]

EXECUTORS = ("local", "ray")
LOCK = ".flatmin-bench.lock"


class OutputLockedError(RuntimeError):
    """Another live process runs a grid in the same output directory (``pid``: its pid)."""

    def __init__(self, out: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(
            f"Output directory {os.fspath(out)!r} is in use by another flatmin bench ({holder}); "
            "wait for it to finish or choose another --out"
        )
        self.pid = pid


@contextlib.contextmanager
def exclusive_output(out: Path) -> Iterator[None]:
    """Hold the lock of the output directory ``out`` (created if missing) for the block.

    Raises:
        OutputLockedError: a live process holds it.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK)
    try:
        lock.acquire()
    except LockedError as exc:
        raise OutputLockedError(out, exc.pid) from None
    try:
        yield
    finally:
        lock.release()


class ExecutorSettings(Protocol):
    """The executor options of a grid (:class:`~flatmin.bench.runner.BenchConfig` has them)."""

    @property
    def executor(self) -> str:
        """``"local"`` or ``"ray"``."""
        ...

    @property
    def jobs(self) -> int:
        """Worker processes (a local Ray instance: its CPUs are ``jobs × cpus_per_run``)."""
        ...

    @property
    def threads(self) -> int:
        """Torch threads per run."""
        ...

    @property
    def ray_address(self) -> str | None:
        """The Ray cluster."""
        ...

    @property
    def cpus_per_run(self) -> float | None:
        """CPUs a Ray task reserves."""
        ...

    @property
    def gpus_per_run(self) -> float | None:
        """GPUs a Ray task reserves."""
        ...


def check_executor(cfg: ExecutorSettings) -> None:
    """Raise ``ValueError`` for a bad executor option, or ``"ray"`` without Ray installed."""
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"Invalid executor: {cfg.executor!r} (expected one of {EXECUTORS})")
    cpus, gpus = cfg.cpus_per_run, cfg.gpus_per_run
    if cpus is not None and not (math.isfinite(cpus) and cpus > 0):
        raise ValueError(f"Invalid cpus_per_run: {cpus} (expected a finite number > 0)")
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        raise ValueError(f"Invalid gpus_per_run: {gpus} (expected a finite number >= 0)")
    if cfg.executor == "ray":
        import_ray()
        return
    given = {
        "ray_address": cfg.ray_address,
        "cpus_per_run": cfg.cpus_per_run,
        "gpus_per_run": cfg.gpus_per_run,
    }
    options = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
    if options:
        raise ValueError(f"Invalid options for executor {cfg.executor!r}: {options} (need 'ray')")


def make_executor(cfg: ExecutorSettings, resolver: Resolver) -> Executor:
    """The executor ``cfg`` asks for (after :func:`check_executor`)."""
    if cfg.executor == "ray":
        return RayExecutor(
            resolver, cfg.threads, cfg.jobs, cfg.ray_address, cfg.cpus_per_run, cfg.gpus_per_run
        )
    if cfg.jobs > 1:
        return PoolExecutor(resolver, cfg.threads, cfg.jobs)
    return SerialExecutor(resolver, cfg.threads)
