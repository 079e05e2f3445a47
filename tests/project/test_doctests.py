"""Every docstring example in the package runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import flatmin

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(flatmin.__path__, prefix="flatmin.") if not m.ispkg
)


def test_modules_were_found():
    assert "flatmin.optim.sam" in MODULES and len(MODULES) > 30


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
