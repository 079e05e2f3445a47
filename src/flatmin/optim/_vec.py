"""Reductions and fused updates over lists of tensors, without host syncs, plain or sharded.

Every global reduction of the SAM family (the norm of ``ε̂``, the dot products and norms of the
variants) and every multi-tensor update goes through here, and this is the one place that knows
how a tensor list is laid out:

* **plain tensors**: one ``torch._foreach_*`` call per (device, dtype);
* **DTensors** (FSDP2's ``fully_shard``, tensor parallelism): the same kernels on the local shards
  (``to_local()``, views, so in-place updates reach the DTensor), and every sum over tensors is a
  sum of local partial sums, all-reduced over the process groups of the mesh dimensions on which
  the tensor is sharded (once per layout, not per tensor; replicated dimensions add nothing).
  Nothing is gathered; elementwise work never leaves the rank.

A list may mix both (parameters and buffers of a model): a plain tensor counts once, as it is.
The plain path is the code that ran before the sharded one existed; deciding between them costs
one type check per tensor, or one per list where the caller knows the list is ``uniform``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "add_scaled_",
    "copy_",
    "dot",
    "foreach",
    "global_sum",
    "is_sharded",
    "local_shards",
    "reduction_keys",
    "split_by_device_dtype",
    "sum_pow_q",
    "sum_sq",
    "uniform_layout",
    "wide_dtype",
]

#: The process groups over which a tensor's partial sums are all-reduced (``()``: plain tensor).
Key = tuple[Any, ...]


def _dtensor_type() -> type[DTensor] | None:
    # A DTensor exists only once its module is imported, so a run without one never imports it.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_sharded(tensors: Sequence[Tensor], *, uniform: bool = False) -> bool:
    """Whether any tensor is a DTensor (``uniform``: they are all alike, look at the first)."""
    cls = _dtensor_type()
    if cls is None or not tensors:
        return False
    if uniform:
        return isinstance(tensors[0], cls)
    return any(isinstance(t, cls) for t in tensors)


def uniform_layout(tensors: Iterable[Tensor]) -> bool:
    """Whether the tensors share one device, one dtype and one kind (all plain or all DTensors)."""
    cls = _dtensor_type()
    if cls is None:
        return len({(t.device, t.dtype) for t in tensors}) <= 1
    return len({(t.device, t.dtype, isinstance(t, cls)) for t in tensors}) <= 1


def local_shards(*lists: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
    """Aligned lists with every DTensor replaced by its local shard (a view of its storage).

    Elementwise work on the shards is the elementwise work on the DTensors when the tensors at
    one position share a layout (a parameter, its gradient, its optimizer state); that is checked.

    Raises:
        RuntimeError: At some position a DTensor meets a plain tensor or another placement.
    """
    cls = _dtensor_type()
    out: list[list[Tensor]] = [[] for _ in lists]
    for i, lead in enumerate(lists[0]):
        placements = lead.placements if cls is not None and isinstance(lead, cls) else None
        for k, ts in enumerate(lists):
            t = ts[i]
            if cls is not None and (placements is not None or isinstance(t, cls)):
                if not (isinstance(t, cls) and t.placements == placements):
                    raise RuntimeError(
                        "Cannot combine a sharded (DTensor) and a differently laid-out tensor "
                        f"elementwise: {_describe(lead)} and {_describe(t)} at position {i} "
                        "(a parameter, its gradient and its optimizer state must share one "
                        "layout; shard every module with fully_shard before building the "
                        "optimizer)"
                    )
                t = t.to_local()
            out[k].append(t)
    return tuple(out)


def _describe(t: Tensor) -> str:
    placements = getattr(t, "placements", None)
    kind = f"DTensor{tuple(placements)}" if placements is not None else "plain tensor"
    return f"{kind} of shape {tuple(t.shape)}"


def reduction_keys(tensors: Sequence[Tensor]) -> list[Key]:
    """Per tensor, the process groups over which the partial sums of its local shard add up.

    ``()`` for a plain tensor (its sum is complete); for a DTensor the groups of the mesh
    dimensions it is sharded on. Looked up once per (mesh, placements).

    Raises:
        RuntimeError: A DTensor with a ``Partial`` placement (reduce it first).
    """
    cls = _dtensor_type()
    memo: dict[Hashable, Key] = {}
    keys: list[Key] = []
    for t in tensors:
        if cls is None or not isinstance(t, cls):
            keys.append(())
            continue
        mesh, placements = t.device_mesh, t.placements
        key = memo.get((mesh, placements))
        if key is None:
            if any(pl.is_partial() for pl in placements):
                raise RuntimeError(
                    f"Cannot reduce a DTensor with a Partial placement {tuple(placements)} "
                    "(redistribute it to Shard/Replicate first)"
                )
            key = tuple(mesh.get_group(d) for d, pl in enumerate(placements) if pl.is_shard())
            memo[(mesh, placements)] = key
        keys.append(key)
    return keys


def _all_reduce(partials: dict[Key, Tensor]) -> Tensor:
    """Σ over keys of each partial sum all-reduced over its groups, on the first one's device."""
    import torch.distributed as dist

    total: Tensor | None = None
    for key, s in partials.items():
        for group in key:
            dist.all_reduce(s, group=group)
        total = s if total is None else total + s.to(total.device)
    assert total is not None  # at least one key
    return total


def _index_by_device_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    index: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        index[(t.device, t.dtype)].append(i)
    return list(index.values())


def split_by_device_dtype(
    *lists: Sequence[Tensor], uniform: bool = False
) -> list[tuple[list[Tensor], ...]]:
    """Split aligned tensor lists by the (device, dtype) of the first list.

    ``torch._foreach_*`` ops want one device and dtype per call. ``uniform=True`` promises that
    all tensors already share one (SAM checks it once per set of parameters), which skips the
    per-tensor scan: on an accelerator that Python loop costs more than the kernels.
    """
    if uniform or not lists[0]:
        return [tuple(list(t) for t in lists)]
    return [tuple([t[i] for i in idx] for t in lists) for idx in _index_by_device_dtype(lists[0])]


def sum_pow_q(
    hs: list[Tensor],
    q: float,
    dtype: torch.dtype,
    uniform: bool,
    keys: Sequence[Key] | None = None,
) -> Tensor:
    """Return Σ_i ‖h_i‖_q^q as one 0-d tensor, without a host sync.

    Args:
        hs: Plain tensors (local shards for a sharded list).
        q: The exponent.
        dtype: The accumulation dtype.
        uniform: All tensors share one device and dtype.
        keys: Per tensor, the groups over which its partial sum is all-reduced
            (:func:`reduction_keys` of the DTensors that ``hs`` are the shards of); ``None``
            for a plain list.
    """
    if keys is not None:
        return _sum_pow_q_sharded(hs, q, dtype, uniform, keys)
    partial = []
    for (sub,) in split_by_device_dtype(hs, uniform=uniform):
        norms = torch._foreach_norm(sub, q, dtype=dtype)
        partial.append(torch.stack(norms).pow(q).sum())
    if len(partial) == 1:
        return partial[0]
    device = partial[0].device
    return torch.stack([s.to(device) for s in partial]).sum()


def _sum_pow_q_sharded(
    hs: list[Tensor], q: float, dtype: torch.dtype, uniform: bool, keys: Sequence[Key]
) -> Tensor:
    partials: dict[Key, Tensor] = {}
    for idx in [list(range(len(hs)))] if uniform else _index_by_device_dtype(hs):
        norms = torch._foreach_norm([hs[i] for i in idx], q, dtype=dtype)
        _add_by_key(partials, torch.stack(norms).pow(q), [keys[i] for i in idx])
    return _all_reduce(partials)


def _add_by_key(partials: dict[Key, Tensor], per_tensor: Tensor, keys: Sequence[Key]) -> None:
    """Add the entries of ``per_tensor`` (one per tensor) into ``partials`` by their key."""
    for key in dict.fromkeys(keys):
        if len(keys) == 1 or all(k == key for k in keys):
            s = per_tensor.sum()
        else:
            s = per_tensor[[j for j, k in enumerate(keys) if k == key]].sum()
        partials[key] = s if key not in partials else partials[key] + s.to(partials[key])


def sum_sq(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ‖t‖² over ``tensors`` as a 0-d tensor on the first tensor's device (no host sync)."""
    if is_sharded(tensors):
        (local,) = local_shards(tensors)
        total = sum_pow_q(local, 2.0, dtype, False, reduction_keys(tensors))
        return total.to(local[0].device)
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack([n.to(device) for n in norms]).square().sum()


def dot(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a 0-d tensor on the first tensor's device (no host sync)."""
    if is_sharded(a):
        la, lb = local_shards(a, b)
        device = la[0].device
        per_tensor = torch.stack(
            [torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)).to(device)
             for x, y in zip(la, lb)]
        )  # fmt: skip
        partials: dict[Key, Tensor] = {}
        _add_by_key(partials, per_tensor, reduction_keys(a))
        return _all_reduce(partials)
    device = a[0].device
    return torch.stack(
        [
            torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)).to(device)
            for x, y in zip(a, b)
        ]
    ).sum()


def global_sum(terms: Sequence[Tensor]) -> Tensor | None:
    """Σ of 0-d terms with differentiable ops; ``None`` when there is none.

    A DTensor term (``x.sum()`` of a sharded tensor: a ``Partial`` sum) is reduced over its mesh,
    once per layout (``full_tensor()``, which autograd differentiates). Plain terms are added in
    order, as the reference form of ``ε̂`` always did.
    """
    cls = _dtensor_type()
    total: Tensor | None = None
    sharded: dict[Hashable, DTensor] = {}
    for t in terms:
        if cls is not None and isinstance(t, cls):
            key = (t.device_mesh, t.placements)
            # Partial + Partial stays a DTensor (linear), reduced once below.
            sharded[key] = t if key not in sharded else sharded[key] + t  # type: ignore[assignment]
        else:
            total = t if total is None else total + t.to(total.device)
    for s in sharded.values():
        full = s.full_tensor()
        total = full if total is None else total + full.to(total.device)
    return total


def wide_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the accumulation dtype of reductions)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def foreach(op: Callable[..., Any], *args: Any, uniform: bool = False, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)`` for an elementwise ``torch._foreach_*`` op, on shards if sharded.

    Every list argument is aligned with the first; scalars pass through. On DTensors the op runs
    on the local shards: an in-place op updates the DTensors, an out-of-place op returns
    DTensors laid out like the first list's (plain tensors stay plain).

    Args:
        op: E.g. ``torch._foreach_lerp_``.
        *args: The op's positional arguments, the first a list of tensors.
        uniform: All tensors of the first list are alike (one look decides plain or sharded).
        **kwargs: The op's keyword arguments (``alpha=``).
    """
    lead: Sequence[Tensor] = args[0]
    if not is_sharded(lead, uniform=uniform):
        return op(*args, **kwargs)
    lists = [i for i, a in enumerate(args) if isinstance(a, (list, tuple))]
    local = local_shards(*(args[i] for i in lists))
    call = list(args)
    for i, shards in zip(lists, local):
        call[i] = shards
    out = op(*call, **kwargs)
    if out is None:
        return None
    cls = _dtensor_type()
    assert cls is not None  # is_sharded found one
    return [
        cls.from_local(
            o, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
        if isinstance(t, cls)
        else o
        for o, t in zip(out, lead)
    ]


def copy_(dst: list[Tensor], src: list[Tensor], *, uniform: bool = False) -> None:
    """Bit-exact ``dst ← src`` with one ``_foreach_copy_`` (on the local shards of DTensors)."""
    if dst:
        foreach(torch._foreach_copy_, dst, src, uniform=uniform)


def _fused_addcmul(device: torch.device) -> bool:
    # On CPU the foreach ops loop over tensors anyway, so one fused addcmul per tensor (one pass
    # over memory) wins; on accelerators a broadcast 0-d operand leaves the multi-tensor fast path.
    return device.type == "cpu"


def add_scaled_(
    tensors: Sequence[Tensor],
    others: Sequence[Tensor],
    scale: Tensor,
    *,
    uniform: bool = False,
    scratch_others: bool = False,
) -> None:
    """``t ← t + s·o`` for every pair, with ``s`` a 0-d tensor: no host sync, no ``.item()``.

    On CPU one fused ``addcmul`` per tensor (one pass, no temporary). Elsewhere ``_foreach_mul``
    into one temporary plus ``_foreach_add_``, which keeps the multi-tensor fast path (a broadcast
    0-d operand would fall back to one kernel launch per tensor); with ``scratch_others`` the
    product goes into ``others`` in place instead, with no temporary at all. DTensors are
    updated through their local shards.

    Args:
        tensors: Updated in place.
        others: Same shapes (and layouts) as ``tensors``.
        scale: A 0-d tensor on any device; it is moved to each tensor's device and dtype.
        uniform: All tensors share one device and dtype (see :func:`split_by_device_dtype`).
        scratch_others: ``others`` may be overwritten (e.g. gradients about to be cleared).
    """
    if is_sharded(tensors, uniform=uniform):
        tensors, others = local_shards(tensors, others)
    for ts, os in split_by_device_dtype(tensors, others, uniform=uniform):
        if not ts:
            continue
        s = scale.to(device=ts[0].device, dtype=ts[0].dtype)
        if _fused_addcmul(ts[0].device):
            torch._foreach_addcmul_(ts, os, [s] * len(ts))
        elif scratch_others:
            torch._foreach_mul_(os, s)
            torch._foreach_add_(ts, os)
        else:
            torch._foreach_add_(ts, torch._foreach_mul(os, s))
