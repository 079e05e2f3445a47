"""Validation of saved states before anything is loaded (transactional loading).

:meth:`flatmin.optim.sam.SAM.load_state_dict` loads through :func:`load`, which runs
:func:`validate` first, so a bad checkpoint changes nothing. Checked: the layout, the class and the
hyper-parameters it was saved with, every param-group value of both sections, the group sizes,
the counters and the variant's own state. :func:`check_averaging` does the same for
:class:`~flatmin.optim.averaging.WeightAveraging` (mode, settings, tensors, BN statistics,
counters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim._base import foreign_base_keys

if TYPE_CHECKING:
    from flatmin.optim.averaging import WeightAveraging
    from flatmin.optim.sam import SAM

__all__ = ["check_averaging", "dump", "load", "validate"]


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


def dump(optimizer: SAM, sam: dict[str, Any]) -> dict[str, Any]:
    """The family's layout: SAM's own state dict, the base's, and the variant's section."""
    return {
        "sam": sam,
        "base": optimizer.base_optimizer.state_dict(),
        "variant": {
            "type": type(optimizer).__name__,
            "hyper": optimizer.hyper_parameters(),
            "counters": {"steps_taken": optimizer.steps_taken},
            "extra": optimizer._extra_state(),
        },
    }


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
    _check_base_class(optimizer, state_dict.get("variant"))
    live = [len(g["params"]) for g in optimizer.param_groups]
    for key in ("sam", "base"):
        for i, group in enumerate(_section(name, key, state_dict[key], live)):
            try:
                optimizer._check_group(dict(group))
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"Invalid {name} state_dict, {key!r} param group {i}: {err}"
                ) from None
    if not _base_class_recorded(state_dict.get("variant")):
        _check_unnamed_base(optimizer, state_dict["base"]["param_groups"])
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
    if isinstance(hyper, Mapping) and "base_optimizer" not in hyper:
        live_hyper.pop("base_optimizer")  # saved before flatmin recorded it
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


def _check_base_class(optimizer: SAM, variant: Any) -> None:
    # First of all: another base class's groups and state fail later, inside its step.
    hyper = variant.get("hyper") if isinstance(variant, Mapping) else None
    saved = hyper.get("base_optimizer") if isinstance(hyper, Mapping) else None
    live = type(optimizer.base_optimizer).__name__
    if saved is not None and saved != live:
        name = type(optimizer).__name__
        raise ValueError(
            f"Invalid {name} state_dict: saved with base optimizer {saved}, but this {name}'s "
            f"base optimizer is {live} (their states do not fit; build the {name} on {saved})"
        )


def _base_class_recorded(variant: Any) -> bool:
    hyper = variant.get("hyper") if isinstance(variant, Mapping) else None
    return isinstance(hyper, Mapping) and "base_optimizer" in hyper


def _check_unnamed_base(optimizer: SAM, groups: list[dict[str, Any]]) -> None:
    # Older layouts name no base class; the keys of its groups still tell another one's.
    own = {*optimizer._keys, *optimizer._keys.values()}
    foreign = foreign_base_keys(groups, optimizer.base_optimizer, own)
    if foreign:
        name, live = type(optimizer).__name__, type(optimizer.base_optimizer).__name__
        raise ValueError(
            f"Invalid {name} state_dict: its param groups hold {sorted(foreign)}, which this "
            f"{name}'s base optimizer {live} does not use (saved with another base optimizer; "
            "build the SAM on that one)"
        )


def load(optimizer: SAM, state_dict: Any, *, legacy: bool) -> None:
    """Validate ``state_dict``, then load it into ``optimizer`` (rolled back on any error)."""
    variant = validate(optimizer, state_dict, legacy=legacy)
    base = optimizer.base_optimizer
    snapshot = (optimizer.param_groups, optimizer.state, base.param_groups, base.state,
                optimizer.steps_taken)  # fmt: skip
    try:
        Optimizer.load_state_dict(optimizer, state_dict["sam"])  # torch's loader for SAM's part
        base.load_state_dict(state_dict["base"])
        # Both loads rebuild their group lists: share one again.
        optimizer.param_groups = base.param_groups
        if variant is not None:
            optimizer.steps_taken = int(variant["counters"]["steps_taken"])
            optimizer._load_extra_state(variant["extra"])
    except BaseException:
        (optimizer.param_groups, optimizer.state, base.param_groups, base.state,
         optimizer.steps_taken) = snapshot  # fmt: skip
        raise


def _check_tensor(name: str, tensor: Any, shape: torch.Size) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"Invalid state_dict tensor {name!r}: {type(tensor).__name__}")
    if tensor.shape != shape:
        found, expected = tuple(tensor.shape), tuple(shape)
        raise ValueError(f"Invalid state_dict tensor {name!r}: shape {found} (expected {expected})")


def check_averaging(averager: WeightAveraging, state_dict: Any) -> None:
    """Raise if ``state_dict`` cannot be loaded into ``averager`` (see its ``check_state_dict``)."""
    keys = {"mode", "count", "n_averaged", "shadow", "bn_stats"}
    found = set(state_dict) if isinstance(state_dict, Mapping) else None
    if found is None or not keys <= found <= keys | {"settings"}:
        shown = sorted(found) if found is not None else type(state_dict).__name__
        raise ValueError(f"Invalid WeightAveraging state_dict with keys {shown}")
    if state_dict["mode"] != averager.mode:
        raise ValueError(
            f"Invalid state_dict mode: {state_dict['mode']!r} (this averager is {averager.mode!r})"
        )
    shadow = state_dict["shadow"]
    if not isinstance(shadow, Mapping):
        raise ValueError(f"Invalid state_dict shadow: {type(shadow).__name__} (expected a dict)")
    missing = sorted(set(averager._shadow) - set(shadow))
    unexpected = sorted(set(shadow) - set(averager._shadow))
    if missing or unexpected:
        raise ValueError(
            f"Invalid state_dict tensors: missing {missing}, unexpected {unexpected} "
            "(was it saved with the same model and buffer policy?)"
        )
    for name, tensor in shadow.items():
        _check_tensor(name, tensor, averager._shadow[name].shape)
    settings = state_dict.get("settings")
    if settings is not None:
        for key, value in averager._settings().items():
            saved = settings.get(key) if isinstance(settings, Mapping) else None
            if saved != value:
                raise ValueError(
                    f"Invalid state_dict: saved with {key}={saved!r} but this averager has "
                    f"{key}={value!r}"
                )
    bn_stats = state_dict["bn_stats"]
    if bn_stats is not None:
        live = averager._bn_buffers()
        if not isinstance(bn_stats, Mapping) or not set(bn_stats) <= set(live):
            names = sorted(bn_stats) if isinstance(bn_stats, Mapping) else bn_stats
            raise ValueError(f"Invalid state_dict bn_stats: {names!r} (not BN statistics)")
        for name, tensor in bn_stats.items():
            _check_tensor(name, tensor, live[name].shape)
    count, n = state_dict["count"], state_dict["n_averaged"]
    for name, value in (("count", count), ("n_averaged", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid state_dict {name}: {value!r} (expected an int >= 0)")
    if n != averager._due_until(count):
        raise ValueError(
            f"Invalid state_dict counters: n_averaged={n} after count={count} (start="
            f"{averager.start}, every={averager.every} give {averager._due_until(count)})"
        )
