"""Shared test settings: single-threaded, deterministic CPU torch."""

import os

import pytest
import torch

# On CI every dataset must be there: a data test that cannot fetch fails instead of skipping.
if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
    os.environ.setdefault("FLATMIN_REQUIRE_DATA", "1")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
