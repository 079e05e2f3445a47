"""Checkpoints and atomic files under faults: a disk that fills, a flipped bit, a bad pickle."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flatmin._io import atomic_open, atomic_write_text
from flatmin.bench.checkpoint import (
    FORMAT,
    CheckpointError,
    _read_payload,
    load_checkpoint,
    payload_digest,
)
from flatmin.data._cache import (
    LocalDirectory,
    ensure_files,
)
from helpers.faults import (
    GOOD,
    GOOD_SHA,
)

# -- atomic writes ---------------------------------------------------------------------------------


def test_atomic_write_is_all_or_nothing(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(target, "w") as f:
        f.write("half of the new conte")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # the temporary file is gone


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_and_cache_files_follow_the_umask(tmp_path, umask):
    """Not mkstemp's 0600: a shared cache must be readable by the group/others the umask allows."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(GOOD)
    files = {"a.txt": GOOD_SHA}
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "x.txt", "x")
        res = ensure_files("toy", files, (LocalDirectory("toy", str(src)),), cache_dir=tmp_path)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == want
    assert stat.S_IMODE(res.paths["a.txt"].stat().st_mode) == want


def test_disk_full_while_saving_keeps_the_earlier_checkpoint(checkpoint, tmp_path):
    """A second ``train`` into the same --out whose checkpoint write fails (RLIMIT_FSIZE)."""
    out = tmp_path / "run"
    shutil.copytree(checkpoint.parent, out)
    before = (out / "checkpoint.pt").read_bytes()

    def limit() -> None:  # in the child: writes past 64 KiB fail with EFBIG (no SIGXFSZ kill)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    argv = [sys.executable, "-m", "flatmin.cli", "train", "--task", "digits", "--method", "sam",
            "--epochs", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run(argv, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "flatmin train: error: could not write" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched, still loads
    assert load_checkpoint(out / "checkpoint.pt").meta["method"] == "swa"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]


# -- checkpoint integrity --------------------------------------------------------------------------


def test_bit_flip_in_the_weights_is_refused(checkpoint, tmp_path):
    data = bytearray(checkpoint.read_bytes())
    weights = _read_payload(checkpoint)["final"]
    name = max(weights, key=lambda k: weights[k].numel())
    pos = data.find(weights[name].numpy().tobytes())
    assert pos > 0
    data[pos + 100] ^= 0x08  # one bit of one weight
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"Corrupt checkpoint: .*flipped\.pt.*sha256"):
        load_checkpoint(bad)


def test_no_single_bit_flip_loads_different_content(checkpoint, tmp_path):
    """Flip one bit at 64 spread positions: each is refused or loads the identical content."""
    data = checkpoint.read_bytes()
    digest = payload_digest(_read_payload(checkpoint))
    bad = tmp_path / "flipped.pt"
    refused = 0
    for pos in np.linspace(0, len(data) - 1, 64).astype(int):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (pos % 8)
        bad.write_bytes(bytes(flipped))
        try:
            payload = _read_payload(bad)
        except CheckpointError:
            refused += 1
            continue
        assert payload_digest(payload) == digest, f"bit flip at byte {pos} loaded silently"
    assert refused > 32  # most bytes matter (the rest is zip padding / unchecked metadata)


def test_checkpoint_digest_covers_every_key(checkpoint):
    payload = _read_payload(checkpoint)
    assert payload["format"] == FORMAT and payload["sha256"] == payload_digest(payload)
    for key, change in [("seed", 1), ("hyper", {"start": 0.5}), ("record", {})]:
        assert payload_digest({**payload, key: change}) != payload["sha256"], key
    final = dict(payload["final"])
    name = next(iter(final))
    final[name] = final[name].clone()
    final[name].view(-1)[0] = torch.nextafter(final[name].view(-1)[0], torch.tensor(1e9))
    assert payload_digest({**payload, "final": final}) != payload["sha256"]


def test_version_1_checkpoints_still_load_with_a_warning(checkpoint, tmp_path):
    payload = _read_payload(checkpoint)
    old = {k: v for k, v in payload.items() if k != "sha256"} | {"format": "flatmin-checkpoint/1"}
    torch.save(old, tmp_path / "v1.pt")
    with pytest.warns(UserWarning, match="has no checksum"):
        ck = load_checkpoint(tmp_path / "v1.pt")
    assert ck.meta["method"] == "swa"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_checkpoints(checkpoint: Path, where: Path) -> dict[str, Path]:
    """The five broken inputs of the issue, plus a pickle payload and a foreign dict."""
    where.mkdir(exist_ok=True)
    data = checkpoint.read_bytes()
    paths = {name: where / f"{name}.pt" for name in
             ("empty", "truncated", "garbage", "missing-keys", "pickle", "foreign")}  # fmt: skip
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["garbage"].write_bytes(np.random.default_rng(0).bytes(4096))
    payload = _read_payload(checkpoint)
    partial = {k: v for k, v in payload.items() if k not in ("final", "task")}
    partial["sha256"] = payload_digest(partial)  # intact, but incomplete
    torch.save(partial, paths["missing-keys"])
    torch.save({"format": FORMAT, "x": _Evil()}, paths["pickle"])
    torch.save({"state_dict": {}}, paths["foreign"])
    paths["directory"] = where / "a-directory.pt"
    paths["directory"].mkdir()
    return paths


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", r"cannot be read \(empty, truncated or not a checkpoint"),
        ("truncated", r"cannot be read \(empty, truncated or not a checkpoint"),
        ("garbage", r"cannot be read \(empty, truncated or not a checkpoint"),
        ("missing-keys", r"lacks keys \['task', 'final'\]"),
        ("directory", r"is a directory"),
        ("pickle", r"refusing it"),
        ("foreign", r"is not a flatmin checkpoint"),
    ],
)
def test_bad_checkpoints_exit_2_in_landscape_and_sharpness(checkpoint, tmp_path, cli, kind,
                                                           message):  # fmt: skip
    path = _bad_checkpoints(checkpoint, tmp_path / "bad")[kind]
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    for cmd in ("landscape", "sharpness"):
        extra = ["--out", str(tmp_path / "land")] if cmd == "landscape" else []
        code, _, err = cli(cmd, str(path), *extra)
        assert code == 2
        assert err.startswith(f"flatmin {cmd}: error: ") and path.name in err
        assert err.count("\n") == 1  # one line
    assert not (tmp_path / "pwned").exists()


