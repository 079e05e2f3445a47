"""Loss-landscape analysis: directions, rays and interpolation, sharpness, Hessian spectra.

Conventions: ``loss_fn(outputs, targets) -> scalar``; ``batches`` is an iterable of
``(inputs, targets)``; randomness only through an explicit ``torch.Generator``; every function
leaves the model exactly as it found it (parameters, buffers, train/eval mode, BatchNorm momentum);
results are frozen dataclasses with numpy arrays and their settings, saved as ``.npz`` + JSON.
Plots live in :mod:`flatmin.analysis.plots` (matplotlib, the ``plot`` extra).
"""

from flatmin.analysis.directions import (
    Direction,
    direction_norm,
    model_direction,
    random_direction,
)
from flatmin.analysis.hessian import hessian_eigenvalues, hessian_spectrum, hessian_trace
from flatmin.analysis.paths import asymmetry, evaluate_plane, evaluate_ray, interpolate
from flatmin.analysis.plots import plot_path, plot_paths, plot_plane, plot_spectrum
from flatmin.analysis.results import (
    AsymmetryResult,
    EigenResult,
    PathResult,
    PlaneResult,
    Result,
    SAMGradientResult,
    SharpnessResult,
    SpectrumResult,
    TraceResult,
)
from flatmin.analysis.sam_gradients import sam_gradients
from flatmin.analysis.sharpness import sharpness

__all__ = [
    "AsymmetryResult",
    "Direction",
    "EigenResult",
    "PathResult",
    "PlaneResult",
    "Result",
    "SAMGradientResult",
    "SharpnessResult",
    "SpectrumResult",
    "TraceResult",
    "asymmetry",
    "direction_norm",
    "evaluate_plane",
    "evaluate_ray",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "interpolate",
    "model_direction",
    "plot_path",
    "plot_paths",
    "plot_plane",
    "plot_spectrum",
    "random_direction",
    "sam_gradients",
    "sharpness",
]
