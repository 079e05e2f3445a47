"""SAM under DistributedDataParallel: two gloo processes on CPU.

One spawn runs every mode (global, global with accumulation, per-replica); the parent compares
each rank's trajectory with single-process references computed here.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

from flatmin import SAM
from flatmin.optim.accumulation import accumulation_closure

pytestmark = pytest.mark.distributed

F = nn.functional
WORLD, STEPS, RHO, LR, MOMENTUM = 2, 3, 0.1, 0.3, 0.9


def _model():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # no BatchNorm
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    x[8:] *= 3.0  # make the two shards clearly different
    return x, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y = _data()
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        results = {}
        for mode in ("global", "global_accum", "per_replica"):
            ddp = DDP(_model())
            opt = SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
            if mode == "global_accum":
                micro = list(zip(xs.chunk(2), ys.chunk(2)))
                closure = accumulation_closure(
                    opt, lambda b, ddp=ddp: F.cross_entropy(ddp(b[0]), b[1]), micro, ddp_model=ddp
                )
            else:

                def closure(ddp=ddp, opt=opt):
                    opt.zero_grad()
                    loss = F.cross_entropy(ddp(xs), ys)
                    loss.backward()
                    return loss

            trajectory, in_sync = [], []
            for _ in range(STEPS):
                opt.step(closure, model=ddp, per_replica=mode == "per_replica")
                flat = _flat(ddp.module)
                gathered = [torch.empty_like(flat) for _ in range(WORLD)]
                dist.all_gather(gathered, flat)
                in_sync.append(all(torch.equal(gathered[0], t) for t in gathered))
                trajectory.append(flat)
            results[mode] = {"trajectory": torch.stack(trajectory), "in_sync": in_sync}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process_sam():
    """flatmin.SAM in one process on the concatenated batch."""
    x, y = _data()
    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    out = []
    for _ in range(STEPS):
        opt.step(closure)
        out.append(_flat(model))
    return torch.stack(out)


def _per_replica_reference():
    """mean_k ∇L_k(w + ρ g_k/‖g_k‖), written out with torch.func, then SGD with momentum."""
    x, y = _data()
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    out = []
    for _ in range(STEPS):
        w = {n: p.detach().clone() for n, p in model.named_parameters()}
        total = {n: torch.zeros_like(w[n]) for n in names}
        for xs, ys in zip(x.chunk(WORLD), y.chunk(WORLD)):

            def loss_of(params, xs=xs, ys=ys):
                return F.cross_entropy(functional_call(model, params, (xs,)), ys)

            g = torch.func.grad(loss_of)(w)
            norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names))
            g_adv = torch.func.grad(loss_of)({n: w[n] + RHO * g[n] / (norm + 1e-12) for n in names})
            for n in names:
                total[n] += g_adv[n] / WORLD
        for n, p in model.named_parameters():
            p.grad = total[n]
        sgd.step()
        out.append(_flat(model))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["global", "global_accum", "per_replica"])
def test_parameters_identical_across_ranks_after_every_step(ddp_results, mode):
    for rank in range(WORLD):
        assert ddp_results[rank][mode]["in_sync"] == [True] * STEPS


@pytest.mark.parametrize("mode", ["global", "global_accum"])
def test_global_mode_equals_single_process_sam_on_the_full_batch(ddp_results, mode):
    torch.testing.assert_close(
        ddp_results[0][mode]["trajectory"], _single_process_sam(), atol=1e-6, rtol=0
    )


def test_per_replica_mode_equals_the_m_sharpness_reference(ddp_results):
    torch.testing.assert_close(
        ddp_results[0]["per_replica"]["trajectory"], _per_replica_reference(), atol=1e-6, rtol=0
    )


def test_per_replica_differs_from_global_when_shards_differ(ddp_results):
    gap = ddp_results[0]["per_replica"]["trajectory"] - ddp_results[0]["global"]["trajectory"]
    assert gap.abs().max() > 1e-4
