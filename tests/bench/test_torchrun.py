"""``torchrun … flatmin train``: one run on two gloo processes equals one process on the batch.

Rotten Tomatoes with the bag-of-embeddings model (no BatchNorm, whose statistics would be per
process) and SAM in global mode: the all-reduced first-pass gradient is the whole batch's, so
every step is one-process SAM's. The shards' gradients are summed in another order than one
batch's, so the weights agree to float32 rounding (a few ulps, 1e-6), not bit for bit; the
per-replica mode, a different algorithm, differs by orders of magnitude more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.data import load_or_skip

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FLATMIN = str(Path(sys.executable).parent / "flatmin")
ARGV = ["train", "--task", "rotten-tomatoes", "--method", "sam", "--epochs", "1", "--no-progress"]


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--no-python", FLATMIN, *ARGV, "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["final"]


def test_two_processes_global_mode_equal_one_process(tmp_path):
    load_or_skip("rotten-tomatoes")
    one = tmp_path / "one"
    subprocess.run([FLATMIN, *ARGV, "--out", str(one)], check=True, timeout=600)
    two = tmp_path / "two"
    proc = _torchrun(two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 alone wrote the results (and removed its training state at the end).
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt", "metrics.json"]
    assert proc.stdout.count("rotten-tomatoes sam seed 0: test") == 1
    metrics = json.loads((two / "metrics.json").read_text())
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["sam_mode"] == "global"
    assert metrics["hash"] == single["hash"] and metrics["steps"] == single["steps"]
    a, b = _weights(one), _weights(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-6, msg=name)
    # The epoch's loss is summed over the processes: the same curve to float32 rounding.
    assert metrics["curves"]["train_loss"] == pytest.approx(single["curves"]["train_loss"], 1e-6)

    # FSDP2: the weights, gradients, optimizer state and averages are sharded; SAM's ε̂ norm
    # is reduced over the shards, so the step is still one-process SAM on the whole batch.
    fsdp = tmp_path / "fsdp"
    proc = _torchrun(fsdp, "--fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads((fsdp / "metrics.json").read_text())
    assert sharded["fsdp"] is True and sharded["world_size"] == 2
    assert sharded["hash"] == single["hash"]
    d = _weights(fsdp)
    assert d.keys() == a.keys()  # the checkpoint holds full, gathered tensors
    for name in a:
        torch.testing.assert_close(d[name], a[name], rtol=1e-6, atol=1e-6, msg=name)
    proc = _torchrun(tmp_path / "bad", "--fsdp", "--sam-mode", "per-replica")
    # torchrun exits with 1 whatever the failed rank's code (flatmin's usage error is 2).
    assert proc.returncode != 0 and "Invalid --sam-mode: 'per-replica' with --fsdp" in proc.stderr

    per = tmp_path / "per"
    proc = _torchrun(per, "--sam-mode", "per-replica")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((per / "metrics.json").read_text())["sam_mode"] == "per-replica"
    c = _weights(per)
    assert max(float((c[n] - a[n]).abs().max()) for n in a) > 1e-3
