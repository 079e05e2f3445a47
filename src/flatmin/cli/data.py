"""``flatmin data list | fetch NAME... | verify``: the benchmark datasets in the cache."""

from __future__ import annotations

import argparse

from flatmin.cli._common import Subparsers, error, print_table


def add_parser(sub: Subparsers) -> None:
    """Register ``flatmin data``."""
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``flatmin data``; exit 1 if a dataset could not be fetched or is corrupt."""
    from flatmin import data

    if args.cache_dir is not None:
        root = data.cache_root(args.cache_dir)
        if root.exists() and not root.is_dir():
            return error(args, f"Invalid --cache-dir: {str(root)!r} is not a directory")
    if args.data_command == "list":
        rows = [("name", "domain", "cached", "size", "source")]
        for info in data.list_datasets():
            status = data.verify(info.name, cache_dir=args.cache_dir)
            size = f"{status.nbytes / 1e6:.1f} MB" if status.ok else "-"
            rows.append((info.name, info.domain, status.state, size, info.sources[0].describe()))
        print_table(rows)
        return 0
    names = args.names or data.dataset_names()
    failed = 0
    for name in names:
        if name not in data.dataset_names():
            return error(args, data.unknown_dataset_message(name))
        if args.data_command == "fetch":
            try:
                res = data.fetch(name, cache_dir=args.cache_dir, force=args.force)
            except data.DataUnavailableError as exc:
                error(args, exc)
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
