"""Executing a grid's runs as Ray tasks: on a local Ray instance or on a cluster.

``flatmin bench --executor ray`` (``pip install 'flatmin[ray]'``). The grid, its resume rules and
its records are those of every :class:`~flatmin.bench.executors.Executor`; only where a run
trains changes.

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
  disconnected when the executor's block ends, shutting down a local instance it started (a
  connected cluster keeps running).
* **Bounded failures**: an address where nothing listens (``--ray-address``, ``$RAY_ADDRESS``)
  is refused after a TCP connection attempt of at most :data:`CONNECT_TIMEOUT` seconds instead
  of Ray's endless retries, and a run that no node of the cluster can host (``gpus_per_run``
  GPUs on a machine without one) before it is submitted instead of waiting for it forever: both
  raise :class:`RayUnavailableError` (a ``ValueError``).
* **A killed driver**: the local instance's processes are watched by a small reaper process
  (:func:`start_reaper`) that SIGKILLs them when the driver dies, even by SIGKILL, so no Ray
  agent outlives it.
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
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType, TracebackType
from typing import Any

from flatmin._proc import Interrupted
from flatmin.bench.executors import OnRecord, Progress, error_record, run_spec
from flatmin.bench.resolver import Resolver
from flatmin.bench.train import RunSpec
from flatmin.data import Dataset
from flatmin.tasks import Task

__all__ = [
    "CONNECT_TIMEOUT",
    "INSTALL",
    "RayExecutor",
    "RayUnavailableError",
    "import_ray",
    "start_reaper",
]

INSTALL = "pip install 'flatmin[ray]'"
CONNECT_TIMEOUT = 10.0  # seconds a TCP connection to the cluster's address may take
_POLL = 0.2  # seconds between looks at the progress messages


class RayUnavailableError(ValueError):
    """The Ray cluster cannot be reached, or cannot host a run (one line, names the option)."""


def import_ray() -> ModuleType:
    """The ``ray`` module.

    Raises:
        ValueError: Ray is not installed (the message gives the install command).
    """
    try:
        import ray  # optional (the ray extra)
    except ImportError:
        raise ValueError(
            f"Invalid executor: 'ray' (Ray is not installed; install it with: {INSTALL})"
        ) from None
    return ray


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


# What a gRPC server (a Ray GCS, a Ray Client server) answers to the HTTP/2 client preface:
# its own first frame, a SETTINGS frame (RFC 9113, section 3.4): 9 header bytes, type 0x4.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes((0, 0, 0, 4, 0, 0, 0, 0, 0))
_H2_SETTINGS = 4


def check_reachable(address: str, option: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse a ``host:port`` address where no gRPC server answers within ``timeout`` seconds.

    A Ray cluster's address (its GCS) and a ``ray://`` client address both serve gRPC, which
    answers the HTTP/2 client preface with a SETTINGS frame; ``ray.init`` would wait for minutes
    on an address where nothing listens or where something else does (a web server, a silent
    socket). ``"auto"`` and ``"local"`` are Ray's own lookups (they fail fast).

    Raises:
        RayUnavailableError: nothing listens there, or what listens does not speak gRPC.
    """
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailableError(f"Invalid {option}: {address!r} (expected host:port or 'auto')")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(_H2_PREFACE)
            header = conn.recv(9)
    except OSError as exc:
        raise RayUnavailableError(
            f"Invalid {option}: {address!r} (no Ray cluster answers there: {exc})"
        ) from None
    if len(header) < 4 or header[3] != _H2_SETTINGS:
        raise RayUnavailableError(
            f"Invalid {option}: {address!r} (something listens there, but not a Ray cluster: "
            f"it does not answer as a gRPC server; its first bytes: {header!r})"
        )


# The reaper: a fresh interpreter outside the driver's session that records the driver's new
# Ray descendants (GCS, raylet, agents, workers: "ray" in their command line; processes that
# existed before it started are not its business) twice a second and SIGKILLs them, with the Ray
# processes they started since, once its stdin closes (the driver exited or was killed) or the
# driver is gone. A process started between two looks whose parent died with the driver (an
# agent of a raylet) is reparented and renames itself ("ray::DashboardAgent"), so it is neither a
# descendant nor recognisable by its command line or environment; what still names it is an open
# file in the driver's Ray session directory, "session_<date>_<time>_<us>_<driver pid>".
_REAPER = r"""
import os, re, signal, sys, select, time
driver = int(sys.argv[1])
session = re.compile(rf"/session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{driver}(/|$)")
def table():
    kids, start = {}, {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                f = open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(f[1]), []).append(int(e)); start[int(e)] = int(f[19])
    return kids, start
def ours(kids, start):
    out, todo = {}, [driver]
    while todo:
        for c in kids.get(todo.pop(), []):
            out[c] = start[c]; todo.append(c)
    return out
def is_ray(pid):
    try:
        return b"ray" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
def in_session(pid):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if session.search(os.readlink(f"/proc/{pid}/fd/{fd}")):
                return True
        except OSError:
            pass
    return False
kids, start = table()
born = start[os.getpid()]
before = set(ours(kids, start).items())
print("ready", flush=True)  # the driver starts Ray only now: nothing of Ray is in `before`
seen = {}
while True:
    kids, start = table()
    for c, t in ours(kids, start).items():
        if c != os.getpid() and (c, t) not in before and c not in seen and is_ray(c):
            seen[c] = t
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready and not os.read(sys.stdin.fileno(), 1) or driver not in start:
        break
# The driver is gone. Kill what was seen, the Ray processes those started since, and every
# process born after the reaper with a file open in the driver's session directory; again until
# a look finds nothing new (a raylet may be starting a worker as it dies).
killed = set()
for _ in range(20):
    kids, start = table()
    todo = list(seen)
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in seen and is_ray(c):
                seen[c] = start[c]; todo.append(c)
    for c, t in start.items():
        if c not in seen and t >= born and c != os.getpid() and in_session(c):
            seen[c] = t
    fresh = {(c, t) for c, t in seen.items() if start.get(c) == t} - killed
    if not fresh:
        break
    for pid, t in fresh:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    killed |= fresh
    time.sleep(0.2)
"""


def start_reaper() -> subprocess.Popen[bytes] | None:
    """A process that kills this process's descendants when it dies (Linux; else ``None``).

    Close the returned process's stdin to make it reap at once (after ``ray.shutdown``: what a
    graceful shutdown left behind).
    """
    if not sys.platform.startswith("linux"):
        return None
    reaper = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    # Wait until it has taken its snapshot of what existed before: a Ray process started
    # earlier (a slow start under load) would count as not its business and outlive a kill.
    reaper.stdout.readline()  # type: ignore[union-attr]
    return reaper


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
        return run_spec(spec, _Loaded(resolver, dataset), threads)
    ray = import_ray()  # in a Ray worker

    progress.put.remote(("start", run_id))

    def notify(epoch: int, epochs: int, acc: float) -> None:
        progress.put.remote(("epoch", run_id, epoch, epochs, acc))

    record = run_spec(spec, _Loaded(resolver, dataset), threads, notify)
    # The actor runs one caller's messages in order: once this one is in, all are, so the
    # driver takes them before it sees the record (the run's bar is never skipped).
    with contextlib.suppress(ray.exceptions.RayError):  # the bars are not worth a run
        ray.get(progress.put.remote(("end", run_id)))
    return record


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


class RayExecutor:
    """One Ray task per run (see the module docstring).

    Args:
        resolver: task and dataset lookup (shipped to the tasks through the object store).
        threads: torch threads per run.
        jobs: a local instance's CPUs are ``jobs × cpus_per_run``.
        address: the cluster (default ``$RAY_ADDRESS``, else a local instance).
        cpus_per_run, gpus_per_run: what each task reserves (default ``threads`` CPUs, no GPU).
    """

    def __init__(
        self,
        resolver: Resolver,
        threads: int = 1,
        jobs: int = 1,
        address: str | None = None,
        cpus_per_run: float | None = None,
        gpus_per_run: float | None = None,
    ) -> None:
        self.resolver, self.threads, self.jobs = resolver, threads, jobs
        self.address, self.gpus = address, gpus_per_run or 0.0
        self.cpus = cpus_per_run if cpus_per_run is not None else float(threads)
        self._ray: ModuleType | None = None
        self._connected_before = False
        self._reaper: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RayExecutor:
        self._ray = import_ray()
        self._connected_before = self._ray.is_initialized()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Disconnect if this executor connected (a local instance it started shuts down)."""
        ray = self._ray
        if ray is not None and not self._connected_before and ray.is_initialized():
            with _handlers_kept():
                ray.shutdown()
        if self._reaper is not None:
            self._reaper.stdin.close()  # type: ignore[union-attr]  # reap what is left
            self._reaper.wait()
            self._reaper = None

    def _connect(self, ray: ModuleType) -> None:
        """``ray.init`` for the grid, unless the process is already connected."""
        if ray.is_initialized():
            return
        option = "--ray-address" if self.address else "RAY_ADDRESS"
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        check_reachable(address, option)
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
        if address == "local":  # this machine, sized like the local executor's pool
            kwargs.update(num_cpus=math.ceil(self.jobs * self.cpus), include_dashboard=False)
            self._reaper = self._reaper or start_reaper()
        with _handlers_kept():
            try:
                ray.init(address=address, **kwargs)
            except BaseException:
                ray.shutdown()  # a half-started local instance
                raise

    def _check_fits(self, ray: ModuleType) -> None:
        """Refuse runs that no alive node can host (Ray would wait for such a node forever)."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(r.get("CPU", 0) >= self.cpus and r.get("GPU", 0) >= self.gpus for r in nodes):
            return
        have = ", ".join(f"{r.get('CPU', 0):g} CPUs/{r.get('GPU', 0):g} GPUs" for r in nodes)
        raise RayUnavailableError(
            f"Invalid cpus/gpus per run: {self.cpus:g}/{self.gpus:g} (no node of the Ray cluster "
            f"has them: {have or 'no node'})"
        )

    def run(self, specs: Sequence[RunSpec], on_record: OnRecord, progress: Progress) -> None:
        """Train ``specs`` as Ray tasks (see the module docstring).

        Raises:
            RayUnavailableError: the cluster cannot be reached or cannot host a run.
            flatmin._proc.Interrupted: SIGINT/SIGTERM; the finished records are handed over and
                the other tasks cancelled.
        """
        ray = self._ray or import_ray()
        with _signals_seen() as seen:
            try:
                self._connect(ray)
                self._check_fits(ray)
                _Batch(ray, self, specs, on_record, progress).run()
            except KeyboardInterrupt as exc:
                if seen and not isinstance(exc, Interrupted):
                    raise Interrupted(seen[-1]) from None
                raise


class _Batch:
    """One batch of runs on Ray: submitted at once, collected as they finish."""

    def __init__(
        self,
        ray: ModuleType,
        ex: RayExecutor,
        specs: Sequence[RunSpec],
        on_record: OnRecord,
        bars: Progress,
    ) -> None:
        self.ray, self.ex, self.specs, self.on_record, self.bars = ray, ex, specs, on_record, bars
        self.pending: dict[Any, int] = {}  # object ref -> run id
        self.started: dict[int, float] = {}  # run id -> when it started (or was submitted)
        self.finished: set[int] = set()
        self.progress: Any = None

    def _submit(self) -> None:
        ray, resolver = self.ray, self.ex.resolver
        datasets: dict[str, Any] = {}  # dataset name -> object ref
        for spec in self.specs:
            task = resolver.task(spec.task)
            if task.dataset not in datasets:
                datasets[task.dataset] = ray.put(resolver.dataset(task))
        if self.bars.enabled:
            self.progress = ray.remote(num_cpus=0)(_Progress).remote()
        remote = ray.remote(_run_task).options(
            num_cpus=self.ex.cpus, num_gpus=self.ex.gpus, max_retries=0, name="flatmin-bench-run",
        )  # fmt: skip
        shared = ray.put(resolver)
        for run_id, spec in enumerate(self.specs):
            dataset = datasets[resolver.task(spec.task).dataset]
            ref = remote.remote(spec, shared, dataset, self.ex.threads, run_id, self.progress)
            self.pending[ref], self.started[run_id] = run_id, time.perf_counter()

    def _show_progress(self) -> None:
        if self.progress is None:
            return
        for kind, run_id, *rest in self.ray.get(self.progress.take.remote()):
            if run_id in self.finished:  # a message that arrived after the record
                continue
            if kind == "start":
                self.started[run_id] = time.perf_counter()
                self.bars.start(run_id, self.specs[run_id])
            elif kind == "epoch":
                self.bars.epoch(run_id, *rest)

    def _collect(self, refs: Sequence[Any]) -> None:
        for ref in refs:
            run_id = self.pending.pop(ref)
            spec = self.specs[run_id]
            try:
                record = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:  # the worker died or the task could not run
                summary = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = f"the Ray task failed ({type(exc).__name__}: {summary})"
                t0 = self.started[run_id]
                record = error_record(spec, self.ex.resolver, reason, str(exc), t0)
            self.on_record(spec, record)
            self.finished.add(run_id)
            self.bars.finish(run_id, record)

    def run(self) -> None:
        ray = self.ray
        try:
            self._submit()
            while self.pending:
                ray.wait(list(self.pending), num_returns=1, timeout=_POLL)
                ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
                self._show_progress()  # after the wait: every message of a ready task is in
                self._collect(ready)
        except BaseException:
            with contextlib.suppress(Exception):  # keep what finished before the interruption
                ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
                self._collect(ready)
            for ref in self.pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        finally:
            if self.progress is not None:
                with contextlib.suppress(Exception):
                    ray.kill(self.progress)
