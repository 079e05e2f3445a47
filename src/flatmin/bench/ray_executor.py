"""Executing a grid's runs as Ray tasks: on a local Ray instance or on a cluster.

``flatmin bench --executor ray`` (``pip install 'flatmin[ray]'``). The grid, its resume rules and
its records are those of :mod:`flatmin.bench.execute`; only where a run trains changes.

* **Tasks**: each run is one Ray task reserving ``cpus_per_run`` CPUs (default: ``threads``) and
  ``gpus_per_run`` GPUs, with ``max_retries=0``: Ray never reruns it behind the driver's back, so
  a run is trained at most once per invocation.
* **Data**: the driver loads each dataset once (the runner did so before any run) and puts it in
  the object store; the tasks receive it from there, so no node fetches or reads the data cache
  and a multi-node cluster needs no shared file system.
* **Records**: the driver alone appends each record to ``results.jsonl`` as its task finishes.
  A task whose worker dies (killed, out of memory, its node lost) gets an ``error`` record: the
  next invocation reruns that run and nothing else.
* **Progress**: the tasks send their start and epochs to a small actor that the driver polls,
  so the bars are those of the local executor.
* **Connection**: ``ray_address`` (or ``$RAY_ADDRESS``) is an existing cluster (``"auto"``: the
  one ``ray start`` started on this machine); without either, a local Ray instance with ``jobs
  × cpus_per_run`` CPUs is started. Ray is connected on the first run that needs training and
  :func:`ray_session` disconnects at the end of the grid, shutting down a local instance it
  started (a connected cluster keeps running).
* **Signals**: on SIGINT/SIGTERM (:class:`flatmin._proc.Interrupted`) the records of finished
  tasks are appended, every other task is cancelled (running ones are killed) and the exception
  propagates; their runs are redone by the next invocation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from flatmin._proc import Interrupted
from flatmin.bench.execute import _Bars, _error_record, _execute
from flatmin.bench.store import append_record
from flatmin.bench.train import RunSpec
from flatmin.data import Dataset
from flatmin.tasks import Task

if TYPE_CHECKING:
    from flatmin.bench.runner import BenchConfig, Resolver

__all__ = ["INSTALL", "import_ray", "ray_session", "run_on_ray"]

INSTALL = "pip install 'flatmin[ray]'"
_POLL = 0.2  # seconds between looks at the progress messages


def import_ray() -> ModuleType:
    """The ``ray`` module.

    Raises:
        ValueError: Ray is not installed (the message gives the install command).
    """
    try:
        import ray
    except ImportError:
        raise ValueError(
            f"Invalid executor: 'ray' (Ray is not installed; install it with: {INSTALL})"
        ) from None
    return ray


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Disconnect from Ray at the end of the block if :func:`run_on_ray` connected inside it.

    A local Ray instance started inside the block is shut down; a connection that existed before
    the block (``ray.init`` called by the caller) is left alone.
    """
    ray = import_ray()
    connected = ray.is_initialized()
    try:
        yield
    finally:
        if not connected and ray.is_initialized():
            with _handlers_kept():
                ray.shutdown()


@contextlib.contextmanager
def _handlers_kept() -> Iterator[None]:
    # ray.init replaces the driver's SIGTERM handler with sys.exit; the grid's own handler
    # (flatmin._proc.interrupt_on_signals) must stay in charge of stopping cleanly.
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            with contextlib.suppress(ValueError):  # not the main thread: nothing was replaced
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _connect(ray: ModuleType, cfg: BenchConfig) -> None:
    """``ray.init`` for the grid, unless the process is already connected."""
    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address == "local":  # this machine, sized like the local executor's pool
        kwargs.update(num_cpus=math.ceil(cfg.jobs * _cpus(cfg)), include_dashboard=False)
    with _handlers_kept():
        try:
            ray.init(address=address, **kwargs)
        except BaseException:
            ray.shutdown()  # a half-started local instance
            raise


def _cpus(cfg: BenchConfig) -> float:
    return cfg.cpus_per_run if cfg.cpus_per_run is not None else float(cfg.threads)


class _Loaded:
    """The grid's resolver, with the task's dataset already loaded (from the object store)."""

    def __init__(self, resolver: Resolver, dataset: Dataset | None) -> None:
        self.resolver, self.loaded = resolver, dataset

    def task(self, name: str) -> Task:
        return self.resolver.task(name)

    def dataset(self, task: Task) -> Dataset | None:
        return self.loaded


class _Progress:
    """An actor collecting the tasks' progress messages until the driver takes them."""

    def __init__(self) -> None:
        self.messages: list[tuple[Any, ...]] = []

    def put(self, message: tuple[Any, ...]) -> None:
        self.messages.append(message)

    def take(self) -> list[tuple[Any, ...]]:
        messages, self.messages = self.messages, []
        return messages


def _run_task(
    spec: RunSpec,
    resolver: Resolver,
    dataset: Dataset | None,
    threads: int,
    run_id: int,
    progress: Any,
) -> dict[str, Any]:
    """The body of a run's Ray task (``dataset`` arrives from the object store)."""
    if progress is None:
        return _execute(spec, _Loaded(resolver, dataset), threads, None)
    import ray  # in a Ray worker

    progress.put.remote(("start", run_id))

    def notify(epoch: int, epochs: int, acc: float) -> None:
        progress.put.remote(("epoch", run_id, epoch, epochs, acc))

    record = _execute(spec, _Loaded(resolver, dataset), threads, notify)
    # The actor runs one caller's messages in order: once this one is in, all are, so the
    # driver takes them before it sees the record (the run's bar is never skipped).
    with contextlib.suppress(ray.exceptions.RayError):  # the bars are not worth a run
        ray.get(progress.put.remote(("end", run_id)))
    return record


def run_on_ray(
    specs: Sequence[RunSpec],
    cfg: BenchConfig,
    resolver: Resolver,
    results: Path,
    bars: _Bars,
) -> None:
    """Train ``specs`` as Ray tasks and append each record (see the module docstring).

    Raises:
        flatmin._proc.Interrupted: SIGINT/SIGTERM; the finished records are kept and the other
            tasks cancelled.
    """
    ray = import_ray()
    with _signals_seen() as seen:
        try:
            _connect(ray, cfg)
            _run(ray, specs, cfg, resolver, results, bars)
        except KeyboardInterrupt as exc:
            if seen and not isinstance(exc, Interrupted):
                raise Interrupted(seen[-1]) from None
            raise


@contextlib.contextmanager
def _signals_seen() -> Iterator[list[int]]:
    """The SIGINT/SIGTERM received in the block, seen as they reach the installed handlers.

    Ray's blocking calls (``ray.init``, ``ray.wait``, ``ray.get``) run the signal handlers but
    replace the exception they raise (an :class:`~flatmin._proc.Interrupted` that carries the
    signal) by a bare ``KeyboardInterrupt``; what is seen here restores it.
    """
    seen: list[int] = []
    previous: dict[int, Any] = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(s)
        if not callable(handler):  # SIG_DFL / SIG_IGN / not installed from Python
            continue

        def remember(signum: int, frame: Any, handler: Callable[..., Any] = handler) -> Any:
            seen.append(signum)
            return handler(signum, frame)

        try:
            previous[s] = signal.signal(s, remember)
        except ValueError:  # not the main thread
            break
    try:
        yield seen
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(
    ray: ModuleType,
    specs: Sequence[RunSpec],
    cfg: BenchConfig,
    resolver: Resolver,
    results: Path,
    bars: _Bars,
) -> None:
    datasets: dict[str, Any] = {}  # dataset name -> object ref
    for spec in specs:
        task = resolver.task(spec.task)
        if task.dataset not in datasets:
            datasets[task.dataset] = ray.put(resolver.dataset(task))
    progress = ray.remote(num_cpus=0)(_Progress).remote() if bars.enabled else None
    remote = ray.remote(_run_task).options(
        num_cpus=_cpus(cfg), num_gpus=cfg.gpus_per_run or 0, max_retries=0,
        name="flatmin-bench-run",
    )  # fmt: skip
    shared = ray.put(resolver)
    pending: dict[Any, int] = {}  # object ref -> run id
    started: dict[int, float] = {}  # run id -> when it started (or was submitted)
    finished: set[int] = set()

    def show_progress() -> None:
        if progress is None:
            return
        for kind, run_id, *rest in ray.get(progress.take.remote()):
            if run_id in finished:  # a message that arrived after the record
                continue
            if kind == "start":
                started[run_id] = time.perf_counter()
                bars.start(run_id, specs[run_id])
            elif kind == "epoch":
                bars.epoch(run_id, *rest)

    def collect(refs: Sequence[Any]) -> None:
        for ref in refs:
            run_id = pending.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died or the task could not run
                summary = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = f"the Ray task failed ({type(exc).__name__}: {summary})"
                record = _error_record(specs[run_id], resolver, reason, str(exc), started[run_id])
            append_record(results, record)
            finished.add(run_id)
            bars.finish(run_id, record)

    try:
        for run_id, spec in enumerate(specs):
            dataset = datasets[resolver.task(spec.task).dataset]
            ref = remote.remote(spec, shared, dataset, cfg.threads, run_id, progress)
            pending[ref], started[run_id] = run_id, time.perf_counter()
        while pending:
            ray.wait(list(pending), num_returns=1, timeout=_POLL)
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            show_progress()  # after the wait: every message of a ready task is in
            collect(ready)
    except BaseException:
        with contextlib.suppress(Exception):  # keep what finished before the interruption
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            collect(ready)
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if progress is not None:
            with contextlib.suppress(Exception):
                ray.kill(progress)
