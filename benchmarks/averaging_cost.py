"""Per-update cost of WeightAveraging.update() vs torch's AveragedModel.update_parameters.

All run SWA on the same model (>= 100 parameter tensors), interleaved repetition by repetition so
that machine load affects them alike; the script prints the median time per update and the ratios
of medians (flatmin / torch; < 1 means flatmin is faster). Two torch baselines: the default
``AveragedModel(model)`` (on CPU it takes a per-tensor path, since torch lists only accelerators as
foreach devices) and ``AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())`` (foreach).

    python benchmarks/averaging_cost.py [--layers 60] [--width 64] [--reps 30] [--updates 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn

from flatmin.optim.averaging import WeightAveraging


def make_model(layers: int, width: int) -> nn.Module:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.LayerNorm(width)]
    return nn.Sequential(*blocks)


def time_updates(fn, updates: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(updates):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / updates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = make_model(args.layers, args.width).to(device)
    n_tensors = sum(1 for _ in model.parameters())
    n_numel = sum(p.numel() for p in model.parameters())
    ours = WeightAveraging(model, mode="swa", buffers="none")
    ref = AveragedModel(model)
    ref_foreach = AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())
    ours.update()  # the first update copies; time the averaging path only
    ref.update_parameters(model)
    ref_foreach.update_parameters(model)

    contenders = {
        "WeightAveraging.update()": ours.update,
        "AveragedModel.update_parameters() [default]": lambda: ref.update_parameters(model),
        "AveragedModel.update_parameters() [multi_avg_fn]": lambda: ref_foreach.update_parameters(
            model
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for rep in range(args.reps):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:  # rotate the order
            times[name].append(time_updates(contenders[name], args.updates, device))

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ours_median = medians["WeightAveraging.update()"]
    print(f"device={device} threads={args.threads} tensors={n_tensors} numel={n_numel}")
    for name, med in medians.items():
        print(f"{name:<50} median {med * 1e6:10.1f} us/update  ratio {ours_median / med:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
