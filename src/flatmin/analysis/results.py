"""Result containers of the analysis layer and their ``.npz`` + JSON persistence.

Every result is a frozen dataclass holding numpy arrays (or dicts of them, keyed by data-set name)
and the settings that produced it. :meth:`Result.save` writes ``<path>.npz`` (arrays) and
``<path>.json`` (everything else); :meth:`Result.load` reads them back into the same class.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from flatmin._io import atomic_open, atomic_write_text

__all__ = [
    "AsymmetryResult",
    "EigenResult",
    "PathResult",
    "PlaneResult",
    "Result",
    "SAMGradientResult",
    "SharpnessResult",
    "SpectrumResult",
    "TraceResult",
]

R = TypeVar("R", bound="Result")


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _jsonable(value: Any, where: str, nonfinite: list[str]) -> Any:
    """Plain JSON values of ``value``; non-finite floats become strings.

    A NaN/±inf float becomes ``"NaN"``/``"Infinity"``/``"-Infinity"`` and its dotted path is
    appended to ``nonfinite`` (strict JSON has no such numbers).
    """
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}", nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        return [_jsonable(v, f"{where}.{i}", nonfinite) for i, v in enumerate(items)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        nonfinite.append(where)
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _restore_nonfinite(fields: dict[str, Any], paths: list[str]) -> None:
    """Turn the strings listed in ``paths`` (``"fields.<name>..."``) back into floats."""
    for path in paths:
        keys = path.split(".")[1:]
        node: Any = fields
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = _NONFINITE[node[int(last)]]
        else:
            node[last] = _NONFINITE[node[last]]


class Result:
    """Mixin giving a frozen dataclass ``save`` / ``load`` as ``.npz`` + ``.json``."""

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (class, scalars, settings).

        Each file is written atomically (temporary file, ``fsync``, rename). The JSON is strict:
        a NaN or infinite scalar is stored as the string ``"NaN"``, ``"Infinity"`` or
        ``"-Infinity"`` and its path is listed under ``"nonfinite"`` (``load`` turns it back).

        Args:
            path: Target path; a ``.npz`` or ``.json`` suffix is replaced.

        Returns:
            The two paths written.
        """
        base = Path(path)
        if base.suffix in {".npz", ".json"}:
            base = base.with_suffix("")
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"class": type(self).__name__, "fields": {}, "arrays": {}}
        nonfinite: list[str] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                arrays[f.name] = value
                meta["arrays"][f.name] = None
            elif (
                isinstance(value, dict)
                and value
                and all(isinstance(v, np.ndarray) for v in value.values())
            ):
                keys = list(value)
                for i, k in enumerate(keys):
                    arrays[f"{f.name}.{i}"] = value[k]
                meta["arrays"][f.name] = keys
            else:
                meta["fields"][f.name] = _jsonable(value, f"fields.{f.name}", nonfinite)
        npz_path = base.with_name(base.name + ".npz")
        json_path = base.with_name(base.name + ".json")
        meta["nonfinite"] = nonfinite
        with atomic_open(npz_path, "wb") as out:
            np.savez(out, **arrays)  # type: ignore[arg-type]
        atomic_write_text(json_path, json.dumps(meta, indent=2, sort_keys=True, allow_nan=False))
        return npz_path, json_path

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a result written by :meth:`save`.

        Raises:
            TypeError: if the files hold a different result class.
        """
        base = Path(path)
        if base.suffix in {".npz", ".json"}:
            base = base.with_suffix("")
        meta = json.loads(base.with_name(base.name + ".json").read_text())
        if meta["class"] != cls.__name__:
            raise TypeError(f"Invalid file: holds a {meta['class']} (expected {cls.__name__})")
        _restore_nonfinite(meta["fields"], meta.get("nonfinite", []))
        kwargs: dict[str, Any] = dict(meta["fields"])
        with np.load(base.with_name(base.name + ".npz"), allow_pickle=False) as npz:
            for name, keys in meta["arrays"].items():
                if keys is None:
                    kwargs[name] = npz[name]
                else:
                    kwargs[name] = {k: npz[f"{name}.{i}"] for i, k in enumerate(keys)}
        return cls(**kwargs)


@dataclass(frozen=True)
class PathResult(Result):
    """Loss and error along a 1-D path (a ray ``w + t d`` or the line between two models).

    Attributes:
        kind: ``"ray"`` or ``"interpolation"``.
        coords: The ``t`` (ray) or ``α`` (interpolation) values, shape ``(P,)``.
        loss: Data-set name → mean loss at each coordinate, shape ``(P,)``.
        error: Data-set name → error (1 − accuracy) at each coordinate; NaN if not a classifier.
        settings: BatchNorm policy, ``max_batches`` and the other arguments.
    """

    kind: str
    coords: np.ndarray
    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlaneResult(Result):
    """Loss and error on the plane ``w + x d₁ + y d₂``; arrays have shape ``(len(x), len(y))``."""

    x: np.ndarray
    y: np.ndarray
    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AsymmetryResult(Result):
    """Loss at ``θ(−a)``, ``θ(0)`` and ``θ(+a)`` on the line ``θ(α) = (1−α)θ + αθ'``.

    ``difference[name] = L(θ(+a)) − L(θ(−a))``: positive when the loss rises faster towards θ'
    (Kaddour et al. 2022, Sec. 4). Each array holds ``[L(−a), L(0), L(+a)]``.
    """

    a: float
    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def difference(self) -> dict[str, float]:
        """``L(θ(+a)) − L(θ(−a))`` per data set."""
        return {k: float(v[2] - v[0]) for k, v in self.loss.items()}


@dataclass(frozen=True)
class SharpnessResult(Result):
    """Per-batch sharpness ``L(w + δ*) − L(w)`` with its mean and standard deviation.

    Attributes:
        values: Sharpness of each batch (each batch is averaged over its ``m``-chunks).
        base_loss: ``L(w)`` per batch.
        perturbed_loss: ``L(w + δ)`` per batch (worst case: the maximum over the ascent iterates;
            average case: the mean over samples).
        mean: Mean of ``values``.
        std: Standard deviation of ``values`` (``ddof=1``; 0 for one batch).
        settings: kind, rho, p, steps, step size, m, adaptive, eta, samples, bn_mode.
    """

    values: np.ndarray
    base_loss: np.ndarray
    perturbed_loss: np.ndarray
    mean: float
    std: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        """Whether every per-batch value is finite (``False``: the loss blew up somewhere)."""
        return bool(np.all(np.isfinite(self.values)))


@dataclass(frozen=True)
class EigenResult(Result):
    """Top Hessian eigenvalues (descending) with Lanczos/power iterations and residuals.

    Attributes:
        eigenvalues: Shape ``(k,)``, descending.
        residuals: ``‖H v_i − λ_i v_i‖`` for each unit eigenvector estimate.
        iterations: Hessian-vector products (over the full data) used.
        eigenvectors: Shape ``(k, n_params)`` if requested, else ``None``.
        settings: method, k, tol, max_iter, n_params, max_batches, bn_mode.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    iterations: int
    eigenvectors: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        """Whether every eigenvalue is finite (``False``: a Hessian product was NaN/inf)."""
        return bool(np.all(np.isfinite(self.eigenvalues)))


@dataclass(frozen=True)
class TraceResult(Result):
    """Hutchinson estimate of ``tr(H)`` with its standard error ``std(samples)/√n``."""

    trace: float
    stderr: float
    samples: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        """Whether every sample is finite (``False``: a Hessian product was NaN/inf)."""
        return bool(np.all(np.isfinite(self.samples)))


@dataclass(frozen=True)
class SpectrumResult(Result):
    """Stochastic Lanczos quadrature estimate of the Hessian eigenvalue density.

    Attributes:
        nodes: Ritz values per probe, shape ``(n_probes, m)``.
        weights: Quadrature weights per probe (squared first components), rows sum to 1.
        grid: Points where the smoothed density is evaluated.
        density: Gaussian-smoothed density on ``grid`` (integrates to ≈ 1).
        settings: steps, n_probes, sigma, n_params, max_batches, bn_mode.
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        """Whether every Ritz value is finite (``False``: a Hessian product was NaN/inf)."""
        return bool(np.all(np.isfinite(self.nodes)))

    @property
    def trace(self) -> float:
        """SLQ trace estimate ``n · mean_probes Σ_i τ_i² θ_i``."""
        n = int(self.settings["n_params"])
        return float(n * np.mean(np.sum(self.weights * self.nodes, axis=1)))


@dataclass(frozen=True)
class SAMGradientResult(Result):
    """First- and second-order SAM gradients (flattened over trainable parameters).

    Attributes:
        gradient: ``∇L(w)``.
        first_order: ``∇L(w)|_{w+ε̂}`` — the gradient SAM uses.
        second_order: ``d/dw L(w + ε̂(w))``, including ``(dε̂/dw)ᵀ ∇L(w+ε̂)``.
        cosine: Cosine similarity of ``first_order`` and ``second_order``.
        loss: ``L(w)``.
        perturbed_loss: ``L(w + ε̂)``.
        settings: rho, bn_mode, n_params.
    """

    gradient: np.ndarray
    first_order: np.ndarray
    second_order: np.ndarray
    cosine: float
    loss: float
    perturbed_loss: float
    settings: dict[str, Any] = field(default_factory=dict)
