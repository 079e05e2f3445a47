"""Optimizers: the SAM family, weight averaging (SWA/EMA), WASAM, FGE, schedules, BN helpers."""

from flatmin.optim.averaging import WeightAveraging, unwrap_model
from flatmin.optim.bn import frozen_bn_stats
from flatmin.optim.fge import FGE, FGECyclicLR
from flatmin.optim.sam import SAM
from flatmin.optim.schedules import ConstantSWALR, CyclicSWALR, DecayHoldSWALR
from flatmin.optim.wasam import WASAM

__all__ = [
    "FGE",
    "SAM",
    "WASAM",
    "ConstantSWALR",
    "CyclicSWALR",
    "DecayHoldSWALR",
    "FGECyclicLR",
    "WeightAveraging",
    "frozen_bn_stats",
    "unwrap_model",
]
