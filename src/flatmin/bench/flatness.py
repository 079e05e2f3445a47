"""The benchmark's flatness study: why the methods differ, measured on their own solutions.

For the analysis task (a label-noise task) and the first evaluation seed, the baseline's and SAM's
evaluation runs are trained again — runs are deterministic, so each method's final test accuracy
(SWA's and WASAM's: their average's) must equal the recorded one (checked, and reported if not) —
their final and averaged weights saved as
checkpoints, and four solutions compared: the baseline (SGD/AdamW), SWA (its average), SAM and
WASAM (SAM's average). For each:

* **curvature**: the top Hessian eigenvalue (Lanczos) and the Hessian trace (Hutchinson, with its
  standard error) and the eigenvalue density (SLQ) of the loss — on the **noisy labels the model
  was trained on** (the objective it minimised) and on the **clean test set**;
* **worst-case sharpness**: ``max_{‖ε‖≤ρ} L(w + ε) − L(w)`` (one SAM ascent step, per batch);
* **paths**: loss and error along a filter-normalised random ray ``w + t·d`` (Li et al. 2018) and
  along the straight lines baseline → SWA / SAM / WASAM (``θ(α) = (1 − α)θ + αθ'``, BatchNorm
  statistics recomputed at every point), on the noisy training set and the clean test set.

All measures use BatchNorm in eval mode and the first ``max_batches`` batches of each set.
Reading them needs care on a memorised noisy training set: a model that fits the noisy labels to
zero loss sits where the loss has almost no curvature — so a small λ_max *on the noisy training
loss* can mean memorisation, not a wide basin. The test-set numbers and the paths say which.

References:
    Kaddour et al., arXiv:2202.00661 (Sec. 3). Izmailov et al., arXiv:1803.05407 (Fig. 4-5).
    Li et al., arXiv:1712.09913. Foret et al., arXiv:2010.01412. Ghorbani et al.,
    arXiv:1901.10159 (Hessian spectra).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatmin._io import atomic_write_text, finite_json, save_figure
from flatmin.analysis import (
    PathResult,
    SpectrumResult,
    evaluate_ray,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    interpolate,
    plot_spectrum,
    random_direction,
    sharpness,
)
from flatmin.bench.checkpoint import save_checkpoint
from flatmin.bench.figures import pyplot_agg
from flatmin.bench.methods import Hyper, get_method
from flatmin.bench.plan import method_result
from flatmin.bench.train import RunSpec, TrainResult, train
from flatmin.tasks import Task

__all__ = [
    "FLATNESS", "flatness_lines", "flatness_study", "load_flatness", "path_figure", "reproduction",
    "spectrum_figure",
]

FLATNESS = "flatness.json"


@dataclass(frozen=True)
class Settings:
    """What the study measures with (stored with the results)."""

    max_batches: int = 4
    hessian_iters: int = 20
    trace_samples: int = 30
    sharpness_rho: float = 0.05
    points: int = 25
    ray_distance: float = 1.0
    alpha_min: float = -0.5
    alpha_max: float = 1.5
    seed: int = 0
    spectrum_steps: int = 40


SETTINGS = Settings()
# Bumped when what the study stores changes, so that an older flatness.json is recomputed
# (2: views reproduced on their averages, spectra on the test set too).
VERSION = 2
ORDER = ("baseline", "swa", "sam", "wasam")


def load_flatness(out: str | Path) -> dict[str, Any] | None:
    """The stored study of ``out`` (``None`` if there is none)."""
    path = Path(out) / FLATNESS
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def reproduction(
    method: str,
    hyper: Hyper,
    recorded: Mapping[str, Any] | None,
    retrained: Mapping[str, Any],
) -> dict[str, Any]:
    """The recorded and the retrained final test accuracy of ``method``'s result.

    Both are read through :func:`~flatmin.bench.plan.method_result`, so a view (SWA, WASAM) is
    compared on its average from ``hyper.start`` — the weights the report shows — and not on the
    trajectory's live weights, which the baseline's and SAM's own entries already compare.
    """

    def test_acc(record: Mapping[str, Any] | None) -> Any:
        if record is None:
            return None
        return (method_result(record, method, hyper).get("final") or {}).get("test_acc")

    return {
        "recorded_final_test_acc": test_acc(recorded),
        "retrained_final_test_acc": test_acc(retrained),
    }


def _solutions(
    results: Mapping[str, TrainResult], hypers: Mapping[str, Hyper], methods: Sequence[str]
) -> dict[str, nn.Module]:
    """The four models: final weights of the trajectories, averages for the views."""
    models: dict[str, nn.Module] = {}
    for name in methods:
        res = results[name]
        start = hypers[name].start
        if get_method(name).is_trajectory or start is None:
            models[name] = res.model
            continue
        model = res.data.make_model()
        model.load_state_dict(res.averagers[start].averaged_state_dict())
        models[name] = model
    return models


def _curvature(model: nn.Module, data: Any, batches: Any, gen: torch.Generator) -> dict[str, Any]:
    mb = SETTINGS.max_batches
    eig = hessian_eigenvalues(
        model, data.loss_fn, batches, k=1, max_iter=SETTINGS.hessian_iters, generator=gen,
        max_batches=mb,
    )  # fmt: skip
    trace = hessian_trace(
        model, data.loss_fn, batches, n_samples=SETTINGS.trace_samples, generator=gen,
        max_batches=mb,
    )  # fmt: skip
    sharp = sharpness(model, data.loss_fn, batches, rho=SETTINGS.sharpness_rho, max_batches=mb)
    return {
        "lambda_max": float(eig.eigenvalues[0]),
        "lambda_max_residual": float(eig.residuals[0]),
        "trace": float(trace.trace),
        "trace_stderr": float(trace.stderr),
        "worst_case_sharpness": float(sharp.mean),
        "loss": float(np.mean(sharp.base_loss)),
    }


def _path_dict(result: PathResult) -> dict[str, Any]:
    return {
        "coords": [float(c) for c in result.coords],
        "loss": {k: [float(v) for v in vals] for k, vals in result.loss.items()},
        "error": {k: [float(v) for v in vals] for k, vals in (result.error or {}).items()},
    }


def flatness_study(
    out: str | Path,
    task: Task,
    specs: Mapping[str, RunSpec],
    hypers: Mapping[str, Hyper],
    records: Mapping[str, Mapping[str, Any]],
    *,
    resolver: Any = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Run (or load) the study for ``specs`` (method → its trajectory's evaluation spec).

    Writes ``flatness.json``, the figures ``flatness_rays.png`` and
    ``flatness_interpolation.png``, and the checkpoints ``checkpoints/<method>.pt`` into ``out``.
    """
    out = Path(out)
    methods = [m for m in ORDER if m in specs]
    key = {
        "version": VERSION,
        "task": task.name,
        "runs": {m: specs[m].config_hash(task) for m in methods},
        "hypers": {m: hypers[m].as_dict() for m in methods},
        "settings": asdict(SETTINGS),
    }
    stored = load_flatness(out)
    if stored is not None and stored.get("key") == finite_json(key)[0]:
        return stored
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        study = _study(out, task, specs, hypers, records, methods, resolver)
    finally:
        torch.set_num_threads(previous)
    study["key"] = key
    study = finite_json(study)[0]
    atomic_write_text(out / FLATNESS, json.dumps(study, indent=1, sort_keys=True))
    return study


def _study(
    out: Path,
    task: Task,
    specs: Mapping[str, RunSpec],
    hypers: Mapping[str, Hyper],
    records: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    resolver: Any,
) -> dict[str, Any]:
    results, reproduced = _retrain(task, specs, hypers, records, methods, resolver)
    models = _solutions(results, hypers, methods)
    _save_checkpoints(out / "checkpoints", models, results, hypers)
    data = results[methods[0]].data
    sets = {"train": data.train_eval, "test": data.test}
    measures, spectra = _measures(models, data, sets)
    rays, lines = _paths(models, data, sets, methods)
    study = {
        "task": task.name,
        "seed": specs[methods[0]].seed,
        "methods": list(methods),
        "hypers": {m: hypers[m].as_dict() for m in methods},
        "reproduced": reproduced,
        "measures": measures,
        "rays": rays,
        "interpolations": lines,
        "settings": asdict(SETTINGS),
        "checkpoints": {m: f"checkpoints/{m}.pt" for m in models},
    }
    _figures(out, study, spectra)
    return study


def _retrain(
    task: Task,
    specs: Mapping[str, RunSpec],
    hypers: Mapping[str, Hyper],
    records: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    resolver: Any,
) -> tuple[dict[str, TrainResult], dict[str, Any]]:
    """Each method's run trained again (a shared trajectory once), and whether it reproduced."""
    dataset = resolver.dataset(task) if resolver is not None else None
    by_hash: dict[str, TrainResult] = {}
    results: dict[str, TrainResult] = {}
    reproduced: dict[str, Any] = {}
    for m in methods:
        h = specs[m].config_hash(task)
        if h not in by_hash:
            by_hash[h] = train(specs[m], task=task, dataset=dataset)
        results[m] = by_hash[h]
        rep = reproduction(m, hypers[m], records.get(h), by_hash[h].record)
        reproduced[m] = {"run": h, **rep}
    return results, reproduced


def _save_checkpoints(
    ckpt: Path,
    models: Mapping[str, nn.Module],
    results: Mapping[str, TrainResult],
    hypers: Mapping[str, Hyper],
) -> None:
    """One checkpoint per solution, in the standard format (`flatmin landscape` reads them)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    for m in models:
        res = results[m]
        start = hypers[m].start
        trajectory = get_method(m).is_trajectory
        view = TrainResult(
            record=method_result(res.record, m, hypers[m]),  # a view's record: its average
            model=res.model,
            averager=res.averagers[start] if not trajectory and start is not None else None,
            data=res.data,
        )
        save_checkpoint(ckpt / f"{m}.pt", view)


def _measures(
    models: Mapping[str, nn.Module], data: Any, sets: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, SpectrumResult]]]:
    """Curvature measures and the SLQ spectrum of each solution on each set (same draws)."""
    gen = torch.Generator()
    measures: dict[str, dict[str, Any]] = {}
    spectra: dict[str, dict[str, SpectrumResult]] = {name: {} for name in sets}
    for m, model in models.items():
        measures[m] = {}
        for name, batches in sets.items():
            gen.manual_seed(SETTINGS.seed)
            measures[m][name] = _curvature(model, data, batches, gen)
            gen.manual_seed(SETTINGS.seed)
            spectrum = hessian_spectrum(
                model, data.loss_fn, batches, steps=SETTINGS.spectrum_steps, generator=gen,
                max_batches=SETTINGS.max_batches,
            )  # fmt: skip
            spectra[name][m] = spectrum
            measures[m][name]["spectrum"] = {
                "nodes": [float(v) for v in spectrum.nodes.ravel()],
                "weights": [float(v) for v in spectrum.weights.ravel()],
            }
    return measures, spectra


def _paths(
    models: Mapping[str, nn.Module], data: Any, sets: Mapping[str, Any], methods: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A random filter-normalised ray through each solution; the line baseline → each other."""
    mb = SETTINGS.max_batches
    ts = np.linspace(-SETTINGS.ray_distance, SETTINGS.ray_distance, SETTINGS.points)
    alphas = np.linspace(SETTINGS.alpha_min, SETTINGS.alpha_max, SETTINGS.points)
    gen = torch.Generator()
    rays, lines = {}, {}
    for m, model in models.items():
        gen.manual_seed(SETTINGS.seed)
        d = random_direction(model, norm="filter", generator=gen)
        rays[m] = _path_dict(evaluate_ray(model, data.loss_fn, sets, d, ts, max_batches=mb))
    if "baseline" in models:
        for m in methods:
            if m == "baseline":
                continue
            lines[f"baseline→{m}"] = _path_dict(
                interpolate(
                    models["baseline"], models[m], data.loss_fn, sets, alphas, bn="recompute",
                    bn_batches=data.train_eval, max_batches=mb,
                )
            )  # fmt: skip
    return rays, lines


def _figures(
    out: Path, study: Mapping[str, Any], spectra: Mapping[str, Mapping[str, SpectrumResult]]
) -> None:
    plt = pyplot_agg()
    if plt is None:  # the plot extra is optional
        return
    figures = {"flatness_spectrum.png": spectrum_figure(plt, study, spectra)}
    names = {"rays": "flatness_rays.png", "interpolations": "flatness_interpolation.png"}
    for kind, name in names.items():
        if study[kind]:
            figures[name] = path_figure(plt, study, kind)
    for name, fig in figures.items():
        save_figure(fig, out / name, dpi=120)
        plt.close(fig)


SET_LABELS = {"train": "training set, its noisy labels", "test": "test set, true labels"}


def spectrum_figure(
    plt: Any, study: Mapping[str, Any], spectra: Mapping[str, Mapping[str, SpectrumResult]]
) -> Any:
    """The Hessian eigenvalue densities, one panel per set (``spectra``: set → method → result)."""
    fig, axes = plt.subplots(1, len(spectra), figsize=(5.5 * len(spectra), 4.0), squeeze=False)
    for ax, (name, by_method) in zip(axes.flat, spectra.items(), strict=True):
        plot_spectrum(dict(by_method), ax=ax, title=SET_LABELS.get(name, name))
    fig.suptitle(
        f"{study['task']}, seed {study['seed']}: Hessian eigenvalue density of the loss "
        f"(SLQ, first {study['settings']['max_batches']} batches, BatchNorm in eval mode)",
        fontsize="medium",
    )
    fig.tight_layout()
    return fig


PATHS = {
    "rays": (
        "t  (w + t·d)",
        "along one random filter-normalised direction d (drawn with the same seed for each "
        "model), BatchNorm in eval mode",
    ),
    "interpolations": (
        "α  (θ(α) = (1 − α)·θ_baseline + α·θ)",
        "on the line from the baseline, BatchNorm statistics recomputed at every point",
    ),
}


def path_figure(plt: Any, study: Mapping[str, Any], kind: str) -> Any:
    """Train loss (noisy labels) and test error along the study's ``rays`` or ``interpolations``."""
    from matplotlib.ticker import MultipleLocator

    xlabel, what = PATHS[kind]
    paths = study[kind]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for label, p in paths.items():
        axes[0].plot(p["coords"], p["loss"]["train"], label=label)
        axes[1].plot(p["coords"], [100 * e for e in p["error"]["test"]], label=label)
    axes[0].set_ylabel("train loss (noisy labels)")
    axes[1].set_ylabel("test error (%)")
    for ax in axes:
        ax.set_xlabel(xlabel)
        # A tick every 0.5: at the default 0.25 the labels of −0.50 … 1.50 overlap.
        ax.xaxis.set_major_locator(MultipleLocator(0.5))
    losses = [v for p in paths.values() for v in p["loss"]["train"] if v and v > 0]
    if losses and max(losses) / min(losses) > 100:  # spans decades: log scale
        axes[0].set_yscale("log")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{study['task']}, seed {study['seed']}: {what}", fontsize="medium")
    fig.tight_layout()
    return fig


def flatness_lines(study: Mapping[str, Any]) -> list[str]:
    """Markdown of the study for the report."""
    methods = study["methods"]
    lines = [
        f"Task `{study['task']}`, evaluation seed {study['seed']}: the final weights of the "
        "baseline and SAM and their averages (SWA, WASAM) from the grid's own runs, trained "
        "again with checkpoints (`checkpoints/`). Curvature on the first "
        f"{study['settings']['max_batches']} batches of each set, BatchNorm in eval mode; "
        f"λ_max by Lanczos ({study['settings']['hessian_iters']} products), trace by Hutchinson "
        f"({study['settings']['trace_samples']} Rademacher vectors, ± standard error), "
        f"worst-case sharpness at ρ = {study['settings']['sharpness_rho']} (one SAM step).",
        "",
        "| Method | Set | Loss | λ_max | Trace | Worst-case sharpness |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        for name, label in (("train", "train (noisy labels)"), ("test", "test (true labels)")):
            v = study["measures"][m][name]
            lines.append(
                f"| {m.upper()} | {label} | {_num(v['loss'])} | {_num(v['lambda_max'])} | "
                f"{_num(v['trace'])} ± {_num(v['trace_stderr'])} | "
                f"{_num(v['worst_case_sharpness'])} |"
            )
    bad = [
        m for m, r in study["reproduced"].items()
        if r["recorded_final_test_acc"] != r["retrained_final_test_acc"]
    ]  # fmt: skip
    lines += [
        "",
        "Retraining reproduced the recorded runs exactly."
        if not bad
        else f"**Not reproduced exactly:** {', '.join(bad)} (see flatness.json).",
        "",
        "![rays](flatness_rays.png)",
        "",
        "![interpolation](flatness_interpolation.png)",
        "",
        "![spectrum](flatness_spectrum.png)",
    ]
    return lines


def _num(value: Any) -> str:
    if value is None:
        return "NaN"
    v = float(value)
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.3g}"
    return f"{v:.2e}"
