"""Typed run records: what one line of ``results.jsonl`` holds, parsed and checked once.

Three kinds, by the line's ``status`` and ``stage``:

* :class:`EvalRecord` — a finished evaluation run (``stage`` ``"eval"``; the budget ablation's runs
  too): ``ok``, or ``failed`` (a non-finite loss: deterministic, not retried).
* :class:`TuneRecord` — a finished tuning run (``stage == "tune"``): it evaluates the validation
  split only, so only its validation accuracies must be numbers.
* :class:`ErrorRecord` — a run that raised or whose worker died (``status == "error"``): retried
  by the next invocation.

:func:`parse_record` is the only validation of a record: a line that is not a well-formed record
raises :class:`InvalidRecordError` naming the first problem. Each record keeps the JSON object it
was read from (:meth:`~RunRecord.to_dict`), so the file format is unchanged by reading and
writing. :class:`MethodResult` is a method's result read from its trajectory's record (a view
such as SWA reads an average of the baseline's run), the unit of the report's tables;
:func:`pool_folds` pools the results of a cross-validated task's outer folds into one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Union

__all__ = [
    "STATUSES",
    "ErrorRecord",
    "EvalRecord",
    "InvalidRecordError",
    "MethodResult",
    "Metrics",
    "Record",
    "RunRecord",
    "TuneRecord",
    "parse_record",
    "pool_folds",
]

STATUSES = ("ok", "failed", "error")
_FINAL = ("test_acc", "val_acc", "train_acc")  # what an ok evaluation record must have
_TUNE_FINAL = ("val_acc",)  # a tuning run is chosen on its validation accuracy alone
_RECIPE = ("lr", "weight_decay", "batch_size", "epochs")


class InvalidRecordError(ValueError):
    """A JSON value that is not a well-formed run record (the message names the problem)."""


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v: object) -> float | None:
    return float(v) if _is_number(v) else None  # type: ignore[arg-type]


@dataclass(frozen=True)
class Metrics:
    """Accuracies (fractions) and losses of one set of weights; ``None``: not measured.

    ``live_test_acc`` is the test accuracy of the trajectory's own (not averaged) weights.
    """

    test_acc: float | None = None
    val_acc: float | None = None
    train_acc: float | None = None
    test_loss: float | None = None
    val_loss: float | None = None
    train_loss: float | None = None
    train_acc_clean: float | None = None
    noise_memorised: float | None = None
    live_test_acc: float | None = None

    @classmethod
    def parse(cls, obj: object, where: str, required: tuple[str, ...]) -> Metrics:
        """The metrics of the JSON object ``obj``; ``required`` keys must be numbers."""
        if not isinstance(obj, Mapping):
            raise InvalidRecordError(f"{where!r} is {obj!r} (expected an object)")
        for key in required:
            if not _is_number(obj.get(key)):
                raise InvalidRecordError(
                    f"'{where}.{key}' is {obj.get(key)!r} (expected a number)"
                )
        return cls(**{f.name: _number(obj.get(f.name)) for f in fields(cls)})


def _text(rec: Mapping[str, Any], key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRecordError(f"{key!r} is {value!r} (expected a non-empty string)")
    return value


def _int(rec: Mapping[str, Any], key: str) -> int:
    value = rec.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRecordError(f"{key!r} is {value!r} (expected an int)")
    return value


def _object(rec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = rec.get(key, {})
    if not isinstance(value, Mapping):
        raise InvalidRecordError(f"{key!r} is {value!r} (expected an object)")
    return dict(value)


@dataclass(frozen=True)
class _Base:
    """What every record has: its configuration hash and identity, and the JSON it came from."""

    hash: str
    status: str
    task: str | None
    method: str | None
    seed: int | None
    stage: str
    hyper: Mapping[str, Any]
    reason: str | None
    data: Mapping[str, Any] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON object, exactly as read (or as :func:`train` returned it)."""
        return dict(self.data)

    @property
    def ok(self) -> bool:
        """The run finished with finite losses."""
        return self.status == "ok"

    @property
    def finished(self) -> bool:
        """An ``ok`` or ``failed`` run: not retrained by a later invocation."""
        return self.status != "error"


@dataclass(frozen=True)
class ErrorRecord(_Base):
    """A run that raised, or whose worker died: the next invocation trains it again."""

    traceback: str = ""
    wall_time: float | None = None


@dataclass(frozen=True)
class RunRecord(_Base):
    """A finished run (``ok`` or ``failed``); base of :class:`EvalRecord` and :class:`TuneRecord`.

    Attributes:
        final: the reported weights' metrics (empty for a ``failed`` run).
        averages: the metrics of each kept average, by start key (``"0.75"``).
        curves: per-epoch curves by name (``epoch``, ``lr``, ``train_loss``...).
        wall_time: seconds.
        budget, domain, model: the run's budget and its task's domain and model.
        recipe: the training recipe (optimizer, lr, batch size, epochs...).
        sizes: samples per split (``folds`` for cross-validated tasks).
        epochs, epochs_planned: epochs trained, and those of the recipe.
    """

    final: Metrics = Metrics()
    averages: Mapping[str, Metrics] = field(default_factory=dict)
    curves: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    wall_time: float = 0.0
    budget: str | None = None
    domain: str = "?"
    model: str = "?"
    recipe: Mapping[str, Any] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=dict)
    epochs: int | None = None
    epochs_planned: int | None = None


@dataclass(frozen=True)
class EvalRecord(RunRecord):
    """A finished evaluation (or budget-ablation) run."""


@dataclass(frozen=True)
class TuneRecord(RunRecord):
    """A finished tuning run (validation split only)."""


#: Any record of ``results.jsonl``: an evaluation run, a tuning run or an error.
Record = Union[EvalRecord, TuneRecord, ErrorRecord]  # noqa: UP007 - a runtime alias (3.10)


def _curves(rec: Mapping[str, Any], ok: bool) -> Mapping[str, tuple[float, ...]]:
    curves = rec.get("curves")
    good = isinstance(curves, Mapping) and all(
        isinstance(c, list) and all(_is_number(v) for v in c) for c in curves.values()
    )
    if not good or not isinstance(curves, Mapping):
        if ok:
            raise InvalidRecordError("'curves' is not an object of number lists")
        return {}
    return {k: tuple(float(v) for v in c) for k, c in curves.items()}


def _run_fields(rec: Mapping[str, Any], tune: bool) -> dict[str, Any]:
    """The fields of a finished run; an ``ok`` run must have what the report computes with."""
    ok = rec["status"] == "ok"
    out: dict[str, Any] = {}
    if ok:
        out["final"] = Metrics.parse(rec.get("final"), "final", _TUNE_FINAL if tune else _FINAL)
        averages = _object(rec, "averages")
        out["averages"] = {
            start: Metrics.parse(part, f"averages.{start}", _TUNE_FINAL if tune else _FINAL)
            for start, part in averages.items()
        }
        recipe = _object(rec, "recipe") if "recipe" in rec else None
        if recipe is None:
            raise InvalidRecordError("'recipe' is None (expected an object)")
        for key in _RECIPE:
            if not _is_number(recipe.get(key)):
                raise InvalidRecordError(
                    f"'recipe.{key}' is {recipe.get(key)!r} (expected a number)"
                )
        if not _is_number(rec.get("wall_time")):
            raise InvalidRecordError(f"'wall_time' is {rec.get('wall_time')!r} (expected a number)")
        out["recipe"] = recipe
    out["curves"] = _curves(rec, ok)
    out["wall_time"] = _number(rec.get("wall_time")) or 0.0
    for key in ("budget", "domain", "model"):
        if isinstance(rec.get(key), str):
            out[key] = rec[key]
    sizes = rec.get("sizes")
    if isinstance(sizes, Mapping):
        out["sizes"] = {k: v for k, v in sizes.items() if isinstance(v, int)}
    for key in ("epochs", "epochs_planned"):
        if isinstance(rec.get(key), int):
            out[key] = rec[key]
    return out


def parse_record(obj: object) -> Record:
    """The typed record of one JSON value of ``results.jsonl``.

    Every record needs a non-empty string ``hash``, a ``status`` in :data:`STATUSES` and
    ``hyper`` (if present) an object. A finished run also needs string ``task`` and ``method``
    and an int ``seed``; an ``ok`` one what the runner and the report compute with: the
    ``final`` accuracies (a tuning run: its validation accuracy), the same for each entry of
    ``averages``, the ``recipe``'s numbers, ``curves`` as lists of numbers and a numeric
    ``wall_time``.

    Raises:
        InvalidRecordError: the first problem found (a ``ValueError``).
    """
    if not isinstance(obj, Mapping):
        raise InvalidRecordError(f"not an object but {type(obj).__name__}")
    rec: Mapping[str, Any] = obj
    hash_ = _text(rec, "hash")
    if rec.get("status") not in STATUSES:
        raise InvalidRecordError(f"'status' is {rec.get('status')!r} (expected one of {STATUSES})")
    stage = rec.get("stage") if isinstance(rec.get("stage"), str) else "eval"
    reason = rec.get("reason") if isinstance(rec.get("reason"), str) else None
    common: dict[str, Any] = {
        "hash": hash_, "status": rec["status"], "stage": stage, "reason": reason,
        "hyper": _object(rec, "hyper"), "data": dict(rec),
    }  # fmt: skip
    if rec["status"] == "error":
        seed = rec.get("seed")
        return ErrorRecord(
            task=rec.get("task") if isinstance(rec.get("task"), str) else None,
            method=rec.get("method") if isinstance(rec.get("method"), str) else None,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            traceback=str(rec.get("traceback") or ""),
            wall_time=_number(rec.get("wall_time")),
            **common,
        )  # fmt: skip
    identity: dict[str, Any] = {
        "task": _text(rec, "task"), "method": _text(rec, "method"), "seed": _int(rec, "seed"),
    }  # fmt: skip
    kind = TuneRecord if stage == "tune" else EvalRecord
    return kind(**identity, **common, **_run_fields(rec, stage == "tune"))


@dataclass(frozen=True)
class MethodResult:
    """One method's result on one task and seed, read from its trajectory's run.

    For a trajectory (baseline, sam...) the run itself; for a view (swa, wasam) ``final`` is the
    average from its ``start`` (with ``live_test_acc`` the trajectory's own test accuracy) and
    ``trajectory`` names the run it was read from. ``budget_factor`` is set for the budget
    ablation's results.
    """

    task: str
    method: str
    seed: int
    status: str
    trajectory: str | None
    hyper: Mapping[str, float]
    final: Metrics
    record: Record
    reason: str | None = None
    averaging_start_epoch: int | None = None
    budget_factor: float | None = None

    @property
    def ok(self) -> bool:
        """The run finished with finite losses."""
        return self.status == "ok"

    @property
    def wall_time(self) -> float:
        """Seconds of the trajectory's run."""
        return self.record.wall_time or 0.0

    @property
    def run(self) -> RunRecord | None:
        """The finished trajectory run (``None``: an error record)."""
        return self.record if isinstance(self.record, RunRecord) else None

    @classmethod
    def parse(
        cls, view: Mapping[str, Any], record: Record, budget_factor: float | None = None
    ) -> MethodResult:
        """From :func:`flatmin.bench.plan.method_result`'s object for ``record``."""
        final = view.get("final")
        seed = record.seed if record.seed is not None else -1
        start = view.get("averaging_start_epoch")
        return cls(
            task=record.task or "?", method=str(view["method"]), seed=seed,
            status=str(view.get("status")), trajectory=record.method,
            hyper=dict(view.get("hyper") or {}),
            final=Metrics.parse(final, "final", ()) if isinstance(final, Mapping) else Metrics(),
            record=record,
            reason=view.get("reason") if isinstance(view.get("reason"), str) else None,
            averaging_start_epoch=start if isinstance(start, int) else None,
            budget_factor=budget_factor,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The result as the JSON object of the record it was read from (figures, CSV)."""
        out = {k: v for k, v in self.record.to_dict().items() if k != "averages"}
        out.update(method=self.method, trajectory=self.trajectory, hyper=dict(self.hyper))
        out.update(status=self.status, reason=self.reason)
        if self.final != Metrics() or "final" in out:
            out["final"] = {k: v for k, v in self.final.__dict__.items() if v is not None}
        if self.averaging_start_epoch is not None:
            out["averaging_start_epoch"] = self.averaging_start_epoch
        if self.budget_factor is not None:
            out["budget_factor"] = self.budget_factor
        return out


# The split whose size weighs each metric when folds are pooled.
_POOL_SPLIT = {
    "test_acc": "test", "test_loss": "test", "live_test_acc": "test", "val_acc": "val",
    "val_loss": "val", "train_acc": "train", "train_loss": "train", "train_acc_clean": "train",
    "noise_memorised": "train",
}  # fmt: skip


def _pooled_metrics(parts: Sequence[MethodResult]) -> Metrics:
    """The folds' metrics pooled: an accuracy is Σ correct / Σ samples, a loss the weighted mean.

    ``noise_memorised`` (its denominator, a fold's flipped labels, is not recorded) is the mean
    weighted by the training sizes: stratified folds flip the same share of each.
    """
    out: dict[str, float | None] = {}
    for name, split in _POOL_SPLIT.items():
        values = [getattr(p.final, name) for p in parts]
        sizes = [p.run.sizes.get(split, 0) if p.run is not None else 0 for p in parts]
        if any(v is None for v in values) or not all(sizes):
            out[name] = None
        elif name.endswith(("_acc", "_acc_clean")):  # counts are integers: no rounding drift
            out[name] = sum(round(v * n) for v, n in zip(values, sizes, strict=True)) / sum(sizes)
        else:
            out[name] = sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)
    return Metrics(**out)


def _common(values: Sequence[Any]) -> Any:
    """The value every fold has, else ``None``."""
    return values[0] if all(v == values[0] for v in values) else None


def _pooled_record(task: str, parts: Sequence[MethodResult], status: str, reason: str | None,
                   final: Metrics) -> Record:  # fmt: skip
    """A record of the pooled folds, shaped as a cross-validated run's (sizes summed)."""
    runs = [p.run for p in parts if p.run is not None]
    first = {k: v for k, v in parts[0].record.to_dict().items() if k != "averages"}
    data: dict[str, Any] = {
        **first, "task": task, "hash": "+".join(p.record.hash for p in parts),
        "status": status, "reason": reason, "folds": len(parts),
        "hyper": {k: v for k, v in first.get("hyper", {}).items()
                  if _common([p.record.hyper.get(k) for p in parts]) is not None},
        "wall_time": sum(p.wall_time for p in parts),
    }  # fmt: skip
    if len(runs) == len(parts):
        sizes = {s: sum(r.sizes.get(s, 0) for r in runs) for s in ("train", "val", "test")}
        data["sizes"] = {**sizes, "folds": len(parts)}
    if status == "ok":
        data["final"] = {k: v for k, v in final.__dict__.items() if v is not None}
        curves = [r.curves for r in runs]
        data["curves"] = {
            k: [sum(col) / len(col) for col in zip(*(c[k] for c in curves))]
            for k in curves[0] if all(k in c for c in curves)
        }  # fmt: skip
    else:
        data.pop("final", None)
    return parse_record(data)


def pool_folds(task: str, parts: Sequence[MethodResult]) -> MethodResult:
    """One result of a cross-validated ``task`` from its outer folds' results, fold 0 first.

    The parts are one method's results at one seed on the fold tasks (:meth:`Task.fold
    <flatmin.tasks.Task.fold>`), each tuned on its own inner validation split. Accuracies are
    pooled over the folds' samples (Σ correct / Σ total: every sample tested once), wall times
    summed, curves averaged; ``hyper`` keeps the values all folds chose. A fold that is not
    ``ok`` makes the pooled result not ``ok`` (its status, the reason naming the fold).
    """
    if not parts:
        raise ValueError(f"Invalid folds of {task!r}: none (expected one result per fold)")
    # An error (retried by the next invocation) outranks a failed fold (a deterministic result).
    bad = [i for i, p in enumerate(parts) if not p.ok]
    bad.sort(key=lambda i: parts[i].status != "error")
    status, reason, final = "ok", None, Metrics()
    if bad:
        part = parts[bad[0]]
        status, reason = part.status, f"fold {bad[0]} ({part.record.hash}): {part.reason}"
    else:
        final = _pooled_metrics(parts)
    first = parts[0]
    hyper = {
        k: v for k, v in first.hyper.items() if _common([p.hyper.get(k) for p in parts]) is not None
    }
    return MethodResult(
        task=task, method=first.method, seed=first.seed, status=status,
        trajectory=first.trajectory, hyper=hyper, final=final,
        record=_pooled_record(task, parts, status, reason, final), reason=reason,
        averaging_start_epoch=_common([p.averaging_start_epoch for p in parts]),
        budget_factor=first.budget_factor,
    )  # fmt: skip
