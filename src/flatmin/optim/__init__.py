"""Optimizers: the SAM family, weight averaging (SWA/EMA), WASAM, FGE, schedules, BN helpers.

The SAM family is one optimizer (:class:`SAM`), one step sequence (``_driver``), the perturbation
rules of :mod:`flatmin.optim.rules`, and variants that are policies on SAM: when to perturb
(:class:`SAMEveryK`, :class:`LookSAM`), along what (:class:`FriendlySAM`, :class:`GCSAM`,
:class:`MomentumSAM`), how to combine the gradients (:class:`GSAM`, :class:`WSAM`), how many ascent
steps (:class:`MultiStepSAM`), on which data (:class:`ESAM`).
"""

from flatmin.optim import migrate, rules
from flatmin.optim.accumulation import accumulation_closure
from flatmin.optim.amp import AmpStepResult, sam_step_amp
from flatmin.optim.averaging import WeightAveraging, unwrap_model
from flatmin.optim.bn import frozen_bn_stats, recompute_bn_stats
from flatmin.optim.distributed import perturbation_pass
from flatmin.optim.esam import ESAM, per_sample_closure
from flatmin.optim.fge import FGE, FGECyclicLR
from flatmin.optim.friendly_sam import FriendlySAM
from flatmin.optim.gcsam import GCSAM
from flatmin.optim.gsam import GSAM
from flatmin.optim.looksam import LookSAM, SAMEveryK
from flatmin.optim.momentum_sam import MomentumSAM
from flatmin.optim.multistep import MultiStepSAM
from flatmin.optim.rho_schedule import ProportionalRho
from flatmin.optim.sam import SAM
from flatmin.optim.schedules import ConstantSWALR, CyclicSWALR, DecayHoldSWALR
from flatmin.optim.second_order import second_order_step
from flatmin.optim.wasam import WASAM
from flatmin.optim.wsam import WSAM

__all__ = [
    "ESAM",
    "FGE",
    "GCSAM",
    "GSAM",
    "SAM",
    "WASAM",
    "WSAM",
    "AmpStepResult",
    "ConstantSWALR",
    "CyclicSWALR",
    "DecayHoldSWALR",
    "FGECyclicLR",
    "FriendlySAM",
    "LookSAM",
    "MomentumSAM",
    "MultiStepSAM",
    "ProportionalRho",
    "SAMEveryK",
    "WeightAveraging",
    "accumulation_closure",
    "frozen_bn_stats",
    "migrate",
    "per_sample_closure",
    "perturbation_pass",
    "recompute_bn_stats",
    "rules",
    "sam_step_amp",
    "second_order_step",
    "unwrap_model",
]
