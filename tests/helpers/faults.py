"""Helpers of the fault probes: strict JSON, and running as root without the file-mode bypass."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2  # linux/prctl.h, capability.h
SRC = Path(__file__).parents[2] / "src"
GOOD = b"data"
GOOD_SHA = "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"  # sha256(GOOD)


def strict_json(text: str) -> object:
    """``json.loads`` that refuses the non-standard NaN / Infinity tokens."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


_CASES = """
import contextlib, io, json, sys
from flatmin.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _obey_permissions() -> None:
    """In a child of root: drop CAP_DAC_OVERRIDE/READ_SEARCH, so permission bits apply to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def python_obeying_permissions(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c code args``; as root, without the capabilities that bypass file modes."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
            preexec_fn=_obey_permissions if ROOT else None,
        )  # fmt: skip
    except subprocess.SubprocessError as exc:  # the preexec_fn failed: no CAP_SETPCAP here
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE ({exc})")


def run_cli_obeying_permissions(cases: list[list[str]], cli) -> list[tuple[int, str]]:
    """CLI cases where file modes must matter: in-process, or in one subprocess when root."""
    if not ROOT:
        return [cli(*argv)[::2] for argv in cases]
    proc = python_obeying_permissions(_CASES, json.dumps(cases))
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout)]
