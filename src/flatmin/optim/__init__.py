"""Optimizers: the SAM family, weight averaging (SWA/EMA), WASAM, FGE, schedules, BN helpers."""

from flatmin.optim.accumulation import accumulation_closure
from flatmin.optim.amp import AmpStepResult, sam_step_amp
from flatmin.optim.averaging import WeightAveraging, unwrap_model
from flatmin.optim.bn import frozen_bn_stats, recompute_bn_stats
from flatmin.optim.distributed import perturbation_pass
from flatmin.optim.esam import ESAM
from flatmin.optim.fge import FGE, FGECyclicLR
from flatmin.optim.looksam import LookSAM, SAMEveryK
from flatmin.optim.rho_schedule import ProportionalRho
from flatmin.optim.sam import SAM
from flatmin.optim.schedules import ConstantSWALR, CyclicSWALR, DecayHoldSWALR
from flatmin.optim.second_order import second_order_step
from flatmin.optim.wasam import WASAM

__all__ = [
    "ESAM",
    "FGE",
    "SAM",
    "WASAM",
    "AmpStepResult",
    "ConstantSWALR",
    "CyclicSWALR",
    "DecayHoldSWALR",
    "FGECyclicLR",
    "LookSAM",
    "ProportionalRho",
    "SAMEveryK",
    "WeightAveraging",
    "accumulation_closure",
    "frozen_bn_stats",
    "perturbation_pass",
    "recompute_bn_stats",
    "sam_step_amp",
    "second_order_step",
    "unwrap_model",
]
