"""The policy interface of the SAM family: what a variant declares and overrides.

:class:`flatmin.optim.SAM` runs every step through :func:`flatmin.optim._driver.run_step`, which
asks the optimizer at fixed points::

    _ascents_this_step()      ascents this step, 0 = plain   SAMEveryK, LookSAM, multi-step
    _lead_pass                a pass at w before the ascent  Momentum-SAM: no
    _on_first_pass()          the gradient at w is in .grad  LookSAM, GSAM, WSAM, GCSAM
    _ascent_groups()          tensors and directions         FriendlySAM, Momentum-SAM
    _perturbed_pass(closure)  the pass at w + ε̂             ESAM (data selection)
    _combine_()               .grad (g_s) → descent grad     GSAM, WSAM, LookSAM, GCSAM
    _adjust_plain_grad_()     .grad before a plain step      LookSAM
    _after_base_step()        after every base step          WSAM, WASAM

and declares its param-group keys (``_group_defaults``, ``_group_checks``: per group, checked every
step) and structural options (``_options``: attributes saved and checked in ``state_dict``).
A family key that the base optimizer also uses (Adadelta's ``rho``, RMSprop's ``alpha``) is
stored as ``sam_<name>`` (``_keys``), so neither overwrites the other; the hooks read every
family value through :meth:`Policy._hp`.
A variant is these declarations plus a few overrides; nothing else of SAM is written again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from flatmin.optim import _vec
from flatmin.optim._checks import GroupCheck, check_bool, check_nonneg, check_p
from flatmin.optim.rules import PerturbGroup

__all__ = ["Policy"]


class Policy:
    """Defaults of every hook (plain SAM) and the declarations a variant may change."""

    param_groups: list[dict[str, Any]]
    _checked: bool
    #: Family name → its param-group key: the name, or ``sam_<name>`` where the base uses it.
    _keys: dict[str, str]
    # Copies of the first-pass gradient (_keep_first_grads), made on first use, reused after.
    _kept_params: list[Tensor] = []  # noqa: RUF012 (reassigned, never mutated)

    #: Param-group keys of the variant, their defaults and their per-step checks.
    _group_defaults: ClassVar[dict[str, Any]] = {}
    _group_checks: ClassVar[dict[str, GroupCheck]] = {
        "rho": check_nonneg,
        "p": check_p,
        "adaptive": check_bool,
        "eta": check_nonneg,
    }
    #: Structural options of the variant (``k``, ``steps``, ...): name → (default, check). They
    #: become attributes, are saved in ``state_dict``, and a mismatch on load is an error.
    _options: ClassVar[dict[str, tuple[Any, GroupCheck]]] = {}
    #: Ascent steps per perturbing step (multi-step ascent: ``steps``).
    _ascent_steps: int = 1
    #: The step starts with a pass at ``w`` (Momentum-SAM perturbs before its only pass).
    _lead_pass: ClassVar[bool] = True
    #: ``first_step`` may clear the gradients it ascended along (ESAM keeps them).
    _zero_grad_after_ascent: ClassVar[bool] = True
    #: The ascent direction is the plain gradient ``g`` at ``w`` (FriendlySAM ascends along
    #: ``g − σ m``, GCSAM along the centralized gradient): second-order SAM needs it.
    _ascends_along_grad: ClassVar[bool] = True
    #: The ascent directions may be overwritten (not so for Momentum-SAM's momentum buffers).
    _direction_is_scratch: ClassVar[bool] = True

    def _hp(self, group: dict[str, Any], name: str) -> Any:
        """The family's value ``name`` (``rho``, ``alpha``, ...) in ``group``, under its key."""
        return group[self._keys[name]]

    def _check_group(self, group: dict[str, Any]) -> None:
        for name, check in self._group_checks.items():
            key = self._keys[name]
            if key not in group:
                raise ValueError(f"Invalid param group: no {key!r} (keys {sorted(group)})")
            check(key, group[key])

    def _check_groups(self) -> None:
        # Once per step: cheap scalar checks, so a scheduler's bad value fails here, by name.
        for group in self.param_groups:
            self._check_group(group)
        self._checked = True

    def _takes_sam_step(self) -> bool:
        """Whether this step perturbs (SAM every k: only every k-th)."""
        return True

    def _ascents_this_step(self) -> int:
        return self._ascent_steps if self._takes_sam_step() else 0

    def _ascent_groups(self) -> list[PerturbGroup]:
        """The tensors to perturb and the directions to ascend along (default: their gradients)."""
        # List comprehensions, not loops with branches: on an accelerator this Python is what a
        # SAM step waits for, the kernels themselves are few.
        groups = []
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            grads = [w.grad for w in params]
            groups.append(PerturbGroup(params, grads, *self._ball(group)))
        return groups

    def _ball(self, group: dict[str, Any]) -> tuple[float, float, bool, float]:
        """``rho``, ``p``, ``adaptive``, ``eta`` of ``group``."""
        keys = self._keys
        return group[keys["rho"]], group[keys["p"]], group[keys["adaptive"]], group[keys["eta"]]

    def _on_first_pass(self) -> None:
        """Called with the gradient at ``w`` in ``.grad``, before the first ascent."""

    def _perturbed_pass(self, closure: Callable[..., Any], first: Any) -> Any:
        """The pass at the perturbed point (ESAM selects data here); ``first``: pass 1's value."""
        with torch.enable_grad():
            return closure()

    def _combine_(self) -> None:
        """Turn ``.grad`` (the gradient at ``w + ε̂``) into the descent gradient (GSAM, WSAM...)."""

    def _adjust_plain_grad_(self) -> None:
        """Change ``.grad`` before a base step without perturbation (LookSAM)."""

    def _after_base_step(self) -> None:
        """Called after every base step (WSAM's decoupled step, WASAM's averaging)."""

    # -- services for the variants --------------------------------------------------------------
    @torch.no_grad()
    def _keep_first_grads(self) -> None:
        """Copy the gradient at ``w`` into reused buffers (GSAM and WSAM compare it with g_s)."""
        params = [w for g in self.param_groups for w in g["params"] if w.grad is not None]
        kept: dict[Tensor, Tensor] = self.__dict__.setdefault("_kept", {})
        bufs = []
        for w in params:
            buf = kept.get(w)
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
                buf = kept[w] = torch.empty_like(w)
            bufs.append(buf)
        if params:
            _vec.copy_(bufs, [w.grad for w in params if w.grad is not None])
        self._kept_params = params

    def _kept_by_group(
        self,
    ) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]]:
        """Per group: the parameters with both gradients, their ``g`` (kept) and ``g_s`` (.grad)."""
        kept = set(map(id, self._kept_params))
        self._kept_params = []
        out = []
        for group in self.param_groups:
            params = [w for w in group["params"] if id(w) in kept and w.grad is not None]
            if params:
                grads = [w.grad for w in params if w.grad is not None]
                out.append((group, params, [self.__dict__["_kept"][w] for w in params], grads))
        return out

    def _extra_state(self) -> dict[str, Any]:
        """Variant state for ``state_dict`` besides counters and per-parameter state."""
        return {}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        """Validate a saved :meth:`_extra_state` (raise, change nothing)."""
        if extra:
            raise ValueError(
                f"Invalid {type(self).__name__} state_dict: unexpected {sorted(extra)}"
            )

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """Load a validated :meth:`_extra_state`."""
