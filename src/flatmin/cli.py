"""Command-line front end: ``flatmin bench | train | tune | landscape | sharpness | data | tasks``.

Every subcommand is a function ``_cmd_<name>(args) -> int`` registered in :func:`build_parser`.
Exit codes: 0 success, 1 a run or check failed (or a result is not finite), 2 bad arguments
(argparse's convention; also a ``--device`` this machine does not have), 130 / 143 interrupted by
SIGINT / SIGTERM. Every error is one line ``flatmin <cmd>: error: ...`` on stderr, never a
traceback (``flatmin --debug <cmd>`` shows one for unexpected errors).

``bench``, ``train``, ``tune``, ``landscape`` and ``sharpness`` take ``--device`` and
``--precision`` (:mod:`flatmin.bench.device`); ``train`` also runs as several processes under
``torchrun`` (:mod:`flatmin.bench.distributed`) and resumes an interrupted run with ``--resume``.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """Build the argparse parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(prog="flatmin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench_parsers(sub)
    _add_data_parser(sub)
    _add_tasks_parser(sub)
    _add_tune_parser(sub)
    return parser


# --- argument types: a bad value is an argparse error (usage, "flatmin CMD: error: ...", exit 2)


SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; int64 keeps records portable


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} (expected an int >= {low})")
        return value

    parse.__name__ = "int"
    return parse


def _seed(text: str) -> int:
    value = _int_at_least(0)(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} (expected 0 <= seed < 2**63)")
    return value


def _real(
    low: float | None = None, high: float | None = None, *, strict_low: bool = False
) -> Callable[[str], float]:
    """A finite float in ``[low, high)`` (``(low, high)`` with ``strict_low``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if strict_low else value >= low))
        ok = ok and (high is None or value < high)
        if not ok:
            lo = "" if low is None else f"{'>' if strict_low else '>='} {low:g}"
            hi = "" if high is None else f"< {high:g}"
            raise argparse.ArgumentTypeError(
                f"{text} (expected a finite number {' and '.join(b for b in (lo, hi) if b)})"
            )
        return value

    parse.__name__ = "float"
    return parse


_THREADS = _int_at_least(1)
# flatmin.bench.device.PRECISIONS, spelled out so that building the parser does not import torch.
PRECISIONS = ("fp32", "bf16", "fp16")


def _add_scale_options(p: argparse.ArgumentParser, *, defaults: str) -> None:
    p.add_argument(
        "--device", metavar="DEVICE",
        help=f"auto, cpu, cuda, cuda:N or mps (auto: an accelerator when present; default: "
        f"{defaults})",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=PRECISIONS,
        help=f"fp32; bf16 autocast; fp16 autocast with loss scaling (default: {defaults})",
    )  # fmt: skip


def _out_dir_problem(option: str, path: Path) -> str | None:
    """Why ``path`` cannot become an output directory (``None``: it can); creates nothing.

    The path must be a directory or not exist yet, and its nearest existing ancestor must be a
    directory in which a file can be created (probed with a temporary file).
    """
    if path.exists() and not path.is_dir():
        return f"Invalid {option}: {str(path)!r} exists and is not a directory"
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return f"Invalid {option}: {str(base)!r} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        return f"Invalid {option}: cannot write into {str(path)!r} ({exc.strerror or exc})"
    return None


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

    if args.cache_dir is not None:
        root = data.cache_root(args.cache_dir)
        if root.exists() and not root.is_dir():
            return _error(args, f"Invalid --cache-dir: {str(root)!r} is not a directory")
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
            return _error(args, data.unknown_dataset_message(name))
        if args.data_command == "fetch":
            try:
                res = data.fetch(name, cache_dir=args.cache_dir, force=args.force)
            except data.DataUnavailableError as exc:
                _error(args, exc)
                failed += 1
                continue
            print(
                f"{name}: {res.nbytes / 1e6:.1f} MB from {res.source} in {res.seconds:.1f} s"
                f" -> {res.directory}"
            )
        else:
            status = data.verify(name, cache_dir=args.cache_dir)
            print(f"{name}: {status.state}" + "".join(f"\n  {m}" for m in status.problems))
            failed += status.state in ("corrupt", "unreadable")
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
# Exit codes: 0 ok; 1 a run crashed (status "error"), no run finished, a train run ended with a
# non-finite loss, an analysis result is not finite, or an output could not be written; 2 bad
# arguments (unknown task/method/suite: the message lists the valid names, a bad checkpoint).


_BENCH_EXIT = (
    "Exit codes: 0 ok (runs that end 'failed' with a non-finite loss are results, listed in the "
    "report); 1 a run raised an exception, no run finished, a dataset is unavailable, or another "
    "bench holds OUT; 2 bad arguments (unknown task/method/suite: the message lists the valid "
    "names); 130/143 interrupted by SIGINT/SIGTERM (finished runs are kept: rerun to resume)."
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
        "--ablation-task", metavar="TASK", help="also train TASK at 0.5x and 2x its epoch budget"
    )
    p.add_argument(
        "--analysis-task", metavar="TASK", help="measure the flatness of TASK's first-seed models"
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/SUITE)")
    p.add_argument("--jobs", type=int, metavar="N", help="parallel worker processes (suite: 2)")
    p.add_argument("--threads", type=_THREADS, default=1, metavar="N", help="torch threads per run")
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
        "--cpus-per-run", type=_real(0, strict_low=True), metavar="C",
        help="CPUs a Ray task reserves (default: --threads)",
    )  # fmt: skip
    p.add_argument(
        "--gpus-per-run", type=_real(0), metavar="G", help="GPUs a Ray task reserves (default: 0)"
    )
    p.add_argument(
        "--tune", action=flag, default=None, help="choose hyper-parameters on validation data"
    )
    p.add_argument("--epochs", type=int, metavar="N", help="override every task's epoch budget")
    p.add_argument("--progress", action=flag, default=True, help="progress bars on stderr")
    p.add_argument(
        "--report-only", action=flag, default=False, help="only rewrite the report from OUT"
    )
    _add_scale_options(p, defaults="the suite's: cpu and fp32 for quick and full")
    p.set_defaults(handler=_cmd_bench)

    t = sub.add_parser(
        "train",
        help="train one run and save a checkpoint (final and averaged weights)",
        description="Train one run. Under torchrun (torchrun --standalone --nproc_per_node N "
        "--no-python flatmin train ...) the N processes train one model with DDP, each on 1/N "
        "of every batch; rank 0 writes OUT. After every epoch OUT/train_state.pt holds the "
        "training state: --resume continues an interrupted run from it, bit for bit.",
        epilog="Exit codes: 0 ok; 1 the run hit a non-finite loss or the output could not be "
        "written; 2 bad arguments (an unavailable --device, a --resume state of another run); "
        "130/143 interrupted (the previous checkpoint and the last epoch's state are kept).",
    )
    t.add_argument("--task", required=True)
    t.add_argument("--method", required=True)
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--out", required=True, metavar="DIR", help="checkpoint.pt and metrics.json")
    t.add_argument("--budget", default="quick", help="quick (default) or full")
    t.add_argument("--rho", type=_real(0), help="SAM radius (default: the method's)")
    t.add_argument("--start", type=_real(0, 1), help="SWA start fraction (default: the method's)")
    t.add_argument(
        "--swa-lr",
        type=_real(0, strict_low=True),
        help="swa-lr: constant LR as a multiple of the peak LR",
    )
    t.add_argument("--alpha", type=_real(0, 1), help="LookSAM's alpha (default: the method's)")
    t.add_argument("--epochs", type=_int_at_least(1), metavar="N", help="override the epoch budget")
    t.add_argument("--threads", type=_THREADS, default=1, metavar="N", help="torch threads")
    t.add_argument("--progress", action=flag, default=True, help="progress bar on stderr")
    _add_scale_options(t, defaults="cpu, fp32")
    t.add_argument(
        "--sam-mode", choices=("global", "per-replica"), default="global",
        help="under torchrun: perturb with the all-reduced gradient (global, = one process on "
        "the whole batch) or each process's own (per-replica, m-sharpness)",
    )  # fmt: skip
    t.add_argument(
        "--fsdp", action=flag, default=False,
        help="under torchrun: shard the model with FSDP2 (fully_shard per child module and the "
        "root) instead of replicating it with DDP; global SAM mode, no --resume",
    )  # fmt: skip
    t.add_argument(
        "--resume", action=flag, default=False,
        help="continue from OUT/train_state.pt (the last finished epoch) to the same result",
    )  # fmt: skip
    t.set_defaults(handler=_cmd_train)

    weights = ("auto", "final", "averaged")
    la = sub.add_parser(
        "landscape", help="rays, interpolations and asymmetry of checkpoints (figures + data)"
    )
    la.add_argument("checkpoints", nargs="+", metavar="CKPT")
    la.add_argument("--task", help="task to evaluate on (default: the checkpoint's)")
    la.add_argument("--out", default="landscape", metavar="DIR")
    la.add_argument("--weights", default="auto", choices=weights)
    la.add_argument("--points", type=_int_at_least(2), default=21)
    la.add_argument(
        "--distance", type=_real(0, strict_low=True), default=1.0, help="ray half-length"
    )
    la.add_argument("--max-batches", type=_int_at_least(1), default=4, metavar="N")
    la.add_argument("--seed", type=_seed, default=0, help="seed of the random directions")
    la.add_argument("--threads", type=_THREADS, default=1, metavar="N", help="torch threads")
    _add_scale_options(la, defaults="cpu, fp32")
    la.set_defaults(handler=_cmd_landscape)

    sh = sub.add_parser(
        "sharpness", help="worst-case/adaptive sharpness, top Hessian eigenvalue, trace (JSON)"
    )
    sh.add_argument("checkpoint", metavar="CKPT")
    sh.add_argument("--task", help="task to evaluate on (default: the checkpoint's)")
    sh.add_argument("--weights", default="auto", choices=weights)
    sh.add_argument("--rho", type=_real(0), default=0.05)
    sh.add_argument("--adaptive-rho", type=_real(0), default=0.5)
    sh.add_argument("--max-batches", type=_int_at_least(1), default=4, metavar="N")
    sh.add_argument("--hessian-iters", type=_int_at_least(1), default=20, metavar="N")
    sh.add_argument("--trace-samples", type=_int_at_least(2), default=20, metavar="N")
    sh.add_argument("--seed", type=_seed, default=0)
    sh.add_argument("--threads", type=_THREADS, default=1, metavar="N", help="torch threads")
    sh.add_argument("--out", metavar="FILE", help="also write the JSON here")
    _add_scale_options(sh, defaults="cpu, fp32")
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


def _prog(args: argparse.Namespace) -> str:
    return f"flatmin {args.command}" if getattr(args, "command", None) else "flatmin"


def _error(args: argparse.Namespace, message: object, code: int = 2) -> int:
    """Print ``flatmin <cmd>: error: <message>`` on stderr and return ``code``."""
    print(f"{_prog(args)}: error: {message}", file=sys.stderr)
    return code


def _device(name: str | None) -> Any:
    """``--device`` resolved (``None``: the CPU); ``ValueError`` if it is not there."""
    from flatmin.bench.device import resolve_device

    return resolve_device(name or "cpu")


def _cmd_bench(args: argparse.Namespace) -> int:
    from flatmin import bench
    from flatmin.bench.execute import OutputLockedError
    from flatmin.data import DataUnavailableError

    tune_seeds = None if args.tune_seeds is None else tuple(range(100, 100 + args.tune_seeds))
    try:
        suite = bench.get_suite(args.suite)
        device = str(_device(args.device or suite.device))
        cfg = bench.BenchConfig.from_suite(
            suite, Path(args.out or f"runs/{suite.name}"),
            tasks=tuple(args.tasks) if args.tasks else None,
            methods=tuple(args.methods) if args.methods else None,
            seeds=None if args.seeds is None else tuple(range(args.seeds)),
            tune_seeds=tune_seeds, tuner=args.tuner, tune_trials=args.tune_trials,
            ablation_task=args.ablation_task,
            analysis_task=args.analysis_task,
            jobs=args.jobs, threads=args.threads, tune=args.tune, epochs=args.epochs,
            executor=args.executor, ray_address=args.ray_address,
            cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
            progress=args.progress, run=not args.report_only, device=device,
            precision=args.precision,
        )  # fmt: skip
        cfg.validate()
    except ValueError as exc:
        return _error(args, exc)
    problem = _out_dir_problem("--out", cfg.out)
    if problem:
        return _error(args, problem)
    try:
        summary = bench.run_grid(cfg)
    except (DataUnavailableError, OutputLockedError, OSError) as exc:
        return _error(args, exc, 1)
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
    errors = [r for r in summary.records + summary.tune_records if r.get("status") == "error"]
    ok = [r for r in summary.records if r.get("status") == "ok"]
    return 1 if errors or not ok else 0


def _check_method_options(method: str, **given: float | None) -> None:
    """A hyper-parameter given for a method that does not have it is an error, not ignored."""
    from flatmin.bench import get_method, method_names

    def has(m: str, name: str) -> bool:
        return getattr(get_method(m).defaults, name) is not None

    for name, value in given.items():
        if value is not None and not has(method, name):
            having = [m for m in method_names() if has(m, name)]
            raise ValueError(
                f"Invalid --{name.replace('_', '-')}: method {method!r} has no {name} "
                f"(methods with one: {', '.join(having)})"
            )


def _rank_device(args: argparse.Namespace, local_rank: int | None) -> Any:
    """``--device`` for this process: under torchrun, ``cuda``/``auto`` mean ``cuda:LOCAL_RANK``."""
    from flatmin.bench.device import resolve_device

    name = args.device or "cpu"
    if local_rank is None:
        return resolve_device(name)
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if args.device not in ("cuda", "auto"):
        raise ValueError(
            f"Invalid --device: {args.device!r} under torchrun (each process takes "
            "cuda:LOCAL_RANK: pass --device cuda)"
        )
    return resolve_device(f"cuda:{local_rank}")


def _cmd_train(args: argparse.Namespace) -> int:
    from flatmin import bench
    from flatmin.bench.checkpoint import STATE_FILE, CheckpointError, load_training_state
    from flatmin.bench.device import check_support
    from flatmin.bench.distributed import init_distributed, torchrun_env
    from flatmin.tasks import get_task

    try:
        env = torchrun_env()
        world = 1 if env is None else env[1]
        if args.sam_mode != "global" and world == 1:
            raise ValueError(
                f"Invalid --sam-mode: {args.sam_mode!r} needs several processes (run under "
                "torchrun --nproc_per_node N with N > 1)"
            )
        if args.fsdp and world == 1:
            raise ValueError(
                "Invalid --fsdp: FSDP2 shards the model over several processes (run under "
                "torchrun --nproc_per_node N with N > 1)"
            )
        if args.fsdp and args.sam_mode != "global":
            raise ValueError(
                f"Invalid --sam-mode: {args.sam_mode!r} with --fsdp (the shards of one model "
                "share one perturbation: use the global mode, or DDP without --fsdp)"
            )
        if args.fsdp and args.resume:
            raise ValueError(
                "Invalid --resume with --fsdp: the per-epoch training state is written for "
                "replicated runs; rerun the sharded run from the start"
            )
        device = _rank_device(args, None if world == 1 or env is None else env[2])
        task = get_task(args.task)
        _check_method_options(
            args.method, rho=args.rho, start=args.start, swa_lr=args.swa_lr, alpha=args.alpha
        )
        spec = bench.RunSpec(
            args.task, args.method, args.seed, args.budget,
            bench.Hyper(rho=args.rho, start=args.start, swa_lr=args.swa_lr, alpha=args.alpha),
            args.epochs, device=str(device), precision=args.precision or "fp32",
        )  # fmt: skip
        spec.config(task)  # validates the budget and the epoch override
        check_support(spec, world)
    except ValueError as exc:
        return _error(args, exc)
    out = Path(args.out)
    problem = _out_dir_problem("--out", out)
    if problem:
        return _error(args, problem)
    state_path = out / STATE_FILE
    state = None
    if args.resume:
        try:
            state = _resume_state(args, spec, task, world, load_training_state(state_path))
        except FileNotFoundError:
            if _finished(out, spec.config_hash(task)):
                print(f"{args.task} {args.method} seed {args.seed}: already finished in {out}")
                return 0
            print(
                f"{_prog(args)}: note: no {STATE_FILE} in {str(out)!r}: training from epoch 1",
                file=sys.stderr,
            )
        except (CheckpointError, ValueError) as exc:
            return _error(args, f"Invalid --resume: {exc}")

    dist = init_distributed(device, args.sam_mode, fsdp=args.fsdp)
    try:
        return _train_and_write(args, spec, task, dist, state, out)
    finally:
        if dist is not None:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _resume_state(
    args: argparse.Namespace, spec: Any, task: Any, world: int, state: dict[str, Any]
) -> dict[str, Any]:
    """The loaded state if it is this run's (same configuration, same number of processes)."""
    expected = spec.config_hash(task)
    if state.get("hash") != expected:
        raise ValueError(
            f"{args.out}/train_state.pt is the state of another run (hash {state.get('hash')!r}, "
            f"this command's is {expected!r}: task, method, seed, budget, hyper-parameters, "
            "epochs, device type and precision must be the same)"
        )
    if state.get("world_size") != world:
        raise ValueError(
            f"{args.out}/train_state.pt was saved by {state.get('world_size')} processes, this "
            f"run has {world} (the per-process batches would differ)"
        )
    fit = state["fit"]
    fold = f", fold {state['fold'] + 1}" if task.folds else ""
    print(
        f"{_prog(args)}: resuming after epoch {fit['epoch']}{fold} from {args.out}/train_state.pt",
        file=sys.stderr,
    )
    return state


def _finished(out: Path, config_hash: str) -> bool:
    """Whether ``out`` holds the checkpoint and metrics of the run ``config_hash``."""
    import json

    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return metrics.get("hash") == config_hash and (out / "checkpoint.pt").is_file()


def _train_and_write(
    args: argparse.Namespace, spec: Any, task: Any, dist: Any, state: dict[str, Any] | None,
    out: Path,
) -> int:  # fmt: skip
    """Train (resuming from ``state``), then write checkpoint and metrics (rank 0 only)."""
    import json

    from flatmin import bench
    from flatmin._io import atomic_write_text, finite_json
    from flatmin.bench.checkpoint import (
        STATE_FILE,
        full_state_dicts,
        save_checkpoint,
        save_training_state,
    )

    main_rank = dist is None or dist.rank == 0
    state_path = out / STATE_FILE
    bar = None
    if args.progress and main_rank:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"{args.task} {args.method} s{args.seed}", unit="ep")
        if state is not None:
            bar.update(state["fit"]["epoch"])

    def on_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        if bar is not None:
            bar.total = epochs
            bar.update(1)
            bar.set_postfix_str(f"val {100 * metrics['val_acc']:.2f}%")

    def on_state(training_state: Any) -> None:  # a bench.train_state.TrainState
        save_training_state(state_path, training_state)

    try:
        if main_rank:
            out.mkdir(parents=True, exist_ok=True)
        with _torch_threads(args.threads):
            result = bench.train(
                spec, task=task, on_epoch=on_epoch, dist=dist, resume=state,
                # Under FSDP2 a rank holds shards only: no per-epoch state (no --resume).
                on_state=on_state if main_rank and not getattr(dist, "fsdp", False) else None,
            )  # fmt: skip
            # Full state dicts: under FSDP2 a collective that every rank takes part in.
            states = full_state_dicts(result) if result.record["status"] == "ok" else None
    except OSError as exc:
        return _error(args, f"could not write the training state into {str(out)!r}: {exc}", 1)
    finally:
        if bar is not None:
            bar.close()
    if not main_rank:
        return 0
    rec = result.record
    try:
        # Each file is replaced atomically: a failure here (disk full) keeps the previous one.
        save_checkpoint(out / "checkpoint.pt", result, states)
        text = json.dumps(finite_json(rec)[0], indent=1, sort_keys=True, allow_nan=False)
        atomic_write_text(out / "metrics.json", text)
        state_path.unlink(missing_ok=True)  # the run is complete: nothing to resume
    except OSError as exc:
        return _error(args, f"could not write the results into {str(out)!r}: {exc}", 1)
    if rec["status"] != "ok":
        return _error(args, f"{args.task} {args.method} seed {args.seed}: {rec['reason']}", 1)
    final = rec["final"]
    where = ""
    if (rec["device"], rec["precision"], rec["world_size"]) != ("cpu", "fp32", 1):
        where = f" on {rec['device']} {rec['precision']} x{rec['world_size']}"
    print(
        f"{args.task} {args.method} seed {args.seed}: test {100 * final['test_acc']:.2f}%, "
        f"train {100 * final['train_acc']:.2f}%, {rec['wall_time']:.1f} s{where} -> "
        f"{out}/checkpoint.pt"
    )
    return 0


def _load_checkpoints(args: argparse.Namespace, paths: Sequence[str]) -> list[Any]:
    from flatmin.bench.checkpoint import load_checkpoint

    device = _device(args.device)
    return [load_checkpoint(c, task=args.task, weights=args.weights, device=device) for c in paths]


def _cmd_landscape(args: argparse.Namespace) -> int:
    import json

    from flatmin._io import atomic_write_text, finite_json, save_figure
    from flatmin.analysis import plot_path, plot_paths
    from flatmin.bench.analyze import LandscapeConfig, landscape

    out = Path(args.out)
    problem = _out_dir_problem("--out", out)
    if problem:
        return _error(args, problem)
    try:
        cfg = LandscapeConfig(
            points=args.points, distance=args.distance, max_batches=args.max_batches,
            seed=args.seed, precision=args.precision or "fp32",
        )  # fmt: skip
        ckpts = _load_checkpoints(args, args.checkpoints)
    except (ValueError, FileNotFoundError) as exc:
        return _error(args, exc)
    with _torch_threads(args.threads):
        result = landscape(ckpts, cfg)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig: object, name: str) -> None:
        save_figure(fig, out / name, dpi=110)
        plt.close(fig)  # type: ignore[arg-type]
        written.append(name)

    def slug(key: str) -> str:
        return key.replace("→", "_to_").replace("#", "_")

    try:
        out.mkdir(parents=True, exist_ok=True)
        for metric in ("loss", "error"):
            save(
                plot_paths(
                    result.rays, dataset="test", metric=metric,
                    title="random filter-normalised rays",
                ),
                f"rays_test_{metric}.png",
            )  # fmt: skip
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
        # Strict JSON: NaN/inf are null, their paths listed under each entry's "nonfinite".
        strict = {}
        for key, entry in asym.items():
            clean, bad = finite_json(entry)
            strict[key] = {**clean, "nonfinite": bad}
        atomic_write_text(out / "asymmetry.json", json.dumps(strict, indent=1, allow_nan=False))
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
    except OSError as exc:
        return _error(args, f"could not write into {str(out)!r}: {exc}", 1)
    print(f"{len(written)} figures and data in {out}: " + ", ".join(written))
    for key, r in asym.items():
        print(f"asymmetry {key}: test {r['difference']['test']:+.4f}")
    nonfinite = result.nonfinite()
    if nonfinite:
        return _error(args, "non-finite losses (written as NaN/null): " + "; ".join(nonfinite), 1)
    return 0


def _cmd_sharpness(args: argparse.Namespace) -> int:
    import json

    from flatmin._io import atomic_write_text
    from flatmin.bench.analyze import SharpnessConfig, sharpness_summary

    if args.out:
        target = Path(args.out)
        if target.is_dir():
            return _error(args, f"Invalid --out: {args.out!r} is a directory (expected a file)")
        problem = _out_dir_problem("--out", target.parent)
        if problem:
            return _error(args, problem)
    try:
        cfg = SharpnessConfig(
            rho=args.rho, adaptive_rho=args.adaptive_rho, max_batches=args.max_batches,
            hessian_iters=args.hessian_iters, trace_samples=args.trace_samples, seed=args.seed,
            precision=args.precision or "fp32",
        )  # fmt: skip
        (ckpt,) = _load_checkpoints(args, [args.checkpoint])
    except (ValueError, FileNotFoundError) as exc:
        return _error(args, exc)
    with _torch_threads(args.threads):
        summary = sharpness_summary(ckpt, cfg)
    text = json.dumps(summary, indent=1, allow_nan=False)
    print(text)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, text + "\n")
        except OSError as exc:
            return _error(args, f"could not write {args.out!r}: {exc}", 1)
    if summary["nonfinite"]:
        return _error(
            args,
            "non-finite results (null in the JSON): " + ", ".join(summary["nonfinite"])
            + " (the loss is NaN or infinite at or near the weights; for the sharpness try a "
            "smaller --rho / --adaptive-rho)",
            1,
        )  # fmt: skip
    return 0


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@contextmanager
def _warnings_as_messages(prog: str) -> Iterator[None]:
    """Show warnings as ``flatmin <cmd>: warning: ...`` lines (not file:line source dumps)."""

    def show(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    from flatmin._proc import interrupt_on_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from flatmin import __version__

        print(__version__)
        return 0
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    prog = _prog(args)
    try:
        with _warnings_as_messages(prog), interrupt_on_signals():
            return int(args.handler(args))
    except KeyboardInterrupt as exc:  # flatmin._proc.Interrupted for SIGTERM, or a plain Ctrl-C
        signum = int(getattr(exc, "signum", signal.SIGINT))
        hint = {
            "bench": "; finished runs are kept: rerun the same command to resume",
            "train": "; the files in --out are the earlier ones or complete new ones",
            "tune": "; finished trials are kept: rerun the same command to resume",
        }.get(args.command, "")
        print(f"{prog}: interrupted by {signal.Signals(signum).name}{hint}", file=sys.stderr)
        return 128 + signum
    except Exception as exc:
        if args.debug:
            raise
        return _error(
            args, f"{type(exc).__name__}: {exc} (`flatmin --debug {args.command} ...` shows the "
            "traceback)", 1,
        )  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
