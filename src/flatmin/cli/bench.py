"""``flatmin bench``: run (or resume) a grid of tasks × methods × seeds and write its report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flatmin.cli._common import (
    TASK_HELP,
    THREADS,
    Subparsers,
    add_log_option,
    add_scale_options,
    error,
    open_log,
    out_dir_problem,
    real,
    resolve_device,
)

EXIT_CODES = (
    "Exit codes: 0 ok (runs that end 'failed' with a non-finite loss are results, listed in the "
    "report); 1 a run raised an exception, no run finished, a dataset is unavailable, or another "
    "bench holds OUT; 2 bad arguments (unknown task/method/suite: the message lists the valid "
    "names); 130/143 interrupted by SIGINT/SIGTERM (finished runs are kept: rerun to resume)."
)


def add_parser(sub: Subparsers) -> None:
    """Register ``flatmin bench``."""
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (tasks × methods × seeds) and write its report",
        description="Run (or resume) a grid of tasks × methods × seeds; finished runs are kept "
        "in OUT/results.jsonl and skipped on a rerun. Writes OUT/report.md, results.csv, figures.",
        epilog=EXIT_CODES,
    )
    _add_grid_options(p)
    _add_executor_options(p)
    flag = argparse.BooleanOptionalAction
    p.add_argument("--epochs", type=int, metavar="N", help="override every task's epoch budget")
    p.add_argument("--progress", action=flag, default=True, help="progress bars on stderr")
    p.add_argument(
        "--report-only", action=flag, default=False, help="only rewrite the report from OUT"
    )
    add_scale_options(p, defaults="the suite's: cpu and fp32 for quick and full")
    add_log_option(p)
    p.set_defaults(handler=run)


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """What runs: suite, tasks, methods, seeds, tuning, ablation, flatness study, output."""
    p.add_argument("--suite", default="quick", help="quick (default) or full")
    p.add_argument(
        "--tasks", nargs="+", metavar="TASK", help=f"override the suite's tasks: {TASK_HELP}"
    )
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="override the suite's methods")
    p.add_argument("--seeds", type=int, metavar="N", help="evaluation seeds 0..N-1")
    p.add_argument(
        "--tune-seeds", type=int, metavar="N", help="tuning seeds 100..100+N-1 (suite: 2)"
    )
    p.add_argument(
        "--tuner", choices=("grid", "optuna"), help="validation grid (default) or Optuna search"
    )
    p.add_argument(
        "--tune-trials", type=int, metavar="N", help="finished trials per Optuna search (12)"
    )
    p.add_argument(
        "--tune", action=argparse.BooleanOptionalAction, default=None,
        help="choose hyper-parameters on validation data",
    )  # fmt: skip
    p.add_argument(
        "--ablation-task", metavar="TASK",
        help="also train TASK (a name or package.module:attr) at 0.5x and 2x its epoch budget",
    )  # fmt: skip
    p.add_argument(
        "--analysis-task", metavar="TASK", help="measure the flatness of TASK's first-seed models"
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/SUITE)")


def _add_executor_options(p: argparse.ArgumentParser) -> None:
    """Where the runs go: worker processes or Ray, and what each reserves."""
    p.add_argument("--jobs", type=int, metavar="N", help="parallel worker processes (suite: 2)")
    p.add_argument("--threads", type=THREADS, default=1, metavar="N", help="torch threads per run")
    p.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="local (default): --jobs processes on this machine; ray: one Ray task per run "
        "(pip install 'flatmin[ray]')",
    )  # fmt: skip
    p.add_argument(
        "--ray-address", metavar="ADDR",
        help="Ray cluster to run on ('auto': the one `ray start` started here; default: "
        "$RAY_ADDRESS, else a local Ray instance with --jobs x --cpus-per-run CPUs)",
    )  # fmt: skip
    p.add_argument(
        "--cpus-per-run", type=real(0, strict_low=True), metavar="C",
        help="CPUs a Ray task reserves (default: --threads)",
    )  # fmt: skip
    p.add_argument(
        "--gpus-per-run", type=real(0), metavar="G", help="GPUs a Ray task reserves (default: 0)"
    )


def _tuner(args: argparse.Namespace) -> Any:
    """``--tuner`` as the BenchConfig's tuner (``None``: the suite's grid, the default)."""
    if args.tuner == "optuna":  # its trials run on the grid's executor: one per --jobs worker
        from flatmin.tune.bench import OptunaTuner

        trials = 12 if args.tune_trials is None else args.tune_trials
        return OptunaTuner(trials=trials, batch=args.jobs or 1)
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``flatmin bench``: 1 if a run raised an exception or no run finished."""
    from flatmin import bench
    from flatmin.bench.execute import OutputLockedError
    from flatmin.data import DataUnavailableError

    tune_seeds = None if args.tune_seeds is None else tuple(range(100, 100 + args.tune_seeds))
    try:
        suite = bench.get_suite(args.suite)
        device = str(resolve_device(args.device or suite.device))
        cfg = bench.BenchConfig.from_suite(
            suite, Path(args.out or f"runs/{suite.name}"),
            tasks=tuple(args.tasks) if args.tasks else None,
            methods=tuple(args.methods) if args.methods else None,
            seeds=None if args.seeds is None else tuple(range(args.seeds)),
            tune_seeds=tune_seeds, tuner=_tuner(args),
            ablation_task=args.ablation_task,
            analysis_task=args.analysis_task,
            jobs=args.jobs, threads=args.threads, tune=args.tune, epochs=args.epochs,
            executor=args.executor, ray_address=args.ray_address,
            cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
            progress=args.progress, run=not args.report_only, device=device,
            precision=args.precision,
        )  # fmt: skip
        cfg.validate()
        logger = open_log(args)
    except ValueError as exc:
        return error(args, exc)
    problem = out_dir_problem("--out", cfg.out)
    if problem:
        return error(args, problem)
    # Live curves: each run is logged as its record arrives, whichever executor trained it.
    on_record = None if logger is None else logger.log_record
    try:
        summary = bench.run_grid(cfg, on_record=on_record)
    except ValueError as exc:  # a Ray cluster that cannot be reached or host a run
        return error(args, exc)
    except (DataUnavailableError, OutputLockedError, OSError) as exc:
        return error(args, exc, 1)
    finally:
        if logger is not None:
            logger.close()
    report = cfg.out / "report.md"
    print(
        f"{summary.planned} runs: {summary.ran} trained, {summary.skipped} already done, "
        f"{summary.failed} not ok; {summary.wall_time:.0f} s. Report: {report}"
    )
    if report.exists():
        text = report.read_text()
        start = text.find("## Test accuracy (final epoch)")
        end = text.find("\n## ", start + 1)
        print("\n" + text[start : end if end > 0 else None].strip())
    errors = [r for r in [*summary.records, *summary.tune_records] if r.status == "error"]
    ok = [r for r in summary.records if r.status == "ok"]
    return 1 if errors or not ok else 0
