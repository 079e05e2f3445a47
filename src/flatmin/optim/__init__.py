"""Optimizers: the SAM family, weight averaging (SWA/EMA), WASAM, FGE, schedules, BN helpers."""

from flatmin.optim.bn import frozen_bn_stats
from flatmin.optim.sam import SAM

__all__ = ["SAM", "frozen_bn_stats"]
