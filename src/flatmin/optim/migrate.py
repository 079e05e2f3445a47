"""Load a davda54/sam or pytorch-optimizer SAM checkpoint into a flatmin optimizer.

Both libraries save a plain ``torch.optim`` state dict of their wrapper: the shared param groups
(``rho``, ``adaptive``, the base optimizer's ``lr``, ``momentum``, ...) and the wrapper's
per-parameter state. davda54/sam keeps its base optimizer's state apart and never saves it (the
momentum is lost on resume); pytorch-optimizer shares it (``momentum_buffer``, ``exp_avg``, ...
are in the checkpoint) and its GSAM/WSAM/FriendlySAM add a ``"base_optimizer"`` entry.
:func:`load_foreign_state` loads what exists, says what is missing, and changes nothing on error.

Differences it bridges (``docs/migration.md``): their ASAM uses ``T = |w|`` (η = 0), flatmin's
default is η = 0.01, so adaptive groups get ``eta = 0``; pytorch-optimizer's WSAM stores
``alpha = γ/(1 − γ)``, flatmin's stores ``gamma``; FriendlySAM's EMA ``momentum`` becomes
``fsam_momentum``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatmin.optim._checks import check_real
from flatmin.optim.sam import SAM

__all__ = ["MigrationReport", "load_foreign_state"]

# Per-parameter entries of the wrappers themselves (not their base optimizer's): weight backups
# and buffers of a step in progress, which a finished step does not need.
_WRAPPER_KEYS = {"old_p", "e_w", "old_g", "grad", "sharpness"}


@dataclass(frozen=True)
class MigrationReport:
    """What :func:`load_foreign_state` loaded, what the checkpoint lacked, what it left out."""

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    ignored: tuple[str, ...]
    notes: tuple[str, ...]

    def __str__(self) -> str:
        lines = []
        for title, items in (("loaded", self.loaded), ("missing", self.missing),
                             ("ignored", self.ignored), ("note", self.notes)):  # fmt: skip
            lines += [f"{title}: {item}" for item in items]
        return "\n".join(lines)


def _torch_state(name: str, value: Any) -> Mapping[str, Any]:
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("param_groups"), list)
        or not isinstance(value.get("state"), Mapping)
    ):
        raise ValueError(f"Invalid {name}: not a torch.optim state dict ('state', 'param_groups')")
    return value


def load_foreign_state(optimizer: SAM, state_dict: Mapping[str, Any]) -> MigrationReport:
    """Load a davda54/sam or pytorch-optimizer (SAM, GSAM, WSAM, FriendlySAM) state dict.

    The optimizer must be built like the one that saved it (same param groups, same base
    optimizer class). Group values (``rho``, ``adaptive``, ``lr``, ...) and whatever base
    optimizer state the checkpoint holds are loaded; everything goes through
    :meth:`SAM.load_state_dict`, so a checkpoint that does not fit changes nothing.

    What is loaded is checked first: each group value has the kind of ours (a finite number
    where ours is a number: ``lr = nan`` is refused), each state entry is a tensor (a Python
    number for ``step``) with finite values. Family values the checkpoint cannot carry
    (pytorch-optimizer's GSAM keeps ``rho`` in its ``rho_scheduler`` and ``alpha`` outside its
    state dict) are listed in ``report.missing`` with the value ours keeps.

    Args:
        optimizer: The flatmin optimizer to load into (any member of the family).
        state_dict: The foreign ``optimizer.state_dict()``.

    Returns:
        A :class:`MigrationReport`; ``str(report)`` lists it line by line.

    Raises:
        ValueError: Not a torch optimizer state dict, other group sizes, a tensor whose shape
            differs from its parameter's, a non-finite number or tensor, a state entry that is
            not a tensor.
        TypeError: A group value of another kind than ours (a string for ``lr``).

    Example:
        >>> import torch, flatmin
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        >>> davda = {"state": {}, "param_groups": [{"rho": 0.1, "adaptive": True, "lr": 0.05,
        ...          "momentum": 0.9, "params": [0, 1]}]}
        >>> report = load_foreign_state(opt, davda)
        >>> opt.param_groups[0]["rho"], opt.param_groups[0]["eta"]
        (0.1, 0.0)
        >>> report.missing[0].startswith("base optimizer state")
        True
    """
    outer = _torch_state("state_dict", state_dict)
    nested = outer.get("base_optimizer")
    base_state = _torch_state("state_dict['base_optimizer']", nested) if nested else outer
    params = [w for g in optimizer.param_groups for w in g["params"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_groups = base_state["param_groups"] if nested else outer["param_groups"]
    if [len(g.get("params", ())) for g in saved_groups] != sizes:
        raise ValueError(
            "Invalid state_dict: param groups of sizes "
            f"{[len(g.get('params', ())) for g in saved_groups]} (this optimizer: {sizes})"
        )
    ours = optimizer.state_dict()
    loaded: list[str] = []
    missing: list[str] = []
    ignored: set[str] = set()
    notes: list[str] = []
    groups = _merge_groups(
        optimizer, ours["base"]["param_groups"], saved_groups, outer["param_groups"], ignored, notes
    )
    loaded.append(
        "param groups: " + ", ".join(sorted({k for g in saved_groups for k in g} - {"params"}))
    )
    missing += _family_values_missing(optimizer, saved_groups, outer["param_groups"])
    base_entries, sam_entries = _split_state(
        optimizer, outer, base_state, bool(nested), params, ignored
    )
    if base_entries:
        keys = sorted({k for e in base_entries.values() for k in e})
        loaded.append(f"base optimizer state: {', '.join(keys)} for {len(base_entries)} tensors")
    else:
        missing.append(
            "base optimizer state (momentum / moments): not in the checkpoint (davda54/sam never "
            "saves it); it starts from zero"
        )
    if sam_entries:
        loaded.append(f"FriendlySAM EMA for {len(sam_entries)} tensors")
    new = {
        "sam": {"state": {**ours["sam"]["state"], **sam_entries}, "param_groups": groups},
        "base": {"state": base_entries, "param_groups": groups},
        "variant": ours["variant"],
    }
    optimizer.load_state_dict(new)
    return MigrationReport(
        tuple(loaded), tuple(missing), tuple(sorted(ignored)), tuple(dict.fromkeys(notes))
    )


def _check_like(where: str, value: Any, live: Any) -> None:
    """Raise unless a loaded group value has the live value's kind (finite where a number)."""
    if live is None:  # "use the default" (foreach, fused): any setting may be saved
        return
    if isinstance(live, bool):
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {where}: {value!r} (expected a bool)")
    elif isinstance(live, (int, float)):
        check_real(where, value, allow_inf=math.isinf(live))
    elif isinstance(live, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(live):
            raise TypeError(f"Invalid {where}: {value!r} (expected {len(live)} values)")
        for i, (v, lv) in enumerate(zip(value, live)):
            _check_like(f"{where}[{i}]", v, lv)
    elif not isinstance(value, type(live)):
        raise TypeError(f"Invalid {where}: {value!r} (expected a {type(live).__name__})")


def _merge_groups(
    optimizer: SAM,
    live_groups: list[dict[str, Any]],
    saved_groups: list[Mapping[str, Any]],
    wrapper_groups: list[Mapping[str, Any]],
    ignored: set[str],
    notes: list[str],
) -> list[dict[str, Any]]:
    """Our groups with the checkpoint's values in them, each checked against ours."""
    groups = []
    for live, saved, wrapper in zip(live_groups, saved_groups, wrapper_groups):
        group = dict(live)
        merged = {**wrapper, **saved}
        if "gamma" in optimizer._keys and "alpha" in merged and "gamma" not in merged:  # WSAM
            a = merged.pop("alpha")
            check_real("WSAM alpha", a, low=0.0)
            merged["gamma"] = a / (1.0 + a)
            notes.append("WSAM: gamma = alpha / (1 + alpha) from their alpha = gamma / (1 - gamma)")
        for key, value in merged.items():
            if key == "params":
                continue
            # A name their wrapper and its base shared (Adadelta's rho): both of ours get it.
            targets = {key, optimizer._keys.get(key, key)} & set(live)
            if len(targets) > 1:
                notes.append(
                    f"{key!r} was one value for their wrapper and its base optimizer: both "
                    f"{sorted(targets)} get it"
                )
            for target in targets:
                _check_like(f"group value {key!r}", value, live[target])
                group[target] = value
            if not targets:
                ignored.add(f"group key {key!r}")
        if optimizer._hp(group, "adaptive") and "eta" not in merged:
            group[optimizer._keys["eta"]] = 0.0
            notes.append(
                "adaptive group: eta = 0 (their ASAM uses T = |w|; flatmin's default is 0.01)"
            )
        groups.append(group)
    return groups


def _family_values_missing(
    optimizer: SAM, saved_groups: list[Mapping[str, Any]], wrapper_groups: list[Mapping[str, Any]]
) -> list[str]:
    """The family's group values the checkpoint does not hold (``p`` and ``eta`` excepted).

    pytorch-optimizer keeps some outside its state dict (GSAM's ``rho`` in its ``rho_scheduler``,
    GSAM's ``alpha`` and LookSAM's as attributes): ours keep the values they were built with.
    """
    found = {k for groups in (saved_groups, wrapper_groups) for g in groups for k in g}
    if "gamma" in optimizer._keys and "alpha" in found:  # their WSAM's alpha is our gamma
        found.add("gamma")
    live = optimizer.param_groups[0]
    # p (always 2 there) and eta (bridged by a note) have no counterpart in either library.
    return [
        f"group value {name!r} of {type(optimizer).__name__}: not in the checkpoint (their "
        f"wrapper keeps it outside its state dict); it stays {optimizer._hp(live, name)!r}, set "
        "it as the run that saved it had it"
        for name in optimizer._keys
        if name not in ("p", "eta") and name not in found
    ]


def _check_state_value(key: str, index: int, value: Any, param: Tensor) -> None:
    where = f"Invalid state_dict: {key!r} of parameter {index}"
    if isinstance(value, Tensor):
        if value.dim() > 0 and value.shape != param.shape:
            raise ValueError(
                f"{where} has shape {tuple(value.shape)} (the parameter: {tuple(param.shape)})"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where} is not finite (NaN or infinite entries)")
    elif key == "step":  # some optimizers count steps in a Python number
        check_real(f"state_dict 'step' of parameter {index}", value, low=0.0)
    elif value is not None:
        raise ValueError(f"{where}: {type(value).__name__} (expected a tensor)")


def _split_state(
    optimizer: SAM,
    outer: Mapping[str, Any],
    base_state: Mapping[str, Any],
    nested: bool,
    params: list[Tensor],
    ignored: set[str],
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """The checkpoint's per-parameter state, checked: the base optimizer's and ours."""
    fsam = "fsam_momentum" if "sigma" in optimizer._keys else None
    base_entries: dict[int, dict[str, Any]] = {}
    sam_entries: dict[int, dict[str, Any]] = {}
    # Without a nested "base_optimizer" the wrapper's state is the base's (pytorch-optimizer's
    # SAM shares it; davda54's holds only its backups).
    sections = [(outer["state"], False)] + ([(base_state["state"], True)] if nested else [])
    for state, is_base in sections:
        for index, entry in state.items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(f"Invalid state_dict: state index {index!r} for {len(params)} "
                                 "parameters")  # fmt: skip
            for key, value in entry.items():
                if key in _WRAPPER_KEYS:
                    ignored.add(f"state {key!r} (a buffer of their step, not needed to resume)")
                    continue
                _check_state_value(key, index, value, params[index])
                if key == "momentum" and fsam is not None and not is_base:
                    sam_entries.setdefault(index, {})[fsam] = value
                elif is_base or not nested:
                    base_entries.setdefault(index, {})[key] = value
                else:
                    ignored.add(f"state {key!r} of their wrapper")
    return base_entries, sam_entries
