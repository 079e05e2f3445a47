"""Command-line front end: ``flatmin bench | train | tune | landscape | sharpness | data | tasks``.

One module per command, each with ``add_parser(sub)`` (its options; sets ``handler``) and
``run(args) -> int``; the argument types and helpers they share are in :mod:`flatmin.cli._common`.
Nothing in flatmin imports this package. Exit codes: 0 success, 1 a run or check failed (or a
result is not finite), 2 bad arguments (argparse's convention; also a ``--device`` this machine
does not have), 130 / 143 interrupted by SIGINT / SIGTERM. Every error is one line
``flatmin <cmd>: error: ...`` on stderr, never a traceback (``flatmin --debug <cmd>`` shows one
for unexpected errors).

``bench``, ``train``, ``tune``, ``landscape`` and ``sharpness`` take ``--device`` and
``--precision`` (:mod:`flatmin.bench.device`) and a task as a built-in name or an import path
``package.module:attr`` (found from the working directory too); ``train`` also runs as several
processes under ``torchrun`` (:mod:`flatmin.bench.distributed`) and resumes an interrupted run
with ``--resume``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from flatmin.cli import bench, data, landscape, sharpness, tasks, train, tune
from flatmin.cli._common import PRECISIONS, error, importable_working_directory, prog

__all__ = ["PRECISIONS", "build_parser", "main"]

#: The commands in the order ``flatmin --help`` lists them.
COMMANDS = (bench, train, landscape, sharpness, data, tasks, tune)
#: What an interrupted command says about its files.
_RESUME_HINTS = {
    "bench": "; finished runs are kept: rerun the same command to resume",
    "train": "; the files in --out are the earlier ones or complete new ones",
    "tune": "; finished trials are kept: rerun the same command to resume",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argparse parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="flatmin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


@contextmanager
def _warnings_as_messages(name: str) -> Iterator[None]:
    """Show warnings as ``flatmin <cmd>: warning: ...`` lines (not file:line source dumps)."""

    def show(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        print(f"{name}: warning: {message}", file=sys.stderr)

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
    name = prog(args)
    importable_working_directory(args)
    try:
        with _warnings_as_messages(name), interrupt_on_signals():
            return int(args.handler(args))
    except KeyboardInterrupt as exc:  # flatmin._proc.Interrupted for SIGTERM, or a plain Ctrl-C
        signum = int(getattr(exc, "signum", signal.SIGINT))
        hint = _RESUME_HINTS.get(args.command, "")
        print(f"{name}: interrupted by {signal.Signals(signum).name}{hint}", file=sys.stderr)
        return 128 + signum
    except Exception as exc:
        if args.debug:
            raise
        return error(
            args, f"{type(exc).__name__}: {exc} (`flatmin --debug {args.command} ...` shows the "
            "traceback)", 1,
        )  # fmt: skip
