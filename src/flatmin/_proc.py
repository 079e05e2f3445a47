"""Process hygiene shared by the benchmark workers and the data cache's download commands.

* :class:`Interrupted` and :func:`interrupt_on_signals`: SIGINT and SIGTERM become one exception
  (a ``KeyboardInterrupt`` carrying the signal number), so ``finally`` blocks run — workers are
  stopped, locks released, finished results kept — and the command exits ``128 + signum``
  (130 for SIGINT, 143 for SIGTERM). SIGTERM is what ``timeout``, Slurm and ``docker stop``
  send; its default action would kill the process without any cleanup.
* :func:`die_with_parent` and :func:`child_command`: on Linux a child asks the kernel for
  SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so even a SIGKILL-ed ``flatmin``
  leaves no worker, ``pip download`` or ``apt-get`` behind. Elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

__all__ = ["Interrupted", "child_command", "die_with_parent", "interrupt_on_signals"]

_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """The process received SIGINT or SIGTERM (``signum``); ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: ``128 + signum``."""
        return 128 + self.signum


@contextlib.contextmanager
def interrupt_on_signals(
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread on ``signals`` for the duration of the block.

    The previous handlers are restored afterwards. Outside the main thread (where Python cannot
    install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; else a no-op).

    Args:
        parent: the pid the caller expects as its parent; if it is already gone (it died
            before the request was made) the process exits at once.
    """
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
        return
    if os.getppid() != parent:
        os._exit(1)


# Runs in a fresh interpreter (-I -S: no site, so it starts in ~10 ms and never imports torch),
# requests the death signal, then becomes the command with exec (which keeps the request).
_EXEC_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    f"    ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL, 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def child_command(cmd: Sequence[str]) -> list[str]:
    r"""``cmd`` wrapped so that it is killed when this process dies (Linux; else ``cmd``).

    Example:
        >>> import subprocess
        >>> subprocess.run(child_command(["echo", "hi"]), capture_output=True, text=True).stdout
        'hi\n'
    """
    if sys.platform != "linux":
        return list(cmd)
    return [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PARENT, str(os.getpid()), *cmd]
