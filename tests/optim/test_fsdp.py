"""The SAM family and weight averaging under FSDP2 (``fully_shard``): two gloo processes on CPU.

One spawned job runs every check (the process group and the imports are paid once) and saves what
it saw; the tests compare it with single-process references computed here, in float64:

* every member of the family (the table of ``test_sam_family``), both kernels, and the balls
  (ℓ∞, ℓ3), ASAM, Fisher-SAM, SAM-ON and clipping: the trajectory of the full (gathered)
  parameters equals single-process training on the concatenated batch;
* ``WeightAveraging`` (SWA, EMA with warmup, both kernels) and WASAM: the gathered average
  equals the single-process average; ``swap()``; ``update_bn`` equals torch's over every rank's
  batches;
* the reductions of ``_vec`` on DTensors: identical on every rank, equal to the full tensors';
* a sharded checkpoint (per-rank DTensor state dicts, and ``torch.distributed.checkpoint``) of
  model + optimizer + averager resumes bit-identically.
"""

from __future__ import annotations

import math
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_sam_family import IDS, MEMBERS, Closure, Member, _build
from torch import nn
from torch.optim.swa_utils import update_bn

import flatmin
from flatmin._io import FileLock
from flatmin.optim import _vec
from flatmin.optim.rules import Fisher, sam_on

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD, STEPS, BATCH = 2, 3, 16
DT = torch.float64
TOL = {"rtol": 0, "atol": 1e-9}

#: SAM's own options on top of the table: name -> SAM keyword arguments (a rule is built later).
BALLS: dict[str, dict[str, Any]] = {
    "linf": {"p": math.inf},
    "l3": {"p": 3.0},
    "asam": {"adaptive": True, "eta": 0.01},
    "fisher": {"rule": "fisher"},
    "sam_on": {"rule": "sam_on"},
    "clip": {"max_grad_norm": 0.05},
    "compile": {"compile": {"backend": "eager"}},  # DTensors keep the kernels
}
# ESAM's data selection (gamma < 1) picks the sharpest samples of each rank's own batch, as under
# DDP: that is not single-process ESAM on the whole batch, so the equivalence runs SWP only.
OVERRIDES: dict[str, dict[str, Any]] = {"ESAM": {"gamma": 1.0}}
# Every member with the default (foreach) kernel; the single-tensor reference for SAM's balls and
# the members whose directions are not gradients (Momentum-SAM) or that extend the backup.
SINGLE = ("SAM", "MomentumSAM", "MultiStepSAM")
CONFIGS = [(m.name, OVERRIDES.get(m.name, {}), f) for m in MEMBERS for f in (True, False)
           if f or m.name in SINGLE]  # fmt: skip
CONFIGS += [("SAM", kw, f) for kw in BALLS.values() for f in (True, False)]
CONFIG_IDS = [f"{m}-{'foreach' if f else 'single'}" for m in IDS for f in (True, False)
              if f or m in SINGLE]  # fmt: skip
CONFIG_IDS += [f"SAM-{b}-{'foreach' if f else 'single'}" for b in BALLS for f in (True, False)]


# -- the model, the data, the runs (shared by the workers and the references) ---------------------
def _model(bn: bool = False) -> nn.Module:
    """An MLP whose layers do not divide evenly over 2 ranks (7 and 3 rows)."""
    g = torch.Generator().manual_seed(0)
    norm: nn.Module = nn.BatchNorm1d(7) if bn else nn.LayerNorm(7)
    model = nn.Sequential(
        nn.Linear(5, 7), norm, nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(DT)


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)  # one FSDP unit per block
    fully_shard(model)
    return model


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, 5, generator=g, dtype=DT)
        x[BATCH // 2 :] *= 2.5  # the two ranks' halves clearly differ
        out.append((x, torch.randint(0, 3, (BATCH,), generator=g)))
    return out


def _mine(batch: tuple[torch.Tensor, torch.Tensor], rank: int | None):
    if rank is None:
        return batch
    return tuple(t.chunk(WORLD)[rank] for t in batch)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _vec.is_sharded([t]) else t  # type: ignore[attr-defined]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([_full(p.detach()).reshape(-1) for p in model.parameters()])


def _full_dict(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: _full(v).detach().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _member(name: str) -> Member:
    return next(m for m in MEMBERS if m.name == name)


def _optimizer(name: str, kw: dict[str, Any], model: nn.Module, foreach: bool) -> Any:
    kw = dict(kw)
    if kw.get("rule") == "fisher":
        kw["rule"] = Fisher(eta=2.0)
    elif kw.get("rule") == "sam_on":
        kw["rule"] = sam_on(model)
    return _build(_member(name), model, foreach=foreach, **kw)


def _train(opt: Any, model: nn.Module, batches: list, rank: int | None) -> torch.Tensor:
    """The trajectory of the full parameters (and of WASAM's full average at the end)."""
    trajectory = []
    for batch in batches:
        opt.step(Closure(opt, model, *_mine(batch, rank)), model=model)
        trajectory.append(_flat(model))
    return torch.stack(trajectory)


def _averaging_run(rank: int | None, mode: str, foreach: bool) -> dict[str, Any]:
    """SGD with momentum, an average of every step from the second on; its state and a swap."""
    model = _model()
    if rank is not None:
        _shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = {"decay": 0.8, "warmup_power": 0.75} if mode == "ema" else {}
    wa = flatmin.WeightAveraging(model, mode=mode, start=2, foreach=foreach, **kw)  # type: ignore[arg-type]
    for x, y in (_mine(b, rank) for b in _batches(5)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        wa.update()
    before = _flat(model)
    with wa.swap():
        swapped = _flat(model)
    return {
        "average": wa.averaged_state_dict(full=True),
        "swapped": swapped,
        "restored": torch.equal(_flat(model), before),
    }


# -- the spawned job ------------------------------------------------------------------------------
def _family(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (name, kw, foreach), cid in zip(CONFIGS, CONFIG_IDS):
        model = _shard(_model())
        opt = _optimizer(name, kw, model, foreach)
        result = {"trajectory": _train(opt, model, _batches(STEPS), rank)}
        if name == "WASAM":
            result["average"] = opt.averaging.averaged_state_dict(full=True)
        out[cid] = result
    return out


def _reductions(rank: int) -> dict[str, Any]:
    """``_vec`` on DTensor gradients (and a plain tensor beside them), on every rank."""
    model = _shard(_model())
    x, y = _mine(_batches(1)[0], rank)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    other = [2.0 * g + 1.0 for g in grads]  # DTensor arithmetic: sharded like the gradients
    plain = torch.arange(4.0, dtype=DT)  # a replicated plain tensor counts once
    refs = [_full(g) for g in grads]
    terms = [(g.abs() ** 3).sum() for g in grads] + [plain.sum()]
    local = _vec.local_shards(grads)[0]
    try:
        _vec.local_shards(grads, [_full(g) for g in grads])
        mixed = ""
    except RuntimeError as err:
        mixed = str(err)
    return {
        "sum_sq": _vec.sum_sq([*grads, plain], DT),
        "dot": _vec.dot(grads, other, DT),
        "sum_pow_q": _vec.sum_pow_q(local, 3.0, DT, True, _vec.reduction_keys(grads)),
        "global_sum": _vec.global_sum(terms),
        "full_grads": refs,
        "full_other": [_full(o) for o in other],
        "mixed_error": mixed,
    }


def _by_hand(rank: int) -> dict[str, Any]:
    """first_step / unperturbed / second_step, and the restore after a failing pass."""
    batch = _mine(_batches(1)[0], rank)
    models = [_shard(_model()) for _ in range(2)]
    opts = [flatmin.SAM(m.parameters(), torch.optim.SGD, 0.1, lr=0.1) for m in models]
    opts[0].step(Closure(opts[0], models[0], *batch))
    before = _flat(models[1])
    closure = Closure(opts[1], models[1], *batch)
    closure()
    opts[1].first_step(zero_grad=True)
    perturbed = _flat(models[1])
    with opts[1].unperturbed():
        inside = _flat(models[1])
    after_block = _flat(models[1])
    closure()
    opts[1].second_step(zero_grad=True)
    failing = Closure(opts[1], models[1], *batch)
    failing.fail_at = 2  # the pass at w + ε̂ raises: the weights must come back bit-exactly
    before_failure = _flat(models[1])
    try:
        opts[1].step(failing)
        raised = False
    except FloatingPointError:
        raised = True
    return {
        "moved": not torch.equal(perturbed, before),
        "unperturbed_inside": torch.equal(inside, before),
        "perturbed_after": torch.equal(after_block, perturbed),
        "by_hand_equals_step": torch.equal(_flat(models[0]), before_failure),
        "restored_after_error": raised and torch.equal(_flat(models[1]), before_failure),
    }


def _averaging(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("swa", "ema"):
        for foreach in (True, False):
            out[f"{mode}-{foreach}"] = _averaging_run(rank, mode, foreach)
    # update_bn: a BatchNorm model, every rank its own batches (the same number: FSDP's forward
    # is a collective); the statistics are all-reduced over the ranks.
    model = _shard(_model(bn=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = flatmin.WeightAveraging(model, start=1)
    for x, y in (_mine(b, rank) for b in _batches(3)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        wa.update()
    live = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    wa.update_bn([_bn_batch(rank, i) for i in range(2)])
    out["bn"] = {
        "average": wa.averaged_state_dict(full=True),
        "live_kept": all(torch.equal(v, model.state_dict()[k]) for k, v in live.items()),
    }
    return out


def _bn_batch(rank: int, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + 10 * rank + i)
    return torch.randn(8, 5, generator=g, dtype=DT) * (1 + rank)


def _make_resumable(rank: int) -> tuple[nn.Module, Any, Any]:
    model = _shard(_model())
    opt = flatmin.LookSAM(model.parameters(), torch.optim.SGD, 0.1, k=3, alpha=0.5, lr=0.1,
                          momentum=0.9)  # fmt: skip
    wa = flatmin.WeightAveraging(model, mode="ema", decay=0.7)
    return model, opt, wa


def _steps(model: nn.Module, opt: Any, wa: Any, batches: list, rank: int) -> None:
    for batch in batches:
        opt.step(Closure(opt, model, *_mine(batch, rank)), model=model)
        wa.update()


def _snapshot(model: nn.Module, opt: Any, wa: Any) -> dict[str, Any]:
    return {
        "params": _flat(model),
        "average": wa.averaged_state_dict(full=True),
        "direction": [_full(opt.state[p]["looksam_u"]) for p in model.parameters()],
        "momentum": [
            _full(opt.base_optimizer.state[p]["momentum_buffer"]) for p in model.parameters()
        ],
        "steps": opt.steps_taken,
    }


def _checkpoint(rank: int, out_dir: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    batches = _batches(7, seed=5)
    model, opt, wa = _make_resumable(rank)
    _steps(model, opt, wa, batches[:4], rank)  # 4 steps: mid-cycle of k = 3
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "avg": wa.state_dict()},
        f"{out_dir}/shard{rank}.pt",
    )
    dcp.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "avg": wa.state_dict()},
        checkpoint_id=f"{out_dir}/dcp",
    )
    _steps(model, opt, wa, batches[4:], rank)
    result = {"uninterrupted": _snapshot(model, opt, wa)}
    # Per-rank files of DTensor state dicts (same world size).
    model, opt, wa = _make_resumable(rank)
    saved = torch.load(f"{out_dir}/shard{rank}.pt")  # weights_only: DTensors are allowed
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    wa.load_state_dict(saved["avg"])
    _steps(model, opt, wa, batches[4:], rank)
    result["per_rank"] = _snapshot(model, opt, wa)
    # torch.distributed.checkpoint: the optimizer needs its state to load into (one step creates
    # it, as torch's own get_optimizer_state_dict does); everything it changed is then loaded.
    model, opt, wa = _make_resumable(rank)
    _steps(model, opt, wa, batches[:1], rank)
    opt.zero_grad()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "avg": wa.state_dict()}
    dcp.load(state, checkpoint_id=f"{out_dir}/dcp")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    wa.load_state_dict(state["avg"])
    _steps(model, opt, wa, batches[4:], rank)
    result["dcp"] = _snapshot(model, opt, wa)
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = {
            "family": _family(rank),
            "reductions": _reductions(rank),
            "by_hand": _by_hand(rank),
            "averaging": _averaging(rank),
            "checkpoint": _checkpoint(rank, out_dir),
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    if hasattr(request.config, "workerinput"):
        # pytest-xdist: the workers of one session share the parent of their base temp, so the
        # job runs once (the first worker to get here) instead of once per worker.
        out = tmp_path_factory.getbasetemp().parent / "fsdp"
        out.mkdir(exist_ok=True)
    else:
        out = tmp_path_factory.mktemp("fsdp")
    with FileLock(out / "lock", blocking=True):
        for attempt in range(3):
            if (out / f"rank{WORLD - 1}.pt").exists():
                break
            try:
                mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
            except mp.ProcessRaisedException:
                # The free port can be taken between choosing and binding it (other tests start
                # servers, e.g. Ray's): try another one.
                if attempt == 2:
                    raise
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# -- the family -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_fsdp_equals_single_process_on_the_concatenated_batch(fsdp, config: int) -> None:
    name, kw, foreach = CONFIGS[config]
    cid = CONFIG_IDS[config]
    model = _model()
    opt = _optimizer(name, kw, model, foreach)
    reference = _train(opt, model, _batches(STEPS), None)
    got = fsdp[0]["family"][cid]
    assert not torch.equal(reference[-1], _flat(_model()))  # it trained
    torch.testing.assert_close(got["trajectory"], reference, **TOL)
    _assert_same(got, fsdp[1]["family"][cid])  # every rank gathers the same weights
    if name == "WASAM":
        expected = opt.averaging.averaged_state_dict()
        assert set(got["average"]) == set(expected)
        for k, v in expected.items():
            torch.testing.assert_close(got["average"][k], v, **TOL)


def test_the_foreach_kernel_and_the_reference_agree_under_fsdp(fsdp) -> None:
    family = fsdp[0]["family"]
    pairs = [(c, c.replace("-foreach", "-single")) for c in CONFIG_IDS if c.endswith("-foreach")]
    pairs = [(a, b) for a, b in pairs if b in CONFIG_IDS]
    assert len(pairs) == len(SINGLE) + len(BALLS)
    for cid, single in pairs:
        torch.testing.assert_close(
            family[cid]["trajectory"], family[single]["trajectory"], rtol=0, atol=1e-12
        )


# -- reductions -----------------------------------------------------------------------------------
def test_sharded_reductions_are_global_and_identical_on_every_rank(fsdp) -> None:
    r0, r1 = fsdp[0]["reductions"], fsdp[1]["reductions"]
    for key in ("sum_sq", "dot", "sum_pow_q", "global_sum"):
        assert torch.equal(r0[key], r1[key]), key  # bit-identical: one all-reduce
    grads, other = r0["full_grads"], r0["full_other"]
    plain = torch.arange(4.0, dtype=DT)
    torch.testing.assert_close(
        r0["sum_sq"], sum((g**2).sum() for g in grads) + (plain**2).sum(), rtol=1e-14, atol=0
    )
    expected_dot = sum((g * o).sum() for g, o in zip(grads, other))
    torch.testing.assert_close(r0["dot"], expected_dot, rtol=1e-14, atol=0)
    cubes = sum((g.abs() ** 3).sum() for g in grads)
    torch.testing.assert_close(r0["sum_pow_q"], cubes, rtol=1e-14, atol=0)
    torch.testing.assert_close(r0["global_sum"], cubes + plain.sum(), rtol=1e-14, atol=0)


def test_a_dtensor_beside_a_plain_tensor_is_an_error_not_a_wrong_update(fsdp) -> None:
    assert "Cannot combine a sharded (DTensor)" in fsdp[0]["reductions"]["mixed_error"]


def test_by_hand_steps_unperturbed_and_restore_after_an_error_under_fsdp(fsdp) -> None:
    for rank in range(WORLD):
        assert fsdp[rank]["by_hand"] == {
            "moved": True,
            "unperturbed_inside": True,
            "perturbed_after": True,
            "by_hand_equals_step": True,
            "restored_after_error": True,
        }


# -- averaging ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["swa", "ema"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_fsdp_average_equals_the_single_process_average(fsdp, mode: str, foreach: bool) -> None:
    got = [fsdp[r]["averaging"][f"{mode}-{foreach}"] for r in range(WORLD)]
    reference = _averaging_run(None, mode, foreach)
    assert set(got[0]["average"]) == set(reference["average"]) == set(_model().state_dict())
    for k, v in reference["average"].items():
        torch.testing.assert_close(got[0]["average"][k], v, **TOL)
    _assert_same(got[0], got[1])
    torch.testing.assert_close(got[0]["swapped"], reference["swapped"], **TOL)
    assert got[0]["restored"] and got[1]["restored"]


def test_fsdp_update_bn_equals_torch_over_every_ranks_batches(fsdp) -> None:
    got = [fsdp[r]["averaging"]["bn"] for r in range(WORLD)]
    _assert_same(got[0]["average"], got[1]["average"])
    assert got[0]["live_kept"] and got[1]["live_kept"]
    ref = _model(bn=True)
    ref.load_state_dict(got[0]["average"])
    update_bn([_bn_batch(r, i) for r in range(WORLD) for i in range(2)], ref)
    for name, b in ref.named_buffers():
        torch.testing.assert_close(got[0]["average"][name], b, rtol=1e-12, atol=1e-14)


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["per_rank", "dcp"])
def test_a_sharded_checkpoint_resumes_bit_identically(fsdp, how: str) -> None:
    for rank in range(WORLD):
        result = fsdp[rank]["checkpoint"]
        assert result["uninterrupted"]["steps"] == 7
        _assert_same(result[how], result["uninterrupted"], how)
