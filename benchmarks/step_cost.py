"""Per-step cost of SAM: flatmin vs peers, and flatmin's cheaper variants.

Contenders run interleaved in one process (A B C A B C ...), after a warm-up; every number is a
median over rounds. Two workloads:

(a) ``cnn``: the BN ResNet CNN of the 28x28 vision tasks (``flatmin.tasks`` when available, else
    an identical local copy) at batch 128;
(b) ``deep``: a residual MLP with >= 200 parameter tensors at batch 8, where the optimizer's own
    work shows.

Reported per workload: time per step; SAM/base (the floor is 2.0); flatmin/peer; SAM's own
arithmetic (``first_step`` + ``second_step`` minus the base optimizer's step, i.e. perturb +
restore without the passes); and the peak extra optimizer state relative to the parameter bytes.
Peers: ``pytorch_optimizer.SAM`` (skipped with a note when the package is missing) and a plain
per-parameter-loop SAM (the classic davda54/sam code) written here.

Usage::

    python benchmarks/step_cost.py [--device cuda] [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import flatmin
from flatmin import SAM
from flatmin.optim.bn import frozen_bn_stats
from flatmin.tasks.models import ResNetCNN

try:
    from pytorch_optimizer import SAM as PeerSAM
except ImportError:
    PeerSAM = None

BASE_KW: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
RHO = 0.05


# -- models ---------------------------------------------------------------------------------------
def make_cnn() -> tuple[nn.Module, str]:
    """The vision tasks' BN ResNet at the size the 28x28 tasks use."""
    return ResNetCNN(10, width=16, blocks=(1, 1), stem_stride=2), "flatmin.tasks ResNetCNN"


class DeepMLP(nn.Module):
    """Pre-norm residual MLP: ``depth`` blocks of LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, d_in: int = 64, width: int = 128, depth: int = 40, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                nn.Linear(2 * width, width),
            )
            for _ in range(depth)
        )  # fmt: skip
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


# -- the classic per-parameter-loop SAM (davda54/sam) -------------------------------------------
class LoopSAM(torch.optim.Optimizer):
    """davda54/sam's SAM: Python loops, a clone per parameter per step, ``p.data`` rebinding."""

    def __init__(self, params: Any, base_optimizer: type, rho: float = 0.05, **kwargs: Any):
        super().__init__(params, {"rho": rho, **kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        norms = [
            p.grad.norm(2) for g in self.param_groups for p in g["params"] if p.grad is not None
        ]
        grad_norm = torch.norm(torch.stack(norms), 2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


# -- contenders -----------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    opt: Any
    kind: str  # "base" | "sam" (manual first/second, timed) | "closure" | "esam"
    step_times: list[float] = field(default_factory=list)
    first_times: list[float] = field(default_factory=list)
    second_times: list[float] = field(default_factory=list)
    base_step_times: list[float] = field(default_factory=list)
    extra_state: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _tensor_storages(obj: Any, seen: set[int], out: dict[int, int], depth: int = 0) -> None:
    """Collect (storage pointer -> bytes) of every tensor reachable from ``obj``."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _tensor_storages(key, seen, out, depth + 1)
            _tensor_storages(value, seen, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _tensor_storages(value, seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        _tensor_storages(vars(obj), seen, out, depth + 1)


def state_bytes(opt: Any, model: nn.Module) -> int:
    """Bytes of the tensors an optimizer holds, other than the parameters and their gradients."""
    found: dict[int, int] = {}
    _tensor_storages(opt, set(), found)
    for p in model.parameters():
        found.pop(p.untyped_storage().data_ptr(), None)
        if p.grad is not None:
            found.pop(p.grad.untyped_storage().data_ptr(), None)
    return sum(found.values())


@dataclass
class Workload:
    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    variants: bool


def run_workload(
    work: Workload, device: torch.device, rounds: int, warmup: int, block: int
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    proto = work.make_model()
    x, y = work.make_batch(gen)
    x, y = x.to(device), y.to(device)
    n_param_bytes = sum(p.numel() * p.element_size() for p in proto.parameters())
    n_tensors = sum(1 for _ in proto.parameters())

    def fresh() -> nn.Module:
        model = work.make_model().to(device)
        model.load_state_dict(proto.state_dict())
        return model

    entries: list[tuple[Contender, nn.Module]] = []

    def add(name: str, make: Callable[[nn.Module], Any], kind: str) -> None:
        model = fresh()
        entries.append((Contender(name, make(model), kind), model))

    sgd = torch.optim.SGD
    add("base (SGD)", lambda m: sgd(m.parameters(), **BASE_KW), "base")
    add("flatmin SAM", lambda m: SAM(m.parameters(), sgd, rho=RHO, **BASE_KW), "sam")
    # The path users take (and trainers call): one step(closure), nothing timed in between.
    add("flatmin SAM step(closure)", lambda m: SAM(m.parameters(), sgd, rho=RHO, **BASE_KW),
        "closure")  # fmt: skip
    notes = []
    if PeerSAM is not None:
        add("pytorch-optimizer SAM", lambda m: PeerSAM(m.parameters(), sgd, rho=RHO, **BASE_KW),
            "sam")  # fmt: skip
        if device.type == "cpu":
            add(
                "pytorch-optimizer SAM (foreach)",
                lambda m: PeerSAM(m.parameters(), sgd, rho=RHO, foreach=True, **BASE_KW),
                "sam",
            )
    else:
        notes.append("pytorch-optimizer not installed: that peer is skipped")
    add("loop SAM (davda54)", lambda m: LoopSAM(m.parameters(), sgd, rho=RHO, **BASE_KW), "sam")
    if work.variants:
        add("SAMEveryK k=5",
            lambda m: flatmin.SAMEveryK(m.parameters(), sgd, k=5, rho=RHO, **BASE_KW),
            "closure")  # fmt: skip
        add("LookSAM k=5 a=0.7",
            lambda m: flatmin.LookSAM(m.parameters(), sgd, k=5, alpha=0.7, rho=RHO, **BASE_KW),
            "closure")  # fmt: skip
        add("ESAM b=0.6 g=0.5",
            lambda m: flatmin.ESAM(m.parameters(), sgd, beta=0.6, gamma=0.5, rho=RHO, **BASE_KW),
            "esam")  # fmt: skip
        add("WASAM", lambda m: flatmin.WASAM(m, sgd, rho=RHO, **BASE_KW), "closure")
        add("GSAM a=0.1", lambda m: flatmin.GSAM(m.parameters(), sgd, RHO, alpha=0.1, **BASE_KW),
            "closure")  # fmt: skip
        add("WSAM g=0.9", lambda m: flatmin.WSAM(m.parameters(), sgd, RHO, gamma=0.9, **BASE_KW),
            "closure")  # fmt: skip
        add(
            "FriendlySAM",
            lambda m: flatmin.FriendlySAM(m.parameters(), sgd, RHO, **BASE_KW),
            "closure",
        )
        add("GCSAM", lambda m: flatmin.GCSAM(m.parameters(), sgd, RHO, **BASE_KW), "closure")
        add(
            "MomentumSAM",
            lambda m: flatmin.MomentumSAM(m.parameters(), sgd, RHO, **BASE_KW),
            "closure",
        )
        add("MultiStepSAM n=2",
            lambda m: flatmin.MultiStepSAM(m.parameters(), sgd, RHO / 2, steps=2, **BASE_KW),
            "closure")  # fmt: skip

    def one_step(c: Contender, model: nn.Module) -> None:
        opt = c.opt

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if c.kind == "base":
            closure()
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            c.base_step_times.append(time.perf_counter() - t0)
        elif c.kind == "sam":
            closure()
            _sync(device)
            t0 = time.perf_counter()
            opt.first_step(zero_grad=True)
            _sync(device)
            t1 = time.perf_counter()
            with frozen_bn_stats(model if isinstance(opt, SAM) else None):
                closure()
            _sync(device)
            t2 = time.perf_counter()
            before = state_bytes(opt, model) if not c.extra_state else 0
            opt.second_step(zero_grad=True)
            _sync(device)
            t3 = time.perf_counter()
            c.first_times.append(t1 - t0)
            c.second_times.append(t3 - t2)
            if not c.extra_state:  # peak: between the passes or after the step
                c.extra_state = max(before, state_bytes(opt, model))
        elif c.kind == "esam":

            def per_sample(index: torch.Tensor | None = None) -> torch.Tensor:
                # ESAM's closure: per-sample losses, an optional sample index, no backward
                # under no_grad (its selection pass).
                opt.zero_grad()
                xb, yb = (x, y) if index is None else (x[index], y[index])
                losses = F.cross_entropy(model(xb), yb, reduction="none")
                if torch.is_grad_enabled():
                    losses.mean().backward()
                return losses

            opt.step(per_sample, model=model)
        else:
            opt.step(closure, model=model)

    def measure_state(c: Contender, model: nn.Module) -> None:
        if c.kind in ("closure", "esam"):
            peak = 0
            orig_second = c.opt.second_step

            def second_step(*args: Any, **kwargs: Any) -> None:
                nonlocal peak
                peak = max(peak, state_bytes(c.opt, model))
                orig_second(*args, **kwargs)

            c.opt.second_step = second_step
            for _ in range(block):
                one_step(c, model)
            del c.opt.second_step
            c.extra_state = max(peak, state_bytes(c.opt, model))

    for c, model in entries:
        for i in range(warmup):
            if i == warmup - 1:
                c.extra_state = 0  # measure on the last warm-up step (base state exists by then)
            one_step(c, model)
        measure_state(c, model)
        c.first_times.clear(), c.second_times.clear(), c.base_step_times.clear()

    for _ in range(rounds):
        for c, model in entries:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                one_step(c, model)
            _sync(device)
            c.step_times.append((time.perf_counter() - t0) / block)

    base_entry = entries[0][0]
    base_state = base_entry.extra_state or state_bytes(base_entry.opt, entries[0][1])
    base_step = statistics.median(base_entry.step_times)
    base_opt_step = statistics.median(base_entry.base_step_times)
    rows = []
    for c, _ in entries:
        step = statistics.median(c.step_times)
        row: dict[str, Any] = {
            "name": c.name,
            "step_ms": 1e3 * step,
            "ratio_to_base": step / base_step,
        }
        if c.kind == "sam":
            first = statistics.median(c.first_times)
            second = statistics.median(c.second_times)
            row["first_step_ms"] = 1e3 * first
            row["second_step_ms"] = 1e3 * second
            row["arithmetic_ms"] = 1e3 * (first + second - base_opt_step)
        if c.kind != "base":
            row["extra_state_x_params"] = (c.extra_state - base_state) / n_param_bytes
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    ours = by_name["flatmin SAM"]
    peer = by_name.get("pytorch-optimizer SAM")
    summary: dict[str, Any] = {"sam_over_base": ours["ratio_to_base"]}
    if peer is not None:
        summary["flatmin_over_peer_step"] = ours["step_ms"] / peer["step_ms"]
        summary["flatmin_over_peer_arithmetic"] = ours["arithmetic_ms"] / peer["arithmetic_ms"]
    loop = by_name["loop SAM (davda54)"]
    summary["flatmin_over_loop_arithmetic"] = ours["arithmetic_ms"] / loop["arithmetic_ms"]
    return {
        "workload": work.name,
        "description": work.description,
        "param_tensors": n_tensors,
        "param_bytes": n_param_bytes,
        "base_optimizer_step_ms": 1e3 * base_opt_step,
        "rounds": rounds,
        "steps_per_round": block,
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    lines = [
        f"### ({result['workload']}) {result['description']}",
        "",
        f"{result['param_tensors']} parameter tensors, {result['param_bytes'] / 2**20:.2f} MiB; "
        f"base optimizer step {result['base_optimizer_step_ms']:.3f} ms; median of "
        f"{result['rounds']} rounds x {result['steps_per_round']} steps.",
        "",
        "| contender | step ms | / base | first_step ms | second_step ms | SAM arithmetic ms "
        "| extra state / params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['step_ms']:.2f} | {r['ratio_to_base']:.3f} "
            f"| {_fmt(r.get('first_step_ms'), '.3f')} | {_fmt(r.get('second_step_ms'), '.3f')} "
            f"| {_fmt(r.get('arithmetic_ms'), '.3f')} "
            f"| {_fmt(r.get('extra_state_x_params'), '.2f')} |"
        )
    lines.append("")
    lines.append(", ".join(f"{k} = {v:.3f}" for k, v in result["summary"].items()))
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default="step_cost.json", help="where to write the results")
    parser.add_argument("--only", choices=["cnn", "deep"], default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (6 if args.quick else 25)
    warmup = 2 if args.quick else 5
    cnn_desc = make_cnn()[1]
    workloads = [
        Workload(
            "cnn",
            f"BN ResNet CNN for 28x28 images ({cnn_desc}), batch 128",
            lambda: make_cnn()[0],
            lambda g: (
                torch.randn(128, 1, 28, 28, generator=g),
                torch.randint(0, 10, (128,), generator=g),
            ),
            variants=True,
        ),
        Workload(
            "deep",
            "residual MLP, 40 blocks (LayerNorm + 2 Linear), width 128, batch 8",
            DeepMLP,
            lambda g: (torch.randn(8, 64, generator=g), torch.randint(0, 10, (8,), generator=g)),
            variants=False,
        ),
    ]
    machine = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        import pytorch_optimizer

        machine["pytorch_optimizer"] = getattr(pytorch_optimizer, "__version__", None) or (
            __import__("importlib.metadata").metadata.version("pytorch-optimizer")
        )
    except ImportError:
        machine["pytorch_optimizer"] = None
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            machine["device_name"] = (
                f"{names[0]} x {len(names)}" if names else machine["device_name"]
            )
        except OSError:
            pass
    print(f"machine: {machine}")
    results = []
    start = time.perf_counter()
    for work in workloads:
        if args.only and work.name != args.only:
            continue
        result = run_workload(work, device, rounds, warmup, block=5)
        results.append(result)
        print(render(result), flush=True)
        print()
    out = {"machine": machine, "elapsed_s": time.perf_counter() - start, "workloads": results}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
