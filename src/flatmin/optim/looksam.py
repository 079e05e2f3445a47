r"""SAM every k steps, and LookSAM: cheaper SAM that skips the second pass on most steps.

Algorithm (Liu et al. 2022, Alg. 1), with ``t`` the step counter::

    if t % k == 0:                                   # a full SAM step (two passes)
        g   = ∇L(w);  g_s = ∇L(w + ε̂)
        g_v = g_s − (g·g_s / ‖g‖²) g                 # part of g_s orthogonal to g, stored
        update with g_s
    else:                                            # one pass only
        g   = ∇L(w)
        update with g + α (‖g‖ / ‖g_v‖) g_v          # reuse the stored direction

:class:`SAMEveryK` is the same schedule with ``α = 0`` and no stored state: plain base steps in
between. On the in-between steps both run the closure once (no perturbation, no second
forward/backward), so their cost is the base optimizer's plus, for LookSAM, one norm and one
fused ``g ← g + s·u`` over the parameters.

References:
    Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022,
    arXiv:2203.02714. Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, arXiv:2010.01412.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from flatmin.optim._checks import GroupCheck, check_nonneg, check_positive_int
from flatmin.optim._vec import (
    add_scaled_,
    copy_,
    dot,
    foreach,
    split_by_device_dtype,
    sum_sq,
    wide_dtype,
)
from flatmin.optim.sam import SAM

__all__ = ["LookSAM", "SAMEveryK"]

_U_KEY = "looksam_u"


class SAMEveryK(SAM):
    r"""SAM on every ``k``-th step, plain base-optimizer steps in between.

    Update rule, with ``t`` counting the steps taken so far (starting at 0):

    .. math::

        w \leftarrow \begin{cases}
            \mathrm{base\_step}\big(w, \nabla L(w + \hat\epsilon)\big) & t \bmod k = 0 \\
            \mathrm{base\_step}\big(w, \nabla L(w)\big) & \text{otherwise.}
        \end{cases}

    ``step(closure)`` calls the closure twice on SAM steps and **once** on the others. By hand:
    check :attr:`is_sam_step`; if true, ``first_step``/second pass/``second_step``; if false,
    :meth:`plain_step` after the one backward. Both advance the counter ``steps_taken``, which is
    saved in :meth:`state_dict` (with ``k``: loading into another ``k`` is an error). With
    ``k = 1`` this is :class:`~flatmin.optim.SAM`.

    Args:
        k: Take a SAM step every ``k`` steps (``k >= 1``, default 2). Every other argument is
            :class:`~flatmin.optim.SAM`'s.

    Raises:
        TypeError: ``k`` is not an int (and SAM's own checks).
        ValueError: ``k < 1`` (and SAM's own checks).

    References:
        Foret et al., ICLR 2021, arXiv:2010.01412 (SAM); Liu et al., CVPR 2022,
        arXiv:2203.02714 (periodic SAM as the LookSAM baseline).

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.SAMEveryK(model.parameters(), torch.optim.SGD, 0.05, k=5, lr=0.1)
        >>> opt.is_sam_step  # steps 0, 5, 10, ... take two passes, the others one
        True
    """

    k: int
    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {"k": (2, check_positive_int)}

    @property
    def is_sam_step(self) -> bool:
        """Whether the next step is a full SAM step (``steps_taken % k == 0``)."""
        return self.steps_taken % self.k == 0

    def _takes_sam_step(self) -> bool:
        return self.is_sam_step

    def plain_step(self, zero_grad: bool = False) -> None:
        """An in-between step: the base optimizer's step with the gradient now in ``.grad``.

        Args:
            zero_grad: Clear the gradients after the base step.

        Raises:
            RuntimeError: Called between :meth:`first_step` and :meth:`second_step`.
        """
        self._plain_step()
        if zero_grad:
            self.zero_grad()

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"{type(self).__name__}(base_optimizer={base}, k={self.k})"


class LookSAM(SAMEveryK):
    r"""LookSAM: SAM every ``k`` steps, reusing the SAM gradient's orthogonal part in between.

    On SAM steps (``t mod k = 0``) with ``g = ∇L(w)`` and ``g_s = ∇L(w + ε̂)`` over all groups,
    LookSAM stores the unit vector of

    .. math::

        g_v = g_s - \frac{g \cdot g_s}{\|g\|^2}\, g,

    the component of the SAM gradient orthogonal to the plain gradient, and updates with ``g_s``.
    On the other steps it takes one pass and updates with

    .. math::

        g \leftarrow g + \alpha\, \frac{\|g\|}{\|g_v\|}\, g_v .

    The stored direction costs one parameter-sized buffer (``self.state[p]["looksam_u"]``,
    saved in :meth:`state_dict`); on SAM steps the same buffer holds ``g`` between the passes, so
    the peak extra state is SAM's backup plus one copy of the parameters. ``alpha`` lives in the
    param groups (per group, schedulable). With ``k = 1`` (or ``alpha = 0``) the updates equal
    :class:`~flatmin.optim.SAM` (:class:`SAMEveryK`).

    Args:
        k: Take a full SAM step every ``k`` steps (default and paper: 5).
        alpha: Weight α of the reused direction (default and paper: 0.7). Every other argument
            is :class:`~flatmin.optim.SAM`'s.

    Raises:
        TypeError: ``k`` is not an int or ``alpha`` not a float (and SAM's own checks).
        ValueError: ``k < 1`` or ``alpha`` negative or non-finite (and SAM's own checks).

    References:
        Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022,
        arXiv:2203.02714.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.LookSAM(model.parameters(), torch.optim.SGD, 0.05, k=5, alpha=0.7, lr=0.1)
        >>> opt.param_groups[0]["alpha"], opt.k
        (0.7, 5)
    """

    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {"k": (5, check_positive_int)}
    _group_defaults: ClassVar[dict[str, Any]] = {"alpha": 0.7}
    _group_checks: ClassVar[dict[str, GroupCheck]] = {**SAM._group_checks, "alpha": check_nonneg}
    # ‖g‖² of the first pass and the tensors it had, between first_step and second_step.
    _g_sq: Tensor | None = None
    _first_params: Sequence[Tensor] = ()

    def _with_grad(self) -> list[Tensor]:
        return [w for group in self.param_groups for w in group["params"] if w.grad is not None]

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        bufs = []
        for w in params:
            buf = self.state[w].get(_U_KEY)
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
                buf = self.state[w][_U_KEY] = torch.zeros_like(w)
            bufs.append(buf)
        return bufs

    @torch.no_grad()
    def _on_first_pass(self) -> None:
        # Keep g in the direction buffers (they hold g_v / ‖g_v‖ again after the step).
        params = self._with_grad()
        self._first_params = params
        if params:
            grads = [w.grad for w in params if w.grad is not None]
            copy_(self._buffers(params), grads)
            self._g_sq = sum_sq(grads, wide_dtype(params))

    @torch.no_grad()
    def _combine_(self) -> None:
        # Turn the stored g into the unit g_v / ‖g_v‖; the update itself is g_s.
        first, g_sq = self._first_params, self._g_sq
        self._first_params, self._g_sq = (), None
        params = [w for w in first if w.grad is not None]
        if not params or g_sq is None:
            return
        bufs = [self.state[w][_U_KEY] for w in params]
        g_s = [w.grad for w in params if w.grad is not None]
        dtype = g_sq.dtype
        # g_v = g_s − c·g with c = g·g_s/‖g‖² (c = 0 when g = 0, so g_v = g_s).
        c = dot(bufs, g_s, dtype) / (g_sq + self.eps)
        for bs, ss in split_by_device_dtype(bufs, g_s):
            foreach(torch._foreach_mul_, bs, (-c).to(device=bs[0].device, dtype=bs[0].dtype))
            foreach(torch._foreach_add_, bs, ss)
        inv = 1.0 / (sum_sq(bufs, dtype).sqrt() + self.eps)
        for bs, _ in split_by_device_dtype(bufs, g_s):
            foreach(torch._foreach_mul_, bs, inv.to(device=bs[0].device, dtype=bs[0].dtype))

    @torch.no_grad()
    def _adjust_plain_grad_(self) -> None:
        if all(self._hp(group, "alpha") == 0.0 for group in self.param_groups):
            return
        params = [w for w in self._with_grad() if _U_KEY in self.state.get(w, {})]
        params = [w for w in params if self.state[w][_U_KEY].shape == w.shape]
        if not params:
            return
        grads = [w.grad for w in params if w.grad is not None]
        norm = sum_sq(grads, wide_dtype(params)).sqrt()
        chosen = set(map(id, params))
        # g ← g + α‖g‖·u with u = g_v/‖g_v‖ stored: one norm and one fused pass per group.
        for group in self.param_groups:
            mine = [w for w in group["params"] if id(w) in chosen]
            if mine and self._hp(group, "alpha") != 0.0:
                add_scaled_(
                    [w.grad for w in mine if w.grad is not None],
                    [self.state[w][_U_KEY] for w in mine],
                    self._hp(group, "alpha") * norm,
                )
