"""Command-line front end: ``flatmin bench | train | landscape | sharpness | data | tasks``.

Every subcommand is a function ``_cmd_<name>(args) -> int`` registered in :func:`build_parser`.
Exit codes: 0 success, 1 a run or check failed, 2 bad arguments (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Build the argparse parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(prog="flatmin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_parser(sub)
    _add_tasks_parser(sub)
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
