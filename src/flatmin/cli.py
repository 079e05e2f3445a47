"""Command-line front end: ``flatmin bench | train | tune | landscape | sharpness | data | tasks``.

Every subcommand is a function ``_cmd_<name>(args) -> int`` registered in :func:`build_parser`.
Exit codes: 0 success, 1 a run or check failed, 2 bad arguments (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """Build the argparse parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(prog="flatmin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench_parsers(sub)
    _add_data_parser(sub)
    _add_tasks_parser(sub)
    _add_tune_parser(sub)
    return parser


# --- data: list | fetch NAME... | verify ---------------------------------------------------


def _add_data_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("data", help="list, fetch and verify the benchmark datasets")
    p.add_argument(
        "--cache-dir", default=None, help="cache directory (default: $FLATMIN_DATA or user cache)"
    )
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="list the known datasets and whether they are cached")
    fetch = actions.add_parser("fetch", help="fetch datasets into the cache")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="dataset names (default: all)")
    fetch.add_argument(
        "--force", action=argparse.BooleanOptionalAction, default=False, help="refetch"
    )
    verify = actions.add_parser("verify", help="check the sha256 of every cached file")
    verify.add_argument("names", nargs="*", metavar="NAME", help="dataset names (default: all)")
    p.set_defaults(handler=_cmd_data)


def _cmd_data(args: argparse.Namespace) -> int:
    from flatmin import data

    if args.data_command == "list":
        rows = [("name", "domain", "cached", "size", "source")]
        for info in data.list_datasets():
            status = data.verify(info.name, cache_dir=args.cache_dir)
            size = f"{status.nbytes / 1e6:.1f} MB" if status.ok else "-"
            rows.append((info.name, info.domain, status.state, size, info.sources[0].describe()))
        _print_table(rows)
        return 0
    names = args.names or data.dataset_names()
    failed = 0
    for name in names:
        if name not in data.dataset_names():
            print(f"error: {data.unknown_dataset_message(name)}", file=sys.stderr)
            return 2
        if args.data_command == "fetch":
            try:
                res = data.fetch(name, cache_dir=args.cache_dir, force=args.force)
            except data.DataUnavailableError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(
                f"{name}: {res.nbytes / 1e6:.1f} MB from {res.source} in {res.seconds:.1f} s"
                f" -> {res.directory}"
            )
        else:
            status = data.verify(name, cache_dir=args.cache_dir)
            print(f"{name}: {status.state}" + "".join(f"\n  {m}" for m in status.problems))
            failed += status.state == "corrupt"
    return 1 if failed else 0


# --- tasks ----------------------------------------------------------------------------------------


def _add_tasks_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tasks", help="list the benchmark tasks and their default recipes")
    p.add_argument("--budget", choices=("quick", "full"), default="quick")
    p.set_defaults(handler=_cmd_tasks)


def _cmd_tasks(args: argparse.Namespace) -> int:
    from flatmin import tasks

    rows = [("task", "domain", "dataset", "model", "optim", "lr", "wd", "bs", "epochs", "sched")]
    for name in tasks.list_tasks():
        t = tasks.get_task(name)
        r = t.recipe(args.budget)
        rows.append(
            (name, t.domain, t.dataset, t.model, r.optimizer, f"{r.lr:g}", f"{r.weight_decay:g}",
             str(r.batch_size), str(r.epochs), r.schedule)
        )  # fmt: skip
    _print_table(rows)
    print("\nlabel-noise variants: append -noisyNN to a vision task (e.g. digits-noisy40)")
    return 0


# --- tune: flatmin.tune.cli owns the options and the command ------------------------------------


def _add_tune_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from flatmin.tune import cli as tune_cli

    p = sub.add_parser(
        "tune",
        help="choose a method's rho (and start) on a task with a pruned, resumable search",
        description=tune_cli.DESCRIPTION,
        epilog=tune_cli.EPILOG,
    )
    tune_cli.add_arguments(p)
    p.set_defaults(handler=tune_cli.run)


# --- bench | train | landscape | sharpness --------------------------------------------------------
# Exit codes: 0 ok; 1 a run crashed (status "error"), no run finished, or a train run ended with a
# non-finite loss; 2 bad arguments (unknown task/method/suite: the message lists the valid names).


_BENCH_EXIT = (
    "Exit codes: 0 ok (runs that end 'failed' with a non-finite loss are results, listed in the "
    "report); 1 a run raised an exception, no run finished, or a dataset is unavailable; 2 bad "
    "arguments (unknown task/method/suite: the message lists the valid names)."
)


def _add_bench_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    flag = argparse.BooleanOptionalAction
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (tasks × methods × seeds) and write its report",
        description="Run (or resume) a grid of tasks × methods × seeds; finished runs are kept "
        "in OUT/results.jsonl and skipped on a rerun. Writes OUT/report.md, results.csv, figures.",
        epilog=_BENCH_EXIT,
    )
    p.add_argument("--suite", default="quick", help="quick (default) or full")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="override the suite's tasks")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="override the suite's methods")
    p.add_argument("--seeds", type=int, metavar="N", help="evaluation seeds 0..N-1")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/SUITE)")
    p.add_argument("--jobs", type=int, metavar="N", help="parallel worker processes (suite: 2)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads per run")
    p.add_argument("--tune", action=flag, default=None, help="choose rho/start on validation")
    p.add_argument("--epochs", type=int, metavar="N", help="override every task's epoch budget")
    p.add_argument("--progress", action=flag, default=True, help="progress bars on stderr")
    p.add_argument(
        "--report-only", action=flag, default=False, help="only rewrite the report from OUT"
    )
    p.set_defaults(handler=_cmd_bench)

    t = sub.add_parser(
        "train",
        help="train one run and save a checkpoint (final and averaged weights)",
        epilog="Exit codes: 0 ok; 1 the run hit a non-finite loss; 2 bad arguments.",
    )
    t.add_argument("--task", required=True)
    t.add_argument("--method", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, metavar="DIR", help="checkpoint.pt and metrics.json")
    t.add_argument("--budget", default="quick", help="quick (default) or full")
    t.add_argument("--rho", type=float, help="SAM radius (default: the method's)")
    t.add_argument("--start", type=float, help="SWA start fraction (default: the method's)")
    t.add_argument("--epochs", type=int, metavar="N", help="override the epoch budget")
    t.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads")
    t.add_argument("--progress", action=flag, default=True, help="progress bar on stderr")
    t.set_defaults(handler=_cmd_train)

    weights = ("auto", "final", "averaged")
    la = sub.add_parser(
        "landscape", help="rays, interpolations and asymmetry of checkpoints (figures + data)"
    )
    la.add_argument("checkpoints", nargs="+", metavar="CKPT")
    la.add_argument("--task", help="task to evaluate on (default: the checkpoint's)")
    la.add_argument("--out", default="landscape", metavar="DIR")
    la.add_argument("--weights", default="auto", choices=weights)
    la.add_argument("--points", type=int, default=21)
    la.add_argument("--distance", type=float, default=1.0, help="ray half-length")
    la.add_argument("--max-batches", type=int, default=4, metavar="N")
    la.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    la.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads")
    la.set_defaults(handler=_cmd_landscape)

    sh = sub.add_parser(
        "sharpness", help="worst-case/adaptive sharpness, top Hessian eigenvalue, trace (JSON)"
    )
    sh.add_argument("checkpoint", metavar="CKPT")
    sh.add_argument("--task", help="task to evaluate on (default: the checkpoint's)")
    sh.add_argument("--weights", default="auto", choices=weights)
    sh.add_argument("--rho", type=float, default=0.05)
    sh.add_argument("--adaptive-rho", type=float, default=0.5)
    sh.add_argument("--max-batches", type=int, default=4, metavar="N")
    sh.add_argument("--hessian-iters", type=int, default=20, metavar="N")
    sh.add_argument("--trace-samples", type=int, default=20, metavar="N")
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads")
    sh.add_argument("--out", metavar="FILE", help="also write the JSON here")
    sh.set_defaults(handler=_cmd_sharpness)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # One thread per process by default: OpenMP threads spin when the cores are shared.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _error(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flatmin import bench

    try:
        suite = bench.get_suite(args.suite)
        cfg = bench.BenchConfig.from_suite(
            suite, Path(args.out or f"runs/{suite.name}"),
            tasks=tuple(args.tasks) if args.tasks else None,
            methods=tuple(args.methods) if args.methods else None,
            seeds=None if args.seeds is None else tuple(range(args.seeds)),
            jobs=args.jobs, threads=args.threads, tune=args.tune, epochs=args.epochs,
            progress=args.progress, run=not args.report_only,
        )  # fmt: skip
        cfg.validate()
    except ValueError as exc:
        return _error(exc)
    from flatmin.data import DataUnavailableError

    try:
        summary = bench.run_grid(cfg)
    except DataUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = cfg.out / "report.md"
    print(
        f"{summary.planned} runs: {summary.ran} trained, {summary.skipped} already done, "
        f"{summary.failed} not ok; {summary.wall_time:.0f} s. Report: {report}"
    )
    if report.exists():
        text = report.read_text()
        start = text.find("## Test accuracy (final epoch)")
        end = text.find("## Test accuracy (epoch of best")
        print("\n" + text[start:end].strip())
    errors = [r for r in summary.records + summary.tune_records if r.get("status") == "error"]
    ok = [r for r in summary.records if r.get("status") == "ok"]
    return 1 if errors or not ok else 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flatmin import bench
    from flatmin.bench.checkpoint import save_checkpoint
    from flatmin.tasks import get_task

    try:
        task = get_task(args.task)
        bench.get_method(args.method)
        spec = bench.RunSpec(
            args.task, args.method, args.seed, args.budget,
            bench.Hyper(rho=args.rho, start=args.start), args.epochs,
        )  # fmt: skip
        spec.config(task)  # validates the budget and the epoch override
    except ValueError as exc:
        return _error(exc)
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"{args.task} {args.method} s{args.seed}", unit="ep")

    def on_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        if bar is not None:
            bar.total = epochs
            bar.update(1)
            bar.set_postfix_str(f"test {100 * metrics['test_acc']:.2f}%")

    try:
        with _torch_threads(args.threads):
            result = bench.train(spec, task=task, on_epoch=on_epoch)
    finally:
        if bar is not None:
            bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", result)
    (out / "metrics.json").write_text(json.dumps(result.record, indent=1, sort_keys=True))
    rec = result.record
    if rec["status"] != "ok":
        print(f"{args.task} {args.method} seed {args.seed}: failed ({rec['reason']})")
        return 1
    final = rec["final"]
    print(
        f"{args.task} {args.method} seed {args.seed}: test {100 * final['test_acc']:.2f}% "
        f"(best-val epoch {rec['best_val']['epoch']}: {100 * rec['best_val']['test_acc']:.2f}%), "
        f"train {100 * final['train_acc']:.2f}%, {rec['wall_time']:.1f} s -> {out}/checkpoint.pt"
    )
    return 0


def _cmd_landscape(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flatmin.analysis import plot_path, plot_paths
    from flatmin.bench.analyze import LandscapeConfig, landscape
    from flatmin.bench.checkpoint import load_checkpoint

    try:
        cfg = LandscapeConfig(
            points=args.points, distance=args.distance, max_batches=args.max_batches,
            seed=args.seed,
        )  # fmt: skip
        ckpts = [load_checkpoint(c, task=args.task, weights=args.weights) for c in args.checkpoints]
        with _torch_threads(args.threads):
            result = landscape(ckpts, cfg)
    except (ValueError, FileNotFoundError) as exc:
        return _error(exc)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: object, name: str) -> None:
        fig.savefig(out / name, dpi=110)  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[arg-type]
        written.append(name)

    def slug(key: str) -> str:
        return key.replace("→", "_to_").replace("#", "_")

    for metric in ("loss", "error"):
        save(
            plot_paths(
                result.rays, dataset="test", metric=metric, title="random filter-normalised rays"
            ),
            f"rays_test_{metric}.png",
        )
    for label, ray in result.rays.items():
        ray.save(out / f"ray_{slug(label)}")
    for key, path in result.interpolations.items():
        path.save(out / f"interpolation_{slug(key)}")
        save(plot_path(path, title=key), f"interpolation_{slug(key)}.png")
    asym: dict[str, dict[str, Any]] = {
        key: {
            "a": r.a,
            "difference": r.difference,
            "loss": {k: v.tolist() for k, v in r.loss.items()},
        }
        for key, r in result.asymmetries.items()
    }
    (out / "asymmetry.json").write_text(json.dumps(asym, indent=1))
    if result.asymmetries:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(asym) + 2), 3.5))
        keys = list(asym)
        ax.bar(range(len(keys)), [asym[k]["difference"]["test"] for k in keys])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize="small")
        ax.set_ylabel(f"L(θ(+{cfg.a})) − L(θ(−{cfg.a})), test")
        ax.set_title("asymmetry along the interpolation lines")
        fig.tight_layout()
        save(fig, "asymmetry.png")
    print(f"{len(written)} figures and data in {out}: " + ", ".join(written))
    for key, r in asym.items():
        print(f"asymmetry {key}: test {r['difference']['test']:+.4f}")
    return 0


def _cmd_sharpness(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flatmin.bench.analyze import SharpnessConfig, sharpness_summary
    from flatmin.bench.checkpoint import load_checkpoint

    try:
        cfg = SharpnessConfig(
            rho=args.rho, adaptive_rho=args.adaptive_rho, max_batches=args.max_batches,
            hessian_iters=args.hessian_iters, trace_samples=args.trace_samples, seed=args.seed,
        )  # fmt: skip
        ckpt = load_checkpoint(args.checkpoint, task=args.task, weights=args.weights)
        with _torch_threads(args.threads):
            summary = sharpness_summary(ckpt, cfg)
    except (ValueError, FileNotFoundError) as exc:
        return _error(exc)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from flatmin import __version__

        print(__version__)
        return 0
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
