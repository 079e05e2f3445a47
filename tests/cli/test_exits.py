"""Every bad CLI input found is one `flatmin <cmd>: error:` line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flatmin.cli import main
from helpers.faults import (
    run_cli_obeying_permissions,
)

# -- CLI inputs ------------------------------------------------------------------------------------


def _train(out: str, *extra: str) -> list[str]:
    return ["train", "--task", "digits", "--method", "sam", "--epochs", "1", "--out", out,
            "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (_train("x", "--rho", "-1"), "argument --rho: -1 (expected a finite number >= 0)"),
        (_train("x", "--rho", "nan"), "argument --rho: nan (expected a finite number >= 0)"),
        (_train("x", "--rho", "inf"), "argument --rho: inf (expected a finite number >= 0)"),
        (_train("x", "--start", "1.5"), "--start: 1.5 (expected a finite number >= 0 and < 1)"),
        (_train("x", "--threads", "0"), "argument --threads: 0 (expected an int >= 1)"),
        (_train("x", "--seed", str(2**70)), f"--seed: {2**70} (expected 0 <= seed < 2**63)"),
        (_train("x", "--seed", "-1"), "argument --seed: -1 (expected an int >= 0)"),
        (_train("x", "--epochs", "0"), "argument --epochs: 0 (expected an int >= 1)"),
        (["bench", "--threads", "0"], "argument --threads: 0 (expected an int >= 1)"),
        (["landscape", "c.pt", "--threads", "0"], "argument --threads: 0"),
        (["landscape", "c.pt", "--points", "1"], "argument --points: 1 (expected an int >= 2)"),
        (["landscape", "c.pt", "--distance", "0"], "--distance: 0 (expected a finite number > 0)"),
        (["sharpness", "c.pt", "--threads", "0"], "argument --threads: 0"),
        (["sharpness", "c.pt", "--rho", "-0.1"], "argument --rho: -0.1"),
        (["sharpness", "c.pt", "--trace-samples", "1"], "--trace-samples: 1 (expected an int >="),
        (["sharpness", "c.pt", "--seed", str(2**64)], "argument --seed"),
    ],
)  # fmt: skip
def test_bad_values_are_argparse_errors(cli, argv, message):
    code, _, err = cli(*argv)
    assert code == 2
    assert f"flatmin {argv[0]}: error: " in err and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--task", "digits", "--method", "baseline", "--rho", "0.1", "--out", "x"],
         "Invalid --rho: method 'baseline' has no rho (methods with one: sam, asam, wasam"),
        (["train", "--task", "digits", "--method", "sam", "--start", "0.5", "--out", "x"],
         "Invalid --start: method 'sam' has no start (methods with one: swa, swa-lr, wasam)"),
        # the option as the user typed it, with its hyphen (not the dest name, swa_lr)
        (["train", "--task", "digits", "--method", "sam", "--swa-lr", "0.2", "--out", "x"],
         "Invalid --swa-lr: method 'sam' has no "),
        (["train", "--task", "digits", "--method", "sam", "--alpha", "0.3", "--out", "x"],
         "Invalid --alpha: method 'sam' has no alpha (methods with one: looksam)"),
        (["train", "--task", "nope", "--method", "sam", "--out", "x"], "Unknown task: 'nope'"),
        (["data", "fetch", "imagenet"], "Unknown dataset: 'imagenet'"),
    ],
)  # fmt: skip
def test_inconsistent_arguments_exit_2(cli, tmp_path, argv, message):
    code, _, err = cli(*argv)
    assert code == 2
    assert err.startswith(f"flatmin {argv[0]}: error: {message}")
    assert not (Path.cwd() / "x").exists()


def _out_argv(cmd: str, out: str, ckpt: str) -> list[str]:
    return {
        "train": _train(out),
        "bench": ["bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1",
                  "--epochs", "1", "--no-progress", "--out", out],
        "landscape": ["landscape", ckpt, "--out", out],
        "sharpness": ["sharpness", ckpt, "--out", out],
    }[cmd]  # fmt: skip


@pytest.mark.parametrize("cmd", ["train", "bench", "landscape", "sharpness"])
def test_out_that_is_a_file_exits_2(cli, checkpoint, tmp_path, cmd):
    blocker = tmp_path / "a-file"
    blocker.write_text("precious")
    # train/bench/landscape write a directory; sharpness a file (its parent must be a directory).
    target = blocker / "x.json" if cmd == "sharpness" else blocker
    code, _, err = cli(*_out_argv(cmd, str(target), str(checkpoint)))
    assert code == 2
    assert err.startswith(f"flatmin {cmd}: error: Invalid --out: ") and "not a directory" in err
    assert blocker.read_text() == "precious"
    if cmd == "sharpness":  # and an existing directory as the JSON file
        code, _, err = cli(*_out_argv(cmd, str(tmp_path), str(checkpoint)))
        assert code == 2 and "is a directory (expected a file)" in err


def test_unwritable_out_exits_2_for_every_command(cli, checkpoint, tmp_path):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    cases = [_out_argv(cmd, str(locked / "out"), str(checkpoint))
             for cmd in ("train", "bench", "landscape", "sharpness")]  # fmt: skip
    for argv, (code, err) in zip(cases, run_cli_obeying_permissions(cases, cli), strict=True):
        assert code == 2, (argv, err)
        assert err.startswith(f"flatmin {argv[0]}: error: Invalid --out: cannot write into")
        assert "Permission denied" in err and "Traceback" not in err
    assert list(locked.iterdir()) == []


def test_data_cache_dir_that_is_a_file_exits_2(cli, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("x")
    for action in (["list"], ["fetch", "digits"], ["verify"]):
        code, _, err = cli("data", "--cache-dir", str(blocker), *action)
        assert code == 2
        assert (
            err.startswith("flatmin data: error: Invalid --cache-dir:") and "not a directory" in err
        )


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(cli, monkeypatch):
    def broken() -> list[str]:
        raise KeyError("surprise")

    monkeypatch.setattr("flatmin.tasks.list_tasks", broken)
    code, _, err = cli("tasks")
    assert code == 1
    assert err == (
        "flatmin tasks: error: KeyError: 'surprise' (`flatmin --debug tasks ...` shows the "
        "traceback)\n"
    )
    with pytest.raises(KeyError, match="surprise"):
        main(["--debug", "tasks"])


def test_the_console_script_exit_codes(tmp_path):
    """The same through the installed ``flatmin`` executable: exit status and stderr."""
    exe = Path(sys.executable).with_name("flatmin")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for argv, code, start in [
        (_train(str(tmp_path / "o"), "--rho", "-1"), 2, "flatmin train: error: argument --rho"),
        (["sharpness", str(garbage)], 2, "flatmin sharpness: error: Invalid checkpoint"),
    ]:
        proc = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == code and "Traceback" not in proc.stderr
        assert start in proc.stderr


