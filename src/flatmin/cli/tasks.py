"""``flatmin tasks``: the built-in benchmark tasks and their default recipes."""

from __future__ import annotations

import argparse

from flatmin.cli._common import Subparsers, print_table


def add_parser(sub: Subparsers) -> None:
    """Register ``flatmin tasks``."""
    p = sub.add_parser("tasks", help="list the benchmark tasks and their default recipes")
    p.add_argument("--budget", choices=("quick", "full"), default="quick")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print one row per built-in task."""
    from flatmin import tasks

    rows = [("task", "domain", "dataset", "model", "optim", "lr", "wd", "bs", "epochs", "sched")]
    for name in tasks.list_tasks():
        t = tasks.get_task(name)
        r = t.recipe(args.budget)
        rows.append(
            (name, t.domain, t.dataset, t.model, r.optimizer, f"{r.lr:g}", f"{r.weight_decay:g}",
             str(r.batch_size), str(r.epochs), r.schedule)
        )  # fmt: skip
    print_table(rows)
    print("\nlabel-noise variants: append -noisyNN to a vision task (e.g. digits-noisy40)")
    print("your own task: --task package.module:attr (a flatmin.bench.Task)")
    return 0
