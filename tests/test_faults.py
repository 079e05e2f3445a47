"""Failure modes (issue 13): nothing lost, no silent wrong result, no traceback, no orphan.

Each test is one probe of a hostile user: a disk that fills while a checkpoint is written, a
flipped bit, SIGTERM/SIGINT/SIGKILL to a parallel grid, two grids on one directory, a malformed
``results.jsonl`` record, a shared or read-only data cache, and every bad CLI input found. CLI
inputs run through ``main()`` in this process (the console script is ``sys.exit(main())``): an
exception escaping it would fail the test, and stderr must hold one ``flatmin <cmd>: error:``
line and no traceback. Where running as root would make a permission probe meaningless, the
command runs in a subprocess as ``nobody``.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flatmin._io import FileLock, LockedError, atomic_open, atomic_write_text, finite_json
from flatmin._proc import child_command
from flatmin.analysis import (
    PathResult,
    SharpnessResult,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    sharpness,
)
from flatmin.bench import BenchConfig, RunSpec, read_records, run_grid
from flatmin.bench.checkpoint import (
    FORMAT,
    CheckpointError,
    _read_payload,
    load_checkpoint,
    payload_digest,
)
from flatmin.bench.execute import LOCK, OutputLockedError
from flatmin.bench.store import append_record, record_problem
from flatmin.cli import main
from flatmin.data import DataUnavailableError
from flatmin.data._cache import (
    LocalDirectory,
    _run,
    ensure_files,
    verify_files,
)
from test_bench_support import TASKS, DyingResolver, ToyResolver, _all_gone, _descendants

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2  # linux/prctl.h, capability.h
SRC = Path(__file__).parents[1] / "src"
GOOD = b"data"
GOOD_SHA = "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"  # sha256(GOOD)


def _strict_json(text: str) -> object:
    """``json.loads`` that refuses the non-standard NaN / Infinity tokens."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def cli(capsys):
    """Run ``flatmin ARGV`` in-process: ``(exit code, stdout, stderr)``; no traceback allowed."""

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return code, out, err

    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint: digits, SWA (final and averaged weights), one epoch."""
    out = tmp_path_factory.mktemp("ckpt")
    argv = ["train", "--task", "digits", "--method", "swa", "--epochs", "1", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out / "checkpoint.pt"


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


# -- non-finite results ----------------------------------------------------------------------------


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.arange(n) % 3)]


class _BlowsUp(nn.Module):
    """A linear model whose output is NaN once any logit exceeds 5 in magnitude."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x):
        y = self.fc(x)
        return y + torch.where(y.abs().max() > 5, torch.nan, 0.0)


def test_worst_case_sharpness_is_nan_when_the_perturbed_loss_is(tmp_path):
    net = _BlowsUp()
    assert torch.isfinite(net(_data()[0][0])).all()  # finite at w
    res = sharpness(net, nn.functional.cross_entropy, _data(), rho=100.0)
    assert math.isnan(res.mean) and math.isnan(res.values[0]) and not res.finite  # was 0.0
    assert math.isnan(res.perturbed_loss[0]) and math.isfinite(res.base_loss[0])
    # Saved and loaded: strict JSON, NaN restored.
    _, js = res.save(tmp_path / "sharp")
    meta = _strict_json(js.read_text())
    assert meta["fields"]["mean"] == "NaN" and "fields.mean" in meta["nonfinite"]
    back = SharpnessResult.load(tmp_path / "sharp")
    assert math.isnan(back.mean) and back.settings == res.settings


def test_a_huge_radius_is_not_dropped_by_an_overflowing_norm():
    """‖δ‖² overflows float64 for ρ = 1e300: the projection used to scale δ by ρ/inf = 0."""
    net = nn.Linear(4, 3).double()
    res = sharpness(net, nn.functional.cross_entropy, _data(), rho=1e300)
    assert not res.finite or res.mean > 1e100  # never the unperturbed loss (a sharpness of 0)


def test_sharpness_is_nan_when_the_gradient_is(tmp_path):
    """A finite loss with a NaN gradient (sqrt at 0): no ascent direction, not a sharpness of 0."""
    net = nn.Linear(4, 3).double()

    def loss_fn(out, y):
        z = (out**2).sum()
        return torch.sqrt(z - z.detach())  # 0, with d/dw = inf * 0 = NaN

    res = sharpness(net, loss_fn, _data(), rho=0.1)
    assert math.isnan(res.mean) and not res.finite
    finite = sharpness(net, nn.functional.cross_entropy, _data(), rho=0.1)
    assert finite.finite and finite.mean > 0


def test_hessian_of_a_nan_loss_is_nan_not_lapack_garbage():
    net = nn.Linear(4, 3).double()

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out, y) * float("nan")

    for method in ("lanczos", "power"):
        eig = hessian_eigenvalues(net, loss_fn, _data(), k=2, method=method, max_iter=5)
        assert eig.eigenvalues.shape == (2,) and np.all(np.isnan(eig.eigenvalues)), method
        assert not eig.finite
    tr = hessian_trace(net, loss_fn, _data(), n_samples=3)
    assert math.isnan(tr.trace) and not tr.finite
    spec = hessian_spectrum(net, loss_fn, _data(), steps=4)
    assert np.all(np.isnan(spec.nodes)) and not spec.finite
    ok = hessian_eigenvalues(net, nn.functional.cross_entropy, _data(), k=2)
    assert ok.finite


def test_landscape_lists_where_a_loss_is_not_finite():
    from flatmin.bench.analyze import LandscapeResult

    coords = np.linspace(-1, 1, 5)
    ok = PathResult("ray", coords, {"test": np.ones(5)}, {"test": np.zeros(5)})
    bad = PathResult("ray", coords, {"test": np.array([np.inf, 1, 1, 1, np.nan])},
                     {"test": np.zeros(5)})  # fmt: skip
    result = LandscapeResult(rays={"sam-s0": ok, "swa-s0": bad})
    assert result.nonfinite() == ["ray swa-s0: test loss at 2 of 5 points"]
    assert LandscapeResult(rays={"sam-s0": ok}).nonfinite() == []


def test_finite_json_flags_every_nonfinite_value():
    value = {"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "NaN", "e": None}
    clean, bad = finite_json(value)
    assert clean == {"a": [1.0, None], "b": {"c": None}, "d": "NaN", "e": None}
    assert bad == ["a.1", "b.c"]
    _strict_json(json.dumps(clean, allow_nan=False))


def test_sharpness_cli_with_a_huge_rho_exits_1_with_strict_json(checkpoint, tmp_path, cli):
    out = tmp_path / "sharp.json"
    code, stdout, err = cli(
        "sharpness", str(checkpoint), "--rho", "1e20", "--max-batches", "1",
        "--hessian-iters", "3", "--trace-samples", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 1
    printed = _strict_json(stdout)
    assert printed == _strict_json(out.read_text())
    assert printed["worst_case_sharpness"]["mean"] is None  # not 0.0
    assert "worst_case_sharpness.mean" in printed["nonfinite"]
    assert err.startswith("flatmin sharpness: error: non-finite results")
    assert "worst_case_sharpness.mean" in err


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


def _python_obeying_permissions(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c code args``; as root, without the capabilities that bypass file modes."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
            preexec_fn=_obey_permissions if ROOT else None,
        )  # fmt: skip
    except subprocess.SubprocessError as exc:  # the preexec_fn failed: no CAP_SETPCAP here
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE ({exc})")


def _run_cli_obeying_permissions(cases: list[list[str]], cli) -> list[tuple[int, str]]:
    """CLI cases where file modes must matter: in-process, or in one subprocess when root."""
    if not ROOT:
        return [cli(*argv)[::2] for argv in cases]
    proc = _python_obeying_permissions(_CASES, json.dumps(cases))
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout)]


def test_unwritable_out_exits_2_for_every_command(cli, checkpoint, tmp_path):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    cases = [_out_argv(cmd, str(locked / "out"), str(checkpoint))
             for cmd in ("train", "bench", "landscape", "sharpness")]  # fmt: skip
    for argv, (code, err) in zip(cases, _run_cli_obeying_permissions(cases, cli), strict=True):
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


# -- results.jsonl ---------------------------------------------------------------------------------


def _toy(out: Path, **kw) -> BenchConfig:
    base = dict(out=out, tasks=("toy-a",), methods=("baseline", "sam"), seeds=(0,),
                progress=False)  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: {k: v for k, v in r.items() if k != "final"},
        lambda r: {**r, "final": {**r["final"], "test_acc": "97%"}},
        lambda r: {**r, "seed": "zero"},
        lambda r: {**r, "status": "done"},
        lambda r: {**r, "curves": {"test_acc": [0.5, "x"]}},
        lambda r: {**r, "hash": 17},
        lambda r: {**r, "averages": {"0.5": {**r["averages"]["0.5"], "val_acc": None}}},
        lambda r: {**r, "averages": [1]},
        lambda r: [r],
    ],
)
def test_a_malformed_record_is_skipped_with_a_warning_and_redone(tmp_path, damage):
    run_grid(_toy(tmp_path), resolver=ToyResolver())
    results = tmp_path / "results.jsonl"
    good = results.read_text().splitlines()
    sam = json.loads(good[1])
    bad = damage(sam)
    assert record_problem(bad) is not None
    results.write_text(good[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.warns(UserWarning, match=r"results\.jsonl:2: skipped a malformed record"):
        summary = run_grid(_toy(tmp_path), resolver=ToyResolver())
    assert (summary.ran, summary.skipped) == (1, 1)  # the damaged run is redone
    with warnings.catch_warnings(record=True):
        recs = read_records(results)
    assert [r.method for r in recs] == ["baseline", "sam"]
    assert recs[1].to_dict()["final"] == sam["final"]  # deterministic: the same result again


def test_a_malformed_record_is_a_warning_line_in_the_cli(tmp_path, cli):
    argv = ["bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1", "--epochs",
            "1", "--jobs", "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert cli(*argv)[0] == 0
    results = tmp_path / "results.jsonl"
    rec = json.loads(results.read_text())
    results.write_text(json.dumps({**rec, "final": None}) + "\n")
    code, out, err = cli(*argv)
    assert code == 0 and "1 runs: 1 trained, 0 already done" in out
    assert f"flatmin bench: warning: {results}:1: skipped a malformed record ('final'" in err


def test_nan_in_a_record_is_written_as_null(tmp_path):
    append_record(tmp_path / "r.jsonl", {"hash": "h", "status": "failed", "loss": float("nan")})
    assert _strict_json((tmp_path / "r.jsonl").read_text()) == {
        "hash": "h", "status": "failed", "loss": None,
    }  # fmt: skip


# -- the lock on --out -----------------------------------------------------------------------------

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_bench_on_the_same_out_refuses_naming_the_holder(tmp_path, cli):
    tmp_path.joinpath(LOCK).touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / LOCK)], stdout=subprocess.PIPE, text=True
    )
    bench = ["bench", "--tasks", "digits", "--methods", "baseline", "--seeds", "1", "--epochs",
             "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        match = rf"in use by another flatmin bench \(pid {holder.pid}\)"
        with pytest.raises(OutputLockedError, match=match):
            run_grid(_toy(tmp_path), resolver=ToyResolver())
        code, _, err = cli(*bench)
        assert code == 1
        assert err.startswith("flatmin bench: error: Output directory")
        assert f"(pid {holder.pid})" in err
        assert not (tmp_path / "results.jsonl").exists()  # nothing ran
        # --report-only does not take the lock: it only reads results.jsonl (empty: exit 1).
        code, out, err = cli(*bench, "--report-only")
        assert code == 1 and "1 runs: 0 trained" in out and "in use" not in err
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead; its pid is still in the file: the stale lock is taken over.
    assert (tmp_path / LOCK).read_text().strip() == str(holder.pid)
    summary = run_grid(_toy(tmp_path), resolver=ToyResolver())
    assert summary.ran == 2
    assert (tmp_path / LOCK).read_text() == ""  # released


def test_file_lock_reports_the_holder_and_is_released(tmp_path):
    path = tmp_path / "lock"
    with FileLock(path):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError) as info:
            FileLock(path).acquire()
        assert info.value.pid == os.getpid()
    with FileLock(path):  # free again
        pass


# -- signals and orphans ---------------------------------------------------------------------------


_BENCH = ["bench", "--tasks", "digits", "--methods", "baseline", "swa", "sam", "--seeds", "2",
          "--epochs", "2", "--no-progress"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize(
    ("sig", "code", "jobs"),
    [(signal.SIGTERM, 143, 2), (signal.SIGINT, 130, 2), (signal.SIGKILL, -9, 2),
     (signal.SIGTERM, 143, 1)],
)  # fmt: skip
def test_a_signal_stops_a_grid_keeping_results_and_leaving_no_process(tmp_path, sig, code, jobs):
    exe = Path(sys.executable).with_name("flatmin")
    argv = [str(exe), *_BENCH, "--jobs", str(jobs), "--out", str(tmp_path)]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    results = tmp_path / "results.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not results.exists() or not results.read_text():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        family = _descendants(proc.pid)  # workers, the resource tracker, their children
        if jobs > 1:  # the workers and the resource tracker
            assert len(family) >= 3, family
        kept = results.read_text()
        if sig == signal.SIGINT:  # Ctrl-C in a terminal: the whole process group gets it
            os.killpg(proc.pid, sig)
        else:  # docker stop, Slurm, kill: the main process only
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert _all_gone(family) == set()
    assert "Traceback" not in err
    if sig != signal.SIGKILL:
        name = signal.Signals(sig).name
        assert f"flatmin bench: interrupted by {name}; finished runs are kept" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every record is whole and well-formed
        records = read_records(results)
    assert results.read_text().startswith(kept) and len(records) < 6
    assert all(r.status == "ok" for r in records)
    with FileLock(tmp_path / LOCK):  # free: released, or dropped by the kernel after SIGKILL
        pass


@pytest.mark.slow
def test_a_worker_that_dies_gives_an_error_record_and_the_grid_goes_on(tmp_path):
    cfg = _toy(tmp_path / "out", tasks=("toy-a", "toy-b"), jobs=2)
    summary = run_grid(cfg, resolver=DyingResolver(tmp_path / "died", hook="dataset"))
    recs = read_records(tmp_path / "out" / "results.jsonl")
    errors = [r for r in recs if r.status == "error"]
    assert len(recs) == 4 and len(errors) == 1 and summary.failed == 1
    assert "worker process died (exit code -9)" in errors[0].reason
    # Recorded under the run's own hash, so the next invocation retries it.
    spec = RunSpec(errors[0].task, errors[0].method, 0)
    assert errors[0].hash == spec.config_hash(TASKS[spec.task])
    again = run_grid(cfg, resolver=ToyResolver())
    assert (again.ran, again.skipped, again.failed) == (1, 3, 0)


# -- data cache housekeeping -----------------------------------------------------------------------


def test_stale_staging_folders_are_removed_by_the_next_fetch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(GOOD)
    stale = tmp_path / "cache" / "toy" / ".fetch-killed123"
    stale.mkdir(parents=True)
    (stale / "scattertext-0.2.2-py3-none-any.whl").write_bytes(b"\0" * 100_000)
    ensure_files("toy", {"a.txt": GOOD_SHA}, (LocalDirectory("toy", str(src)),),
                 cache_dir=tmp_path / "cache")  # fmt: skip
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "toy").iterdir()) == [
        ".fetch.lock",
        "a.txt",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_a_download_command_dies_with_its_parent():
    """``pip download`` / ``apt-get`` run via child_command: SIGKILL the parent, the child goes."""
    # The parent loads _proc.py alone (stdlib only), so it starts without importing torch.
    script = textwrap.dedent(f"""
        import importlib.util, subprocess, time
        spec = importlib.util.spec_from_file_location("p", {str(SRC / "flatmin" / "_proc.py")!r})
        proc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(proc)
        child = subprocess.Popen(proc.child_command(["sleep", "60"]))
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline  # the wrapper has exec-ed the command
            time.sleep(0.02)
    finally:
        parent.kill()
        parent.wait()
    assert _all_gone({child}) == set()


def test_the_cache_runs_its_commands_through_child_command(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    _run(["apt-get", "download", "x"], tmp_path, 1.0)
    assert seen == [child_command(["apt-get", "download", "x"])]


def test_a_read_only_cache_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(GOOD)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    code = textwrap.dedent(f"""
        from flatmin.data import DataUnavailableError
        from flatmin.data._cache import LocalDirectory, ensure_files
        source = LocalDirectory("toy", {str(src)!r})
        try:
            ensure_files("toy", {{"a.txt": {GOOD_SHA!r}}}, (source,), cache_dir={str(cache)!r})
        except DataUnavailableError as exc:
            print(exc)
    """)
    proc = _python_obeying_permissions(code)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Cache directory {cache}/toy is not writable (PermissionError" in proc.stdout
    assert "set $FLATMIN_DATA or --cache-dir" in proc.stdout
    assert list(cache.iterdir()) == []


def test_a_cache_root_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "cache").write_text("x")
    with pytest.raises(DataUnavailableError, match="is not writable"):
        ensure_files("toy", {"a.txt": GOOD_SHA}, (), cache_dir=tmp_path / "cache")


def test_an_unreadable_cached_file_is_reported_not_raised(tmp_path, monkeypatch):
    import flatmin.data._cache as cache

    (tmp_path / "a.txt").write_bytes(GOOD)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache, "sha256_file", denied)
    assert verify_files(tmp_path, {"a.txt": GOOD_SHA}) == {"a.txt": "unreadable"}
