"""``flatmin train``: one run, its checkpoint and metrics; DDP/FSDP2 under ``torchrun``; resume."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flatmin.cli._common import (
    TASK_HELP,
    THREADS,
    Subparsers,
    add_log_option,
    add_scale_options,
    error,
    int_at_least,
    open_log,
    out_dir_problem,
    prog,
    real,
    seed,
    torch_threads,
)


def add_parser(sub: Subparsers) -> None:
    """Register ``flatmin train``."""
    flag = argparse.BooleanOptionalAction
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
    t.add_argument("--task", required=True, help=TASK_HELP)
    t.add_argument("--method", required=True)
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--out", required=True, metavar="DIR", help="checkpoint.pt and metrics.json")
    t.add_argument("--budget", default="quick", help="quick (default) or full")
    t.add_argument("--rho", type=real(0), help="SAM radius (default: the method's)")
    t.add_argument("--start", type=real(0, 1), help="SWA start fraction (default: the method's)")
    t.add_argument(
        "--swa-lr",
        type=real(0, strict_low=True),
        help="swa-lr: constant LR as a multiple of the peak LR",
    )
    t.add_argument("--alpha", type=real(0, 1), help="LookSAM's alpha (default: the method's)")
    t.add_argument("--epochs", type=int_at_least(1), metavar="N", help="override the epoch budget")
    t.add_argument("--threads", type=THREADS, default=1, metavar="N", help="torch threads")
    t.add_argument("--progress", action=flag, default=True, help="progress bar on stderr")
    add_scale_options(t, defaults="cpu, fp32")
    add_log_option(t)
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
    t.set_defaults(handler=run)


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


def _check_processes(args: argparse.Namespace, world: int) -> None:
    """``--sam-mode``, ``--fsdp`` and ``--resume`` against the number of processes."""
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


def _spec(args: argparse.Namespace, env: Any) -> tuple[Any, Any, int, Any]:
    """The run's ``RunSpec``, task, number of processes and device (``ValueError``: refused)."""
    from flatmin import bench
    from flatmin.bench.device import check_support
    from flatmin.tasks import get_task

    world = 1 if env is None else env[1]
    _check_processes(args, world)
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
    return spec, task, world, device


def run(args: argparse.Namespace) -> int:
    """Run ``flatmin train``: 1 if the loss was not finite or the files could not be written."""
    from flatmin.bench.checkpoint import STATE_FILE, CheckpointError, load_training_state
    from flatmin.bench.distributed import init_distributed, torchrun_env

    try:
        spec, task, world, device = _spec(args, torchrun_env())
        logger = open_log(args)
    except ValueError as exc:
        return error(args, exc)
    out = Path(args.out)
    problem = out_dir_problem("--out", out)
    if problem:
        return error(args, problem)
    state = None
    if args.resume:
        try:
            state = _resume_state(args, spec, task, world, load_training_state(out / STATE_FILE))
        except FileNotFoundError:
            if _finished(out, spec.config_hash(task)):
                print(f"{args.task} {args.method} seed {args.seed}: already finished in {out}")
                return 0
            print(
                f"{prog(args)}: note: no {STATE_FILE} in {str(out)!r}: training from epoch 1",
                file=sys.stderr,
            )
        except (CheckpointError, ValueError) as exc:
            return error(args, f"Invalid --resume: {exc}")

    dist = init_distributed(device, args.sam_mode, fsdp=args.fsdp)
    try:
        return _train_and_write(args, spec, task, dist, state, out, logger)
    finally:
        if logger is not None:
            logger.close()
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
        f"{prog(args)}: resuming after epoch {fit['epoch']}{fold} from {args.out}/train_state.pt",
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
    out: Path, logger: Any = None,
) -> int:  # fmt: skip
    """Train (resuming from ``state``), then write checkpoint and metrics (rank 0 only).

    With ``logger`` (``--log``) rank 0 logs every epoch live as one logger run.
    """
    from flatmin import bench
    from flatmin.bench.checkpoint import STATE_FILE, full_state_dicts, save_training_state
    from flatmin.bench.loggers import chain

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

    def on_state(training_state: Any) -> None:
        save_training_state(state_path, training_state)

    if not main_rank:
        logger = None
    try:
        if main_rank:
            out.mkdir(parents=True, exist_ok=True)
        with torch_threads(args.threads), _logged(logger, spec, task) as log:
            result = bench.train(
                spec, task=task, on_epoch=chain(on_epoch, log), dist=dist, resume=state,
                # Under FSDP2 a rank holds shards only: no per-epoch state (no --resume).
                on_state=on_state if main_rank and not getattr(dist, "fsdp", False) else None,
            )  # fmt: skip
            # Full state dicts: under FSDP2 a collective that every rank takes part in.
            states = full_state_dicts(result) if result.record["status"] == "ok" else None
            if log is not None:
                log.finish(result.record)
    except OSError as exc:
        return error(args, f"could not write the training state into {str(out)!r}: {exc}", 1)
    finally:
        if bar is not None:
            bar.close()
    if not main_rank:
        return 0
    return _write_results(args, out, result, states)


@contextmanager
def _logged(logger: Any, spec: Any, task: Any) -> Iterator[Any]:
    """The logger's run for this training (``None`` without ``--log``)."""
    if logger is None:
        yield None
        return
    from flatmin.bench.loggers import run_name, run_params

    config = {**spec.config(task), "hash": spec.config_hash(task)}
    with logger.run(run_name(config), run_params(config)) as log:
        yield log


def _write_results(args: argparse.Namespace, out: Path, result: Any, states: Any) -> int:
    """Checkpoint and ``metrics.json`` of a finished run (rank 0), and its one-line summary."""
    import json

    from flatmin._io import atomic_write_text, finite_json
    from flatmin.bench.checkpoint import STATE_FILE, save_checkpoint

    state_path = out / STATE_FILE
    rec = result.record
    try:
        # Each file is replaced atomically: a failure here (disk full) keeps the previous one.
        save_checkpoint(out / "checkpoint.pt", result, states)
        text = json.dumps(finite_json(rec)[0], indent=1, sort_keys=True, allow_nan=False)
        atomic_write_text(out / "metrics.json", text)
        state_path.unlink(missing_ok=True)  # the run is complete: nothing to resume
    except OSError as exc:
        return error(args, f"could not write the results into {str(out)!r}: {exc}", 1)
    if rec["status"] != "ok":
        return error(args, f"{args.task} {args.method} seed {args.seed}: {rec['reason']}", 1)
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
