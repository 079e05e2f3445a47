"""Live training curves: TensorBoard event files or an MLflow tracking store.

A logger is an ``on_epoch`` callback of :func:`flatmin.bench.train.train`: nothing in the loop
changes, and without a logger nothing is written. Each training run is one logger run; its
hyper-parameters are TensorBoard hparams / MLflow params, and per epoch it logs

* ``train/loss``, ``train/acc``: the epoch's mean training loss (at ``w``: SAM's first pass) and
  accuracy;
* ``val/loss``, ``val/acc``: validation loss and accuracy (when the loop validates);
* ``lr``: the learning rate of the first param group at the epoch's end;
* ``rho``: ``metrics["rho"]`` when the loop reports it, else the run's ``hyper.rho``;
* ``time/wall_s``: seconds since the run started (``metrics["wall_time"]`` when given);

and at the end ``final/<name>`` for each final metric of the record (test accuracy, ...). The
step is the epoch; the folds of a cross-validated task follow each other (fold ``k``, epoch
``e`` is step ``k · epochs + e``).

Live, in one process (``flatmin train``)::

    logger = open_logger("tensorboard", "runs/tb")
    config = spec.config()
    with logger.run(run_name(config), run_params(config)) as on_epoch:
        result = train(spec, on_epoch=on_epoch)
        logger.finish(result.record)

After the fact, one run per record (``flatmin bench``: records arrive from any executor)::

    for record in read_records("runs/quick/results.jsonl"):
        logger.log_record(record)

Needs the ``tensorboard`` extra (``pip install 'flatmin[tensorboard]'``) or the ``mlflow`` extra;
importing this module imports neither.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "LOGGERS",
    "TAGS",
    "MLflowLogger",
    "ParamValue",
    "RunLogger",
    "TensorBoardLogger",
    "chain",
    "open_logger",
    "run_name",
    "run_params",
]

#: Per-epoch metric names of the training loop and the tag each is logged under.
TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "lr": "lr",
    "rho": "rho",
    "wall_time": "time/wall_s",
}
# The record keys that describe a run (its parameters), as in RunSpec.config.
_CONFIG_KEYS = ("task", "method", "seed", "budget", "stage", "hyper", "recipe", "folds")

#: A parameter value as both backends store it.
ParamValue = str | int | float | bool
EpochCallback = Callable[[int, int, dict[str, float]], None]


def _tag(name: str) -> str:
    return TAGS.get(name, name)


def run_params(config: Mapping[str, Any]) -> dict[str, ParamValue]:
    """A run's parameters as flat ``name: value`` pairs (nested keys joined with ``.``).

    Args:
        config: ``RunSpec.config()``, a record, or any mapping; lists and ``None`` become
            strings (neither backend stores them as values).

    Returns:
        ``{"task": "digits", "hyper.rho": 0.05, "recipe.lr": 0.05, ...}`` in sorted order.

    Example:
        >>> run_params({"seed": 0, "hyper": {"rho": 0.05}, "folds": None})
        {'folds': 'None', 'hyper.rho': 0.05, 'seed': 0}
    """
    out: dict[str, ParamValue] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", config)
    return dict(sorted(out.items()))


def run_name(config: Mapping[str, Any]) -> str:
    """``task-method-s<seed>`` plus the run's hash when known: a file-name-safe run name.

    Example:
        >>> run_name({"task": "digits", "method": "sam", "seed": 1, "hash": "0123456789abcdef"})
        'digits-sam-s1-01234567'
    """
    name = f"{config['task']}-{config['method']}-s{config['seed']}"
    if config.get("hash"):
        name += f"-{str(config['hash'])[:8]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def chain(*callbacks: EpochCallback | None) -> EpochCallback:
    """One ``on_epoch`` callback that calls each given one in order (``None`` skipped).

    Example:
        >>> seen = []
        >>> on_epoch = chain(lambda e, n, m: seen.append(e), None, lambda e, n, m: seen.append(n))
        >>> on_epoch(1, 3, {})
        >>> seen
        [1, 3]
    """
    active = [c for c in callbacks if c is not None]

    def on_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        for callback in active:
            callback(epoch, epochs, metrics)

    return on_epoch


class RunLogger(ABC):
    """A sink for training curves: one run at a time, per-epoch scalars, final metrics.

    Subclasses implement :meth:`_open`, :meth:`_scalars` and :meth:`_close`; this class keeps
    the run's state (step across folds, wall clock, ``rho``) and checks the protocol.
    """

    def __init__(self) -> None:
        self._active = False
        self._params: dict[str, ParamValue] = {}
        self._offset = self._last_epoch = self._last_epochs = self._step = 0
        self._t0 = 0.0

    # -- the protocol ------------------------------------------------------------------------
    def start_run(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """Open a run called ``name`` with its hyper-parameters (see :func:`run_params`).

        Raises:
            RuntimeError: a run is already open (end it first).
            ValueError: an empty name.
        """
        if self._active:
            raise RuntimeError("A logger run is already open: call end_run() before start_run()")
        if not name:
            raise ValueError(f"Invalid run name: {name!r} (expected a non-empty string)")
        self._params = run_params(params or {})
        self._offset = self._last_epoch = self._last_epochs = self._step = 0
        self._t0 = time.perf_counter()
        self._open(name, self._params)
        self._active = True

    def log_epoch(self, epoch: int, epochs: int, metrics: Mapping[str, float]) -> None:
        """Log one epoch's metrics (the ``on_epoch`` signature of the training loop).

        Raises:
            RuntimeError: no run is open.
        """
        self._require_run("log_epoch")
        if epoch <= self._last_epoch:  # the next fold of a cross-validated task
            self._offset += self._last_epochs
        self._last_epoch, self._last_epochs = epoch, epochs
        self._step = self._offset + epoch
        values: dict[str, Any] = {k: v for k, v in metrics.items() if k != "epoch"}
        if "rho" not in values and _finite(self._params.get("hyper.rho")):
            values["rho"] = self._params["hyper.rho"]
        values.setdefault("wall_time", time.perf_counter() - self._t0)
        # Non-finite values (a NaN loss, an unknown wall time) are not logged.
        self._scalars(self._step, {_tag(k): float(v) for k, v in values.items() if _finite(v)})

    __call__ = log_epoch

    def end_run(self, status: str = "ok", final: Mapping[str, Any] | None = None) -> None:
        """Close the run: its final metrics (``final/<name>``, non-finite values skipped).

        Args:
            status: ``"ok"``, ``"failed"`` or ``"killed"``.
            final: final metrics, e.g. ``record["final"]``.

        Raises:
            RuntimeError: no run is open.
            ValueError: an unknown status.
        """
        self._require_run("end_run")
        if status not in ("ok", "failed", "killed"):
            raise ValueError(f"Invalid status: {status!r} (expected 'ok', 'failed' or 'killed')")
        values = {f"final/{k}": float(v) for k, v in (final or {}).items() if _finite(v)}
        self._active = False
        self._close(status, values, self._step)

    # -- conveniences ------------------------------------------------------------------------
    @contextmanager
    def run(self, name: str, params: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
        """``with logger.run(name, params) as on_epoch:`` — a run that ends even on an error.

        An exception ends the run as ``"killed"`` (``KeyboardInterrupt``) or ``"failed"`` and
        propagates; :meth:`finish` inside the block ends it with the record's status.
        """
        self.start_run(name, params)
        try:
            yield self
        except BaseException as exc:
            if self._active:
                self.end_run("killed" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
        if self._active:
            self.end_run()

    def finish(self, record: Mapping[str, Any]) -> None:
        """End the open run with a training record's status, final metrics and wall time."""
        final = {**(record.get("final") or {}), "wall_time": record.get("wall_time")}
        self.end_run("ok" if record.get("status") == "ok" else "failed", final)

    def log_record(self, record: Mapping[str, Any]) -> None:
        """Log a finished run from its record: parameters, per-epoch curves, final metrics.

        The benchmark's records carry their curves (``record["curves"]``), so a grid run by any
        executor is logged by the process that reads the records; per-epoch wall time is not in
        a record (the final ``final/wall_time`` is).
        """
        config = {k: record[k] for k in _CONFIG_KEYS if k in record}
        self.start_run(run_name(record), config)
        curves = record.get("curves") or {}
        epochs = [int(e) for e in curves.get("epoch", [])]
        for i, epoch in enumerate(epochs):
            metrics = {k: v[i] for k, v in curves.items() if k != "epoch" and i < len(v)}
            metrics.setdefault("wall_time", math.nan)  # unknown per epoch: not logged
            self.log_epoch(epoch, len(epochs), metrics)
        self.finish(record)

    def close(self) -> None:
        """Release the backend (a run still open ends as ``"killed"``)."""
        if self._active:
            self.end_run("killed")

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_run(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(f"{what}() without an open run: call start_run() first")

    # -- the backend ---------------------------------------------------------------------------
    @abstractmethod
    def _open(self, name: str, params: dict[str, ParamValue]) -> None: ...

    @abstractmethod
    def _scalars(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def _close(self, status: str, final: dict[str, float], step: int) -> None: ...


def _missing_extra(extra: str, exc: ImportError) -> ImportError:
    return ImportError(
        f"{extra} logging needs the {extra!r} extra: pip install 'flatmin[{extra}]' ({exc})"
    )


class TensorBoardLogger(RunLogger):
    """TensorBoard event files: one sub-directory of ``log_dir`` per run.

    Scalars through ``torch.utils.tensorboard.SummaryWriter`` (stored as float32), the run's
    parameters and final metrics as hparams (the HPARAMS tab compares runs). View with
    ``tensorboard --logdir LOG_DIR``.

    Args:
        log_dir: directory of the runs (created on the first run).

    Raises:
        ImportError: the ``tensorboard`` package is missing.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing_extra("tensorboard", exc) from exc
        super().__init__()
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def _open(self, name: str, params: dict[str, ParamValue]) -> None:
        self._writer = self._writer_class(log_dir=str(self.log_dir / name))

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def _close(self, status: str, final: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._scalars(step, final)
        # Into the run's own directory (SummaryWriter.add_hparams would open another one).
        hparam_values = {**self._params, "status": status}
        writer = self._writer.file_writer
        for summary in hparams(hparam_values, final):
            writer.add_summary(summary)
        self._writer.close()
        self._writer = None


class MLflowLogger(RunLogger):
    """An MLflow tracking store: one MLflow run per training run, in one experiment.

    Args:
        tracking_uri: an MLflow tracking URI (``sqlite:///runs/mlflow.db``, ``http://host:5000``)
            or a directory, which becomes the local store ``sqlite:///DIR/mlflow.db`` (MLflow 3
            refuses its old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``). View with
            ``mlflow ui --backend-store-uri URI``.
        experiment: the experiment's name (created when missing).

    Raises:
        ImportError: the ``mlflow`` package is missing.
    """

    def __init__(self, tracking_uri: str | Path, experiment: str = "flatmin") -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing_extra("mlflow", exc) from exc
        super().__init__()
        uri, artifacts = str(tracking_uri), None
        if "://" not in uri:
            directory = Path(uri).resolve()
            directory.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{directory / 'mlflow.db'}", (directory / "artifacts")
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                experiment, artifact_location=None if artifacts is None else artifacts.as_uri()
            )
        )
        self.run_id: str | None = None

    def _open(self, name: str, params: dict[str, ParamValue]) -> None:
        from mlflow.entities import Param as MLflowParam

        self.run_id = self.client.create_run(self.experiment_id, run_name=name).info.run_id
        entries = [MLflowParam(k, str(v)) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=entries)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None  # _open ran (RunLogger checks the protocol)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def _close(self, status: str, final: dict[str, float], step: int) -> None:
        assert self.run_id is not None
        self._scalars(step, final)
        mlflow_status = {"ok": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[status]
        self.client.set_terminated(self.run_id, mlflow_status)
        self.run_id = None


#: Logger kinds by name, as ``--log KIND TARGET`` names them.
LOGGERS: dict[str, Callable[[str | Path], RunLogger]] = {
    "tensorboard": TensorBoardLogger,
    "mlflow": MLflowLogger,
}


def open_logger(kind: str, target: str | Path) -> RunLogger:
    """The logger ``kind`` (``"tensorboard"`` or ``"mlflow"``) writing to ``target``.

    Raises:
        ValueError: an unknown kind.
        ImportError: the kind's extra is not installed.
    """
    if kind not in LOGGERS:
        raise ValueError(f"Unknown logger: {kind!r} (known: {', '.join(LOGGERS)})")
    return LOGGERS[kind](target)
