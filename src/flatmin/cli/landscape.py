"""``flatmin landscape``: rays, interpolations and asymmetry of checkpoints (figures + data)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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

WEIGHTS = ("auto", "final", "averaged")


def add_parser(sub: Subparsers) -> None:
    """Register ``flatmin landscape``."""
    la = sub.add_parser(
        "landscape", help="rays, interpolations and asymmetry of checkpoints (figures + data)"
    )
    la.add_argument("checkpoints", nargs="+", metavar="CKPT")
    la.add_argument(
        "--task", help="task to evaluate on (default: the checkpoint's): a built-in name or "
        "package.module:attr",
    )  # fmt: skip
    la.add_argument("--out", default="landscape", metavar="DIR")
    la.add_argument("--weights", default="auto", choices=WEIGHTS)
    la.add_argument("--points", type=int_at_least(2), default=21)
    la.add_argument(
        "--distance", type=real(0, strict_low=True), default=1.0, help="ray half-length"
    )
    la.add_argument("--max-batches", type=int_at_least(1), default=4, metavar="N")
    la.add_argument("--seed", type=seed, default=0, help="seed of the random directions")
    la.add_argument("--threads", type=THREADS, default=1, metavar="N", help="torch threads")
    add_scale_options(la, defaults="cpu, fp32")
    la.set_defaults(handler=run)


def _one_task(ckpts: list[Any]) -> None:
    """Refuse checkpoints of different tasks: their lines and rays would not be comparable.

    Raises:
        ValueError: the checkpoints' tasks differ (the message names each file's task).
    """
    tasks = {c.meta["task"] for c in ckpts}
    if len(tasks) > 1:
        each = ", ".join(f"{c.path}: {c.meta['task']}" for c in ckpts)
        raise ValueError(
            f"Invalid checkpoints: the tasks differ ({each}); landscape compares checkpoints of "
            "one task (with --task T, all are evaluated on T if they share its dataset and model)"
        )


def run(args: argparse.Namespace) -> int:
    """Run ``flatmin landscape``: 1 if a loss is not finite or a file could not be written."""
    from flatmin.bench.analyze import LandscapeConfig, landscape

    out = Path(args.out)
    problem = out_dir_problem("--out", out)
    if problem:
        return error(args, problem)
    try:
        cfg = LandscapeConfig(
            points=args.points, distance=args.distance, max_batches=args.max_batches,
            seed=args.seed, precision=args.precision or "fp32",
        )  # fmt: skip
        ckpts = load_checkpoints(args, args.checkpoints)
        if args.task is None:
            _one_task(ckpts)
    except (ValueError, FileNotFoundError) as exc:
        return error(args, exc)
    with torch_threads(args.threads):
        result = landscape(ckpts, cfg)
    try:
        written = _write(result, cfg, out)
    except OSError as exc:
        return error(args, f"could not write into {str(out)!r}: {exc}", 1)
    print(f"{len(written)} figures and data in {out}: " + ", ".join(written))
    for key, r in result.asymmetries.items():
        print(f"asymmetry {key}: test {r.difference['test']:+.4f}")
    nonfinite = result.nonfinite()
    if nonfinite:
        return error(args, "non-finite losses (written as NaN/null): " + "; ".join(nonfinite), 1)
    return 0


def _slug(key: str) -> str:
    return key.replace("→", "_to_").replace("#", "_")


def _write(result: Any, cfg: Any, out: Path) -> list[str]:
    """Write the figures and data of ``result`` into ``out``; the names of the figures."""
    import matplotlib

    from flatmin._io import atomic_write_text, save_figure
    from flatmin.analysis import plot_path, plot_paths

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig: object, name: str) -> None:
        save_figure(fig, out / name, dpi=110)
        plt.close(fig)  # type: ignore[arg-type]
        written.append(name)

    out.mkdir(parents=True, exist_ok=True)
    for metric in ("loss", "error"):
        fig = plot_paths(
            result.rays, dataset="test", metric=metric, title="random filter-normalised rays"
        )
        save(fig, f"rays_test_{metric}.png")
    for label, ray in result.rays.items():
        ray.save(out / f"ray_{_slug(label)}")
    for key, path in result.interpolations.items():
        path.save(out / f"interpolation_{_slug(key)}")
        save(plot_path(path, title=key), f"interpolation_{_slug(key)}.png")
    asym = _asymmetries(result)
    atomic_write_text(out / "asymmetry.json", json.dumps(asym, indent=1, allow_nan=False))
    if asym:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(asym) + 2), 3.5))
        keys = list(asym)
        ax.bar(range(len(keys)), [result.asymmetries[k].difference["test"] for k in keys])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize="small")
        ax.set_ylabel(f"L(θ(+{cfg.a})) − L(θ(−{cfg.a})), test")
        ax.set_title("asymmetry along the interpolation lines")
        fig.tight_layout()
        save(fig, "asymmetry.png")
    return written


def _asymmetries(result: Any) -> dict[str, dict[str, Any]]:
    """The asymmetries as strict JSON: NaN/inf are null, their paths under ``"nonfinite"``."""
    from flatmin._io import finite_json

    strict = {}
    for key, r in result.asymmetries.items():
        entry = {
            "a": r.a,
            "difference": r.difference,
            "loss": {k: v.tolist() for k, v in r.loss.items()},
        }
        clean, bad = finite_json(entry)
        strict[key] = {**clean, "nonfinite": bad}
    return strict
