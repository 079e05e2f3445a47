"""The benchmark's protocol: which runs to train, and how hyper-parameters are chosen.

Tuning (a validation grid that cannot miss):

1. Every method with grids (:class:`~flatmin.bench.methods.Grid`) is trained at every grid point
   with each of the **tuning seeds** (disjoint from the evaluation seeds). Views of a shared
   trajectory cost nothing extra: SWA's ``start`` is read from the baseline's runs, WASAM's
   ``(rho, start)`` from SAM's runs.
2. A point's score is the **mean** final validation accuracy over the tuning seeds (a point with a
   failed seed — a non-finite loss — is not eligible: an unstable value must not win on a lucky
   seed). The best score wins; an exact tie goes to the method's default, then to the smaller
   values.
3. When the chosen value of an extendable grid (``rho``) is its first or last value, the grid is
   extended by one geometric step beyond it and step 1-2 repeat, at most
   :data:`~flatmin.bench.methods.MAX_EXTENSIONS` times per grid; a value still on an edge after
   that is reported as such.
4. Hyper-parameters taken from another method (``tuned_by``: the SAM variants use SAM's ``rho``)
   are planned once that method's choice is final.

Everything here is a pure function of the configuration and the records found so far, so a
resumed grid replays the same choices (:func:`plan_tuning` is called in rounds by the runner
until it asks for no new run).

Evaluation: each method at its chosen hyper-parameters and every evaluation seed; methods that are
views of one trajectory (baseline/swa, sam/wasam at the same rho) share one run (:func:`plan_eval`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flatmin.bench.methods import (
    MAX_EXTENSIONS,
    START_GRID,
    Hyper,
    Method,
    get_method,
    start_epoch,
)
from flatmin.bench.train import RunSpec, average_key
from flatmin.tasks import Task

__all__ = [
    "GridState",
    "TuneChoice",
    "TuningPlan",
    "eval_trajectory",
    "free_params",
    "method_result",
    "method_score",
    "plan_eval",
    "plan_tuning",
    "tuned_methods",
]

GridState = dict[tuple[str, str, str], tuple[float, ...]]
"""Current grid values by ``(task, trajectory method, hyper-parameter)`` (after extensions)."""


class Grid(Protocol):
    """What :func:`plan_tuning` needs of the benchmark configuration."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks."""
        ...

    @property
    def tune_seeds(self) -> tuple[int, ...]:
        """The tuning seeds."""
        ...

    @property
    def epochs(self) -> int | None:
        """The epoch override."""
        ...

    @property
    def grids(self) -> Mapping[str, Mapping[str, tuple[float, ...]]]:
        """Initial grid values replacing the methods' own, by trajectory method and parameter."""
        ...

    def methods_of(self, task: str) -> tuple[str, ...]:
        """The methods run on ``task``."""
        ...

    def budget_of(self, task: str) -> str:
        """The budget of ``task``'s runs."""
        ...

    @property
    def device(self) -> str:
        """Where the runs compute."""
        ...

    @property
    def precision(self) -> str:
        """The runs' precision."""
        ...


@dataclass(frozen=True)
class TuneChoice:
    """The validation grid of one method on one task and what it chose.

    Attributes:
        task, method: e.g. ``("digits-noisy40", "wasam")``.
        params: the tuned hyper-parameters, e.g. ``("rho", "start")``.
        points: the grid points (one value per param), extensions included.
        scores: mean final validation accuracy over the tuning seeds per point (``None``: a seed
            failed or is missing).
        per_seed: the validation accuracy of every tuning seed per point.
        chosen: the selected point.
        fixed: hyper-parameters taken from other methods (``tuned_by``).
        extended: extensions made, e.g. ``("rho 1 -> 2",)``.
        at_edge: params whose chosen value is still on an end of an extendable grid after the
            last extension.
    """

    task: str
    method: str
    params: tuple[str, ...]
    points: tuple[tuple[float, ...], ...]
    scores: tuple[float | None, ...]
    per_seed: tuple[tuple[float | None, ...], ...]
    chosen: tuple[float, ...]
    fixed: Hyper = field(default_factory=Hyper)
    extended: tuple[str, ...] = ()
    at_edge: tuple[str, ...] = ()

    @property
    def hyper(self) -> Hyper:
        """The chosen hyper-parameters (with the fixed ones)."""
        return get_method(self.method).resolve(
            self.fixed, **dict(zip(self.params, self.chosen, strict=True))
        )


@dataclass
class TuningPlan:
    """One round of :func:`plan_tuning`.

    Attributes:
        specs: every tuning run this round needs (found or not).
        choices: final choices by ``(task, method)``.
        state: the grids after this round's extensions.
        pending: methods whose choice is not final yet (runs missing, an extension, or waiting for
            another method's choice).
    """

    specs: list[RunSpec]
    choices: dict[tuple[str, str], TuneChoice]
    state: GridState
    pending: list[tuple[str, str]]


def free_params(method: Method) -> tuple[str, ...]:
    """Hyper-parameters a method reads from a trajectory run instead of training for each value.

    An averaged view of a trajectory that keeps averages (swa, wasam) reads every ``start`` of
    :data:`~flatmin.bench.methods.START_GRID` from the same run.
    """
    view = method.averaged and not method.is_trajectory
    return ("start",) if view and get_method(method.trajectory).keeps_averages else ()


def tuned_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` plus the owners they take hyper-parameters from, ordered by depth.

    Methods that take nothing from others come first, then those that take from them, and so on.
    """
    order: list[str] = []
    depth: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"Invalid tuned_by cycle: {' -> '.join((*path, name))}")
        owners = [o for o in get_method(name).tuned_by.values() if o != name]
        for owner in owners:
            visit(owner, (*path, name))
        depth[name] = 1 + max((depth[o] for o in owners), default=-1)
        order.append(name)

    for name in methods:
        visit(name, ())
    return sorted(order, key=lambda n: depth[n])


def eval_trajectory(method: Method, hyper: Hyper) -> tuple[str, Hyper]:
    """The trajectory run (method name, hyper-parameters) that a method's result is read from."""
    free = free_params(method)
    traj = get_method(method.trajectory)
    if free and hyper.start is not None and hyper.start not in START_GRID:
        raise ValueError(
            f"Invalid start: {hyper.start} for {method.name!r} (a view reads the averages of "
            f"its trajectory, kept at starts {START_GRID})"
        )
    return method.trajectory, traj.resolve(hyper.without(*free))


def method_score(record: Mapping[str, Any] | None, method: Method, hyper: Hyper) -> float | None:
    """Final validation accuracy of ``method``'s reported weights in a trajectory ``record``."""
    if record is None or record.get("status") != "ok":
        return None
    block: Any = record.get("final")
    if free_params(method):
        block = (record.get("averages") or {}).get(average_key(hyper.start))  # type: ignore[arg-type]
    if not isinstance(block, Mapping):
        return None
    value = block.get("val_acc")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def method_result(record: Mapping[str, Any], method: str, hyper: Hyper) -> dict[str, Any]:
    """A method's result read from its trajectory's record.

    For a trajectory the record itself (with ``method`` and ``hyper`` of the method); for a view
    (swa, wasam) the average from its ``start``: ``final`` becomes that average's metrics (with
    ``live_test_acc`` the trajectory's final test accuracy) and ``trajectory`` names the run.
    """
    m = get_method(method)
    out = dict(record)
    out["method"] = method
    out["trajectory"] = record.get("method")
    out["hyper"] = hyper.as_dict()
    start = hyper.start
    if free_params(m) and start is not None and record.get("status") == "ok":
        avg = (record.get("averages") or {}).get(average_key(start))
        if avg is None:
            out["status"] = "error"
            out["reason"] = f"no average from start {start} in run {record.get('hash')}"
        else:
            live = record.get("final", {}).get("test_acc")
            out["final"] = {**avg, "live_test_acc": live}
            out["averaging_start_epoch"] = start_epoch(start, int(record["epochs_planned"]))
    out.pop("averages", None)
    return out


def _initial(cfg: Grid, method: Method, param: str) -> tuple[float, ...]:
    """The grid ``param`` of ``method`` starts from: the configuration's, else the method's.

    Keyed by the trajectory, so that the views of one trajectory (sam and wasam) search the same
    values; the averaging ``start`` of a view is read from its trajectory and keeps its grid.
    """
    if param in free_params(method):
        return method.grids[param].values
    return cfg.grids.get(method.trajectory, {}).get(param, method.grids[param].values)


def _grid_values(
    state: GridState, cfg: Grid, task: str, method: Method, param: str
) -> tuple[float, ...]:
    key = (task, method.trajectory, param)
    return state.get(key, _initial(cfg, method, param))


def _extensions(values: tuple[float, ...], original: tuple[float, ...]) -> int:
    return sum(v not in original for v in values)


def _seed_scores(
    cfg: Grid, task: str, m: Method, fixed: Hyper, points: list[tuple[float, ...]],
    need: Callable[[RunSpec], Mapping[str, Any] | None],
) -> tuple[list[tuple[float | None, ...]], bool]:  # fmt: skip
    """Each point's validation score per tuning seed, and whether every run is recorded."""
    params = tuple(m.grids)
    complete = True
    per_seed: list[tuple[float | None, ...]] = []
    for point in points:
        hyper = m.resolve(fixed, **dict(zip(params, point, strict=True)))
        traj_name, traj_hyper = eval_trajectory(m, hyper)
        seeds = []
        for seed in cfg.tune_seeds:
            spec = RunSpec(
                task, traj_name, seed, cfg.budget_of(task), traj_hyper, cfg.epochs,
                stage="tune", device=cfg.device, precision=cfg.precision,
            )  # fmt: skip
            rec = need(spec)
            complete &= rec is not None
            seeds.append(method_score(rec, m, hyper))
        per_seed.append(tuple(seeds))
    return per_seed, complete


def _select(
    m: Method, points: list[tuple[float, ...]], per_seed: list[tuple[float | None, ...]]
) -> tuple[list[float | None], tuple[float, ...], bool]:
    """Mean scores over seeds (``None`` if a seed failed), the chosen point, any eligible."""
    scores: list[float | None] = []
    for s in per_seed:
        vals = [v for v in s if v is not None]
        scores.append(sum(vals) / len(vals) if len(vals) == len(s) else None)
    default = tuple(getattr(m.defaults, p) for p in m.grids)
    eligible = [(sc, pt) for sc, pt in zip(scores, points, strict=True) if sc is not None]
    if not eligible:
        return scores, default, False
    top = max(sc for sc, _ in eligible)
    winners = sorted(pt for sc, pt in eligible if sc == top)
    return scores, (default if default in winners else winners[0]), True


def _extend(
    cfg: Grid, m: Method, task: str, values: Mapping[str, tuple[float, ...]],
    chosen: tuple[float, ...], new_state: GridState,
) -> tuple[list[str], bool]:  # fmt: skip
    """Grow the grids whose chosen value is on an edge; (params still at an edge, grew)."""
    at_edge = []
    grew = False
    free = free_params(m)
    for i, p in enumerate(m.grids):
        grid = m.grids[p]
        if p in free or not grid.extend:
            continue
        current = values[p]
        for end, edge in (("low", current[0]), ("high", current[-1])):
            if chosen[i] != edge:
                continue
            if _extensions(current, _initial(cfg, m, p)) >= MAX_EXTENSIONS:
                at_edge.append(p)
                continue
            new = grid.step_beyond(current, end)
            grown = tuple(sorted({*current, new}))
            key = (task, m.trajectory, p)
            new_state[key] = tuple(sorted({*new_state.get(key, current), *grown}))
            grew = True
    return at_edge, grew


def _added(cfg: Grid, m: Method, values: Mapping[str, tuple[float, ...]]) -> tuple[str, ...]:
    """The values added to each grid so far (``"rho: 0.0032, 0.008"``)."""
    out = []
    for p in m.grids:
        added = [v for v in values[p] if v not in _initial(cfg, m, p)]
        if added:
            out.append(f"{p}: " + ", ".join(f"{v:g}" for v in added))
    return tuple(out)


def plan_tuning(
    cfg: Grid,
    state: GridState,
    records: Mapping[str, Mapping[str, Any]],
    task_of: Mapping[str, Task],
) -> TuningPlan:
    """One round of tuning: the runs needed now, the final choices, and extended grids.

    Args:
        cfg: tasks, methods, tuning seeds, budgets and epoch override.
        state: the grids so far (``{}`` at the start).
        records: the records found so far, by configuration hash.
        task_of: task records by name (for the hashes).

    Returns:
        A :class:`TuningPlan`. The runner trains the missing ``specs``, then calls again with
        ``plan.state``, until no spec is missing and the state stops changing.
    """
    specs: list[RunSpec] = []
    seen: set[str] = set()
    choices: dict[tuple[str, str], TuneChoice] = {}
    pending: list[tuple[str, str]] = []
    new_state: GridState = dict(state)

    def need(spec: RunSpec) -> Mapping[str, Any] | None:
        h = spec.config_hash(task_of[spec.task])
        if h not in seen:
            seen.add(h)
            specs.append(spec)
        return records.get(h)

    for task in cfg.tasks:
        extended_now: set[str] = set()  # trajectories whose grid grew this round
        for name in tuned_methods(cfg.methods_of(task)):
            m = get_method(name)
            owners = {p: o for p, o in m.tuned_by.items() if o != name}
            if any((task, o) not in choices for o in owners.values()) or any(
                get_method(o).trajectory in extended_now for o in owners.values()
            ):
                pending.append((task, name))
                continue
            fixed = m.resolve(
                None, **{p: getattr(choices[(task, o)].hyper, p) for p, o in owners.items()}
            ).without(*m.grids)
            params = tuple(m.grids)
            if not params:
                choices[(task, name)] = TuneChoice(task, name, (), ((),), (None,), ((),), (), fixed)
                continue
            free = free_params(m)
            values = {
                p: (m.grids[p].values if p in free else _grid_values(new_state, cfg, task, m, p))
                for p in params
            }
            points = list(itertools.product(*(values[p] for p in params)))
            per_seed, complete = _seed_scores(cfg, task, m, fixed, points, need)
            if not complete:
                pending.append((task, name))
                continue
            scores, chosen, any_eligible = _select(m, points, per_seed)
            at_edge, grew = (
                _extend(cfg, m, task, values, chosen, new_state) if any_eligible else ([], False)
            )
            if grew:
                extended_now.add(m.trajectory)
                pending.append((task, name))
                continue
            choices[(task, name)] = TuneChoice(
                task, name, params, tuple(points), tuple(scores), tuple(per_seed), chosen, fixed,
                _added(cfg, m, values), tuple(at_edge),
            )  # fmt: skip
        # A method whose trajectory grid grew this round must be re-chosen next round, even if
        # its own choice sat inside the grid (the new point may beat it).
        for name in tuned_methods(cfg.methods_of(task)):
            m = get_method(name)
            if (task, name) in choices and m.grids and m.trajectory in extended_now:
                del choices[(task, name)]
                pending.append((task, name))
    return TuningPlan(specs, choices, new_state, pending)


def plan_eval(
    tasks: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    hypers: Mapping[tuple[str, str], Hyper],
    budget_of: Any,
    epochs: int | None = None,
    stage: str = "eval",
    *,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[tuple[str, str, int], RunSpec]:
    """The trajectory run that gives each ``(task, method, seed)`` its result.

    Views of one trajectory at the same hyper-parameters map to the same spec (baseline and swa;
    sam and wasam when WASAM chose SAM's rho), so it is trained once. Every spec runs on
    ``device`` at ``precision``.
    """
    out = {}
    for task in tasks:
        for seed in seeds:
            for name in methods:
                m = get_method(name)
                traj, hyper = eval_trajectory(m, hypers.get((task, name), m.resolve()))
                out[(task, name, seed)] = RunSpec(
                    task, traj, seed, budget_of(task), hyper, epochs, stage=stage,
                    device=device, precision=precision,
                )  # fmt: skip
    return out
