"""flatmin: flat-minima optimization for PyTorch.

Optimizers (SAM family, weight averaging, WASAM), loss-landscape analysis, real-data tasks in
three domains and a benchmark that reproduces Kaddour et al. (2022), "When Do Flat Minima
Optimizers Work?".
"""

from flatmin.optim import (
    ESAM,
    GCSAM,
    GSAM,
    SAM,
    WASAM,
    WSAM,
    FriendlySAM,
    LookSAM,
    MomentumSAM,
    MultiStepSAM,
    SAMEveryK,
    WeightAveraging,
)

__version__ = "0.1.0"

__all__ = [
    "ESAM",
    "GCSAM",
    "GSAM",
    "SAM",
    "WASAM",
    "WSAM",
    "FriendlySAM",
    "LookSAM",
    "MomentumSAM",
    "MultiStepSAM",
    "SAMEveryK",
    "WeightAveraging",
    "__version__",
]
