r"""Sharpness-Aware Minimization (SAM) as a wrapper optimizer, and the base of its variants.

Algorithm (Foret et al. 2021, Alg. 1), for one mini-batch::

    g      = ∇L(w)                                  # first forward/backward pass
    ε̂      = ρ · sign(g)|g|^(q−1) / (‖g‖_q^q)^(1/p)  # climb to the local maximum w + ε̂
    g_SAM  = ∇L(w)|_{w + ε̂}                          # second pass at the perturbed point
    w      ← base_step(w, g_SAM)                      # e.g. SGD with momentum, AdamW, ...

The base optimizer owns the update; SAM only moves ``w`` to ``w + ε̂`` and back. Both share
one list of ``param_groups``, so learning-rate schedulers, ``add_param_group`` and per-group
``rho`` just work. ``ε̂`` comes from a perturbation rule (:mod:`flatmin.optim.rules`), the step
sequence from :mod:`flatmin.optim._driver`; a variant overrides a few policy hooks of
:class:`SAM` (when to perturb, along what, how to combine the gradients) and nothing else.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim import _state
from flatmin.optim._backup import WeightBackup
from flatmin.optim._base import (
    base_name,
    check_base,
    check_no_clash,
    check_unambiguous,
    family_keys,
)
from flatmin.optim._checks import check_nonneg, check_real
from flatmin.optim._driver import refuse_lightning_wrapper, remember_grad, run_step
from flatmin.optim._policy import Policy
from flatmin.optim.rules import LpBall, PerturbationRule, PerturbGroup, compile_perturbation

__all__ = ["SAM"]

Params = Iterable[Tensor] | Iterable[dict[str, Any]] | None
Base = type[Optimizer] | Optimizer


class SAM(Policy, Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer (SAM, ASAM, any ℓp ball).

    Update rule, with ``g`` the gradient over all param groups and 1/p + 1/q = 1:

    .. math::

        \hat\epsilon = \rho\, \mathrm{sign}(g)\, |g|^{q-1} / (\|g\|_q^q)^{1/p}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L(w + \hat\epsilon)\big).

    ``p = 2`` gives ``ρ g/‖g‖₂`` and ``p = math.inf`` gives ``ρ sign(g)``. With ``adaptive=True``
    (ASAM) and ``T = |w| + η``: ``ε̂ = T · ε̂_p(T g)``, i.e. ``ρ T² g / ‖T g‖₂`` for p = 2. Other
    geometries (Fisher-SAM, SAM-ON) are a ``rule=`` (:mod:`flatmin.optim.rules`).

    Two ways to drive it:

    * With a closure that zeroes the gradients, runs forward and backward, and returns the loss
      (the PyTorch closure contract that Lightning's automatic optimization uses):
      ``loss = opt.step(closure)``. SAM calls it twice and returns its value at ``w``. Do not
      call ``backward()`` before ``step(closure)`` (davda54/sam's usage): SAM runs both passes
      itself, so that would be a third; it warns once if it finds such a gradient.
    * By hand: ``loss.backward(); opt.first_step(zero_grad=True)``, then a second forward/backward
      at the perturbed weights, then ``opt.second_step(zero_grad=True)``.

    The closure may return per-sample losses (a 1-D tensor) instead of a scalar; ``step``
    returns whatever the first call returned (ESAM needs them, see :class:`~flatmin.ESAM`).

    BatchNorm: the second pass would update the running statistics a second time, at perturbed
    weights; ``step(closure, model=...)`` keeps them as the first pass left them
    (:func:`flatmin.optim.bn.frozen_bn_stats`). Every member of the family accepts ``model=``.

    DDP (global or ``per_replica``), FSDP2 (``fully_shard``: DTensor parameters, ``ε̂``'s norm
    global over the shards; ``docs/fsdp.md``), gradient accumulation, fp16
    (``amp.sam_step_amp``), clipping, ``same_rng``, rho schedules and second-order SAM:
    ``docs/sam_in_practice.md``.

    Param-group values (``rho``, ``p``, ``adaptive``, ``eta`` and a variant's own) are checked
    at every step that uses them, so a scheduler that sets an invalid value fails at that step.
    Where the base optimizer uses the same name (Adadelta's ``rho``, RMSprop's ``alpha``), the
    family's value lives under ``sam_<name>`` and the base keeps its own (:meth:`group_key`).

    Args:
        params: Parameters or param-group dicts (ignored when ``base_optimizer`` is an instance,
            whose groups SAM adopts; pass ``None`` then).
        base_optimizer: An optimizer class, built on SAM's param groups with ``base_kwargs``, or
            an optimizer instance, whose param groups SAM adopts.
        rho: Radius of the neighbourhood (per group); may be positional, as in davda54/sam.
        p: The ℓp ball of the perturbation, ``p > 1`` or ``math.inf`` (per group).
        adaptive: Use ASAM's scale-invariant neighbourhood (per group).
        eta: ASAM's offset η in ``T = |w| + η`` (per group). davda54/sam and pytorch-optimizer
            use η = 0 (see ``docs/migration.md``).
        eps: Added to the normaliser so that a zero gradient gives a zero perturbation.
        foreach: Use the multi-tensor kernel (default when ``None``); ``False`` selects the
            single-tensor reference loop.
        max_grad_norm: If set, the gradient the base optimizer receives (the SAM gradient, after
            a variant combined it) is clipped to this global ℓ2 norm over all groups
            (:func:`torch.nn.utils.clip_grad_norm_`). Clipping the first-pass gradient instead
            changes nothing: ``ε̂`` is invariant to rescaling ``g``.
        rule: The perturbation rule (default :class:`~flatmin.optim.rules.LpBall`, which reads
            ``p``, ``adaptive``, ``eta`` from the groups).
        compile: Run the perturbation through ``torch.compile``: the rule's reference form,
            fused by the compiler (:func:`~flatmin.optim.rules.compile_perturbation`; equal to
            the reference to 1e-6 in float32). ``True`` for inductor's defaults, or a dict of
            ``torch.compile`` arguments (``{"mode": "max-autotune-no-cudagraphs"}``). The first
            step compiles. DTensor parameters and ESAM's random subsets keep the kernels.
        **base_kwargs: Arguments of the base optimizer class (``lr``, ``momentum``, ...).

    Raises:
        TypeError: ``base_optimizer`` is neither an ``Optimizer`` subclass nor an instance, is
            one SAM cannot drive (LBFGS: its step needs a closure; SparseAdam: sparse
            gradients; a member of the SAM family), or an option has the wrong type.
        ValueError: ``rho`` or ``eps`` negative or non-finite, ``p <= 1``, ``eta < 0``,
            ``max_grad_norm <= 0``.

    References:
        Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
        ICLR 2021, arXiv:2010.01412. Kwon et al., "ASAM", ICML 2021, arXiv:2102.11600.

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = flatmin.SAM(model.parameters(), torch.optim.SGD, 0.05, lr=0.1)
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
        params: Params,
        base_optimizer: Base,
        rho: float = 0.05,
        *,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
        foreach: bool | None = None,
        max_grad_norm: float | None = None,
        rule: PerturbationRule | None = None,
        compile: bool | Mapping[str, Any] = False,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(compile, (bool, Mapping)):
            raise TypeError(f"Invalid compile: {compile!r} (expected a bool or a dict)")
        check_nonneg("eps", eps)
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach: {foreach!r} (expected None or a bool)")
        if max_grad_norm is not None:
            check_real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        if rule is not None and not isinstance(rule, PerturbationRule):
            raise TypeError(f"Invalid rule: {rule!r} (expected a flatmin.optim.rules rule)")
        for name, (default, check) in self._options.items():
            value = base_kwargs.pop(name, default)
            check(name, value)
            setattr(self, name, value)
        variant = {k: base_kwargs.pop(k, v) for k, v in self._group_defaults.items()}
        family = {"rho": rho, "p": p, "adaptive": adaptive, "eta": eta, **variant}
        for name, check in self._group_checks.items():
            check(name, family[name])
        check_base(base_optimizer)
        # A family value the base uses too (Adadelta's rho) gets its own key (_base.py).
        self._keys = family_keys(self._group_checks, base_optimizer)
        self._base_name = base_name(base_optimizer)
        defaults = {self._keys[name]: value for name, value in family.items()}
        self._base_defaults: dict[str, Any] = {}
        self._adopting = isinstance(base_optimizer, Optimizer)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    "base optimizer keyword arguments are only accepted with an optimizer class, "
                    f"got an instance and {sorted(base_kwargs)}"
                )
            super().__init__(base_optimizer.param_groups, defaults)
            base = base_optimizer
        else:
            if params is None:
                raise TypeError("params is None but base_optimizer is a class (expected params)")
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
            check_no_clash(self._keys, base)
        self._adopting = False
        self.base_optimizer = base
        # One list of group dicts for both: schedulers and add_param_group reach the base too.
        self.param_groups = base.param_groups
        self._base_defaults = dict(base.defaults)
        self.defaults.update(base.defaults)
        self.eps = float(eps)
        self.foreach = foreach
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.rule = rule or LpBall()
        self._compiled = (
            None if compile is False else compile_perturbation({} if compile is True else compile)
        )
        #: Base steps taken (SAM and plain); a Python int, so deciding a branch costs no sync.
        self.steps_taken = 0
        # The weights the pending step moved, and their saved values.
        self._backup = WeightBackup()
        self._ascents_done = 0
        # The selected groups (settings and masks, no gradients) of the last ascent.
        self.last_groups: list[PerturbGroup] = []
        self._plain_pending = False
        # The groups were validated for the step in progress (the driver checks them first).
        self._checked = False
        # (param, its gradient, that gradient's version) left by the last step (see
        # _driver.warn_on_pending_grad).
        self._left_grad: tuple[Tensor, weakref.ref[Tensor], int] | None = None
        self._pending_grad_warned = False

    # -- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to SAM and its base optimizer (they share the list).

        The group is validated with its defaults filled in before anything is stored.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param group: {type(param_group).__name__} (expected a dict)")
        if not self._adopting:  # an adopted instance's groups hold the base's own keys
            check_unambiguous(self._keys, param_group, type(self).__name__, self._base_name)
        self._check_group({**getattr(self, "defaults", {}), **param_group})
        for key, value in self._base_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def group_key(self, name: str) -> str:
        """The param-group key that holds the family value ``name`` (``"rho"``, ``"alpha"``, ...).

        ``name`` itself, or ``"sam_" + name`` where the base optimizer uses ``name`` too
        (Adadelta's decay ``rho``, RMSprop's smoothing ``alpha``): both share one group dict,
        so the family's value gets its own key and the base keeps its own (``docs/variants.md``).
        Schedulers that drive a family value write ``group[opt.group_key("rho")]``.

        Raises:
            ValueError: ``name`` is not a param-group value of this optimizer.

        Example:
            >>> import torch, flatmin
            >>> w = torch.nn.Parameter(torch.zeros(2))
            >>> opt = flatmin.SAM([w], torch.optim.Adadelta, rho=0.05)
            >>> opt.group_key("rho"), opt.param_groups[0]["sam_rho"], opt.param_groups[0]["rho"]
            ('sam_rho', 0.05, 0.9)
        """
        if name not in self._keys:
            raise ValueError(f"Invalid name: {name!r} (expected one of {sorted(self._keys)})")
        return self._keys[name]

    # -- the two halves of a step ---------------------------------------------------------------
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
            RuntimeError: Called twice without :meth:`second_step` in between (more than
                ``steps`` times for multi-step ascent), a gradient is sparse, or called on
                Lightning's optimizer wrapper (use ``SAMModule.sam_step``).
            ValueError: A param group holds an invalid value (e.g. ``rho < 0`` from a scheduler).
        """
        refuse_lightning_wrapper(self, "first_step")
        if self._ascents_done >= self._ascent_steps:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are already perturbed"
            )
        if self._ascents_done == 0:
            if not self._checked:
                self._check_groups()
            self._on_first_pass()
        groups = self.rule.select(self._ascent_groups())
        params = [w for g in groups for w in g.params]
        uniform = self._backup.save(
            params, foreach=self._use_foreach(), extend=self._ascents_done > 0
        )
        if params:
            self.rule.perturb_(
                groups,
                self.eps,
                foreach=self._use_foreach(),
                uniform=uniform,
                # zero_grad: the directions are dropped next, so they can be scratch space.
                consume_grads=zero_grad and self._direction_is_scratch,
                compiled=self._compiled,
            )
        for group in groups:  # keep the selection (tensors, settings, masks), not the gradients
            group.grads = []
        self.last_groups = groups
        self._ascents_done += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step` (bit-exact copy) without stepping.

        Used by :meth:`second_step`, and on its own to abandon a SAM step (e.g. after a
        non-finite loss at the perturbed point).
        """
        if not self.perturbed:
            raise RuntimeError("second_step()/restore() called before first_step()")
        self._backup.restore(foreach=self._use_foreach())
        self._ascents_done = 0

    @property
    def perturbed(self) -> bool:
        """Whether :meth:`first_step` ran and the weights wait for :meth:`second_step`."""
        return self._ascents_done > 0

    @contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Hold the unperturbed weights ``w`` inside the block, whatever the step's state.

        Outside a step (after ``step(closure)`` or ``second_step``) the weights are ``w``
        already and this does nothing; between ``first_step`` and ``second_step`` it swaps ``w``
        in and puts ``w + ε̂`` back afterwards (bit-exact). Use it to evaluate or average.

        Example:
            >>> import torch, flatmin
            >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
            >>> opt = flatmin.SAM([w], torch.optim.SGD, rho=1.0, lr=0.1)
            >>> w.square().sum().backward()
            >>> opt.first_step()
            >>> with opt.unperturbed():
            ...     print(w.detach())
            tensor([3., 4.])
        """
        if not self.perturbed:
            yield
            return
        with self._backup.original(foreach=self._use_foreach()):
            yield

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Go back to ``w`` and take the base optimizer's step with the gradient at ``w + ε̂``.

        A variant combines the gradients here first (GSAM, WSAM, ...); with ``max_grad_norm`` the
        result is clipped to that global norm.

        Args:
            zero_grad: Clear the gradients after the base step.

        Raises:
            RuntimeError: Called before :meth:`first_step`, or on Lightning's optimizer
                wrapper (use ``SAMModule.sam_step``).
        """
        refuse_lightning_wrapper(self, "second_step")
        self._second_step(None)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _second_step(self, before_base: Callable[[], None] | None) -> None:
        self.restore()
        if before_base is not None:
            before_base()
        self._combine_()
        self._base_step()

    @torch.no_grad()
    def _plain_step(self) -> None:
        """A base step with the gradient at ``w`` (no perturbation this step)."""
        if self.perturbed:
            raise RuntimeError("plain_step() called between first_step() and second_step()")
        if not self._checked:
            self._check_groups()
        self._adjust_plain_grad_()
        self._base_step()

    def _base_step(self) -> None:
        if self.max_grad_norm is not None:
            grads = [w for g in self.param_groups for w in g["params"] if w.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm, foreach=self.foreach)
        self.base_optimizer.step()
        self._after_base_step()
        self._checked = False
        self.steps_taken += 1
        # An LR scheduler attached to SAM tracks SAM.step(); a manual step counts too.
        self._opt_called = True
        remember_grad(self)

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(
        self,
        closure: Callable[..., Any],
        *,
        model: torch.nn.Module | None = None,
        same_rng: bool = False,
        per_replica: bool = False,
    ) -> Any: ...
    def step(
        self,
        closure: Callable[..., Any] | None = None,
        *,
        model: torch.nn.Module | None = None,
        same_rng: bool = False,
        per_replica: bool = False,
    ) -> Any:
        """One full step driven by ``closure`` (SAM calls it at ``w`` and at ``w + ε̂``).

        Without a closure, ``step()`` finishes a pending step (after :meth:`first_step` it is
        :meth:`second_step`), so wrappers that call ``optimizer.step()``, such as
        ``GradScaler.step``, finish a SAM step.

        Args:
            closure: Zeroes the gradients, computes the loss, calls ``backward()`` and returns the
                loss (or per-sample losses, a 1-D tensor). It runs under ``torch.enable_grad()``.
            model: If given, BatchNorm running statistics are kept unchanged during the passes at
                the perturbed point (:func:`flatmin.optim.bn.frozen_bn_stats`). With
                ``per_replica`` it must be the ``DistributedDataParallel`` module.
            same_rng: Replay the CPU (and initialised CUDA) RNG state before each pass at the
                perturbed point, so that every pass draws the same dropout masks (one dropout key
                per step, as the official SAM code does).
            per_replica: Run the first pass under ``model.no_sync()``: each DDP replica
                perturbs with its own gradient (m-sharpness, one all-reduce fewer); the second
                pass is synchronised as usual.

        Returns:
            The closure's value at ``w`` (its first call); ``None`` when called without a closure.

        Raises:
            RuntimeError: ``closure`` is ``None`` and no step is pending, or a step is pending
                and a closure is given.
            TypeError: ``per_replica=True`` and ``model`` has no ``no_sync()``.
            ValueError: A param group holds an invalid value (e.g. ``rho`` set to NaN).
        """
        if closure is None:
            if self.perturbed:
                self.second_step()
                return None
            if self._plain_pending:
                self._plain_pending = False
                self._plain_step()
                return None
            raise RuntimeError(
                f"{type(self).__name__}.step() requires a closure that recomputes the loss and its "
                "gradients (or call first_step()/second_step() yourself)"
            )
        return run_step(self, closure, model=model, same_rng=same_rng, per_replica=per_replica).loss

    # -- checkpoints ----------------------------------------------------------------------------
    def hyper_parameters(self) -> dict[str, Any]:
        """Constructor hyper-parameters a checkpoint must agree with (``k``, ``eps``, rule...)."""
        names = ("eps", "max_grad_norm", *self._options)
        return {
            **{name: getattr(self, name) for name in names},
            "rule": repr(self.rule),
            "base_optimizer": self._base_name,
        }

    def state_dict(self) -> dict[str, Any]:
        """SAM's groups and state, the base optimizer's state, and the variant's section.

        ``"variant"`` holds the class name, the hyper-parameters (:meth:`hyper_parameters`), the
        step counter and any state of the variant that is not per parameter.
        """
        if self.perturbed:
            raise RuntimeError("state_dict() called between first_step() and second_step()")
        return _state.dump(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: all of it, or (on any error) nothing.

        Everything is validated first: the layout, the class, base optimizer class and
        hyper-parameters it was saved with (a mismatch, e.g. another ``k``, is an error), every
        group value, the group sizes of both sections, the counters and the variant's own state.
        A ``{"sam", "base"}`` dict from an older flatmin ``SAM`` (no ``"variant"``) loads into
        :class:`SAM`. Such older dicts do not name their base optimizer's class; one whose
        groups hold ``torch.optim`` keys this base does not use (SGD's ``momentum`` loaded into
        AdamW) is refused.

        Raises:
            ValueError: The state dict does not fit this optimizer (the message says why).
            RuntimeError: Called between ``first_step`` and ``second_step``.
        """
        if self.perturbed:
            raise RuntimeError("load_state_dict() called between first_step() and second_step()")
        _state.load(self, state_dict, legacy=type(self) is SAM)
        self._backup.forget_plan()
        self._left_grad = None

    def __repr__(self) -> str:
        base = self.base_optimizer.__class__.__name__
        return f"{type(self).__name__}(base_optimizer={base}, groups={len(self.param_groups)})"
