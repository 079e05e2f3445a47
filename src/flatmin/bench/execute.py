"""Executing a grid's runs: in this process or in worker processes, locked and interruptible.

* **Lock**: :func:`exclusive_output` holds an advisory lock on ``<out>/.flatmin-bench.lock``
  (holder's pid inside) while a grid runs, so a second ``flatmin bench`` on the same directory
  refuses at once (:class:`OutputLockedError`) instead of training every run twice. The kernel
  drops the lock when its holder dies, so a lock file left by a killed process is taken over.
* **Records**: every finished run is appended to ``results.jsonl`` by this (the main) process
  as soon as it finishes (:func:`flatmin.bench.store.append_record`).
* **Workers** (``jobs > 1``): ``jobs`` spawned processes, each joined to the main process by one
  pipe: the main process sends a run, the worker sends epoch progress and the finished record.
  Workers ignore SIGINT (the main process decides when they stop) and are SIGKILL-ed by the
  kernel if the main process dies, even by SIGKILL (:func:`flatmin._proc.die_with_parent`). A
  worker that dies (out of memory, a crash) gives its run an ``error`` record, which the next
  invocation retries, and is replaced; one killed by SIGTERM or SIGINT (someone is stopping
  the job) stops the grid like a signal to the main process.
* **Executors**: ``cfg.executor`` is ``"local"`` (this process or the worker processes above) or
  ``"ray"`` (one Ray task per run, :mod:`flatmin.bench.ray_executor`); the records, the resume
  rules and the progress bars are the same.
* **Signals**: SIGINT and SIGTERM raise :class:`flatmin._proc.Interrupted` in the main process;
  records that already arrived are appended, the workers are terminated (SIGTERM, then SIGKILL
  after 3 s) and the exception propagates (``flatmin bench`` exits 130 or 143). Runs that were
  in flight are redone by the next invocation.
"""

from __future__ import annotations

import collections
import contextlib
import math
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flatmin._io import FileLock, LockedError
from flatmin._proc import Interrupted, die_with_parent
from flatmin.bench.store import append_record
from flatmin.bench.train import RunSpec, train

if TYPE_CHECKING:  # runner imports this module; the types only are needed here
    from flatmin.bench.runner import BenchConfig, Resolver

__all__ = [
    "EXECUTORS",
    "LOCK",
    "OutputLockedError",
    "check_executor",
    "exclusive_output",
    "executor_session",
    "run_specs",
]

EXECUTORS = ("local", "ray")
LOCK = ".flatmin-bench.lock"
_STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a worker


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


# -- executors ------------------------------------------------------------------------------------


def check_executor(cfg: BenchConfig) -> None:
    """Raise ``ValueError`` for a bad executor option, or ``"ray"`` without Ray installed."""
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"Invalid executor: {cfg.executor!r} (expected one of {EXECUTORS})")
    cpus, gpus = cfg.cpus_per_run, cfg.gpus_per_run
    if cpus is not None and not (math.isfinite(cpus) and cpus > 0):
        raise ValueError(f"Invalid cpus_per_run: {cpus} (expected a finite number > 0)")
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        raise ValueError(f"Invalid gpus_per_run: {gpus} (expected a finite number >= 0)")
    if cfg.executor == "ray":
        from flatmin.bench.ray_executor import import_ray

        import_ray()
        return
    given = {
        name: value
        for name in ("ray_address", "cpus_per_run", "gpus_per_run")
        if (value := getattr(cfg, name)) is not None
    }
    if given:
        options = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"Invalid options for executor {cfg.executor!r}: {options} (need 'ray')")


def executor_session(cfg: BenchConfig) -> contextlib.AbstractContextManager[None]:
    """The context of a whole grid: for ``"ray"``, disconnects from Ray at its end."""
    if cfg.executor == "ray" and cfg.run:
        from flatmin.bench.ray_executor import ray_session

        return ray_session()
    return contextlib.nullcontext()


# -- one run ---------------------------------------------------------------------------------------


def _error_record(spec: RunSpec, resolver: Resolver, reason: str, tb: str, t0: float) -> dict:
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


def _execute(
    spec: RunSpec,
    resolver: Resolver,
    threads: int,
    notify: Callable[[int, int, float], None] | None,
) -> dict[str, Any]:
    """Train one run and return its record (``status="error"`` if it raised)."""
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
        return _error_record(spec, resolver, reason, traceback.format_exc(limit=8), t0)
    finally:
        torch.set_num_threads(previous)


# -- progress bars ---------------------------------------------------------------------------------


class _Bars:
    """The grid bar and one bar per running run (tqdm, stderr); inert without ``enabled``."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.enabled = enabled
        self.runs: dict[int, Any] = {}
        self.grid: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.grid = tqdm(total=total, desc=desc, unit="run", position=0, dynamic_ncols=True)

    def start(self, run_id: int, spec: RunSpec) -> None:
        if not self.enabled:
            return
        slots = {bar.pos for bar in self.runs.values()}
        pos = next(i for i in range(1, len(slots) + 2) if i not in slots)
        label = f"{spec.task} {spec.method} s{spec.seed}" + (" (val grid)" * (spec.stage == "tune"))
        self.runs[run_id] = self._tqdm(
            desc=label, unit="ep", position=pos, leave=False, dynamic_ncols=True
        )

    def epoch(self, run_id: int, epoch: int, epochs: int, acc: float) -> None:
        bar = self.runs.get(run_id)
        if bar is None:
            return
        bar.total = epochs
        bar.n = epoch
        bar.set_postfix_str(f"train {100 * acc:.1f}%", refresh=True)

    def finish(self, run_id: int, record: dict[str, Any]) -> None:
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
        for bar in self.runs.values():
            bar.close()
        self.runs.clear()
        if self.grid is not None:
            self.grid.close()


# -- the grid --------------------------------------------------------------------------------------


def run_specs(
    specs: Sequence[RunSpec],
    cfg: BenchConfig,
    resolver: Resolver,
    results: Path,
    desc: str,
) -> None:
    """Train ``specs`` (sequentially, in ``cfg.jobs`` workers, or on Ray) and append each record.

    Raises:
        flatmin._proc.Interrupted: SIGINT/SIGTERM (when handlers are installed, see
            :func:`flatmin._proc.interrupt_on_signals`); finished records are kept.
    """
    bars = _Bars(len(specs), desc, cfg.progress)
    try:
        if cfg.executor == "ray":
            from flatmin.bench.ray_executor import run_on_ray

            run_on_ray(specs, cfg, resolver, results, bars)
            return
        if cfg.jobs == 1 or len(specs) <= 1:
            for run_id, spec in enumerate(specs):
                bars.start(run_id, spec)
                rec = _execute(spec, resolver, cfg.threads, partial(bars.epoch, run_id))
                append_record(results, rec)
                bars.finish(run_id, rec)
            return
        _Pool(specs, cfg, resolver, results, bars).run()
    finally:
        bars.close()


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

        conn.send(("done", run_id, _execute(spec, resolver, threads, notify)))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    run_id: int | None = None  # the run it is training
    started: float = 0.0


class _Pool:
    """``cfg.jobs`` worker processes fed one run at a time (see the module docstring)."""

    def __init__(
        self,
        specs: Sequence[RunSpec],
        cfg: BenchConfig,
        resolver: Resolver,
        results: Path,
        bars: _Bars,
    ) -> None:
        self.specs = specs
        self.cfg = cfg
        self.resolver = resolver
        self.results = results
        self.bars = bars
        self.queued = collections.deque(range(len(specs)))
        self.workers: list[_Worker] = []
        self.ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock

    def _start_worker(self) -> _Worker:
        ours, theirs = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_worker_main, args=(theirs, self.resolver, self.cfg.threads, os.getpid()),
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
                append_record(self.results, record)
                self.bars.finish(run_id, record)
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
        record = _error_record(self.specs[run_id], self.resolver, reason, "", worker.started)
        append_record(self.results, record)
        self.bars.finish(run_id, record)
        if self.queued:
            self._assign(self._start_worker())

    def run(self) -> None:
        graceful = False
        try:
            for _ in range(min(self.cfg.jobs, len(self.specs))):
                self._start_worker()
            for worker in list(self.workers):
                self._assign(worker)
            while busy := [w for w in self.workers if w.run_id is not None]:
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
