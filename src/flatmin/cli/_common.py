"""Argument types and helpers shared by the commands of :mod:`flatmin.cli`.

A bad option value is an argparse error (usage, ``flatmin CMD: error: argument ...``, exit 2);
a bad combination found later is one ``flatmin CMD: error: ...`` line (:func:`error`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; int64 keeps records portable
# flatmin.bench.device.PRECISIONS, spelled out so that building the parser does not import torch.
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
#: The options that name a task (their ``dest``): a built-in name or ``package.module:attr``.
TASK_DESTS = ("task", "tasks", "ablation_task", "analysis_task")
TASK_HELP = "a built-in task (flatmin tasks) or your own, as package.module:attr"

Subparsers = argparse._SubParsersAction  # the type of ``add_subparsers()``'s result


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int ``>= low``."""

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


THREADS = int_at_least(1)


def seed(text: str) -> int:
    """An argparse type: a seed, ``0 <= seed < 2**63``."""
    value = int_at_least(0)(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} (expected 0 <= seed < 2**63)")
    return value


def real(
    low: float | None = None, high: float | None = None, *, strict_low: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high)`` (``(low, high)`` with ``strict_low``)."""

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


def device_name(text: str) -> str:
    """An argparse type: a device name; an empty one is refused (it would silently mean cpu)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} (expected {DEVICES})")
    return text


def add_scale_options(p: argparse.ArgumentParser, *, defaults: str) -> None:
    """``--device`` and ``--precision`` (every command that trains or evaluates)."""
    p.add_argument(
        "--device", type=device_name, metavar="DEVICE",
        help=f"{DEVICES} (auto: an accelerator when present; default: {defaults})",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=PRECISIONS,
        help=f"fp32; bf16 autocast; fp16 autocast with loss scaling (default: {defaults})",
    )  # fmt: skip


def is_import_path(name: str) -> bool:
    """Whether a task name is an import path ``package.module:attr`` (not a built-in name)."""
    return ":" in name


def importable_working_directory(args: argparse.Namespace) -> None:
    """Put the working directory on ``sys.path`` when a task option is an import path.

    ``flatmin bench --tasks mytasks:task`` then finds ``./mytasks.py`` as ``python -m`` would
    (the console script's ``sys.path`` does not hold the working directory). Spawned workers
    inherit ``sys.path``.
    """
    names: list[str] = []
    for dest in TASK_DESTS:
        value = getattr(args, dest, None)
        names += value if isinstance(value, list) else [value] if value else []
    cwd = os.getcwd()
    if any(is_import_path(n) for n in names) and cwd not in sys.path:
        sys.path.insert(0, cwd)


def add_log_option(p: argparse.ArgumentParser) -> None:
    """``--log KIND TARGET``: live curves in TensorBoard or MLflow (``flatmin.bench.loggers``)."""
    p.add_argument(
        "--log", nargs=2, metavar=("KIND", "TARGET"),
        help="live curves: 'tensorboard DIR' or 'mlflow URI' (a directory: a local SQLite "
        "store); needs the tensorboard / mlflow extra",
    )  # fmt: skip


def open_log(args: argparse.Namespace) -> Any:
    """``--log`` as a :class:`~flatmin.bench.loggers.RunLogger` (``None`` without it).

    Raises:
        ValueError: an unknown kind, or its extra is not installed (said before anything runs).
    """
    if not getattr(args, "log", None):
        return None
    from flatmin.bench.loggers import open_logger

    kind, target = args.log
    try:
        return open_logger(kind, target)
    except ImportError as exc:
        raise ValueError(f"Invalid --log {kind}: {exc}") from exc


def out_dir_problem(option: str, path: Path) -> str | None:
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


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (the previous number restored afterwards)."""
    # One thread per process by default: OpenMP threads spin when the cores are shared.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prog(args: argparse.Namespace) -> str:
    """``flatmin <cmd>``, the prefix of every message."""
    return f"flatmin {args.command}" if getattr(args, "command", None) else "flatmin"


def error(args: argparse.Namespace, message: object, code: int = 2) -> int:
    """Print ``flatmin <cmd>: error: <message>`` on stderr and return ``code``."""
    print(f"{prog(args)}: error: {message}", file=sys.stderr)
    return code


def resolve_device(name: str | None) -> Any:
    """``--device`` resolved (``None``: the CPU); ``ValueError`` if it is not there."""
    from flatmin.bench.device import resolve_device

    return resolve_device(name or "cpu")


def load_checkpoints(args: argparse.Namespace, paths: Sequence[str]) -> list[Any]:
    """The checkpoints ``paths`` on ``args.device``, with ``args.task`` and ``args.weights``."""
    from flatmin.bench.checkpoint import load_checkpoint

    device = resolve_device(args.device)
    return [load_checkpoint(c, task=args.task, weights=args.weights, device=device) for c in paths]


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
