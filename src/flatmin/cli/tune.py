"""``flatmin tune``: choose a method's hyper-parameters on a task with a search.

Writes ``OUT/study.db`` (the resumable study), ``OUT/tune.json`` and ``OUT/tune.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatmin.cli._common import (
    TASK_HELP,
    Subparsers,
    add_log_option,
    add_scale_options,
    error,
    int_at_least,
    open_log,
    out_dir_problem,
    real,
    torch_threads,
)

if TYPE_CHECKING:
    from flatmin.tune.result import Score, TrialRecord, TuneResult

DESCRIPTION = (
    "Search a method's hyper-parameters (rho on a log scale; SWA's start) on a task's validation "
    "split: each trial trains seeds 100, 101, ...; trials clearly worse than the finished ones "
    "are pruned; the score is mean - X * std over the seeds. Writes OUT/tune.json, OUT/tune.png "
    "and the resumable study OUT/study.db."
)
EPILOG = (
    "Rerun the same command to resume: finished trials are kept. Exit codes: 0 ok; 1 no trial "
    "completed, a dataset is unavailable or a run raised an exception; 2 bad arguments (an "
    "unavailable --device included), OUT holds another search or a file that is not a flatmin "
    "study, or Optuna is not installed (pip install 'flatmin[tune]'); 130/143 interrupted by "
    "SIGINT/SIGTERM."
)
_POSITIVE_INT = int_at_least(1)


def _range(text: str) -> tuple[str, float, float]:
    name, sep, rest = text.partition("=")
    low, sep2, high = rest.partition(":")
    try:
        if not (sep and sep2 and name):
            raise ValueError
        return name, float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid range: {text!r} (expected NAME=LOW:HIGH)"
        ) from None


def add_parser(sub: Subparsers) -> None:
    """Register ``flatmin tune``."""
    p = sub.add_parser(
        "tune",
        help="choose a method's rho (and start) on a task with a pruned, resumable search",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    _add_options(p)
    p.set_defaults(handler=run)


def _add_options(p: argparse.ArgumentParser) -> None:
    from flatmin.tune.search import PRUNERS

    p.add_argument("--task", required=True, help=TASK_HELP)
    p.add_argument("--method", required=True, help="method whose hyper-parameters are searched")
    p.add_argument(
        "--trials", type=_POSITIVE_INT, default=12, metavar="N",
        help="finished trials the study should hold (default 12)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=real(0, strict_low=True), metavar="S",
        help="start no new trial after S seconds",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=_POSITIVE_INT, default=2, metavar="K",
        help="tuning seeds 100..100+K-1 per trial (default 2)",
    )  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="study directory (default runs/tune/TASK-METHOD)")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--budget", choices=("quick", "full"), default="quick")
    p.add_argument("--epochs", type=_POSITIVE_INT, metavar="N", help="override the epoch budget")
    p.add_argument(
        "--warmup", type=float, default=0.5, metavar="F",
        help="fraction of each seed's epochs never pruned (default 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--spread-penalty", type=float, default=1.0, metavar="X",
        help="score = mean - X * std over seeds (default 1: the worse of 2 seeds)",
    )  # fmt: skip
    p.add_argument(
        "--range", type=_range, action="append", default=[], metavar="NAME=LOW:HIGH",
        help="search range of a parameter, e.g. rho=0.01:2",
    )  # fmt: skip
    p.add_argument("--threads", type=_POSITIVE_INT, default=1, metavar="N", help="torch threads")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True,
        help="progress bar on stderr",
    )  # fmt: skip
    add_scale_options(p, defaults="cpu, fp32")
    add_log_option(p)


def _check(args: argparse.Namespace) -> tuple[dict[str, tuple[float, float]], Any]:
    """The ``--range`` values by name and the device (``ValueError``: bad arguments)."""
    from flatmin.tune.bench import bench_epochs, bench_space, check_scale, check_warmup
    from flatmin.tune.result import check_spread_penalty

    ranges: dict[str, tuple[float, float]] = {}
    for name, low, high in args.range:
        if name in ranges:
            raise ValueError(f"Invalid range: {name!r} given twice")
        ranges[name] = (low, high)
    bench_space(args.method, ranges)  # validates the method and the ranges
    bench_epochs(args.task, args.budget, args.epochs)
    check_spread_penalty(args.spread_penalty)
    check_warmup(args.warmup)
    device = check_scale(args.task, args.method, args.device or "cpu", args.precision or "fp32")
    return ranges, device


def run(args: argparse.Namespace) -> int:
    """Run ``flatmin tune`` with parsed ``args``; return the exit code.

    SIGINT and SIGTERM reach :func:`flatmin.cli.main` (exit 130 / 143): the study keeps the
    finished trials, and the same command resumes it.
    """
    from flatmin.tune.search import StudyConflictError, import_optuna

    try:
        optuna = import_optuna()
    except ImportError as exc:
        return error(args, exc)
    from flatmin.data import DataUnavailableError
    from flatmin.tune import bench as tune_bench  # suggest_hyper looked up at call time

    try:
        ranges, device = _check(args)
        logger = open_log(args)
    except ValueError as exc:
        return error(args, exc)
    # An import path's colon stays out of the default directory name (mytasks:t -> mytasks.t).
    out = Path(args.out or f"runs/tune/{args.task.replace(':', '.')}-{args.method}")
    problem = out_dir_problem("--out", out)
    if problem:
        return error(args, problem)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    t0 = time.perf_counter()
    try:
        with torch_threads(args.threads):
            hyper, result = tune_bench.suggest_hyper(
                args.task, args.method, args.budget, args.seeds, args.trials,
                pruner=args.pruner, warmup=args.warmup, epochs=args.epochs, out=out,
                timeout=args.timeout, spread_penalty=args.spread_penalty, ranges=ranges,
                progress=args.progress, device=device, precision=args.precision or "fp32",
                logger=logger,
            )  # fmt: skip
    except StudyConflictError as exc:
        return error(args, exc)
    except (DataUnavailableError, tune_bench.NoTrialCompleted) as exc:
        return error(args, exc, 1)
    finally:
        if logger is not None:
            logger.close()
    wall = time.perf_counter() - t0
    try:
        figure = _save_figure(result, out / "tune.png")
    except OSError as exc:
        return error(args, f"could not write {str(out / 'tune.png')!r}: {exc}", 1)
    best = result.best
    if best is None or best.score is None:  # pragma: no cover - suggest_hyper raised
        return 1
    _print_summary(args, result, best, best.score, wall)
    print(f"hyper-parameters: {hyper}")
    print(
        f"wrote {out / 'tune.json'}" + (f", {figure}" if figure else "") + f", {out / 'study.db'}"
    )
    return 0


def _print_summary(
    args: argparse.Namespace, result: TuneResult, best: TrialRecord, s: Score, wall: float
) -> None:
    """The best trial (``best``, its score ``s``), the trials' outcomes, the cost vs a grid's."""
    from flatmin.tune.bench import grid_size

    values = ", ".join(f"{r.final:.4f}" for r in best.runs if r.final is not None)
    params = " ".join(f"{k}={v:.4g}" for k, v in best.params.items())
    print(
        f"{args.task} {args.method}: best {params} (trial {best.number}): score {s.value:.4f} = "
        f"mean {s.mean:.4f} - {s.spread_penalty:g} x std {s.std:.4f} over seeds "
        f"{', '.join(map(str, result.seeds))} ({values})"
    )
    cost = result.cost()
    print(
        f"{len(result.trials)} trials: {result.count('complete')} complete, "
        f"{result.count('pruned')} pruned, {result.count('failed')} failed, "
        f"{result.count('interrupted')} interrupted; {cost.epochs} epochs trained in "
        f"{cost.seconds:.0f} s of training ({wall:.0f} s wall this call)"
    )
    full_s, full_e = cost.full_run_seconds, cost.full_run_epochs
    if full_s is not None and full_e is not None:
        g = grid_size(args.method)
        runs = g * len(result.seeds)
        grid_s, grid_e = runs * full_s, runs * full_e
        print(
            f"vs a grid of {g} values x {len(result.seeds)} seeds = {runs} full runs: "
            f"{grid_e} epochs, ~{grid_s:.0f} s at this search's median full run ({full_s:.1f} s); "
            f"the search trained {cost.epochs} epochs ({cost.epochs / grid_e:.2f}x), "
            f"{cost.seconds:.0f} s ({cost.seconds / grid_s:.2f}x)"
        )


def _save_figure(result: TuneResult, path: Path) -> Path | None:
    """Write the search's figure to ``path`` atomically (``None``: no matplotlib)."""
    from flatmin._io import save_figure

    try:
        from flatmin.tune.report import plot_search

        fig = plot_search(result)
    except ImportError:
        print("figure skipped: pip install 'flatmin[plot]'", file=sys.stderr)
        return None
    save_figure(fig, path, dpi=110)
    return path
