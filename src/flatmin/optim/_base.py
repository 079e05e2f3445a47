"""The base optimizer of a SAM: which ones SAM can drive, and whose param-group keys are whose.

SAM and its base share one list of param-group dicts (so schedulers reach both). A family value
whose name the base optimizer also uses (SAM's ``rho`` and Adadelta's decay ``rho``; GSAM's and
LookSAM's ``alpha`` and RMSprop's or ASGD's ``alpha``; WSAM's ``gamma`` and pytorch-optimizer's
AdaBound ``gamma``) would overwrite the base's in that shared dict, silently. :func:`family_keys`
gives such a value its own key, ``sam_<name>``, for that optimizer only; every other base keeps
the plain names that davda54/sam and existing code use.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from flatmin.optim._policy import Policy

__all__ = [
    "base_name",
    "check_base",
    "check_no_clash",
    "check_unambiguous",
    "family_keys",
    "foreign_base_keys",
]

#: The prefix of a family key that the base optimizer uses too.
PREFIX = "sam_"


def base_name(base: Any) -> str:
    """The class name of a base optimizer given as a class or an instance."""
    return (base if isinstance(base, type) else type(base)).__name__


def check_base(base: Any) -> None:
    """Refuse what cannot be SAM's base optimizer, naming it and why.

    Raises:
        TypeError: ``base`` is not an ``Optimizer`` subclass or instance, is itself a member of
            the SAM family, needs a closure in ``step`` (LBFGS) or sparse gradients (SparseAdam).
    """
    cls = base if isinstance(base, type) else type(base)
    if not issubclass(cls, Optimizer):
        raise TypeError(
            f"Invalid base_optimizer: {base!r} (expected a torch.optim.Optimizer subclass or "
            "instance)"
        )
    why = None
    if issubclass(cls, Policy):
        why = (
            "a SAM-family optimizer cannot be the base of another (it would perturb twice); "
            "give the outer one the inner one's base optimizer"
        )
    elif issubclass(cls, torch.optim.SparseAdam):
        why = "it needs sparse gradients and SAM's perturbation is dense; use Adam or AdamW"
    elif _step_needs_closure(cls):
        why = (
            "its step() requires a closure that re-evaluates the loss (a line search), while "
            "SAM's base step must use the gradient at w + ε̂ alone"
        )
    if why is not None:
        raise TypeError(f"Invalid base_optimizer: {cls.__name__} ({why})")


def _step_needs_closure(cls: type[Optimizer]) -> bool:
    try:
        closure = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError):  # a C-implemented step: no signature to read
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _base_keys(base: Any) -> set[str]:
    """Param-group keys of ``base``: its ``defaults``, or a class's constructor arguments."""
    if isinstance(base, Optimizer):
        return set(base.defaults)
    try:
        parameters = inspect.signature(base.__init__).parameters.values()
    except (TypeError, ValueError):
        return set()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name for p in parameters if p.kind not in variadic} - {"self", "params"}


def family_keys(names: Iterable[str], base: Any) -> dict[str, str]:
    """Map each family name to its param-group key: ``sam_<name>`` where ``base`` uses it too."""
    taken = _base_keys(base)
    return {name: PREFIX + name if name in taken else name for name in names}


def check_no_clash(keys: dict[str, str], base: Optimizer) -> None:
    """Raise if the built base uses a family key after all (one not in its signature).

    Raises:
        ValueError: ``base.defaults`` holds a key the family writes into the shared groups.
    """
    clash = sorted(key for key in keys.values() if key in base.defaults)
    if clash:
        raise ValueError(
            f"Invalid base_optimizer: {type(base).__name__} uses the param-group keys {clash}, "
            "which the SAM family uses too; pass an instance of it instead of the class (SAM "
            "then keeps its own values under 'sam_<name>')"
        )


def check_unambiguous(keys: dict[str, str], group: dict[str, Any], family: str, base: str) -> None:
    """Refuse a group that gives a shared name (``rho``) without the family's key (``sam_rho``).

    Raises:
        ValueError: Whose value it is cannot be told; the message says which key is whose.
    """
    for name, key in keys.items():
        if name != key and name in group and key not in group:
            raise ValueError(
                f"Invalid param group: {name!r} is a key of both {family} and {base}; write "
                f"{key!r} for {family}'s {name} and {name!r} for {base}'s"
            )


def _torch_keys() -> set[str]:
    """Every hyper-parameter name of the ``torch.optim`` optimizers (``momentum``, ``betas``...)."""
    classes = (getattr(torch.optim, name) for name in dir(torch.optim))
    return set().union(*(
        _base_keys(c) for c in classes
        if isinstance(c, type) and issubclass(c, Optimizer) and c is not Optimizer
    ))  # fmt: skip


def foreign_base_keys(
    groups: Iterable[dict[str, Any]], base: Optimizer, own: Iterable[str]
) -> set[str]:
    """The ``torch.optim`` hyper-parameter names in saved ``groups`` that ``base`` does not use.

    An old ``{"sam", "base"}`` state dict does not name its base class, but its groups carry
    that class's keys: SGD's ``momentum`` in a dict loaded into AdamW, Adam's ``betas`` loaded
    into SGD. ``own`` are the family's keys, which the groups hold too.
    """
    saved = set().union(*(set(g) for g in groups))
    return (saved & _torch_keys()) - set(base.defaults) - set(own)
