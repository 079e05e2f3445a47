"""GPU checks of issue 14, as one prepared script: step cost, SAM's arithmetic, a compiled ε̂, bench.

Run it on a GPU (``--device cuda``, a few minutes); ``--tiny`` runs every part at toy sizes on any
device to prove the script works. Nothing here runs in the tests. Each part prints its number and
the issue's target:

1. ``sam_over_base`` — ``SAM.step(closure)`` time / base step time (SGD with momentum, the task
   recipe's fused kernel) on a WRN-16-4 at batch 128, forward under bf16 autocast, medians of
   interleaved rounds. Target <= 2.05.
2. ``arithmetic`` — SAM's own arithmetic (``first_step`` + ``second_step`` minus the base
   step) against pytorch-optimizer's SAM on the 244-tensor residual MLP, measured by
   ``benchmarks/step_cost.py``'s ``run_workload`` (imported, not copied). Target: peer / flatmin
   >= 3.
3. ``compiled`` — the compiled ε̂ (issue 14, item 3): ``SAM(compile=True)``, the rule's reference
   form through ``torch.compile`` (:func:`flatmin.optim.rules.compile_perturbation`), checked
   against the reference form run eagerly (:func:`flatmin.optim.rules.add_perturbation_`; max
   deviation of the perturbed weights <= 1e-6 in fp32, ``restore`` bit-exact) and timed against
   SAM's foreach ``first_step`` + ``restore`` on the same 244 tensors (``--tiny``: 28).
4. ``bench`` — ``flatmin bench --suite gpu`` with 2 seeds, 1 epoch, ``--jobs 1`` and then
   ``--jobs 2`` (two worker processes sharing the device); the speed-up, the epoch time per
   trajectory, and the gpu suite's projected wall time (3 seeds x 10 epochs of baseline and SAM).

Usage::

    python benchmarks/gpu_scale.py --device cuda --json gpu_scale.json
    python benchmarks/gpu_scale.py --tiny --device cpu --json gpu_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatmin.bench.device import autocast, resolve_device
from flatmin.bench.store import read_records
from flatmin.optim import SAM
from flatmin.optim.rules import LpBall, PerturbGroup, add_perturbation_
from flatmin.tasks.models import WideResNet

sys.path.insert(0, str(Path(__file__).parent))
from step_cost import DeepMLP, Workload, run_workload

RHO, EPS = 0.05, 1e-12
BASE_KW: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, rounds: int, block: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved blocks (A B A B ...)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / block)
    return {k: statistics.median(v) for k, v in times.items()}


# -- 1. SAM step / base step, WRN-16-4, batch 128, bf16 ------------------------------------------


def sam_over_base(device: torch.device, precision: str, tiny: bool) -> dict[str, Any]:
    depth, width, batch = (10, 1, 16) if tiny else (16, 4, 128)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    fused = device.type in ("cuda", "cpu")

    def make() -> nn.Module:
        torch.manual_seed(0)
        return WideResNet(10, depth=depth, width=width).to(device)

    def closure_for(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    base_model, sam_model = make(), make()
    base = torch.optim.SGD(base_model.parameters(), fused=fused, **BASE_KW)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=RHO, fused=fused, **BASE_KW)
    base_closure, sam_closure = closure_for(base_model, base), closure_for(sam_model, sam)

    def base_step() -> None:
        base.step(base_closure)

    def sam_step() -> None:
        sam.step(sam_closure, model=sam_model)

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        base_step(), sam_step()
    med = _interleaved(
        {"base": base_step, "sam": sam_step},
        device,
        rounds=5 if tiny else 30,
        block=3 if tiny else 10,
    )
    return {
        "model": f"WRN-{depth}-{width}", "batch": batch, "precision": precision,
        "base_step_ms": 1e3 * med["base"], "sam_step_ms": 1e3 * med["sam"],
        "sam_over_base": med["sam"] / med["base"], "target": "<= 2.05",
        "met": med["sam"] / med["base"] <= 2.05,
    }  # fmt: skip


# -- 2. SAM's arithmetic vs pytorch-optimizer on the 244-tensor model ----------------------------


def arithmetic(device: torch.device, tiny: bool) -> dict[str, Any]:
    work = Workload(
        "deep", "residual MLP, 40 blocks (LayerNorm + 2 Linear), width 128, batch 8", DeepMLP,
        lambda g: (torch.randn(8, 64, generator=g), torch.randint(0, 10, (8,), generator=g)),
        variants=False,
    )  # fmt: skip
    result = run_workload(work, device, rounds=4 if tiny else 25, warmup=2 if tiny else 5, block=5)
    rows = {r["name"]: r for r in result["rows"]}
    out: dict[str, Any] = {
        "param_tensors": result["param_tensors"],
        "flatmin_arithmetic_ms": rows["flatmin SAM"]["arithmetic_ms"],
        "target": "peer / flatmin >= 3",
        "notes": result["notes"],
    }
    peer = rows.get("pytorch-optimizer SAM")
    if peer is not None:
        out["peer_arithmetic_ms"] = peer["arithmetic_ms"]
        out["peer_over_flatmin"] = peer["arithmetic_ms"] / rows["flatmin SAM"]["arithmetic_ms"]
        out["met"] = out["peer_over_flatmin"] >= 3.0
    return out


# -- 3. the compiled ε̂: SAM(compile=True) against the reference form and the foreach kernel ----


def compiled(device: torch.device, tiny: bool) -> dict[str, Any]:
    depth = 4 if tiny else 40  # tiny: inductor compiles in seconds on a CPU
    torch.manual_seed(0)
    foreach_model = DeepMLP(depth=depth).to(device)
    torch.manual_seed(0)
    compiled_model = DeepMLP(depth=depth).to(device)
    params = [p.detach() for p in compiled_model.parameters()]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(device) * 1e-2 for p in params]
    start = [p.clone() for p in params]
    for model in (foreach_model, compiled_model):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()

    # The reference form, eagerly, on a copy (eta only matters for adaptive groups).
    ref = [p.clone() for p in start]
    add_perturbation_(LpBall(), [PerturbGroup(ref, grads, RHO, 2.0, False, 0.01)], EPS)
    sam_foreach = SAM(foreach_model.parameters(), torch.optim.SGD, rho=RHO, eps=EPS, lr=0.1)
    sam_compiled = SAM(
        compiled_model.parameters(), torch.optim.SGD, rho=RHO, eps=EPS, lr=0.1,
        compile={"fullgraph": True},
    )  # fmt: skip
    t0 = time.perf_counter()
    sam_compiled.first_step()  # compiles
    _sync(device)
    compile_s = time.perf_counter() - t0
    deviation = max(float((a - b).abs().max()) for a, b in zip(params, ref))
    eps_scale = max(float((b - s).abs().max()) for b, s in zip(ref, start))
    sam_compiled.restore()
    restore_ok = all(torch.equal(p, s) for p, s in zip(params, start))

    def foreach_path() -> None:
        sam_foreach.first_step()
        sam_foreach.restore()

    def compiled_path() -> None:
        sam_compiled.first_step()
        sam_compiled.restore()

    for _ in range(3):
        foreach_path(), compiled_path()
    med = _interleaved(
        {"foreach": foreach_path, "compiled": compiled_path}, device,
        rounds=4 if tiny else 25, block=3 if tiny else 10,
    )  # fmt: skip
    return {
        "param_tensors": len(params), "compile_s": compile_s,
        "max_weight_deviation": deviation, "max_perturbation": eps_scale,
        "restore_exact": restore_ok, "target": "deviation <= 1e-6 (fp32)",
        "met": deviation <= 1e-6 and restore_ok,
        "foreach_first_step_restore_ms": 1e3 * med["foreach"],
        "compiled_first_step_restore_ms": 1e3 * med["compiled"],
        "foreach_over_compiled": med["foreach"] / med["compiled"],
    }  # fmt: skip


# -- 4. flatmin bench with --jobs > 1 on one device ---------------------------------------------


def bench(device: torch.device, precision: str, tiny: bool) -> dict[str, Any]:
    # 2 seeds x (baseline, SAM) = 4 trajectories of 1 epoch (SWA/WASAM are views of them).
    if tiny:
        grid = ["--suite", "quick", "--tasks", "digits", "--methods", "baseline", "sam"]
    else:
        grid = ["--suite", "gpu"]
    out: dict[str, Any] = {"grid": " ".join(grid), "runs": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in (1, 2):
            target = Path(tmp) / f"jobs{jobs}"
            cmd = [
                sys.executable, "-m", "flatmin.cli", "bench", *grid, "--seeds", "2", "--epochs",
                "1", "--jobs", str(jobs), "--device", str(device), "--precision", precision,
                "--out", str(target), "--no-progress",
            ]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                out["runs"][jobs] = {"error": proc.stderr[-2000:]}
                continue
            records = read_records(target / "results.jsonl")
            walls = {r["method"]: [] for r in records}
            for r in records:
                walls[r["method"]].append(r["wall_time"])
            out["runs"][jobs] = {
                "elapsed_s": elapsed, "device": sorted({r["device"] for r in records}),
                "run_wall_s": {m: statistics.median(w) for m, w in walls.items()},
                "parallelism": sum(r["wall_time"] for r in records) / elapsed,
            }  # fmt: skip
    one, two = out["runs"].get(1, {}), out["runs"].get(2, {})
    if "elapsed_s" in one and "elapsed_s" in two:
        out["jobs2_speedup"] = one["elapsed_s"] / two["elapsed_s"]
        if not tiny:
            # The gpu suite: 3 seeds x 10 epochs of a baseline and a SAM trajectory, at the
            # measured (contended) epoch times and parallelism of --jobs 2.
            per_epoch = sum(two["run_wall_s"].values())
            out["gpu_suite_projected_min"] = 3 * 10 * per_epoch / two["parallelism"] / 60
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--only", nargs="+", choices=("step", "arithmetic", "compiled", "bench"))
    parser.add_argument("--json", default="gpu_scale.json", help="where to write the results")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    machine = {
        "device": str(device), "torch": torch.__version__, "python": sys.version.split()[0],
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "tiny": args.tiny,
    }  # fmt: skip
    print(f"machine: {machine}", flush=True)
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "step": lambda: sam_over_base(device, args.precision, args.tiny),
        "arithmetic": lambda: arithmetic(device, args.tiny),
        "compiled": lambda: compiled(device, args.tiny),
        "bench": lambda: bench(device, args.precision, args.tiny),
    }
    results: dict[str, Any] = {"machine": machine}
    for name, run in parts.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # report and go on: one part must not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps(results[name], default=str)}", flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
