"""Numbers and promises in the docs agree with the code (issue #21, item 8)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flatmin.data import DataUnavailableError, load_dataset, vision

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _digits_sizes() -> tuple[int, int, int]:
    try:
        ds = load_dataset("digits")
    except DataUnavailableError as err:
        pytest.skip(f"digits not available here: {err}")
    return len(ds.train.targets), len(ds.val.targets), len(ds.test.targets)


def test_digits_split_is_stated_as_the_loader_draws_it():
    train, val, test = _digits_sizes()
    assert (train, val, test) == (934, 504, 359)
    lines = (DOCS / "data.md").read_text().splitlines()
    row = next(line for line in lines if "| `digits` |" in line)
    assert f"| {train} / {val} / {test} (stratified 52/28/20" in row
    assert f"{train}/{val}/{test} train/val/test" in (DOCS / "tune.md").read_text()
    doc = " ".join((vision.load_digits.__doc__ or "").split())
    assert f"{train} / {val} / {test} images" in doc
    for text in ((DOCS / "data.md").read_text(), (DOCS / "tune.md").read_text(), doc):
        assert not re.search(r"\b1259\b", text)  # the 70/10/20 split of an earlier version


def test_lightning_resume_promise_is_limited_to_epoch_ends():
    text = " ".join((DOCS / "integrations" / "lightning.md").read_text().split())
    section = text[text.index("## Checkpoints and weight averaging") :]
    assert "from a checkpoint saved **at the end of an epoch** continues bit-identically" in section
    assert "in the middle of an epoch" in section and "does not continue bit-identically" in section


def test_reliability_says_the_digest_detects_corruption_not_tampering():
    text = " ".join((DOCS / "reliability.md").read_text().split())
    assert "The digest detects **corruption, not tampering**" in text
