"""``flatmin train --resume``: an interrupted run continues to the same final weights, bit for bit.

The reference is always an uninterrupted run of the same command; the interrupted one is stopped
right after an epoch's state is written (an injected Ctrl-C) or at a random point (SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatmin.bench import checkpoint
from flatmin.bench.checkpoint import STATE_FILE, load_training_state
from flatmin.cli import main

FLATMIN = [sys.executable, "-m", "flatmin.cli"]


def _assert_same_run(a: Path, b: Path) -> None:
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    for key in ("final", "averaged"):
        if ca[key] is None:
            assert cb[key] is None
            continue
        assert ca[key].keys() == cb[key].keys()
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), (key, name)
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    ma.pop("wall_time"), mb.pop("wall_time")
    assert ma == mb


@pytest.mark.parametrize(
    ("argv", "stop_after"),
    [
        # 10-fold cross-validation with SWA averages: stopped in the 4th fold.
        (["--task", "mutag", "--method", "swa", "--epochs", "2"], 7),
        # fp16 SAM: the loss scale and the SAM/momentum state must come back too.
        pytest.param(
            ["--task", "digits", "--method", "wasam", "--epochs", "2", "--precision", "fp16"],
            1,
            marks=pytest.mark.slow,
        ),
        (["--task", "digits-noisy40", "--method", "esam", "--epochs", "2"], 1),
    ],
)
def test_interrupted_run_resumes_to_the_same_weights(
    tmp_path, monkeypatch, capsys, argv, stop_after
):
    argv = ["train", *argv, "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / STATE_FILE).exists()  # removed once the run is complete

    out = tmp_path / "cut"
    save = checkpoint.save_training_state
    saved: list[tuple[int, int]] = []

    def save_then_interrupt(path, state):
        save(path, state)
        saved.append((state.fold, state.fit.epoch))
        if len(saved) == stop_after:
            raise KeyboardInterrupt  # as Ctrl-C right after the state was written

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_interrupt)
    assert main([*argv, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert not (out / "checkpoint.pt").exists()
    state = load_training_state(out / STATE_FILE)
    assert (state["fold"], state["fit"]["epoch"]) == saved[-1]
    capsys.readouterr()

    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert "resuming after epoch" in capsys.readouterr().err
    _assert_same_run(tmp_path / "whole", out)
    assert not (out / STATE_FILE).exists()
    # Resuming a finished run does nothing.
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_resume_refuses_another_runs_state_and_a_damaged_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    argv = ["train", "--task", "digits", "--method", "sam", "--epochs", "2", "--no-progress"]
    save = checkpoint.save_training_state

    def save_then_interrupt(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_interrupt)
    assert main([*argv, "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume", "--rho", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "Invalid --resume" in err and "state of another run" in err
    assert main([*argv, "--out", str(out), "--resume", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err  # the precision is part of the run's identity (its hash)
    assert err.startswith("flatmin train: error: Invalid --resume: ")
    assert "state of another run" in err and "precision must be the same" in err
    data = bytearray((out / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / STATE_FILE).write_bytes(bytes(data))
    assert main([*argv, "--out", str(out), "--resume"]) == 2
    assert "Invalid --resume" in capsys.readouterr().err


def test_resume_without_a_state_trains_from_the_start(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["train", "--task", "digits", "--method", "baseline", "--epochs", "1", "--no-progress"]
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert f"no {STATE_FILE}" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    argv = ["train", "--task", "digits", "--method", "sam", "--epochs", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*FLATMIN, *argv, "--out", str(tmp_path / "whole")], check=True, env=env)
    out = tmp_path / "cut"
    proc = subprocess.Popen([*FLATMIN, *argv, "--out", str(out)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / STATE_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists()  # killed before the end
    epoch = load_training_state(out / STATE_FILE)["fit"]["epoch"]
    assert 1 <= epoch < 3
    subprocess.run([*FLATMIN, *argv, "--out", str(out), "--resume"], check=True, env=env)
    _assert_same_run(tmp_path / "whole", out)
