r"""Weight averaging (SWA and EMA) with shadow tensors keyed by name.

Algorithm, for the ``count``-th call of :meth:`WeightAveraging.update` (``count`` is 1-based and
counted in the caller's units: optimizer steps, epochs, ...)::

    if count >= start and (count - start) % every == 0:
        if n == 0:        w̄ ← w                               # first average: a copy
        elif mode="swa":  w̄ ← w̄ + (w − w̄) / (n + 1)            # equal-weight running mean
        elif mode="ema":  w̄ ← β_n w̄ + (1 − β_n) w              # exponential moving average
        n ← n + 1

with ``β_n = decay`` or, with a warmup, ``β_n = min(decay, 1 − (1 + n/γ)^(−power))`` (timm's
``ModelEmaV3``). Both updates are one ``torch._foreach_lerp_`` per (device, dtype) group; counters
are Python ints, so an update never synchronises with the device.

Unlike :class:`torch.optim.swa_utils.AveragedModel`, the module is never deep-copied: the averager
holds detached copies of the tensors that ``named_parameters()`` / ``named_buffers()`` return, keyed
by name. This works for modules that ``copy.deepcopy`` rejects (legacy
``torch.nn.utils.weight_norm`` after a forward pass, parametrized modules) and for wrappers:
a ``DistributedDataParallel`` / ``DataParallel`` model is averaged through its ``.module``.

References:
    Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
    UAI 2018, arXiv:1803.05407. Polyak & Juditsky, "Acceleration of Stochastic Approximation by
    Averaging", 1992.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatmin.optim.bn import ForwardFn, recompute_bn_stats

__all__ = ["WeightAveraging", "unwrap_model"]

Mode = Literal["swa", "ema"]
BufferPolicy = Literal["average", "copy", "none"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper.

    Averages, exports and BN statistics are about the wrapped network, so names carry no
    ``module.`` prefix and a checkpoint loads into an unwrapped copy of the model.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _is_averageable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class _Group:
    """Shadow tensors and their live sources on one (shadow device, live device, dtype)."""

    __slots__ = ("live", "same_device", "shadow")

    def __init__(self, same_device: bool) -> None:
        self.shadow: list[Tensor] = []
        self.live: list[Tensor] = []
        self.same_device = same_device

    def sources(self, device: torch.device) -> list[Tensor]:
        if self.same_device:
            return self.live
        return [t.to(device) for t in self.live]


def _grouped(pairs: Iterable[tuple[Tensor, Tensor]]) -> list[_Group]:
    groups: dict[tuple[torch.device, torch.device, torch.dtype], _Group] = {}
    for shadow, live in pairs:
        key = (shadow.device, live.device, shadow.dtype)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(shadow.device == live.device)
        group.shadow.append(shadow)
        group.live.append(live)
    return list(groups.values())


class WeightAveraging:
    r"""Stochastic weight averaging (SWA) or an exponential moving average (EMA) of a model.

    Update rule on the averaging events (``count ≥ start`` and ``(count − start) % every == 0``):

    .. math::

        \bar w_{n+1} = \bar w_n + \frac{w - \bar w_n}{n + 1} \ (\text{SWA}), \qquad
        \bar w_{n+1} = \beta_n \bar w_n + (1 - \beta_n) w \ (\text{EMA}),

    and :math:`\bar w_1 = w` (the first average copies). ``start`` and ``every`` are counted in
    the units in which the caller calls :meth:`update` (after each optimizer step, or once per
    epoch). Averaging never changes the learning rate; pair it with a schedule from
    :mod:`flatmin.optim.schedules`.

    Buffer policy (``buffers=``):

    * ``"average"`` (default): floating-point buffers (BN running mean/var) are averaged like the
      parameters; integer buffers (``num_batches_tracked``) are copied at each averaging event.
    * ``"copy"``: every buffer is copied from the live model at each averaging event.
    * ``"none"``: buffers are not tracked; the averaged model uses the live buffers.

    Whatever the policy, :meth:`update_bn` recomputes BatchNorm statistics for the current average;
    they are used by :meth:`swap` and :meth:`averaged_state_dict` until the next averaging event
    (the weights they belong to then change).

    Args:
        model: The model being trained (a ``DistributedDataParallel`` / ``DataParallel`` wrapper
            is unwrapped). Its parameters must not be replaced after construction.
        mode: ``"swa"`` (equal weights) or ``"ema"``.
        decay: EMA decay ``β`` in ``[0, 1]`` (ignored by SWA).
        start: First ``count`` at which to average (``count`` is 1-based).
        every: Average every ``every`` counts from ``start`` on.
        buffers: Buffer policy, see above.
        device: Where the shadow tensors live (e.g. ``"cpu"`` to save accelerator memory);
            ``None`` keeps each next to its source.
        warmup_power: EMA decay warmup ``β_n = min(decay, 1 − (1 + n/γ)^(−power))`` with ``n``
            the number of averages so far (``None``: no warmup). timm uses 2/3 or 3/4.
        warmup_gamma: ``γ`` of the warmup.
        foreach: Use ``torch._foreach_*`` kernels (default); ``False`` selects the per-tensor
            reference loop.

    Raises:
        ValueError: An option is out of range (``decay`` outside ``[0, 1]``, ``start < 0``,
            ``every < 1``, unknown ``mode`` / ``buffers``, ``warmup_power <= 0``, ...).
        TypeError: An option has the wrong type.

    References:
        Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
        UAI 2018, arXiv:1803.05407.

    Example:
        >>> import torch
        >>> from flatmin.optim.averaging import WeightAveraging
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> swa = WeightAveraging(model, mode="swa", start=2)
        >>> data = [torch.randn(16, 4) for _ in range(3)]
        >>> for x in data:  # one "epoch" per batch here
        ...     opt.zero_grad()
        ...     model(x).pow(2).mean().backward()
        ...     opt.step()
        ...     averaged = swa.update()
        >>> swa.n_averaged
        2
        >>> swa.update_bn(data)
        >>> with swa.swap():  # the averaged weights and their BN statistics, temporarily
        ...     out = model.eval()(data[0])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: Mode = "swa",
        decay: float = 0.999,
        start: int = 0,
        every: int = 1,
        buffers: BufferPolicy = "average",
        device: torch.device | str | None = None,
        warmup_power: float | None = None,
        warmup_gamma: float = 1.0,
        foreach: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected a torch.nn.Module)")
        if mode not in ("swa", "ema"):
            raise ValueError(f"Invalid mode: {mode!r} (expected 'swa' or 'ema')")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise TypeError(f"Invalid decay: {decay!r} (expected a float in [0, 1])")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Invalid decay: {decay} (expected 0 <= decay <= 1)")
        for name, value, low in (("start", start, 0), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Invalid {name}: {value!r} (expected an int)")
            if value < low:
                raise ValueError(f"Invalid {name}: {value} (expected >= {low})")
        if buffers not in ("average", "copy", "none"):
            raise ValueError(f"Invalid buffers: {buffers!r} (expected 'average', 'copy' or 'none')")
        if warmup_power is not None and not (
            isinstance(warmup_power, (int, float)) and warmup_power > 0
        ):
            raise ValueError(f"Invalid warmup_power: {warmup_power!r} (expected None or > 0)")
        if not (isinstance(warmup_gamma, (int, float)) and warmup_gamma > 0):
            raise ValueError(f"Invalid warmup_gamma: {warmup_gamma!r} (expected > 0)")
        if not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach: {foreach!r} (expected a bool)")

        self.mode: Mode = mode
        self.decay = float(decay)
        self.start = start
        self.every = every
        self.buffer_policy: BufferPolicy = buffers
        self.warmup_power = None if warmup_power is None else float(warmup_power)
        self.warmup_gamma = float(warmup_gamma)
        self.foreach = foreach
        self.device = None if device is None else torch.device(device)
        self.module = unwrap_model(model)

        # Live tensors by name. named_parameters() de-duplicates tied weights and, for
        # parametrized modules, yields ``parametrizations.<name>.original*`` (what we average).
        self._live: dict[str, Tensor] = {}
        averaged: list[str] = []
        copied: list[str] = []
        for name, p in self.module.named_parameters():
            if _is_averageable(p):
                self._live[name] = p
                averaged.append(name)
        if buffers != "none":
            for name, b in self.module.named_buffers():
                self._live[name] = b
                (averaged if buffers == "average" and _is_averageable(b) else copied).append(name)
        self._shadow: dict[str, Tensor] = {
            name: t.detach().to(self.device or t.device, copy=True)
            for name, t in self._live.items()
        }
        self._avg_groups = _grouped((self._shadow[n], self._live[n].detach()) for n in averaged)
        self._copy_groups = _grouped((self._shadow[n], self._live[n].detach()) for n in copied)
        self._averaged_names = frozenset(averaged)
        # BN statistics recomputed by update_bn() for the current average (None: not computed).
        self._bn_stats: dict[str, Tensor] | None = None
        self._count = 0
        self._n_averaged = 0
        self._swapped = False

    # -- counters -------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """How many times :meth:`update` was called (the caller's units)."""
        return self._count

    @property
    def n_averaged(self) -> int:
        """How many snapshots went into the average."""
        return self._n_averaged

    def current_decay(self) -> float:
        """EMA decay ``β_n`` of the next averaging event (with the warmup, if any)."""
        n = self._n_averaged
        if self.warmup_power is None or n == 0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + n / self.warmup_gamma) ** -self.warmup_power)

    def is_due(self, count: int) -> bool:
        """Whether the ``count``-th call of :meth:`update` averages."""
        return count >= self.start and (count - self.start) % self.every == 0

    # -- averaging ------------------------------------------------------------------------------
    def update(self) -> bool:
        """Count one unit and average the current weights if this count is scheduled.

        Returns:
            ``True`` if the weights were averaged.

        Raises:
            RuntimeError: Called inside :meth:`swap` (it would average the average).
        """
        if self._swapped:
            raise RuntimeError("update() called inside swap(): the live model holds the average")
        self._count += 1
        if not self.is_due(self._count):
            return False
        self._average()
        return True

    @torch.no_grad()
    def _average(self) -> None:
        n = self._n_averaged
        if n == 0:
            weight = 1.0
        elif self.mode == "swa":
            weight = 1.0 / (n + 1)
        else:
            weight = 1.0 - self.current_decay()
        for group in self._avg_groups:
            sources = group.sources(group.shadow[0].device)
            if self.foreach:
                if n == 0:
                    torch._foreach_copy_(group.shadow, sources)
                else:
                    torch._foreach_lerp_(group.shadow, sources, weight)
            else:
                for shadow, src in zip(group.shadow, sources):
                    if n == 0:
                        shadow.copy_(src)
                    else:
                        shadow.lerp_(src, weight)
        for group in self._copy_groups:
            sources = group.sources(group.shadow[0].device)
            if self.foreach:
                torch._foreach_copy_(group.shadow, sources)
            else:
                for shadow, src in zip(group.shadow, sources):
                    shadow.copy_(src)
        self._n_averaged = n + 1
        self._bn_stats = None  # they belonged to the previous average

    def averaged_tensors(self) -> dict[str, Tensor]:
        """The current averages by name (parameters, tracked buffers, recomputed BN statistics).

        The tensors are the averager's own storage: read them, do not modify them.

        Raises:
            RuntimeError: Nothing has been averaged yet.
        """
        if self._n_averaged == 0:
            raise RuntimeError("no average yet: update() has not averaged any weights")
        out = dict(self._shadow)
        if self._bn_stats is not None:
            out.update(self._bn_stats)
        return out

    # -- using the average ----------------------------------------------------------------------
    @contextmanager
    def swap(self) -> Iterator[nn.Module]:
        """Put the averaged weights (and their BN statistics) into the live model, temporarily.

        On exit every parameter and buffer of the model is restored bit-exactly, whatever
        happened inside (forward passes in train mode included). Before the first average this
        is a no-op. Yields the (unwrapped) model.

        Raises:
            RuntimeError: Nested ``swap()``.
        """
        if self._swapped:
            raise RuntimeError("swap() is already active (nested swap)")
        if self._n_averaged == 0:
            yield self.module
            return
        averages = self.averaged_tensors()
        live: dict[str, Tensor] = dict(self.module.named_parameters())
        live.update(self.module.named_buffers())
        backup = {name: t.detach().clone() for name, t in live.items()}
        self._swapped = True
        try:
            with torch.no_grad():
                for name, avg in averages.items():
                    live[name].copy_(avg)
            yield self.module
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    live[name].copy_(saved)
            self._swapped = False

    def averaged_state_dict(self) -> dict[str, Any]:
        """Export the averaged model as a plain ``state_dict`` of the (unwrapped) model.

        Keys are those of ``model.state_dict()`` (tied weights appear under each of their names),
        so it loads with ``load_state_dict`` into a fresh copy of the model. Tensors are copies
        (on ``device`` when given); entries the averager does not track are copied from the live
        model.

        Raises:
            RuntimeError: Nothing has been averaged yet.
        """
        averages = self.averaged_tensors()
        by_id = {id(t): name for name, t in self.module.named_parameters(remove_duplicate=False)}
        by_id.update({id(t): name for name, t in self.module.named_buffers(remove_duplicate=False)})
        # Tied tensors: every alias resolves to the name under which the averager stores it.
        canonical = {id(t): name for name, t in self._live.items()}
        live_sd = self.module.state_dict(keep_vars=True)
        out: OrderedDict[str, Any] = OrderedDict()
        for key, value in live_sd.items():
            if not isinstance(value, Tensor):
                out[key] = value
                continue
            name = canonical.get(id(value), by_id.get(id(value)))
            src = averages.get(name, value) if name is not None else value
            out[key] = src.detach().to(self.device or src.device, copy=True)
        metadata = getattr(live_sd, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out

    # -- BatchNorm ------------------------------------------------------------------------------
    def update_bn(
        self,
        loader: Iterable[Any],
        *,
        forward_fn: ForwardFn | None = None,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Recompute BatchNorm running statistics for the averaged weights.

        Inside :meth:`swap`, every BN layer with running statistics is reset and run in train mode
        with ``momentum=None`` (a cumulative average over batches, as
        :func:`torch.optim.swa_utils.update_bn` does) under ``torch.no_grad()``. The result is
        stored with the average; the live model's statistics, momenta and the train/eval mode of
        every submodule are restored afterwards.

        Batches: ``forward_fn(model, batch)`` if given (``model`` is the unwrapped module);
        otherwise a tensor is the input, a tuple/list contributes its first element and a dict is
        passed as ``model(**batch)``; ``device`` moves those inputs first.

        Distributed: when ``torch.distributed`` is initialized with more than one process, the
        per-rank statistics are all-reduced, weighted by each rank's number of batches, so every
        rank ends with the statistics a single process would compute over all ranks' batches.
        Every rank must call it.

        Args:
            loader: Any iterable of batches (a ``DataLoader``, a list, ...).
            forward_fn: ``forward_fn(model, batch)`` runs the forward pass for any batch structure.
            max_batches: Use at most this many batches (per rank).
            device: Move default-dispatched inputs to this device.

        Raises:
            RuntimeError: Nothing has been averaged yet, or called inside :meth:`swap`.
            ValueError: ``max_batches < 1``, or no batch at all reached the BN layers.
            TypeError: A batch has an unsupported structure and no ``forward_fn`` was given.
        """
        if self._n_averaged == 0:
            raise RuntimeError("update_bn() before the first average: nothing to recompute")
        bns = {
            name: m
            for name, m in self.module.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats
        }
        if not bns:
            return
        with self.swap() as model:
            recompute_bn_stats(
                model, loader, forward_fn=forward_fn, max_batches=max_batches, device=device
            )
            stats: dict[str, Tensor] = {}
            for prefix, m in bns.items():
                for bname, buf in m.named_buffers(prefix=prefix, recurse=False):
                    stats[bname] = buf.detach().to(self.device or buf.device, copy=True)
        self._bn_stats = stats

    # -- checkpoints ----------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "start": self.start,
            "every": self.every,
            "buffers": self.buffer_policy,
            "warmup_power": self.warmup_power,
            "warmup_gamma": self.warmup_gamma,
        }

    def _due_until(self, count: int) -> int:
        """How many of the counts ``1..count`` are averaging events."""
        first = self.start if self.start >= 1 else self.every * -(-(1 - self.start) // self.every)
        return 0 if count < first else (count - first) // self.every + 1

    def state_dict(self) -> dict[str, Any]:
        """Averages, counters, settings and recomputed BN statistics (tensors: live storage)."""
        return {
            "mode": self.mode,
            "count": self._count,
            "n_averaged": self._n_averaged,
            "shadow": dict(self._shadow),
            "bn_stats": None if self._bn_stats is None else dict(self._bn_stats),
            "settings": self._settings(),
        }

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise if ``state_dict`` cannot be loaded into this averager; change nothing.

        Checked: the keys, the mode and settings (``start``, ``every``, ``decay``, ... — a
        mismatch is an error; a state dict without ``"settings"`` from flatmin 0.1 is accepted),
        every tensor's name and shape, the BN statistics' names and shapes, and the counters
        (ints, ``n_averaged`` equal to the number of averaging events in ``1..count``).

        Raises:
            ValueError: The first problem found, named.
        """
        from flatmin.optim._state import check_averaging

        check_averaging(self, state_dict)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (same model structure, mode and settings): all or nothing.

        Raises:
            ValueError: As :meth:`check_state_dict`; then nothing has changed.
        """
        self.check_state_dict(state_dict)
        with torch.no_grad():
            for name, tensor in state_dict["shadow"].items():
                self._shadow[name].copy_(tensor)
        bn_stats = state_dict["bn_stats"]
        self._bn_stats = (
            None
            if bn_stats is None
            else {
                k: v.detach().to(self.device or self._live_device(k), copy=True)
                for k, v in bn_stats.items()
            }
        )
        self._count = int(state_dict["count"])
        self._n_averaged = int(state_dict["n_averaged"])

    def _bn_buffers(self) -> dict[str, Tensor]:
        return {
            f"{prefix}.{name}" if prefix else name: buf
            for prefix, m in self.module.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats
            for name, buf in m.named_buffers(recurse=False)
        }

    def _live_device(self, name: str) -> torch.device:
        buffers = dict(self.module.named_buffers())
        return buffers[name].device if name in buffers else torch.device("cpu")

    def __repr__(self) -> str:
        extra = f", decay={self.decay}" if self.mode == "ema" else ""
        return (
            f"WeightAveraging(mode={self.mode!r}{extra}, start={self.start}, every={self.every}, "
            f"buffers={self.buffer_policy!r}, count={self._count}, n_averaged={self._n_averaged})"
        )
