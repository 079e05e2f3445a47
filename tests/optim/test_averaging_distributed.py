"""WeightAveraging under DistributedDataParallel: 2 gloo processes on CPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.optim.swa_utils import update_bn

from flatmin.optim.averaging import WeightAveraging

# Spawning two processes that import torch takes several seconds on a loaded 2-core machine.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
N_BATCHES = (3, 2)  # unequal per rank: the all-reduce must weight by batch counts


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)
    ).double()


def rank_batches(rank: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 4, generator=g, dtype=torch.float64) * (1 + rank) for _ in range(n)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        wa = WeightAveraging(model, start=2)
        for x in rank_batches(rank, 4):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            wa.update()
        wa.update_bn(rank_batches(10 + rank, N_BATCHES[rank]))
        torch.save(
            {"averaged": wa.averaged_state_dict(), "live": model.module.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_average_is_identical_on_ranks_and_bn_stats_match_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    sd0, sd1 = results[0]["averaged"], results[1]["averaged"]
    assert set(sd0) == set(make_model().state_dict())  # no "module." prefix
    for name, t in sd0.items():
        assert torch.equal(t, sd1[name]), name  # identical on every rank
    # Reference: one process, the averaged weights, torch's update_bn over every rank's batches.
    ref = make_model()
    ref.load_state_dict(sd0)
    union = [x for r in range(WORLD) for x in rank_batches(10 + r, N_BATCHES[r])]
    update_bn(union, ref)
    for name, b in ref.named_buffers():
        torch.testing.assert_close(sd0[name], b, rtol=1e-12, atol=1e-14)
    # The live models' statistics were left alone (and differ from the recomputed ones).
    assert not torch.equal(results[0]["live"]["1.running_mean"], sd0["1.running_mean"])
