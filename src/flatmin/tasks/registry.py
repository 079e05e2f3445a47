"""The task registry and the resolution of a task spec: a built-in name or an import path.

``get_task(spec)`` accepts

- a registered name (``"digits"``),
- an import path ``"package.module:attr"`` whose ``attr`` (dotted attributes allowed) is a
  :class:`~flatmin.tasks.Task` or a zero-argument callable returning one — a user's own task,
- either of them with ``-noisy<NN>``: its ``NN`` % label-noise variant (``-noisy0``: the clean
  control of the label-noise protocol), or ``-asym<NN>``: ``NN`` % class-dependent noise,
- any of these with ``-x<F>``: ``F`` × the epochs of every recipe (``mnist-5k-noisy40-x2``),
- a cross-validated task with ``@fold<f>``: its outer fold ``f`` as a task (:meth:`Task.fold`).

A task found by import path is renamed to the path, so its records, checkpoints and reports name
what resolves it again (in a ``--jobs`` worker or on a Ray worker, which import the module
themselves). Like ``python -m``, the current directory is searched for the module when it is not
already on ``sys.path`` (a ``flatmin`` console script starts with its own directory there).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import replace

from flatmin.tasks.task import Task, split_fold_name

__all__ = ["get_task", "list_tasks", "register_task", "register_variant"]

_REGISTRY: dict[str, Task] = {}
_LISTED_VARIANTS: list[str] = []
_NOISY = re.compile(r"^(?P<base>.+)-(?P<kind>noisy|asym)(?P<pct>[0-9]{1,2})$")
_BUDGET = re.compile(r"^(?P<base>.+)-x(?P<factor>[0-9]+(?:\.[0-9]+)?)$")
_PATH = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)$")


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (``ValueError`` on a duplicate name); returns it."""
    if not isinstance(task, Task):
        raise TypeError(f"Invalid task: {type(task).__name__} (expected flatmin.bench.Task)")
    if task.name in _REGISTRY:
        raise ValueError(f"Invalid task name: {task.name!r} (already registered)")
    _REGISTRY[task.name] = task
    return task


def register_variant(name: str) -> str:
    """List the variant ``name`` (e.g. ``"digits-noisy40"``) in :func:`list_tasks`; returns it."""
    get_task(name)  # refuses a name that does not resolve
    if name not in _LISTED_VARIANTS:
        _LISTED_VARIANTS.append(name)
    return name


def list_tasks(*, domain: str | None = None, include_noisy: bool = True) -> list[str]:
    """Names of the registered tasks (and the listed label-noise variants)."""
    names = list(_REGISTRY)
    if include_noisy:
        names += _LISTED_VARIANTS
    return [n for n in names if domain is None or get_task(n).domain == domain]


def _import_module(module: str, spec: str) -> object:
    """Import ``module``, searching the current directory too (as ``python -m`` does)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        top = module.split(".")[0]
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise ValueError(f"Invalid task: {spec!r} (module {module!r} does not import: "
                             f"{exc})") from None  # fmt: skip
        sys.path.append(cwd)  # kept: --jobs and local Ray workers inherit the driver's path
        return _import_module(module, spec)
    except Exception as exc:  # the user's module raised while importing
        raise ValueError(
            f"Invalid task: {spec!r} (module {module!r} does not import: "
            f"{type(exc).__name__}: {exc})"
        ) from None


def _import_task(spec: str) -> Task:
    """The :class:`Task` at import path ``spec`` (``package.module:attr``)."""
    m = _PATH.match(spec)
    if m is None:
        raise ValueError(f"Invalid task: {spec!r} (expected package.module:attr)")
    obj = _import_module(m["module"], spec)
    for part in m["attr"].split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Invalid task: {spec!r} (module {m['module']!r} has no {part!r})")
        obj = getattr(obj, part)
    if not isinstance(obj, Task) and callable(obj) and not isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:
            raise ValueError(f"Invalid task: {spec!r} (calling {m['attr']}() raised "
                             f"{type(exc).__name__}: {exc})") from None  # fmt: skip
    if not isinstance(obj, Task):
        raise ValueError(
            f"Invalid task: {spec!r} ({m['attr']} is a {type(obj).__name__}, expected a "
            "flatmin.bench.Task or a zero-argument callable returning one)"
        )
    return replace(obj, name=spec)


def get_task(name: str) -> Task:
    """Return the task ``name``: a registered name or ``package.module:attr``.

    ``<task>-noisy<NN>`` gives the ``NN`` % label-noise variant of either, ``<task>@fold<f>``
    the outer fold ``f`` of a cross-validated task (``"mutag@fold3"``, ``"pkg.mod:attr@fold0"``).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: an unknown name (the message lists the known tasks), a module that does not
            import, or an attribute that is missing or not a task.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid task: {name!r} (expected a name or package.module:attr)")
    if name in _REGISTRY:
        return _REGISTRY[name]
    parent, fold = split_fold_name(name)
    if fold is not None:
        return get_task(parent).fold(fold)
    variant = _variant(name)
    if variant is not None:
        return variant
    if ":" in name:
        return _import_task(name)
    raise ValueError(
        f"Unknown task: {name!r} (known: {', '.join(_REGISTRY)}; append -noisyNN or -asymNN "
        "for NN % label noise, -xF for F × the epochs, or give your own task as "
        "package.module:attr)"
    )


def _variant(name: str) -> Task | None:
    """``name`` as a budget or label-noise variant of a task that resolves, else ``None``.

    Only the canonical spelling resolves (``-x2``, not ``-x2.0``; ``-noisy5``, not
    ``-noisy05``; the noise before the budget), so every variant has one name and its runs one
    hash.
    """
    m = _BUDGET.match(name)
    if m and (base := _resolvable(m["base"])) is not None:
        factor = float(m["factor"])
        if factor > 0 and f"{factor:g}" == m["factor"]:
            return base.with_budget(factor)
    m = _NOISY.match(name)
    if m and _BUDGET.match(m["base"]) and m["base"] not in _REGISTRY:
        return None  # the noise before the budget: <task>-noisy40-x2, never <task>-x2-noisy40
    if m and str(int(m["pct"])) == m["pct"] and (base := _resolvable(m["base"])) is not None:
        if m["kind"] == "asym" and int(m["pct"]) == 0:
            return None
        kind = "symmetric" if m["kind"] == "noisy" else "asymmetric"
        return base.with_label_noise(int(m["pct"]) / 100, kind)
    return None


def _resolvable(base: str) -> Task | None:
    """The task ``base`` when it is registered, an import path or a variant, else ``None``."""
    if base in _REGISTRY or ":" in base:
        return get_task(base)
    return _variant(base)
