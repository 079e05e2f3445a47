"""One benchmark run on several processes: ``torchrun … flatmin train`` with DDP or FSDP2.

``torchrun --standalone --nproc_per_node N --no-python flatmin train …`` starts ``N`` copies of
the command; each finds its rank in torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), joins the process group (``gloo`` on the CPU, ``nccl`` on CUDA, rank ``r`` on
``cuda:LOCAL_RANK``) and trains the same model wrapped in ``DistributedDataParallel``:

* **data**: every rank draws the same permutation and forms the same global batches as one
  process would; rank ``r`` takes the strided slice ``batch[r::N]`` of each
  (:meth:`flatmin.data.batching.Batches.sharded`, the assignment of ``DistributedSampler``). The
  recipe's batch size stays the global batch size, so it must be a multiple of ``N``.
* **SAM** (Foret et al. 2021, arXiv:2010.01412; :mod:`flatmin.optim.distributed`):
  ``global`` — the first pass's gradient is all-reduced, every rank perturbs by the same
  ``ε̂``, and a step equals one-process SAM on the whole batch (for models without BatchNorm,
  whose statistics are per rank); ``per-replica`` — each rank perturbs with its own shard's
  gradient (m-sharpness with m = the per-rank batch), the second pass is all-reduced.
* **FSDP2** (``--fsdp``): instead of DDP's replicas, every child module that holds parameters
  and then the root are ``fully_shard``-ed before the optimizer is built, so each rank keeps a
  shard of the weights, gradients, optimizer state and SWA averages (DTensors); SAM's ε̂ norm is
  reduced over all shards (:mod:`flatmin.optim._vec`), so a step equals one-process SAM on the
  whole batch (global mode only). The checkpoint gathers full state dicts on every rank and rank 0
  writes them.
* **bookkeeping**: the epoch's summed loss, correct predictions and sample count are all-reduced
  once per epoch (one collective, no host sync per step); evaluation runs on every rank on the
  whole split (the weights are identical, or gathered by FSDP); only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SAM_MODES", "DistContext", "all_reduce_sum", "init_distributed", "torchrun_env"]

SAM_MODES = ("global", "per-replica")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a multi-process run.

    Attributes:
        rank: global rank (0 writes the files).
        world_size: number of processes.
        local_rank: rank on this machine (the CUDA device index).
        sam_mode: ``"global"`` or ``"per-replica"`` perturbation (see the module docstring).
        fsdp: shard the model with FSDP2 instead of replicating it with DDP.
    """

    rank: int
    world_size: int
    local_rank: int
    sam_mode: str = "global"
    fsdp: bool = False

    def __post_init__(self) -> None:
        if self.sam_mode not in SAM_MODES:
            raise ValueError(f"Invalid sam_mode: {self.sam_mode!r} (expected one of {SAM_MODES})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Invalid rank: {self.rank} (world size {self.world_size})")
        if self.fsdp and self.per_replica:
            raise ValueError(
                "Invalid sam_mode: 'per-replica' with FSDP2 (the shards of one model share one "
                "perturbation; use the global mode or DDP)"
            )

    @property
    def per_replica(self) -> bool:
        """Whether SAM perturbs each replica with its own gradient."""
        return self.sam_mode == "per-replica"

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (on its device; rank 0's weights broadcast).

        Under FSDP2 the model was sharded in place by :meth:`shard` and is returned as it is.
        """
        if self.fsdp:
            return model
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: ``fully_shard`` every child that holds parameters, then the root (in place).

        Called before the optimizer and the averages are built: sharding replaces the
        parameters by DTensors. Every rank starts from the same weights (the same seed), so no
        broadcast is needed. A no-op without ``fsdp``.
        """
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``None`` outside torchrun.

    Raises:
        ValueError: the variables are present but not integers.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(
            f"Invalid torchrun environment: RANK={os.environ['RANK']!r}, "
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} (expected integers)"
        ) from None
    return rank, world, local


def init_distributed(
    device: torch.device, sam_mode: str = "global", fsdp: bool = False
) -> DistContext | None:
    """Join torchrun's process group; ``None`` when not under torchrun or with one process.

    Args:
        device: this rank's device (``gloo`` for the CPU, ``nccl`` for CUDA).
        sam_mode: ``"global"`` or ``"per-replica"``.
        fsdp: shard the model with FSDP2 (:meth:`DistContext.shard`) instead of DDP.

    Raises:
        ValueError: a bad ``sam_mode``, or a device type DDP cannot use here (MPS).
    """
    if sam_mode not in SAM_MODES:
        raise ValueError(f"Invalid sam_mode: {sam_mode!r} (expected one of {SAM_MODES})")
    env = torchrun_env()
    if env is None or env[1] == 1:
        return None
    rank, world, local = env
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"Invalid device for several processes: {device.type!r} (DDP here runs on cpu "
            "with gloo or cuda with nccl)"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, sam_mode, fsdp)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the process group in place (returned for chaining)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
