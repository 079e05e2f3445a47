"""Validation of a SAM-family ``state_dict`` before anything is loaded (transactional loading).

:meth:`flatmin.optim.sam.SAM.load_state_dict` calls :func:`validate` first and loads only a state
dict that passed, so a bad checkpoint changes nothing. Checked: the layout, the class and the
hyper-parameters it was saved with, every param-group value of both sections, the group sizes,
the counters and the variant's own state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flatmin.optim.sam import SAM

__all__ = ["validate"]


def _section(name: str, key: str, section: Any, live_sizes: list[int]) -> list[dict[str, Any]]:
    if not isinstance(section, Mapping) or set(section) < {"state", "param_groups"}:
        raise ValueError(
            f"Invalid {name} state_dict: {key!r} is not an optimizer state dict "
            "(expected 'state' and 'param_groups')"
        )
    groups = section["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError(f"Invalid {name} state_dict: {key!r} param_groups is not a list of dicts")
    sizes = [len(g.get("params", ())) for g in groups]
    if sizes != live_sizes:
        raise ValueError(
            f"Invalid {name} state_dict: {key!r} has param groups of sizes {sizes} "
            f"(this optimizer: {live_sizes})"
        )
    if not isinstance(section["state"], Mapping):
        raise ValueError(f"Invalid {name} state_dict: {key!r} state is not a dict")
    return list(groups)


def validate(optimizer: SAM, state_dict: Any, *, legacy: bool) -> dict[str, Any] | None:
    """Raise if ``state_dict`` does not fit ``optimizer``; return its ``"variant"`` section.

    Args:
        optimizer: The optimizer about to load.
        state_dict: What :meth:`SAM.state_dict` returned (or a foreign object).
        legacy: Accept the ``{"sam", "base"}`` layout of flatmin 0.1 (plain SAM only).

    Returns:
        The validated ``"variant"`` section, or ``None`` for the legacy layout.

    Raises:
        ValueError: Wrong layout, class, hyper-parameter, group value, size or counter.
        TypeError: A group value of the wrong type.
    """
    name = type(optimizer).__name__
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"Invalid {name} state_dict: {type(state_dict).__name__} (expected a dict)"
        )
    keys = set(state_dict)
    expected = {"sam", "base", "variant"}
    if keys != expected and not (legacy and keys == {"sam", "base"}):
        raise ValueError(
            f"Invalid {name} state_dict with keys {sorted(map(str, keys))} (expected "
            f"{sorted(expected)}; was it saved by {name}.state_dict()? For davda54/sam or "
            "pytorch-optimizer checkpoints see flatmin.optim.migrate)"
        )
    live = [len(g["params"]) for g in optimizer.param_groups]
    for key in ("sam", "base"):
        for i, group in enumerate(_section(name, key, state_dict[key], live)):
            try:
                optimizer._check_group(dict(group))
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"Invalid {name} state_dict, {key!r} param group {i}: {err}"
                ) from None
    if "variant" not in state_dict:
        return None
    variant = state_dict["variant"]
    if not isinstance(variant, Mapping) or set(variant) != {"type", "hyper", "counters", "extra"}:
        raise ValueError(f"Invalid {name} state_dict: malformed 'variant' section")
    if variant["type"] != name:
        raise ValueError(
            f"Invalid {name} state_dict: saved by {variant['type']!r}, loading into {name!r}"
        )
    hyper, live_hyper = variant["hyper"], optimizer.hyper_parameters()
    if not isinstance(hyper, Mapping) or set(hyper) != set(live_hyper):
        raise ValueError(f"Invalid {name} state_dict: hyper-parameters {hyper!r}")
    for key, value in live_hyper.items():
        if hyper[key] != value:
            raise ValueError(
                f"Invalid {name} state_dict: saved with {key}={hyper[key]!r} but this optimizer "
                f"has {key}={value!r} (build it with the saved hyper-parameters)"
            )
    counters = variant["counters"]
    steps = counters.get("steps_taken") if isinstance(counters, Mapping) else None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid {name} state_dict: steps_taken {steps!r} (expected an int >= 0)")
    extra = variant["extra"]
    if not isinstance(extra, Mapping):
        raise ValueError(f"Invalid {name} state_dict: 'extra' is not a dict")
    optimizer._check_extra_state(dict(extra))
    return dict(variant)
