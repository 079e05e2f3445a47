r"""Sharpness-Aware Minimization (SAM) and adaptive SAM (ASAM) as a wrapper optimizer.

Algorithm (Foret et al. 2021, Alg. 1), for one mini-batch::

    g      = ∇L(w)                                  # first forward/backward pass
    ε̂      = ρ · sign(g)|g|^(q−1) / (‖g‖_q^q)^(1/p)  # climb to the local maximum w + ε̂
    g_SAM  = ∇L(w)|_{w + ε̂}                          # second pass at the perturbed point
    w      ← base_step(w, g_SAM)                      # e.g. SGD with momentum, AdamW, ...

The base optimizer owns the update; SAM only moves ``w`` to ``w + ε̂`` and back. Both share
one list of ``param_groups``, so learning-rate schedulers, ``add_param_group`` and per-group
``rho`` just work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim._perturb import PerturbGroup, perturb_foreach_, perturb_single_tensor_
from flatmin.optim._rng import RNGState

__all__ = ["SAM"]

_SAM_KEYS = ("rho", "p", "adaptive", "eta")


def _check_group(group: dict[str, Any]) -> None:
    rho, p, eta, adaptive = group["rho"], group["p"], group["eta"], group["adaptive"]
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"Invalid rho: {rho!r} (expected a float)")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"Invalid rho: {rho} (expected a finite value >= 0)")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"Invalid p: {p!r} (expected a float > 1 or math.inf)")
    if math.isnan(p) or p <= 1:
        raise ValueError(f"Invalid p: {p} (expected p > 1, or math.inf)")
    if not isinstance(adaptive, bool):
        raise TypeError(f"Invalid adaptive: {adaptive!r} (expected a bool)")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"Invalid eta: {eta!r} (expected a float)")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"Invalid eta: {eta} (expected a finite value >= 0)")


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer (SAM, ASAM, any ℓp ball).

    Update rule, with ``g`` the gradient over all param groups and 1/p + 1/q = 1:

    .. math::

        \hat\epsilon = \rho\, \mathrm{sign}(g)\, |g|^{q-1} / (\|g\|_q^q)^{1/p}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L(w + \hat\epsilon)\big).

    ``p = 2`` gives ``ρ g/‖g‖₂`` and ``p = math.inf`` gives ``ρ sign(g)``. With ``adaptive=True``
    (ASAM) and ``T = |w| + η``: ``ε̂ = T · ε̂_p(T g)``, i.e. ``ρ T² g / ‖T g‖₂`` for p = 2.

    Two ways to drive it:

    * By hand: ``loss.backward(); opt.first_step(zero_grad=True)``, then a second forward/backward
      at the perturbed weights, then ``opt.second_step(zero_grad=True)``.
    * With a closure that zeroes the gradients, runs forward and backward, and returns the loss
      (the PyTorch closure contract that Lightning's automatic optimization uses):
      ``loss = opt.step(closure)``. SAM calls it twice and returns the loss at ``w``.

    BatchNorm: the second pass would update the running statistics a second time, at perturbed
    weights. Wrap it in :func:`flatmin.optim.bn.frozen_bn_stats` to keep them as the first pass
    left them (``step(closure, model=...)`` does this for you).

    In real training (recipes in ``docs/sam_in_practice.md``): DDP works as is (``global`` mode)
    or per replica (``step(closure, model=ddp_model, per_replica=True)``); gradient accumulation is
    a closure over micro-batches (:func:`flatmin.optim.accumulation.accumulation_closure`); fp16
    with a ``GradScaler`` goes through :func:`flatmin.optim.amp.sam_step_amp`; ``max_grad_norm``
    clips the SAM gradient; ``same_rng=True`` gives both passes the same dropout masks;
    :class:`flatmin.optim.rho_schedule.ProportionalRho` drives ``rho`` from the learning rate;
    :func:`flatmin.optim.second_order.second_order_step` adds the second-order term.

    Args:
        params: Parameters or param-group dicts (ignored when ``base_optimizer`` is an instance,
            whose groups SAM adopts; pass ``None`` then).
        base_optimizer: An optimizer class, built on SAM's param groups with ``base_kwargs``, or
            an optimizer instance, whose param groups SAM adopts.
        rho: Radius of the neighbourhood (per group).
        p: The ℓp ball of the perturbation, ``p > 1`` or ``math.inf`` (per group).
        adaptive: Use ASAM's scale-invariant neighbourhood (per group).
        eta: ASAM's offset η in ``T = |w| + η`` (per group).
        eps: Added to the normaliser so that a zero gradient gives a zero perturbation.
        foreach: Use the multi-tensor kernel (default when ``None``); ``False`` selects the
            single-tensor reference loop.
        max_grad_norm: If set, :meth:`second_step` clips the SAM gradient (the one at ``w + ε̂``)
            to this global ℓ2 norm over all groups before the base step
            (:func:`torch.nn.utils.clip_grad_norm_`). Clipping the first-pass gradient instead
            changes nothing: ``ε̂`` is invariant to rescaling ``g``.
        **base_kwargs: Arguments of the base optimizer class (``lr``, ``momentum``, ...).

    Raises:
        TypeError: ``base_optimizer`` is neither an ``Optimizer`` subclass nor an instance, or an
            option has the wrong type.
        ValueError: ``rho < 0`` or non-finite, ``p <= 1``, ``eta < 0``, ``eps < 0``,
            ``max_grad_norm <= 0``.

    References:
        Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
        ICLR 2021, arXiv:2010.01412. Kwon et al., "ASAM", ICML 2021, arXiv:2102.11600.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
        foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"Invalid eps: {eps!r} (expected a float >= 0)")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach: {foreach!r} (expected None or a bool)")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
                raise TypeError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a float)")
            if not max_grad_norm > 0:
                raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (expected > 0)")
        defaults = {"rho": rho, "p": p, "adaptive": adaptive, "eta": eta}
        _check_group(defaults)
        self._base_defaults: dict[str, Any] = {}
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    "base optimizer keyword arguments are only accepted with an optimizer class, "
                    f"got an instance and {sorted(base_kwargs)}"
                )
            super().__init__(base_optimizer.param_groups, defaults)
            base = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise TypeError("params is None but base_optimizer is a class (expected params)")
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "Invalid base_optimizer: "
                f"{base_optimizer!r} (expected a torch.optim.Optimizer subclass or instance)"
            )
        self.base_optimizer = base
        # One list of group dicts for both: schedulers and add_param_group reach the base too.
        self.param_groups = base.param_groups
        self._base_defaults = dict(base.defaults)
        self.defaults.update(base.defaults)
        self.eps = float(eps)
        self.foreach = foreach
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        # Backups of the weights perturbed by the last first_step, keyed by parameter.
        self._backup: dict[Tensor, Tensor] = {}
        # (ids of params, backups, uniform device/dtype) of the last first_step: _backups_for.
        self._plan: tuple[list[int], list[Tensor], bool] | None = None
        # What the pending first_step moved, and where it saved the originals.
        self._perturbed: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._first_step_done = False

    # -- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to SAM and its base optimizer (they share the list)."""
        for key, value in self._base_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # -- the two halves of a step ---------------------------------------------------------------
    def _perturb_groups(self) -> list[PerturbGroup]:
        # List comprehensions, not loops with branches: on an accelerator this Python is what a
        # SAM step waits for, the kernels themselves are few.
        groups = []
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            grads = [w.grad for w in params]
            groups.append(
                PerturbGroup(
                    params,
                    grads,
                    group["rho"],
                    group["p"],
                    group["adaptive"],
                    group["eta"],
                )
            )
        return groups

    def _backups_for(self, params: list[Tensor]) -> tuple[list[Tensor], bool]:
        """Backup buffers for ``params`` and whether they share one device and dtype.

        Cached for the last set of parameters (compared by identity), so a step allocates
        nothing and scans nothing per tensor once the set is stable.
        """
        ids = list(map(id, params))
        cached = self._plan
        if cached is not None and cached[0] == ids:
            return cached[1], cached[2]
        # A new set of tensors: check it once (a parameter's gradient layout is fixed by its
        # module, e.g. Embedding(sparse=True)), then build and cache its buffers.
        if any(w.grad is not None and w.grad.is_sparse for w in params):
            raise RuntimeError(
                "SAM does not support sparse gradients; use a dense embedding "
                "(sparse=False) for the parameters that SAM perturbs"
            )
        backups = []
        for w in params:
            buf = self._backup.get(w)
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
                buf = self._backup[w] = torch.empty_like(w, memory_format=torch.preserve_format)
            backups.append(buf)
        uniform = len({(w.device, w.dtype) for w in params}) <= 1
        self._plan = (ids, backups, uniform)
        return backups, uniform

    def _use_foreach(self) -> bool:
        # Like torch.optim's ``foreach=None``: the multi-tensor kernel unless asked otherwise.
        return self.foreach is None or self.foreach

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to the local maximum: ``w ← w + ε̂(w)`` using the gradients now in ``.grad``.

        Saves a copy of exactly the tensors it perturbs so that :meth:`second_step` can restore
        them bit-exactly. Tensors without a gradient are left alone.

        Args:
            zero_grad: Clear the gradients afterwards (ready for the second pass).

        Raises:
            RuntimeError: Called twice without :meth:`second_step` in between, or a gradient is
                sparse.
        """
        if self._first_step_done:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are already perturbed"
            )
        groups = self._perturb_groups()
        params = [w for g in groups for w in g.params]
        backups: list[Tensor] = []
        if params:
            backups, uniform = self._backups_for(params)
            if self._use_foreach():
                torch._foreach_copy_(backups, params)
                # zero_grad: the first-pass gradients are dropped next, so they can be scratch.
                perturb_foreach_(groups, self.eps, uniform=uniform, consume_grads=zero_grad)
            else:
                for buf, w in zip(backups, params):
                    buf.copy_(w)
                perturb_single_tensor_(groups, self.eps)
        self._perturbed = (params, backups)
        self._first_step_done = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step` (bit-exact copy) without stepping.

        Used by :meth:`second_step`, and on its own to abandon a SAM step (e.g. after a
        non-finite loss at the perturbed point).
        """
        if not self._first_step_done:
            raise RuntimeError("second_step()/restore() called before first_step()")
        params, backups = self._perturbed
        if params:
            if self._use_foreach():
                torch._foreach_copy_(params, backups)
            else:
                for w, buf in zip(params, backups):
                    w.copy_(buf)
        self._perturbed = ([], [])
        self._first_step_done = False

    @property
    def perturbed(self) -> bool:
        """Whether :meth:`first_step` ran and the weights wait for :meth:`second_step`."""
        return self._first_step_done

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Go back to ``w`` and take the base optimizer's step with the gradient at ``w + ε̂``.

        With ``max_grad_norm`` set, the gradient at ``w + ε̂`` is first clipped to that global
        norm.

        Args:
            zero_grad: Clear the gradients after the base step.

        Raises:
            RuntimeError: Called before :meth:`first_step`.
        """
        self.restore()
        if self.max_grad_norm is not None:
            grads = [w for g in self.param_groups for w in g["params"] if w.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm, foreach=self.foreach)
        self.base_optimizer.step()
        # An LR scheduler attached to SAM tracks SAM.step(); a manual first/second step counts too.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @overload  # type: ignore[override]
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(
        self,
        closure: Callable[[], Tensor],
        *,
        model: torch.nn.Module | None = None,
        same_rng: bool = False,
        per_replica: bool = False,
    ) -> Tensor: ...
    def step(
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        model: torch.nn.Module | None = None,
        same_rng: bool = False,
        per_replica: bool = False,
    ) -> Tensor | None:
        """One full SAM step driven by ``closure`` (called twice, at ``w`` and at ``w + ε̂``).

        Without a closure, ``step()`` after :meth:`first_step` is :meth:`second_step` (so
        wrappers that call ``optimizer.step()``, such as ``GradScaler.step``, finish a SAM step).

        Args:
            closure: Zeroes the gradients, computes the loss, calls ``backward()`` and returns the
                loss. It runs under ``torch.enable_grad()``.
            model: If given, BatchNorm running statistics are kept unchanged during the second
                pass (:func:`flatmin.optim.bn.frozen_bn_stats`). With ``per_replica`` it must be
                the ``DistributedDataParallel`` module.
            same_rng: Replay the CPU (and initialised CUDA) RNG state before the second pass, so
                that both passes draw the same dropout masks (one dropout key per step, as the
                official SAM code does).
            per_replica: Run the first pass under ``model.no_sync()``: each DDP replica
                perturbs with its own gradient (m-sharpness, one all-reduce fewer); the second
                pass is synchronised as usual.

        Returns:
            The loss at ``w`` (the first call's value); ``None`` when called without a closure.

        Raises:
            RuntimeError: ``closure`` is ``None`` and no :meth:`first_step` is pending.
            TypeError: ``per_replica=True`` and ``model`` has no ``no_sync()``.
        """
        if closure is None:
            if self.perturbed:
                self.second_step()
                return None
            raise RuntimeError(
                "SAM.step() requires a closure that recomputes the loss and its gradients "
                "(or call first_step()/second_step() yourself)"
            )
        from flatmin.optim.bn import frozen_bn_stats
        from flatmin.optim.distributed import perturbation_pass

        closure = torch.enable_grad()(closure)
        rng = RNGState.capture() if same_rng else None
        with perturbation_pass(model, per_replica=per_replica):
            loss = closure()
        self.first_step(zero_grad=True)
        try:
            if rng is not None:
                rng.restore()
            with frozen_bn_stats(model):
                closure()
        except BaseException:
            self.restore()  # never leave the caller's weights at w + ε̂
            raise
        self.second_step()
        return loss

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return SAM's param groups and state together with the base optimizer's state."""
        if self._first_step_done:
            raise RuntimeError("state_dict() called between first_step() and second_step()")
        return {"sam": super().state_dict(), "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: SAM's groups and the base optimizer's state."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"sam", "base"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise ValueError(
                f"Invalid SAM state_dict with keys {keys} (expected 'sam' and 'base'; "
                "was it saved by SAM.state_dict()?)"
            )
        super().load_state_dict(state_dict["sam"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        # Both loads rebuild their group lists: share one again.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            _check_group(group)

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"SAM(base_optimizer={base}, groups={len(self.param_groups)})"
