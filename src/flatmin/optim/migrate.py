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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

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

    Args:
        optimizer: The flatmin optimizer to load into (any member of the family).
        state_dict: The foreign ``optimizer.state_dict()``.

    Returns:
        A :class:`MigrationReport`; ``str(report)`` lists it line by line.

    Raises:
        ValueError: Not a torch optimizer state dict, other group sizes, or a tensor whose shape
            differs from its parameter's.

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

    # -- group values -------------------------------------------------------------------------
    wrapper_groups = outer["param_groups"]
    groups = []
    for live, saved, wrapper in zip(ours["base"]["param_groups"], saved_groups, wrapper_groups):
        group = dict(live)
        merged = {**wrapper, **saved}
        if "gamma" in live and "alpha" in merged and "gamma" not in merged:  # their WSAM
            a = merged.pop("alpha")
            merged["gamma"] = a / (1.0 + a)
            notes.append("WSAM: gamma = alpha / (1 + alpha) from their alpha = gamma / (1 - gamma)")
        for key, value in merged.items():
            if key == "params":
                continue
            if key in live:
                group[key] = value
            else:
                ignored.add(f"group key {key!r}")
        if group.get("adaptive") and "eta" not in merged:
            group["eta"] = 0.0
            notes.append(
                "adaptive group: eta = 0 (their ASAM uses T = |w|; flatmin's default is 0.01)"
            )
        groups.append(group)
    loaded.append(
        "param groups: " + ", ".join(sorted({k for g in saved_groups for k in g} - {"params"}))
    )

    # -- per-parameter state ------------------------------------------------------------------
    fsam = "fsam_momentum" if "sigma" in optimizer.param_groups[0] else None
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
                if (
                    isinstance(value, Tensor)
                    and value.dim() > 0
                    and value.shape != params[index].shape
                ):
                    raise ValueError(
                        f"Invalid state_dict: {key!r} of parameter {index} has shape "
                        f"{tuple(value.shape)} (the parameter: {tuple(params[index].shape)})"
                    )
                if key in _WRAPPER_KEYS:
                    ignored.add(f"state {key!r} (a buffer of their step, not needed to resume)")
                elif key == "momentum" and fsam is not None and not is_base:
                    sam_entries.setdefault(index, {})[fsam] = value
                elif is_base or not nested:
                    base_entries.setdefault(index, {})[key] = value
                else:
                    ignored.add(f"state {key!r} of their wrapper")
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
