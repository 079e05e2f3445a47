"""Hessian-vector products shared by the optimizers (second-order SAM) and the analysis layer.

Two backends compute ``H v`` for the Hessian ``H = ∇²L(w)`` of a scalar loss without forming ``H``:

* :func:`hvp` — *double backward* (Pearlmutter 1994): with ``g = ∇L(w)`` built with
  ``create_graph=True``, ``H v = ∇_w (gᵀ v)``. It works on any ``nn.Module`` (hooks, BatchNorm in
  either mode) and costs roughly one extra backward pass through the graph of ``g``.
* :func:`functional_hvp` — *forward-over-reverse* with :mod:`torch.func`:
  ``H v = jvp(grad(L), (w,), (v,))[1]`` on a pure function of the parameters obtained with
  :func:`torch.func.functional_call`. It never touches ``.grad`` and does not need the loss graph.

Both return one tensor per parameter; a parameter the loss does not depend on gets zeros. This
module must not import :mod:`flatmin.analysis` (the optimizer layer imports it).

References:
    Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 1994.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["flat_to_tensors", "functional_hvp", "hvp", "tensors_to_flat", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Return the parameters that require a gradient, by name, in ``named_parameters`` order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _check_vectors(params: Sequence[Tensor], vectors: Sequence[Tensor]) -> None:
    if len(params) != len(vectors):
        raise ValueError(
            f"Invalid vectors: {len(vectors)} tensors for {len(params)} parameters (expected equal)"
        )
    for i, (p, v) in enumerate(zip(params, vectors, strict=True)):
        if p.shape != v.shape:
            raise ValueError(
                f"Invalid vector {i}: shape {tuple(v.shape)} (expected {tuple(p.shape)})"
            )


def hvp(
    loss: Tensor,
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    grads: Sequence[Tensor | None] | None = None,
    create_graph: bool = False,
) -> list[Tensor]:
    r"""Hessian-vector product by double backward.

    .. math:: H v = \nabla_w \big( \nabla_w L(w)^\top v \big)

    Args:
        loss: Scalar loss whose graph reaches ``params``.
        params: Tensors ``w`` (leaves requiring grad) that define the Hessian.
        vectors: One tensor per parameter, same shapes; ``v`` is treated as a constant.
        grads: Optional ``∇L(w)`` already computed with ``create_graph=True`` (saves one backward).
            Entries may be ``None`` for parameters the loss does not reach; an entry without a
            graph (a gradient constant in ``w``) contributes nothing.
        create_graph: Keep the graph of the result (for third-order quantities). When false the
            graph of ``loss`` is still retained, so several products can share one ``grads``.

    Returns:
        ``[H v]`` split per parameter; zeros for parameters the loss does not depend on.

    Raises:
        ValueError: if the number or shapes of ``vectors`` do not match ``params``, or ``loss`` is
            not a scalar.
        RuntimeError: if no entry of ``grads`` has a graph (built without ``create_graph=True``).

    References:
        Pearlmutter 1994, "Fast Exact Multiplication by the Hessian".

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = (w**3).sum()
        >>> hvp(loss, [w], [torch.tensor([1.0, 0.0])])[0]
        tensor([6., 0.])
    """
    params = list(params)
    vectors = list(vectors)
    _check_vectors(params, vectors)
    if loss.numel() != 1:
        raise ValueError(f"Invalid loss: shape {tuple(loss.shape)} (expected a scalar)")
    if grads is None:
        grad_list: list[Tensor | None] = list(
            torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        )
    else:
        grad_list = list(grads)
        if len(grad_list) != len(params):
            raise ValueError(
                f"Invalid grads: {len(grad_list)} tensors for {len(params)} parameters"
            )
    pairs = [
        (g, v.detach().to(g.dtype))
        for g, v in zip(grad_list, vectors, strict=True)
        if g is not None and g.requires_grad
    ]
    if grads is not None and not pairs and any(g is not None for g in grad_list):
        # A gradient that is constant in w has no graph; if none has one, create_graph was missed.
        raise RuntimeError("Invalid grads: none has a graph (compute them with create_graph=True)")
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    dot = torch.stack([(g * v).sum() for g, v in pairs]).sum()
    out = torch.autograd.grad(
        dot, params, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, out, strict=True)]


def functional_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch: tuple[Tensor, Tensor],
    vectors: Sequence[Tensor] | Mapping[str, Tensor],
    *,
    params: Mapping[str, Tensor] | None = None,
) -> list[Tensor]:
    r"""Hessian-vector product by forward-over-reverse differentiation with :mod:`torch.func`.

    .. math:: H v = \frac{\partial}{\partial t} \nabla_w L(w + t v) \Big|_{t=0}
       = \mathrm{jvp}(\nabla_w L, (w,), (v,))

    The model is called as a pure function of its parameters through
    :func:`torch.func.functional_call`; buffers are read from the module, in its current mode.
    In training mode BatchNorm would write running statistics inside the transform, so call this
    in ``eval()`` mode (or with BatchNorm tracking disabled); the model's parameters, ``.grad`` and
    mode are never changed.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch: ``(inputs, targets)``.
        vectors: One tensor per trainable parameter (``named_parameters`` order, requires_grad
            only), or a mapping name → tensor.
        params: Optional name → tensor mapping of the point ``w`` (defaults to the model's
            trainable parameters). Parameters not listed are held fixed.

    Returns:
        ``[H v]`` in the order of ``params``; zeros where the loss does not depend on a parameter.

    Raises:
        ValueError: if ``vectors`` do not match the parameters.

    References:
        Pearlmutter 1994; torch.func documentation ("Hessian-vector products").
    """
    from torch.func import functional_call, grad, jvp

    point = dict(trainable_parameters(model) if params is None else params)
    names = list(point)
    if isinstance(vectors, Mapping):
        missing = [n for n in names if n not in vectors]
        if missing:
            raise ValueError(f"Invalid vectors: missing entries for parameters {missing}")
        vec_list = [vectors[n] for n in names]
    else:
        vec_list = list(vectors)
    primals = [point[n].detach() for n in names]
    _check_vectors(primals, vec_list)
    inputs, targets = batch

    def loss_of(flat: tuple[Tensor, ...]) -> Tensor:
        out = functional_call(model, dict(zip(names, flat, strict=True)), (inputs,))
        return loss_fn(out, targets)

    tangents = tuple(v.detach().to(p.dtype) for p, v in zip(primals, vec_list, strict=True))
    out = jvp(grad(loss_of), (tuple(primals),), (tangents,))
    return list(out[1])


def tensors_to_flat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (``torch.cat`` of ``reshape(-1)``)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def flat_to_tensors(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like`` (inverse of :func:`tensors_to_flat`)."""
    out: list[Tensor] = []
    offset = 0
    for t in like:
        n = t.numel()
        out.append(flat[offset : offset + n].view_as(t))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"Invalid flat vector: {flat.numel()} entries (expected {offset})")
    return out
