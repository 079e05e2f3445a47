"""``flatmin sharpness``: worst-case/adaptive sharpness, top Hessian eigenvalue, trace (JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flatmin.cli._common import (
    THREADS,
    Subparsers,
    add_scale_options,
    error,
    int_at_least,
    load_checkpoints,
    out_dir_problem,
    real,
    seed,
    torch_threads,
)
from flatmin.cli.landscape import WEIGHTS


def add_parser(sub: Subparsers) -> None:
    """Register ``flatmin sharpness``."""
    sh = sub.add_parser(
        "sharpness", help="worst-case/adaptive sharpness, top Hessian eigenvalue, trace (JSON)"
    )
    sh.add_argument("checkpoint", metavar="CKPT")
    sh.add_argument(
        "--task", help="task to evaluate on (default: the checkpoint's): a built-in name or "
        "package.module:attr",
    )  # fmt: skip
    sh.add_argument("--weights", default="auto", choices=WEIGHTS)
    sh.add_argument("--rho", type=real(0), default=0.05)
    sh.add_argument("--adaptive-rho", type=real(0), default=0.5)
    sh.add_argument("--max-batches", type=int_at_least(1), default=4, metavar="N")
    sh.add_argument("--hessian-iters", type=int_at_least(1), default=20, metavar="N")
    sh.add_argument("--trace-samples", type=int_at_least(2), default=20, metavar="N")
    sh.add_argument("--seed", type=seed, default=0)
    sh.add_argument("--threads", type=THREADS, default=1, metavar="N", help="torch threads")
    sh.add_argument("--out", metavar="FILE", help="also write the JSON here")
    add_scale_options(sh, defaults="cpu, fp32")
    sh.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``flatmin sharpness``: 1 if a result is not finite or the file could not be written."""
    from flatmin._io import atomic_write_text
    from flatmin.bench.analyze import SharpnessConfig, sharpness_summary

    if args.out:
        target = Path(args.out)
        if target.is_dir():
            return error(args, f"Invalid --out: {args.out!r} is a directory (expected a file)")
        problem = out_dir_problem("--out", target.parent)
        if problem:
            return error(args, problem)
    try:
        cfg = SharpnessConfig(
            rho=args.rho, adaptive_rho=args.adaptive_rho, max_batches=args.max_batches,
            hessian_iters=args.hessian_iters, trace_samples=args.trace_samples, seed=args.seed,
            precision=args.precision or "fp32",
        )  # fmt: skip
        (ckpt,) = load_checkpoints(args, [args.checkpoint])
    except (ValueError, FileNotFoundError) as exc:
        return error(args, exc)
    with torch_threads(args.threads):
        summary = sharpness_summary(ckpt, cfg)
    text = json.dumps(summary, indent=1, allow_nan=False)
    print(text)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, text + "\n")
        except OSError as exc:
            return error(args, f"could not write {args.out!r}: {exc}", 1)
    if summary["nonfinite"]:
        return error(
            args,
            "non-finite results (null in the JSON): " + ", ".join(summary["nonfinite"])
            + " (the loss is NaN or infinite at or near the weights; for the sharpness try a "
            "smaller --rho / --adaptive-rho)",
            1,
        )  # fmt: skip
    return 0

