"""The benchmark report: ``report.md``, ``results.csv`` and PNG figures.

Layout of the accuracy tables (Kaddour et al. 2022, Table 2): one table per domain; per task its
model, the test-set resolution (points of accuracy per test sample), the baseline's test accuracy
(mean ± 95 % CI over seeds), then for every other method the difference to the baseline (mean ±
95 % CI of the per-seed differences, paired by seed). ``*`` marks a Holm-corrected paired t-test
p < 0.05 across the whole headline table; ``=`` a difference that is identical on every seed
(see :mod:`flatmin.bench.stats`).

References:
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from flatmin._io import atomic_write_text
from flatmin.bench.figures import ablation_accuracies, report_figures
from flatmin.bench.flatness import flatness_lines
from flatmin.bench.methods import METHODS, Hyper
from flatmin.bench.noise_map import map_lines, noise_maps, write_map_figures
from flatmin.bench.plan import TuneChoice
from flatmin.bench.records import MethodResult, Record
from flatmin.bench.stats import Cell, mean_ci, min_detectable_effect, paired_difference, with_holm
from flatmin.bench.tuning import SearchSummary
from flatmin.tasks import split_fold_name

__all__ = ["ReportData", "TaskRow", "fold_hypers", "summarize", "write_csv", "write_report"]

Meta = Mapping[str, object]
"""The grid's options shown in the report (:func:`flatmin.bench.runner.meta_of`)."""


class ReportData(Protocol):
    """What the report reads (a :class:`~flatmin.bench.runner.GridSummary` has it)."""

    @property
    def records(self) -> Sequence[MethodResult]:
        """One result per task × method × seed."""
        ...

    @property
    def tune_records(self) -> Sequence[Record]:
        """The tuning runs."""
        ...

    @property
    def ablation(self) -> Sequence[MethodResult]:
        """The budget ablation's results."""
        ...

    @property
    def tuning(self) -> Sequence[TuneChoice]:
        """The validation grids."""
        ...

    @property
    def searches(self) -> Sequence[SearchSummary]:
        """Another tuner's searches."""
        ...

    @property
    def hypers(self) -> Mapping[tuple[str, str], Hyper]:
        """The hyper-parameters used."""
        ...

    @property
    def flatness(self) -> Mapping[str, object] | None:
        """The flatness study."""
        ...

DOMAINS = ("vision", "text", "graph")
CSV_FIELDS = (
    "task", "domain", "model", "method", "trajectory", "seed", "status", "reason", "rho",
    "start", "swa_lr", "alpha", "test_acc", "test_loss", "val_acc", "train_acc", "train_loss",
    "train_acc_clean", "noise_memorised", "live_test_acc", "epochs", "budget_factor",
    "wall_time", "hash",
)  # fmt: skip


@dataclass(frozen=True)
class TaskRow:
    """One task of a domain table.

    Attributes:
        task, domain, model: identification.
        test_size: test samples (pooled over folds for cross-validated tasks).
        baseline: baseline test accuracy.
        diffs: per method, the paired difference to the baseline (``None``: no paired seeds).
        absolute: per method (baseline included), the test accuracy itself.
        fit: per method, mean train accuracy on the labels trained on, on the true labels, and
            the share of flipped labels reproduced (``None`` when not measured).
        cost: per method, mean wall time of its run relative to the baseline's run.
    """

    task: str
    domain: str
    model: str
    test_size: int | None
    baseline: Cell
    diffs: dict[str, Cell | None]
    absolute: dict[str, Cell]
    fit: dict[str, tuple[float | None, float | None, float | None]]
    cost: dict[str, float]

    @property
    def resolution(self) -> float | None:
        """Points of accuracy per test sample."""
        return None if not self.test_size else 100.0 / self.test_size


def _mean(values: Sequence[float | None], scale: float = 100.0) -> float | None:
    vals = [scale * v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _task_row(task: str, results: Sequence[MethodResult], methods: Sequence[str]) -> TaskRow:
    """The row of ``task`` from its results (``ok`` ones count), without Holm's correction."""
    by: dict[str, dict[int, MethodResult]] = {m: {} for m in methods}
    for r in results:
        if r.ok and r.method in by and r.final.test_acc is not None:
            by[r.method][r.seed] = r
    acc = {m: {s: 100.0 * (r.final.test_acc or 0.0) for s, r in by[m].items()} for m in methods}
    base = acc.get("baseline", {})
    base_time = [r.wall_time for r in by.get("baseline", {}).values()]
    cost = {}
    for m in methods:
        times = [r.wall_time for r in by[m].values()]
        if times and base_time:
            cost[m] = float(np.mean(times) / np.mean(base_time))
    fit = {
        m: (
            _mean([r.final.train_acc for r in by[m].values()]),
            _mean([r.final.train_acc_clean for r in by[m].values()]),
            _mean([r.final.noise_memorised for r in by[m].values()]),
        )
        for m in methods
    }
    runs = [r.run for r in results if r.run is not None]
    return TaskRow(
        task=task, domain=next((r.domain for r in runs), "?"),
        model=next((r.model for r in runs), "?"),
        test_size=next((r.sizes["test"] for r in runs if r.sizes.get("test")), None),
        baseline=mean_ci(list(base.values())),
        diffs={m: paired_difference(acc[m], base) for m in methods if m != "baseline"},
        absolute={m: mean_ci(list(acc[m].values())) for m in methods}, fit=fit, cost=cost,
    )  # fmt: skip


def summarize(records: Sequence[MethodResult], methods: Sequence[str]) -> list[TaskRow]:
    """Per-task rows from method results (``status == "ok"`` only), Holm over all cells.

    Args:
        records: one result per task × method × seed.
        methods: method order; ``"baseline"`` is the reference.
    """
    tasks: dict[str, list[MethodResult]] = {}
    for r in records:
        tasks.setdefault(r.task, []).append(r)
    rows = [_task_row(task, results, methods) for task, results in tasks.items()]
    # One Holm family: every tested cell of the table.
    family = with_holm({(i, m): c for i, r in enumerate(rows) for m, c in r.diffs.items()})
    return [
        TaskRow(**{**r.__dict__, "diffs": {m: family[(i, m)] for m in r.diffs}})
        for i, r in enumerate(rows)
    ]


def _domain_order(rows: Sequence[TaskRow]) -> list[str]:
    present = list(dict.fromkeys(r.domain for r in rows))
    return [d for d in DOMAINS if d in present] + [d for d in present if d not in DOMAINS]


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _registry_index(method: str) -> int:
    names = list(METHODS)
    return names.index(method) if method in names else len(names)


def _label(method: str) -> str:
    return method.upper()


def _resolution(r: TaskRow) -> str:
    res = r.resolution
    return "–" if res is None else f"{r.test_size} ({res:.2g})"


def accuracy_tables(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    """Markdown: one Kaddour-style table per domain."""
    others = [m for m in methods if m != "baseline"]
    out: list[str] = []
    for domain in _domain_order(rows):
        out += [f"### {domain}", ""]
        body = []
        for r in rows:
            if r.domain != domain:
                continue
            cells = [r.task, r.model, _resolution(r), r.baseline.format()]
            for m in others:
                d = r.diffs.get(m)
                cells.append("–" if d is None else d.format(signed=True))
            body.append(cells)
        header = ["Task", "Model", "Test n (pts/sample)", "Baseline", *map(_label, others)]
        out += [*_table(header, body), ""]
    return out


def summary_table(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    """Markdown: per method, on how many tasks it beats / trails the baseline."""
    body = []
    for m in methods:
        if m == "baseline":
            continue
        diffs = [c for c in (r.diffs.get(m) for r in rows) if c is not None]
        if not diffs:
            continue
        better = sum(c.mean > 0 for c in diffs)
        worse = sum(c.mean < 0 for c in diffs)
        sig_b = sum(c.mean > 0 and c.significant for c in diffs)
        sig_w = sum(c.mean < 0 and c.significant for c in diffs)
        means = [c.mean for c in diffs]
        body.append(
            [
                _label(m), f"{better} ({sig_b})", f"{worse} ({sig_w})", str(len(diffs)),
                f"{float(np.mean(means)):+.2f}", f"{float(np.median(means)):+.2f}",
            ]
        )  # fmt: skip
    header = [
        "Method",
        "Tasks better (*)",
        "Tasks worse (*)",
        "Tasks",
        "Mean diff.",
        "Median diff.",
    ]
    return _table(header, body)


def _fit_table(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    body = []
    for r in rows:
        if all(r.fit[m][1] is None for m in methods if m in r.fit):
            continue  # no label noise: nothing to separate
        for m in methods:
            te = r.absolute.get(m)
            tr, clean, memo = r.fit.get(m, (None, None, None))
            if te is None or te.n == 0:
                continue
            body.append([r.task, _label(m), f"{te.mean:.2f}", _fmt(tr), _fmt(clean), _fmt(memo)])
    header = [
        "Task", "Method", "Test acc.", "Train acc. (noisy labels)", "Train acc. (true labels)",
        "Noise memorised",
    ]  # fmt: skip
    return _table(header, body)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cost_table(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    body = []
    for r in rows:
        body.append([r.task, *(f"{r.cost[m]:.2f}×" if m in r.cost else "–" for m in methods)])
    geo = []
    for m in methods:
        vals = [r.cost[m] for r in rows if m in r.cost]
        geo.append(f"{math.exp(float(np.mean(np.log(vals)))):.2f}×" if vals else "–")
    body.append(["**geometric mean**", *geo])
    return _table(["Task", *map(_label, methods)], body)


def _variant_table(rows: Sequence[TaskRow], variants: Sequence[str]) -> list[str]:
    """Cost and the share of SAM's gain each cheap variant keeps, per task and pooled."""
    body = []
    pooled: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    for r in rows:
        sam = r.diffs.get("sam")
        for v in variants:
            d = r.diffs.get(v)
            if d is None or sam is None or v not in r.cost:
                continue
            share = 100.0 * d.mean / sam.mean if sam.mean > 0 else math.nan
            pooled[v].append((d.mean, sam.mean, r.cost[v]))
            body.append(
                [
                    r.task, _label(v), f"{r.cost[v]:.2f}×", d.format(signed=True),
                    sam.format(signed=True), "–" if math.isnan(share) else f"{share:.0f} %",
                ]
            )  # fmt: skip
    for v, items in pooled.items():
        if not items:
            continue
        gain = sum(d for d, _, _ in items)
        sam_gain = sum(s for _, s, _ in items)
        cost = math.exp(float(np.mean(np.log([c for _, _, c in items]))))
        kept = f"{100.0 * gain / sam_gain:.0f} %" if sam_gain > 0 else "–"
        body.append(
            [f"**all ({len(items)} tasks)**", _label(v), f"{cost:.2f}×",
             f"{gain / len(items):+.2f}", f"{sam_gain / len(items):+.2f}", kept]
        )  # fmt: skip
    header = ["Task", "Variant", "Cost vs baseline", "Variant − baseline", "SAM − baseline",
              "SAM's gain kept"]  # fmt: skip
    return _table(header, body)


def fold_hypers(
    hypers: Mapping[tuple[str, str], Hyper], task: str, method: str
) -> tuple[Hyper, ...]:
    """A cross-validated task's hyper-parameters per outer fold (``()``: none are recorded).

    ``hypers`` holds them by fold task (``("mutag@fold3", "sam")``), as the runner chose them.
    """
    found = {}
    for (t, m), hp in hypers.items():
        parent, fold = split_fold_name(t)
        if m == method and parent == task and fold is not None:
            found[fold] = hp
    return tuple(found[f] for f in sorted(found))


def _hyper_cell(hypers: Sequence[Hyper]) -> str:
    """``rho=0.05``; per-fold choices as their range and list (``rho=0.02–0.1 (0.05, 0.02, …)``)."""
    cells = []
    for k in sorted({k for hp in hypers for k in hp.as_dict()}):
        values = [hp.as_dict().get(k) for hp in hypers]
        if all(v == values[0] for v in values):
            cells.append(f"{k}={values[0]:g}")
            continue
        nums = [v for v in values if v is not None]
        listed = ", ".join("–" if v is None else f"{v:g}" for v in values)
        cells.append(f"{k}={min(nums):g}–{max(nums):g} (per fold: {listed})")
    return ", ".join(cells) or "–"


def _hyper_table(
    hypers: Mapping[tuple[str, str], Hyper], tasks: Sequence[str], methods: Sequence[str]
) -> list[str]:
    body = []
    for t in tasks:
        cells = [t]
        for m in methods:
            hp = hypers.get((t, m))
            cells.append(_hyper_cell([hp] if hp is not None else fold_hypers(hypers, t, m)))
        body.append(cells)
    return _table(["Task", *map(_label, methods)], body)


def _tuning_table(tuning: Sequence[TuneChoice]) -> list[str]:
    body = []
    for c in tuning:
        if not c.params:
            continue
        parts = []
        for point, score, seeds in zip(c.points, c.scores, c.per_seed, strict=True):
            label = ", ".join(f"{p}={v:g}" for p, v in zip(c.params, point, strict=True))
            if score is None:
                text = "failed"
            else:
                vals = [100 * s for s in seeds if s is not None]
                text = f"{100 * score:.2f}" + (
                    f" (±{(max(vals) - min(vals)) / 2:.2f})" if len(vals) > 1 else ""
                )
            parts.append(f"{label}: {text}" + (" ←" if tuple(point) == tuple(c.chosen) else ""))
        notes = []
        if c.extended:
            notes.append("extended " + "; ".join(c.extended))
        if c.at_edge:
            notes.append("still at the edge: " + ", ".join(c.at_edge))
        chosen = ", ".join(f"{p}={v:g}" for p, v in zip(c.params, c.chosen, strict=True))
        body.append([c.task, _label(c.method), "<br>".join(parts), chosen, "; ".join(notes) or "–"])
    return _table(
        ["Task", "Method", "Mean validation accuracy (%) (± half-range over tuning seeds)",
         "Chosen", "Grid notes"], body,
    )  # fmt: skip


def _search_table(searches: Sequence[SearchSummary]) -> list[str]:
    body = []
    for search in searches:
        chosen = search.chosen
        text = "–" if chosen is None else ", ".join(f"{k}={v:.3g}" for k, v in chosen.items())
        score = (
            "–" if search.score is None or search.mean is None
            else f"{100 * search.score:.2f} (mean {100 * search.mean:.2f})"
        )  # fmt: skip
        states = ", ".join(f"{n} {s}" for s, n in search.trials.items() if n)
        body.append([search.task, _label(search.method), text, score, states])
    return _table(["Task", "Method", "Chosen", "Score: mean − std (%)", "Trials"], body)


def _task_table(records: Sequence[MethodResult]) -> list[str]:
    seen: dict[str, list[str]] = {}
    for result in records:
        r = result.run
        if r is None or result.task in seen or not r.recipe:
            continue
        rec, sizes = r.recipe, r.sizes
        split = "/".join(str(sizes.get(k, "?")) for k in ("train", "val", "test"))
        if sizes.get("folds"):
            split = f"{sizes['folds']}-fold CV, pooled {split}"
        seen[result.task] = [
            result.task, r.domain, r.model, str(r.budget or "?"),
            f"{rec['optimizer']} lr {rec['lr']:g}, wd {rec['weight_decay']:g}",
            str(rec["batch_size"]), str(rec["epochs"]), str(rec["schedule"]), split,
        ]  # fmt: skip
    header = [
        "Task", "Domain", "Model", "Budget", "Optimizer", "Batch", "Epochs", "Schedule",
        "Train/val/test",
    ]  # fmt: skip
    return _table(header, list(seen.values()))


def _mde(c: Cell) -> str:
    """The cell's minimum detectable effect at 80 % power (``–`` without two seeds or variance)."""
    if c.n < 2 or c.constant:
        return "–"
    return f"{min_detectable_effect(c.std, c.n):.2f} (n={c.n})"


def _pvalue_table(rows: Sequence[TaskRow], methods: Sequence[str]) -> list[str]:
    body = []
    for r in rows:
        for m in methods:
            c = r.diffs.get(m)
            if c is None or m == "baseline":
                continue
            if c.p is None:
                body.append([r.task, _label(m), f"{c.mean:+.2f}", "= (not tested)", "–", _mde(c)])
            else:
                body.append([r.task, _label(m), f"{c.mean:+.2f}", f"{c.p:.2g}", f"{c.p_holm:.2g}",
                             _mde(c)])  # fmt: skip
    header = ["Task", "Method", "Difference", "p (paired t)", "p (Holm)", "MDE at 80 % power"]
    return _table(header, body)


def _ablation_table(ablation: Sequence[MethodResult], main: Sequence[MethodResult]) -> list[str]:
    task = ablation[0].task
    pts = ablation_accuracies([r.to_dict() for r in ablation], [r.to_dict() for r in main])
    factors = sorted({f for by in pts.values() for f in by})
    body = [
        [_label(m), *(mean_ci(by.get(f, [])).format() for f in factors)] for m, by in pts.items()
    ]
    epochs = {
        float(r.budget_factor or 1.0): r.run.epochs_planned if r.run else None for r in ablation
    }
    head = [f"{f:g}× ({epochs.get(f, '1×')} ep)" if f != 1.0 else "1× (main grid)" for f in factors]
    chosen: dict[str, dict[float, str]] = {}
    for r in [*ablation, *(r for r in main if r.task == task)]:
        text = ", ".join(f"{k}={v:g}" for k, v in sorted(r.hyper.items())) or "–"
        chosen.setdefault(r.method, {})[float(r.budget_factor or 1.0)] = text
    hyper_body = [[_label(m), *(chosen.get(m, {}).get(f, "–") for f in factors)] for m in pts]
    return [f"Task `{task}`, test accuracy (%), mean ± 95 % CI over seeds.", "",
            *_table(["Method", *head], body), "",
            "Hyper-parameters used at each budget (tuned again per budget when the grid is "
            f"tuned: the tasks `{task}-x<F>` in 'Validation grids').", "",
            *_table(["Method", *head], hyper_body)]  # fmt: skip


def _csv_row(r: MethodResult) -> dict[str, object]:
    run = r.run
    row: dict[str, object] = {k: "" for k in CSV_FIELDS}
    row.update(
        task=r.task, method=r.method, trajectory=r.trajectory or "", seed=r.seed, status=r.status,
        reason=r.reason or "", hash=r.record.hash, wall_time=f"{r.wall_time:.2f}",
        budget_factor=r.budget_factor or "",
    )  # fmt: skip
    if run is not None:
        row.update(domain=run.domain, model=run.model, epochs=run.epochs or "")
    row.update({k: r.hyper.get(k, "") for k in ("rho", "start", "swa_lr", "alpha")})
    row.update({k: v for k, v in r.final.__dict__.items() if v is not None and k in row})
    return row


def write_csv(path: str | os.PathLike[str], records: Sequence[MethodResult]) -> None:
    """One row per result (see :data:`CSV_FIELDS`), sorted by task, method, seed."""
    rows = sorted(records, key=lambda r: (r.task, r.method, r.budget_factor or 1.0, r.seed))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(_csv_row(r))
    atomic_write_text(path, buf.getvalue())


_HOW_TO_READ = [
    "**How to read the tables.** Test accuracy (%) in the layout of Kaddour et al. (2022), "
    "Table 2: the baseline's mean ± the half-width of its 95 % confidence interval over "
    "seeds, then each method's difference to the baseline: mean ± 95 % CI of the per-seed "
    "differences (paired by seed: same initialisation and batch order; Student's t). `*`: "
    "paired t-test p < 0.05 after Holm's correction over every cell of the headline table; "
    "`=`: the difference is identical on every seed (no variance, not tested). `Test n` is "
    "the number of test samples and, in brackets, how many points of accuracy one sample "
    "is: a difference below that is noise.",
    "",
    "Model selection: the **final epoch** (for SWA, SWA-LR and WASAM the averaged weights, "
    "BatchNorm statistics recomputed on the training set). Every method trains for the same "
    "number of epochs. SWA and WASAM follow Kaddour et al. (Alg. 1-2): the average of the "
    "baseline's and SAM's own iterates under the task's schedule, read from the same runs; "
    "SWA-LR follows Izmailov et al. (Alg. 1): a constant SWA learning rate from the start. "
    "(Best-validation-epoch tables are not reported: the averages exist only from their "
    "start, so such a table would compare averaged with non-averaged weights.)",
    "",
]


def _strings(value: object) -> list[str]:
    """A list of names from the metadata (``[]`` if absent)."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _report_methods(records: Sequence[MethodResult], meta: Meta) -> tuple[list[str], list[str]]:
    """The headline methods (registry order, baseline first) and the cheap variants."""
    methods = _strings(meta.get("methods")) or list(dict.fromkeys(r.method for r in records))
    variants = [v for v in _strings(meta.get("variants")) if v not in methods]
    extra = meta.get("extra_methods")
    extras = [m for ms in extra.values() for m in ms] if isinstance(extra, Mapping) else []
    # Methods run on some tasks only (ASAM on the vision tasks, say) join the headline table, in
    # the registry's order (baseline, swa, swa-lr, sam, asam, wasam, ...).
    methods += [m for m in dict.fromkeys(extras) if m not in methods and m not in variants]
    methods.sort(key=_registry_index)
    return methods, variants


def _intro(
    meta: Meta, records: Sequence[MethodResult], rows: Sequence[TaskRow], methods: Sequence[str],
    variants: Sequence[str],
) -> list[str]:  # fmt: skip
    """The title, what was run, how to read the tables and how hyper-parameters were chosen."""
    ok = [r for r in records if r.ok]
    seeds = sorted({r.seed for r in ok})
    task_budgets = meta.get("task_budgets")
    pairs = task_budgets.items() if isinstance(task_budgets, Mapping) else ()
    budgets = ", ".join(f"{t} (`{b}`)" for t, b in pairs)
    lines = ["# flatmin benchmark report", ""]
    lines += [
        f"Suite `{meta.get('suite') or 'custom'}`, `{meta.get('budget', '?')}` budgets"
        + (f" except {budgets}" if budgets else "")
        + f"; {len(rows)} tasks × {len(methods)} methods"
        + (f" (+ {len(variants)} cheap SAM variants on some tasks)" if variants else "")
        + f" × {len(seeds)} evaluation seeds ({', '.join(map(str, seeds))}); "
        f"{len(ok)} of {len(records)} results finished.",
        "",
        *_HOW_TO_READ,
    ]
    if meta.get("tune") and meta.get("tuning"):
        lines += [str(meta["tuning"]), ""]
    elif meta.get("hyper_source"):
        lines += [f"Hyper-parameters: fixed per task — {meta['hyper_source']}.", ""]
    else:
        lines += ["Hyper-parameters: the methods' defaults (no validation grid).", ""]
    return lines


def _accuracy_sections(
    rows: Sequence[TaskRow], variant_rows: Sequence[TaskRow], methods: Sequence[str],
    variants: Sequence[str],
) -> list[str]:  # fmt: skip
    """The headline tables, their summary, memorisation and the cheap variants."""
    lines = ["## Test accuracy (final epoch)", "", *accuracy_tables(rows, methods)]
    lines += [
        "### Summary",
        "",
        "Tasks on which each method's mean difference to the baseline is positive / negative "
        "(in brackets: significant after Holm), and the unweighted mean and median difference "
        "over tasks (points).",
        "",
        *summary_table(rows, methods),
        "",
    ]
    if any(r.fit.get("baseline", (None, None))[1] is not None for r in rows):
        lines += [
            "## Memorisation (label-noise tasks)",
            "",
            "Final reported weights, mean over seeds (%). Train accuracy on the noisy labels "
            "the model was trained on, on the true labels of the same images, and the share of "
            "flipped labels the model reproduces (100 % = the noise is memorised). A model that "
            "ignores the noise has a low share and a high accuracy on the true labels.",
            "",
            *_fit_table(rows, methods),
            "",
        ]
    if variant_rows and variants:
        lines += [
            "## Cheap SAM variants (label-noise tasks)",
            "",
            "Wall time of a run relative to the baseline's, its difference to the baseline, "
            "SAM's, and the share of SAM's gain it keeps ((variant − baseline) / (SAM − "
            "baseline); pooled: the sum of the mean differences over tasks). Variants use SAM's "
            "rho; LookSAM's alpha is tuned. `*`: p < 0.05 after Holm's correction over the "
            "headline cells and the variants' cells together.",
            "",
            *_variant_table(variant_rows, variants),
            "",
        ]
    return lines


def _cost_and_choice_sections(
    summary: ReportData, rows: Sequence[TaskRow], all_methods: Sequence[str]
) -> list[str]:
    """Wall-clock cost, the chosen hyper-parameters, and how they were chosen."""
    lines = [
        "## Relative wall-clock cost",
        "",
        "Mean wall time of a run relative to the baseline's on the same task (training, "
        "evaluation and BN recomputation included). SWA and WASAM are read from the baseline's "
        "and SAM's runs, which also keep their averages, so they show those runs' cost.",
        "",
        *_cost_table(rows, all_methods),
        "",
    ]
    tasks = list(dict.fromkeys(r.task for r in summary.records))
    lines += [
        "## Chosen hyper-parameters",
        "",
        *_hyper_table(summary.hypers, tasks, all_methods),
        "",
    ]
    if summary.tuning:
        lines += ["## Validation grids", "", *_tuning_table(summary.tuning), ""]
    if summary.searches:
        lines += ["## Optuna searches", "", *_search_table(summary.searches), ""]
    return lines


def _pvalue_sections(
    records: Sequence[MethodResult], rows: Sequence[TaskRow], variant_rows: Sequence[TaskRow],
    methods: Sequence[str], variants: Sequence[str],
) -> list[str]:  # fmt: skip
    """The tasks' recipes and the p-values of both Holm families."""
    lines = [
        "## Tasks and budgets",
        "",
        "Split sizes are samples (labelled nodes for node classification).",
        "",
        *_task_table(records),
        "",
        "## p-values",
        "",
        "Headline methods; Holm over every tested cell of the headline table (the `*` above). "
        "MDE: the minimum detectable effect (points), the true mean difference that a "
        "two-sided paired t-test at α = 0.05 (before Holm) detects with 80 % power given the "
        "cell's n seeds and the observed sd of its paired differences (exact noncentral t, "
        "`flatmin.bench.stats.min_detectable_effect`); a difference well below it is "
        "inconclusive, not absent.",
        "",
        *_pvalue_table(rows, methods),
        "",
    ]
    if variant_rows and variants:
        lines += [
            "Cheap SAM variants; Holm over the headline cells and the variants' cells together "
            "(the `*` of the variants table).",
            "",
            *_pvalue_table(variant_rows, variants),
            "",
        ]
    return lines


def _map_sections(
    out: Path, rows: Sequence[TaskRow], hypers: Mapping[tuple[str, str], Hyper],
    methods: Sequence[str], figures: bool,
) -> list[str]:  # fmt: skip
    """The noise × budget maps of tasks sharing a base (:mod:`flatmin.bench.noise_map`)."""
    maps = noise_maps([r.task for r in rows])
    if not maps:
        return []
    by_task = {r.task: r for r in rows}
    lines = [
        "## When do flat minima help? (label noise × budget)",
        "",
        "Each cell is a task of its own, tuned on its own validation data. Mean test-accuracy "
        "gain over the baseline (points; `*`: Holm p < 0.05 in the headline family) and, in "
        "brackets, the share of flipped training labels reproduced (%) by the baseline → the "
        "method. Then the chosen rho per cell: does the best rho grow with noise and budget?",
        "",
    ]
    for nm in maps:
        lines += map_lines(nm, by_task, hypers, methods)
    if figures:
        names = write_map_figures(out, maps, by_task, hypers, methods)
        lines += [*(f"![{n}]({n})" for n in names), ""]
    return lines


def _failed_runs(summary: ReportData) -> list[str]:
    """Every result and tuning run that is not ``ok``."""
    bad: list[tuple[str | None, str | None, int | None, str, str, str | None]] = [
        (r.task, r.method, r.seed, r.record.stage, r.status, r.reason)
        for r in [*summary.records, *summary.ablation]
        if not r.ok
    ]
    bad += [
        (r.task, r.method, r.seed, r.stage, r.status, r.reason)
        for r in summary.tune_records
        if r.status != "ok"
    ]
    if not bad:
        return []
    lines = ["## Failed runs", ""]
    for task, method, seed, stage, status, reason in bad:
        where = " (validation grid)" if stage == "tune" else ""
        lines.append(f"- {task} / {method} / seed {seed}{where}: {status} — {reason}")
    return [*lines, ""]


def write_report(
    out: str | os.PathLike[str],
    summary: ReportData,
    *,
    meta: Meta | None = None,
    figures: bool = True,
) -> Path:
    """Write ``report.md``, ``results.csv`` and the figures into ``out``.

    Args:
        out: output directory.
        summary: a :class:`~flatmin.bench.runner.GridSummary` (results, tuning, hypers,
            ablation, flatness).
        meta: the grid's options (suite, budget, seeds, ...), shown at the top.
        figures: draw the PNG figures (needs matplotlib).

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    records = list(summary.records)
    methods, variants = _report_methods(records, meta)
    rows = summarize([r for r in records if r.method in methods], methods)
    variant_rows = summarize(records, [*methods, *variants]) if variants else []
    write_csv(out / "results.csv", [*records, *summary.ablation])
    lines = _intro(meta, records, rows, methods, variants)
    lines += _accuracy_sections(rows, variant_rows, methods, variants)
    lines += _map_sections(out, rows, summary.hypers, methods, figures)
    if summary.ablation:
        lines += ["## Budget ablation", "", *_ablation_table(summary.ablation, records), ""]
    if summary.flatness:
        lines += ["## Flatness of the solutions", "", *flatness_lines(summary.flatness), ""]
    lines += _cost_and_choice_sections(summary, variant_rows or rows, [*methods, *variants])
    lines += _pvalue_sections(records, rows, variant_rows, methods, variants)
    lines += _failed_runs(summary)
    if figures and any(r.ok for r in records):
        names = report_figures(
            out, rows, [r.to_dict() for r in records], methods,
            [r.to_dict() for r in summary.ablation],
        )  # fmt: skip
        if names:
            lines += ["## Figures", ""] + [f"![{n}]({n})" for n in names] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
