"""Loading a built-in task's real data in a test: skip when it cannot be fetched (fail on CI)."""

from __future__ import annotations

import os

import pytest

from flatmin.data import DataUnavailableError
from flatmin.tasks import get_task


def load_or_skip(name: str, budget: str = "quick", seed: int = 0):
    try:
        return get_task(name).load(budget, seed=seed)
    except DataUnavailableError as exc:
        if os.environ.get("FLATMIN_REQUIRE_DATA") == "1":
            pytest.fail(f"{name} data unavailable but FLATMIN_REQUIRE_DATA=1:\n{exc}")
        pytest.skip(f"{name} data unavailable: {str(exc).splitlines()[1:3]}")
