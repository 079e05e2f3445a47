"""The executor seam: where a batch of runs trains (this process, worker processes, or Ray).

Every executor runs the same function, :func:`run_spec` (one spec → its record), and hands each
record to the caller's ``on_record`` as soon as the run finishes, so the caller (the runner)
appends it to ``results.jsonl`` and the resume rules never depend on where a run trained.

* :class:`SerialExecutor` — in this process, one run after another.
* :class:`PoolExecutor` (``--jobs N``) — ``N`` spawned processes, each joined to this process by
  one pipe: this process sends a run, the worker sends epoch progress and the finished record.
  Workers ignore SIGINT (this process decides when they stop) and are SIGKILL-ed by the kernel
  if this process dies, even by SIGKILL (:func:`flatmin._proc.die_with_parent`). A worker that
  dies (out of memory, a crash) gives its run an ``error`` record, which the next invocation
  retries, and is replaced; one killed by SIGTERM or SIGINT (someone is stopping the job) stops
  the batch like a signal to this process.
* :class:`flatmin.bench.ray_executor.RayExecutor` (``--executor ray``) — one Ray task per run.

Signals: SIGINT and SIGTERM raise :class:`flatmin._proc.Interrupted` here; records that already
arrived are handed over, the workers are terminated (SIGTERM, then SIGKILL after 3 s) and the
exception propagates. Runs that were in flight are redone by the next invocation.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Protocol, TypeVar

import torch

from flatmin._proc import Interrupted, die_with_parent
from flatmin.bench.resolver import Resolver
from flatmin.bench.train import RunSpec, train

__all__ = [
    "Executor",
    "OnRecord",
    "PoolExecutor",
    "Progress",
    "SerialExecutor",
    "error_record",
    "run_spec",
]

_STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a worker

Notify = Callable[[int, int, float], None]
"""Progress of a run: ``notify(epoch, epochs, train_acc)``."""
OnRecord = Callable[[RunSpec, dict[str, Any]], None]
"""What an executor calls with each finished run's spec and record (in this process)."""


# -- the one run function --------------------------------------------------------------------------


def error_record(
    spec: RunSpec, resolver: Resolver, reason: str, tb: str, t0: float
) -> dict[str, Any]:
    """The ``status="error"`` record of a run that raised or whose worker died."""
    try:
        task = resolver.task(spec.task)
        config, h = spec.config(task), spec.config_hash(task)
    except Exception:
        config, h = {"task": spec.task, "method": spec.method, "seed": spec.seed}, "error"
    return {
        **config,
        "hash": h,
        "status": "error",
        "reason": reason,
        "traceback": tb,
        "wall_time": time.perf_counter() - t0,
    }


def run_spec(
    spec: RunSpec, resolver: Resolver, threads: int, notify: Notify | None = None
) -> dict[str, Any]:
    """Train one run with ``threads`` torch threads; its record (``"error"`` if it raised).

    A tuning run (``stage="tune"``) validates every epoch, so its record has the validation
    curve a search may prune on.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        task = resolver.task(spec.task)
        dataset = resolver.dataset(task)

        def on_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
            if notify is not None:
                notify(epoch, epochs, metrics["train_acc"])

        return train(spec, task=task, dataset=dataset, on_epoch=on_epoch).record
    except Exception as exc:  # the grid goes on; the run is retried on the next invocation
        reason = f"{type(exc).__name__}: {exc}"
        return error_record(spec, resolver, reason, traceback.format_exc(limit=8), t0)
    finally:
        torch.set_num_threads(previous)


# -- progress bars ---------------------------------------------------------------------------------


class Progress:
    """The batch's bar and one bar per running run (tqdm, stderr); inert without ``enabled``."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.enabled = enabled
        self.runs: dict[int, Any] = {}
        self.grid: Any = None
        if enabled:
            from tqdm.auto import tqdm  # optional (the bench extra)

            self._tqdm = tqdm
            self.grid = tqdm(total=total, desc=desc, unit="run", position=0, dynamic_ncols=True)

    def start(self, run_id: int, spec: RunSpec) -> None:
        """A bar for the run ``run_id`` (in the first free row)."""
        if not self.enabled:
            return
        slots = {bar.pos for bar in self.runs.values()}
        pos = next(i for i in range(1, len(slots) + 2) if i not in slots)
        label = f"{spec.task} {spec.method} s{spec.seed}" + (" (val grid)" * (spec.stage == "tune"))
        self.runs[run_id] = self._tqdm(
            desc=label, unit="ep", position=pos, leave=False, dynamic_ncols=True
        )

    def epoch(self, run_id: int, epoch: int, epochs: int, acc: float) -> None:
        """The run ``run_id`` finished ``epoch`` of ``epochs`` at training accuracy ``acc``."""
        bar = self.runs.get(run_id)
        if bar is None:
            return
        bar.total = epochs
        bar.n = epoch
        bar.set_postfix_str(f"train {100 * acc:.1f}%", refresh=True)

    def finish(self, run_id: int, record: dict[str, Any]) -> None:
        """The run ``run_id`` ended with ``record`` (a line for a run that is not ``ok``)."""
        if not self.enabled:
            return
        bar = self.runs.pop(run_id, None)
        if bar is not None:
            bar.close()
        self.grid.update(1)
        if record.get("status") != "ok":
            self.grid.write(
                f"{record.get('task')} {record.get('method')} seed {record.get('seed')}: "
                f"{record.get('status')} ({record.get('reason')})"
            )

    def close(self) -> None:
        """Close every bar."""
        for bar in self.runs.values():
            bar.close()
        self.runs.clear()
        if self.grid is not None:
            self.grid.close()


# -- the seam --------------------------------------------------------------------------------------


class Executor(Protocol):
    """Trains batches of runs; a context manager around every batch of one grid.

    ``run`` returns when every spec has a record (handed to ``on_record`` in this process as it
    arrives), or raises :class:`flatmin._proc.Interrupted` after handing over what finished.
    """

    def __enter__(self) -> Executor:
        """Start what the batches share (a Ray connection)."""
        ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Release it."""
        ...

    def run(self, specs: Sequence[RunSpec], on_record: OnRecord, progress: Progress) -> None:
        """Train ``specs``; call ``on_record(spec, record)`` for each, as it finishes."""
        ...


_S = TypeVar("_S", bound="_Stateless")


class _Stateless:
    """Executors with nothing to start or release."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class SerialExecutor(_Stateless):
    """Every run in this process, one after another."""

    def __init__(self, resolver: Resolver, threads: int = 1) -> None:
        self.resolver, self.threads = resolver, threads

    def run(self, specs: Sequence[RunSpec], on_record: OnRecord, progress: Progress) -> None:
        """Train ``specs`` in order."""
        for run_id, spec in enumerate(specs):
            progress.start(run_id, spec)
            record = run_spec(spec, self.resolver, self.threads, partial(progress.epoch, run_id))
            on_record(spec, record)
            progress.finish(run_id, record)


class PoolExecutor(_Stateless):
    """``jobs`` spawned worker processes (see the module docstring); one run: in this process."""

    def __init__(self, resolver: Resolver, threads: int = 1, jobs: int = 2) -> None:
        self.resolver, self.threads, self.jobs = resolver, threads, jobs

    def run(self, specs: Sequence[RunSpec], on_record: OnRecord, progress: Progress) -> None:
        """Train ``specs`` in the workers."""
        if len(specs) <= 1:
            SerialExecutor(self.resolver, self.threads).run(specs, on_record, progress)
            return
        _Pool(specs, self, on_record, progress).run()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_main(conn: Connection, resolver: Resolver, threads: int, parent: int) -> None:
    """A worker process: run what the pipe sends until ``None`` or the pipe closes."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when workers stop
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the main process is gone
            return
        if job is None:
            return
        run_id, spec = job

        def notify(epoch: int, epochs: int, acc: float, run_id: int = run_id) -> None:
            conn.send(("epoch", run_id, epoch, epochs, acc))

        conn.send(("done", run_id, run_spec(spec, resolver, threads, notify)))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    run_id: int | None = None  # the run it is training
    started: float = 0.0


class _Pool:
    """One batch on :class:`PoolExecutor`'s worker processes."""

    def __init__(
        self, specs: Sequence[RunSpec], pool: PoolExecutor, on_record: OnRecord, progress: Progress
    ) -> None:
        self.specs, self.pool, self.on_record, self.bars = specs, pool, on_record, progress
        self.queued = collections.deque(range(len(specs)))
        self.workers: list[_Worker] = []
        self.ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock

    def _start_worker(self) -> _Worker:
        ours, theirs = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_worker_main, args=(theirs, self.pool.resolver, self.pool.threads, os.getpid()),
            daemon=True, name="flatmin-bench-worker",
        )  # fmt: skip
        # Started with SIGINT/SIGTERM blocked (the mask survives exec) so that a Ctrl-C while
        # the worker imports torch cannot print a traceback; the worker unblocks them.
        with _signals_blocked():
            process.start()
        theirs.close()
        worker = _Worker(process, ours)
        self.workers.append(worker)
        return worker

    def _assign(self, worker: _Worker) -> None:
        """Send the worker the next queued run, or tell it to stop."""
        if not self.queued:
            worker.run_id = None
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            return
        run_id = self.queued.popleft()
        worker.run_id, worker.started = run_id, time.perf_counter()
        self.bars.start(run_id, self.specs[run_id])
        worker.conn.send((run_id, self.specs[run_id]))

    def _finish(self, run_id: int, record: dict[str, Any]) -> None:
        self.on_record(self.specs[run_id], record)
        self.bars.finish(run_id, record)

    def _drain(self, worker: _Worker) -> None:
        """Handle every message the worker has sent so far."""
        while True:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):  # the worker is gone; its sentinel tells how
                return
            if message[0] == "epoch":
                _, run_id, epoch, epochs, acc = message
                self.bars.epoch(run_id, epoch, epochs, acc)
            else:
                _, run_id, record = message
                self._finish(run_id, record)
                worker.run_id = None

    def _died(self, worker: _Worker) -> None:
        """A busy worker exited: record its run as an error and replace it."""
        code = worker.process.exitcode
        if code is not None and -code in (signal.SIGTERM, signal.SIGINT):
            raise Interrupted(-code)  # someone is stopping the job, not a crash of the run
        run_id = worker.run_id
        if run_id is None:  # only busy workers are watched
            return
        self.workers.remove(worker)
        worker.process.join()
        worker.conn.close()
        reason = f"the worker process died (exit code {code}) during the run"
        spec = self.specs[run_id]
        self._finish(run_id, error_record(spec, self.pool.resolver, reason, "", worker.started))
        if self.queued:
            self._assign(self._start_worker())

    def _step(self, busy: list[_Worker]) -> None:
        """Wait for a message or a death, then handle every busy worker's news."""
        wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
        for worker in busy:
            self._drain(worker)
            if worker.run_id is None:
                self._assign(worker)
            elif not worker.process.is_alive():
                self._drain(worker)  # a record sent just before it died still counts
                if worker.run_id is not None:
                    self._died(worker)
                else:
                    self._assign(worker)

    def run(self) -> None:
        graceful = False
        try:
            for _ in range(min(self.pool.jobs, len(self.specs))):
                self._start_worker()
            for worker in list(self.workers):
                self._assign(worker)
            while busy := [w for w in self.workers if w.run_id is not None]:
                self._step(busy)
            graceful = True
        except BaseException:
            for worker in self.workers:  # keep what finished before the interruption
                with contextlib.suppress(Exception):
                    self._drain(worker)
            raise
        finally:
            self._stop(graceful)

    def _stop(self, graceful: bool) -> None:
        """Stop every worker: idle ones were told to exit; otherwise SIGTERM, then SIGKILL."""
        if not graceful:
            for worker in self.workers:
                if worker.process.is_alive():
                    worker.process.terminate()
        deadline = time.monotonic() + _STOP_GRACE
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers.clear()
