"""The training loop's resume state: frozen records, checked when they come from a file.

After every epoch :func:`flatmin.bench.train.train` hands ``on_state`` a :class:`TrainState`;
``flatmin train`` saves :meth:`TrainState.as_dict` (plain values and tensors, loadable with
``weights_only=True``) and :meth:`TrainState.from_dict` rebuilds it, refusing a state with a
missing or ill-typed part with one :class:`ValueError` that says what is wrong (instead of a
``KeyError`` deep inside the loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

__all__ = ["STATE_FORMAT", "FitState", "TrainState"]

STATE_FORMAT = "flatmin-train-state/1"


def _check(
    plain: Any, where: str, types: Mapping[str, type | tuple[type, ...]]
) -> dict[str, Any]:
    """``plain`` as a dict with every key of ``types`` of its type; ``ValueError`` otherwise."""
    if not isinstance(plain, Mapping):
        raise ValueError(f"{where} is a {type(plain).__name__}, expected a dict")
    missing = [k for k in types if k not in plain]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    wrong = [
        f"{k} ({type(plain[k]).__name__})"
        for k, t in types.items()
        if not isinstance(plain[k], t) or (t is int and isinstance(plain[k], bool))
    ]
    if wrong:
        raise ValueError(f"{where} has values of the wrong type: {', '.join(wrong)}")
    return dict(plain)


@dataclass(frozen=True)
class FitState:
    """One model's training state after an epoch (one fold of a cross-validated run).

    Attributes:
        epoch, step: the last finished epoch and the optimizer steps so far.
        curves: per-epoch curves so far.
        model, optimizer, scheduler: their ``state_dict()`` (the optimizer's with its base's).
        averagers: each average's ``state_dict()`` by start key (``"0.75"``).
        generator: the batch-order generator's state (``None``: no generator).
        scaler: the fp16 loss scaler's state (``None``: no scaler).
        rng: the global CPU RNG state (dropout masks).
    """

    epoch: int
    step: int
    curves: dict[str, list[float]]
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    averagers: dict[str, dict[str, Any]]
    generator: torch.Tensor | None
    scaler: dict[str, Any] | None
    rng: torch.Tensor

    _TYPES: ClassVar[Mapping[str, type | tuple[type, ...]]] = {
        "epoch": int, "step": int, "curves": dict, "model": dict, "optimizer": dict,
        "scheduler": dict, "averagers": dict, "generator": (torch.Tensor, type(None)),
        "scaler": (dict, type(None)), "rng": torch.Tensor,
    }  # fmt: skip

    @classmethod
    def from_dict(cls, plain: Any) -> FitState:
        """The state from its :meth:`as_dict` form (``ValueError`` naming what is wrong)."""
        return cls(**_check(plain, "its 'fit'", cls._TYPES))

    def as_dict(self) -> dict[str, Any]:
        """Plain values and tensors (what ``torch.save`` writes)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TrainState:
    """A run's complete training state after an epoch (what ``train(resume=)`` continues).

    Attributes:
        hash: the run's configuration hash (a state resumes only its own run).
        world_size: the number of processes that trained it.
        fold: the fold in progress (0 for a task with fixed splits).
        done: the finished folds' summaries (their counts and curves).
        fit: the fold in progress.
        elapsed: training seconds so far.
        format: :data:`STATE_FORMAT`.
    """

    hash: str
    world_size: int
    fold: int
    done: tuple[dict[str, Any], ...]
    fit: FitState
    elapsed: float
    format: str = STATE_FORMAT

    _TYPES: ClassVar[Mapping[str, type | tuple[type, ...]]] = {
        "format": str, "hash": str, "world_size": int, "fold": int, "done": (list, tuple),
        "fit": dict, "elapsed": (float, int),
    }  # fmt: skip

    @classmethod
    def from_dict(cls, plain: Any) -> TrainState:
        """The state from its :meth:`as_dict` form.

        Raises:
            ValueError: not a state of this format, a missing key, a value of the wrong type
                (the message names them).
        """
        top = _check(plain, "the state", cls._TYPES)
        if top["format"] != STATE_FORMAT:
            raise ValueError(f"the state has format {top['format']!r}, expected {STATE_FORMAT!r}")
        if not top["fold"] >= 0 or len(top["done"]) != top["fold"]:
            raise ValueError(
                f"the state is in fold {top['fold']} with {len(top['done'])} finished folds"
            )
        for i, done in enumerate(top["done"]):
            _check(done, f"finished fold {i}", {"status": str, "steps": int, "curves": dict,
                                                "final": dict, "averages": dict})  # fmt: skip
        fit = FitState.from_dict(top["fit"])
        return cls(top["hash"], top["world_size"], top["fold"], tuple(top["done"]), fit,
                   float(top["elapsed"]), top["format"])  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """Plain values and tensors (what ``flatmin train`` saves)."""
        return {
            "format": self.format, "hash": self.hash, "world_size": self.world_size,
            "fold": self.fold, "done": list(self.done), "fit": self.fit.as_dict(),
            "elapsed": self.elapsed,
        }  # fmt: skip
