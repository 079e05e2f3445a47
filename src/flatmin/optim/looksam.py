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

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim._perturb import add_scaled_, split_by_device_dtype
from flatmin.optim.sam import SAM

__all__ = ["LookSAM", "SAMEveryK"]

_VARIANT_KEY = "variant"
_U_KEY = "looksam_u"


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"Invalid k: {k!r} (expected an int >= 1)")
    if k < 1:
        raise ValueError(f"Invalid k: {k} (expected an int >= 1)")
    return k


def _sum_sq(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ‖t‖² over ``tensors`` as a 0-d tensor on the first tensor's device (no host sync)."""
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack([n.to(device) for n in norms]).square().sum()


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
    :meth:`plain_step` after the one backward. Both advance the counter, which is saved in
    :meth:`state_dict`. With ``k = 1`` this is :class:`~flatmin.optim.SAM`.

    Args:
        params: As for :class:`~flatmin.optim.SAM`.
        base_optimizer: As for :class:`~flatmin.optim.SAM`.
        k: Take a SAM step every ``k`` steps (``k >= 1``).
        **kwargs: Everything else :class:`~flatmin.optim.SAM` accepts (``rho``, ``p``,
            ``adaptive``, ..., and the base optimizer's arguments such as ``lr``).

    Raises:
        TypeError: ``k`` is not an int (and SAM's own checks).
        ValueError: ``k < 1`` (and SAM's own checks).

    References:
        Foret et al., ICLR 2021, arXiv:2010.01412 (SAM); Liu et al., CVPR 2022,
        arXiv:2203.02714 (periodic SAM as the LookSAM baseline).

    Example:
        >>> import torch, flatmin
        >>> from flatmin.optim.looksam import SAMEveryK
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAMEveryK(model.parameters(), torch.optim.SGD, k=5, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> losses = [opt.step(closure) for _ in range(5)]  # 1 SAM step, 4 plain steps
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        k: int = 2,
        **kwargs: Any,
    ) -> None:
        self.k = _check_k(k)
        # A Python int: deciding the branch costs no device sync.
        self.steps_taken = 0
        super().__init__(params, base_optimizer, **kwargs)

    @property
    def is_sam_step(self) -> bool:
        """Whether the next step is a full SAM step (``steps_taken % k == 0``)."""
        return self.steps_taken % self.k == 0

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """SAM's second step (restore ``w``, base step), counted as one step."""
        super().second_step(zero_grad=zero_grad)
        self.steps_taken += 1

    @torch.no_grad()
    def plain_step(self, zero_grad: bool = False) -> None:
        """An in-between step: the base optimizer's step with the gradient now in ``.grad``.

        Args:
            zero_grad: Clear the gradients after the base step.

        Raises:
            RuntimeError: Called between :meth:`first_step` and :meth:`second_step`.
        """
        if self.perturbed:
            raise RuntimeError("plain_step() called between first_step() and second_step()")
        self._adjust_plain_grad()
        self.base_optimizer.step()
        self._opt_called = True
        self.steps_taken += 1
        if zero_grad:
            self.zero_grad()

    def _adjust_plain_grad(self) -> None:
        """Hook for subclasses: change ``.grad`` before an in-between base step."""

    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, **kwargs: Any
    ) -> Tensor | None:
        """A SAM step on every ``k``-th call, otherwise one pass and a :meth:`plain_step`.

        Args:
            closure: The PyTorch closure contract (zero grads, forward, backward, return the
                loss); called twice on SAM steps and once otherwise.
            **kwargs: Passed to :meth:`SAM.step` on SAM steps (``model=``, ...); on in-between
                steps there is no second pass for them to act on.

        Returns:
            The loss at ``w``.
        """
        if closure is None or self.is_sam_step or self.perturbed:
            return super().step(closure, **kwargs)
        with torch.enable_grad():
            loss = closure()
        self.plain_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict plus the step counter (and subclass state)."""
        state = super().state_dict()
        state[_VARIANT_KEY] = {"steps_taken": self.steps_taken, "k": self.k}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (the counter, then SAM's and the base optimizer's state)."""
        if not isinstance(state_dict, dict) or _VARIANT_KEY not in state_dict:
            raise ValueError(
                f"Invalid {type(self).__name__} state_dict: no {_VARIANT_KEY!r} entry (was it "
                f"saved by {type(self).__name__}.state_dict()?)"
            )
        rest = {key: value for key, value in state_dict.items() if key != _VARIANT_KEY}
        super().load_state_dict(rest)
        self.steps_taken = int(state_dict[_VARIANT_KEY]["steps_taken"])

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
    the peak extra state is SAM's backup plus one copy of the parameters. With ``k = 1`` (or
    ``alpha = 0``) the updates equal :class:`~flatmin.optim.SAM` (:class:`SAMEveryK`).

    Args:
        params: As for :class:`~flatmin.optim.SAM`.
        base_optimizer: As for :class:`~flatmin.optim.SAM`.
        k: Take a full SAM step every ``k`` steps (the paper uses 5).
        alpha: Weight α of the reused direction (the paper uses 0.7).
        **kwargs: Everything else :class:`~flatmin.optim.SAM` accepts.

    Raises:
        TypeError: ``k`` is not an int or ``alpha`` not a float (and SAM's own checks).
        ValueError: ``k < 1`` or ``alpha`` negative or non-finite (and SAM's own checks).

    References:
        Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022,
        arXiv:2203.02714.

    Example:
        >>> import torch
        >>> from flatmin.optim.looksam import LookSAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = LookSAM(model.parameters(), torch.optim.SGD, k=5, alpha=0.7, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> losses = [opt.step(closure) for _ in range(5)]
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"Invalid alpha: {alpha!r} (expected a float)")
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"Invalid alpha: {alpha} (expected a finite value >= 0)")
        self.alpha = float(alpha)
        # ‖g‖² of the first pass, between first_step and second_step (a 0-d tensor).
        self._g_sq: Tensor | None = None
        self._first_params: list[Tensor] = []
        super().__init__(params, base_optimizer, k=k, **kwargs)

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
    def first_step(self, zero_grad: bool = False) -> None:
        """Keep ``g`` (in the direction buffers), then SAM's ``w ← w + ε̂``."""
        params = self._with_grad()
        if params and not self.perturbed:
            grads = [w.grad for w in params if w.grad is not None]
            torch._foreach_copy_(self._buffers(params), grads)
            self._g_sq = _sum_sq(grads, torch.float64 if _any_f64(params) else torch.float32)
        self._first_params = params
        super().first_step(zero_grad=zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Turn the stored ``g`` into the unit ``g_v / ‖g_v‖``, then SAM's second step."""
        if self.perturbed and self._first_params and self._g_sq is not None:
            params = [w for w in self._first_params if w.grad is not None]
            if params:
                bufs = [self.state[w][_U_KEY] for w in params]
                g_s = [w.grad for w in params if w.grad is not None]
                dtype = self._g_sq.dtype
                device = self._g_sq.device
                dot = torch.stack(
                    [
                        torch.dot(b.reshape(-1).to(dtype), s.reshape(-1).to(dtype)).to(device)
                        for b, s in zip(bufs, g_s)
                    ]
                ).sum()
                # g_v = g_s − c·g with c = g·g_s/‖g‖² (c = 0 when g = 0, so g_v = g_s).
                c = dot / (self._g_sq + self.eps)
                for bs, ss in split_by_device_dtype(bufs, g_s):
                    torch._foreach_mul_(bs, (-c).to(device=bs[0].device, dtype=bs[0].dtype))
                    torch._foreach_add_(bs, ss)
                inv = 1.0 / (_sum_sq(bufs, dtype).sqrt() + self.eps)
                for bs, _ in split_by_device_dtype(bufs, g_s):
                    torch._foreach_mul_(bs, inv.to(device=bs[0].device, dtype=bs[0].dtype))
        self._g_sq = None
        self._first_params = []
        super().second_step(zero_grad=zero_grad)

    @torch.no_grad()
    def _adjust_plain_grad(self) -> None:
        if self.alpha == 0.0:
            return
        params = [w for w in self._with_grad() if _U_KEY in self.state[w]]
        params = [w for w in params if self.state[w][_U_KEY].shape == w.shape]
        if not params:
            return
        grads = [w.grad for w in params if w.grad is not None]
        dtype = torch.float64 if _any_f64(params) else torch.float32
        # g ← g + α‖g‖·u with u = g_v/‖g_v‖ stored: one norm and one fused pass.
        scale = self.alpha * _sum_sq(grads, dtype).sqrt()
        add_scaled_(grads, [self.state[w][_U_KEY] for w in params], scale)


def _any_f64(params: list[Tensor]) -> bool:
    return any(w.dtype == torch.float64 for w in params)
