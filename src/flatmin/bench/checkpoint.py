"""Checkpoints of benchmark runs (``flatmin train``) and their reloading for analysis.

A checkpoint is a plain ``dict`` saved with :func:`torch.save` (loadable with
``weights_only=True``, so loading never runs code from the file): the run's configuration and
record, the final live weights, and for the averaging methods the averaged weights with their
recomputed BatchNorm statistics.

Integrity (format ``flatmin-checkpoint/2``): the dict carries ``sha256``, the digest of its whole
content (every other key, tensors by dtype, shape and bytes; see :func:`payload_digest`), checked
on load, so one flipped bit in the file is an error instead of silently different weights. The
file is written atomically (temporary file, ``fsync``, rename), so a run that dies while saving
(disk full, a signal) leaves the previous checkpoint intact. Version-1 files (no digest) still
load, with a warning.

Training states (``flatmin train --resume``): after every epoch ``flatmin train`` replaces
``OUT/train_state.pt`` with the complete state of the run (:func:`flatmin.bench.train.train`'s
``on_state``; format ``flatmin-train-state/1``), written and checked the same way; a resumed run
ends with the same weights, bit for bit, as an uninterrupted one, and the file is removed once the
run's checkpoint and metrics are written.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatmin._io import atomic_write_bytes
from flatmin.bench.methods import Hyper
from flatmin.bench.train import RunSpec, TrainResult
from flatmin.bench.train_state import STATE_FORMAT, TrainState
from flatmin.tasks import Task, TaskData, get_task

__all__ = [
    "FORMAT",
    "STATE_FILE",
    "CheckpointError",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_training_state",
    "payload_digest",
    "save_checkpoint",
    "save_training_state",
]

FORMAT = "flatmin-checkpoint/2"
STATE_FILE = "train_state.pt"
_FORMAT_V1 = "flatmin-checkpoint/1"
WEIGHTS = ("auto", "final", "averaged")
# Key → expected type(s) of a loadable payload ("averaged" may also be None).
_KEYS: dict[str, type | tuple[type, ...]] = {
    "task": str, "method": str, "seed": int, "budget": str, "hyper": dict, "epochs": int,
    "record": dict, "final": dict, "averaged": (dict, type(None)),
}  # fmt: skip


class CheckpointError(ValueError):
    """A file that is not a valid, intact flatmin checkpoint (the message names the file)."""


def _digest(obj: Any, h: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _digest(v, h)
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(f"S{len(data)};".encode() + data)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())  # repr round-trips floats exactly
    else:
        raise TypeError(f"Invalid checkpoint value of type {type(obj).__name__}: {obj!r}")


def payload_digest(payload: dict[str, Any]) -> str:
    """Hex sha256 of a checkpoint's content: every key but ``"sha256"``, in order."""
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "sha256"}, h)
    return h.hexdigest()


def full_state_dicts(result: TrainResult) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The final and averaged weights of ``result`` as full, plain state dicts.

    For an FSDP2-sharded model this gathers the shards — a collective: every rank must call it
    (then rank 0 alone writes); for a plain model it is ``state_dict()``.
    """
    from flatmin.optim._vec import is_sharded

    avg = result.averager
    # full=True gathers sharded averages and leaves plain tensors as they are.
    averaged = None
    if avg is not None and avg.n_averaged > 0:
        averaged = avg.averaged_state_dict(full=True)
    if not is_sharded(list(result.model.parameters())):
        return result.model.state_dict(), averaged
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(result.model, options=options), averaged


def save_checkpoint(
    path: str | os.PathLike[str],
    result: TrainResult,
    states: tuple[dict[str, Any], dict[str, Any] | None] | None = None,
) -> None:
    """Save a run's final and averaged weights with its record, atomically, with its digest.

    Args:
        path: the file.
        result: the run.
        states: ``(final, averaged)`` full state dicts already gathered with
            :func:`full_state_dicts` (FSDP2: on every rank, before rank 0 saves); default:
            taken from ``result``.

    Raises:
        OSError: the file could not be written (an existing ``path`` is then unchanged).
    """
    final, averaged = states if states is not None else full_state_dicts(result)
    rec = result.record
    payload: dict[str, Any] = {
        "format": FORMAT,
        "task": rec["task"],
        "method": rec["method"],
        "seed": rec["seed"],
        "budget": rec["budget"],
        "hyper": rec.get("hyper", {}),
        "epochs": rec["recipe"]["epochs"],
        "record": {k: v for k, v in rec.items() if k != "curves"},
        "final": final,
        "averaged": averaged,
    }
    _write(path, payload)


def _write(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    payload["sha256"] = payload_digest(payload)
    # Serialised in memory first (benchmark models are small): torch.save straight into the file
    # would turn a failed write (disk full) into an opaque RuntimeError instead of an OSError.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def save_training_state(
    path: str | os.PathLike[str], state: TrainState | Mapping[str, Any]
) -> None:
    """Save a training state (``train(on_state=...)``) atomically, with its digest.

    Raises:
        OSError: the file could not be written (an existing ``path`` is then unchanged).
    """
    _write(path, state.as_dict() if isinstance(state, TrainState) else dict(state))


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a state written by :func:`save_training_state` (for ``train(resume=)``).

    Returns:
        The state's plain form, checked by :meth:`TrainState.from_dict` (every part present
        and of its type); ``TrainState.from_dict`` of it gives the typed state.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: not a readable, intact training state (see :func:`load_checkpoint`),
            or one with a missing or ill-typed part (the message names the file and the part).
    """
    name = os.fspath(path)
    payload = _torch_load(Path(path))
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != STATE_FORMAT:
        raise CheckpointError(
            f"Invalid training state: {name!r} is not a flatmin training state (format {fmt!r}, "
            f"expected {STATE_FORMAT!r})"
        )
    _check_digest(payload, name)
    try:
        TrainState.from_dict(payload)
    except ValueError as exc:
        raise CheckpointError(f"Invalid training state: {name!r}: {exc}") from None
    return payload


@dataclass
class LoadedCheckpoint:
    """A checkpoint rebuilt on its task.

    Attributes:
        path: the file.
        label: short name for legends (``sam-s0``, ``swa-s1-avg``).
        model: the model with the selected weights.
        weights: ``"final"`` or ``"averaged"``.
        data: the task data (batches, loss and accuracy functions).
        meta: the checkpoint's configuration (task, method, seed, budget, hyper, record).
        final_model: the live final weights when ``model`` holds the average, else ``None``.
    """

    path: str
    label: str
    model: nn.Module
    weights: str
    data: TaskData
    meta: dict[str, Any]
    final_model: nn.Module | None = None


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure as one clear error."""
    name = os.fspath(path)
    if path.is_dir():
        raise CheckpointError(f"Invalid checkpoint: {name!r} is a directory (expected a file)")
    if not path.exists():
        raise FileNotFoundError(f"No such checkpoint: {name!r}")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(
            f"Invalid checkpoint: {name!r} cannot be read (empty, truncated or not a checkpoint: "
            "not a torch zip archive)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"Invalid checkpoint: {name!r} holds Python objects that only an unsafe "
                "(pickle) load could rebuild; refusing it (flatmin checkpoints hold tensors "
                "and plain values)"
            ) from None
        raise CheckpointError(f"Invalid checkpoint: {name!r} cannot be read ({exc})") from None
    except Exception as exc:  # torch raises EOFError, RuntimeError, KeyError... on bad bytes
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(
            f"Invalid checkpoint: {name!r} cannot be read (empty, truncated or not a checkpoint: "
            f"{type(exc).__name__}{': ' + detail if detail else ''})"
        ) from None
    return payload


def _check_digest(payload: dict[str, Any], name: str) -> None:
    stored = payload.get("sha256")
    try:
        actual = payload_digest(payload)
    except TypeError as exc:
        raise CheckpointError(f"Invalid checkpoint: {name!r}: {exc}") from None
    if stored != actual:
        raise CheckpointError(
            f"Corrupt checkpoint: {name!r}: the sha256 of its content is {actual}, the "
            f"recorded one {stored!r} (the file was damaged or edited; recreate it with "
            "flatmin train)"
        )


def _read_payload(path: Path) -> dict[str, Any]:
    """Load, check the format, the digest and the keys; :class:`CheckpointError` otherwise."""
    name = os.fspath(path)
    payload = _torch_load(path)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (FORMAT, _FORMAT_V1):
        raise CheckpointError(
            f"Invalid checkpoint: {name!r} is not a flatmin checkpoint (format {fmt!r}, "
            f"expected {FORMAT!r})"
        )
    if fmt == FORMAT:
        _check_digest(payload, name)
    else:
        warnings.warn(
            f"{name}: a {_FORMAT_V1} checkpoint has no checksum; its integrity is not checked",
            stacklevel=3,
        )
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"Invalid checkpoint: {name!r} lacks keys {missing}")
    wrong = [k for k, t in _KEYS.items() if not isinstance(payload[k], t)]
    if wrong:
        raise CheckpointError(f"Invalid checkpoint: {name!r} has values of the wrong type: {wrong}")
    return payload


def _load_weights(model: nn.Module, state: dict[str, Any], name: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"Invalid checkpoint: {name!r}: weights do not fit the task's model ({exc})"
        ) from None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    weights: str = "auto",
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint on its task's data.

    Args:
        path: a file written by :func:`save_checkpoint`.
        task: the task to evaluate on (default: the checkpoint's; another task must use the
            same dataset and model, e.g. a label-noise variant).
        weights: ``"auto"`` (the averaged weights when present — what the method reports — else
            the final ones), ``"final"`` or ``"averaged"``.
        device: where the models and the task's batches go (an existing device).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: (a ``ValueError``) a directory, an empty, truncated or foreign file, a
            pickle payload, a digest mismatch (damaged file), missing keys, or weights that do
            not fit the model.
        ValueError: an unknown or incompatible task, or ``weights="averaged"`` for a run
            without an average.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"Invalid weights: {weights!r} (expected one of {WEIGHTS})")
    name = os.fspath(path)
    payload = _read_payload(Path(path))
    own: Task = get_task(payload["task"])
    chosen = own if task is None else get_task(task)
    if (chosen.dataset, chosen.model) != (own.dataset, own.model):
        raise ValueError(
            f"Invalid task: {chosen.name!r} for a checkpoint of {own.name!r} (expected a task "
            f"with dataset {own.dataset!r} and model {own.model!r})"
        )
    try:
        hyper = Hyper(**payload["hyper"])
    except TypeError as exc:
        raise CheckpointError(f"Invalid checkpoint: {name!r}: bad hyper ({exc})") from None
    spec = RunSpec(
        own.name, payload["method"], payload["seed"], payload["budget"], hyper,
        payload["epochs"],
    )  # fmt: skip
    data = chosen.load(spec.budget, seed=spec.seed).to(device)
    averaged = payload["averaged"]
    if weights == "averaged" and averaged is None:
        raise ValueError(f"Invalid weights: 'averaged' ({payload['method']} run has no average)")
    use_avg = averaged is not None and weights in ("auto", "averaged")
    model = data.make_model()
    _load_weights(model, averaged if averaged is not None and use_avg else payload["final"], name)
    final_model = None
    if use_avg:
        final_model = data.make_model()
        _load_weights(final_model, payload["final"], name)
    label = f"{payload['method']}-s{payload['seed']}" + ("-avg" if use_avg else "")
    meta = {k: v for k, v in payload.items() if k not in ("final", "averaged", "sha256")}
    return LoadedCheckpoint(
        path=name, label=label, model=model,
        weights="averaged" if use_avg else "final", data=data, meta=meta,
        final_model=final_model,
    )  # fmt: skip
