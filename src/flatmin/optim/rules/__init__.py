r"""Perturbation rules: where SAM's ``ε̂`` lives, once, for every member of the family.

A rule turns the gradient ``g`` (over **all** participating tensors, so the perturbation is one
point on one ball) into the ascent step ``ε̂``. With ``T`` a positive elementwise scale (``T = 1``
unless a rule or the group says otherwise), ``h = T g``, and 1/p + 1/q = 1:

.. math::

    \hat\epsilon = T \odot \rho\, \operatorname{sign}(h)\, |h|^{q-1} \big/ \big(\|h\|_q^q\big)^{1/p}

(Foret et al. 2021, eq. 2), so ``p = 2`` gives ``ρ h/‖h‖₂`` scaled by ``T`` and ``p = ∞`` gives
``ρ T sign(h)``. The geometries:

* :class:`LpBall` (the default): the ℓp ball, ``p`` per param group (ℓ2, ℓ∞, any ℓp); a group with
  ``adaptive=True`` is ASAM (Kwon et al. 2021): ``T = |w| + η``, i.e. ``ρ T² g / ‖T g‖₂`` for p = 2.
  The adaptive scale wraps every rule below too.
* :class:`Fisher`: Fisher-SAM (Kim et al. 2022), the ball in the metric of the diagonal Fisher
  ``f = 1 + η_F g²``: ``T = f^{-1/2}``, so ``ε̂ = ρ f⁻¹g / √(gᵀf⁻¹g)`` for p = 2.
* :class:`Subset`: only some tensors take part (norm and move), e.g. :func:`sam_on` (SAM-ON,
  Mueller et al. 2023: the normalization layers only).
* :class:`RandomSubset`: every tensor counts towards the norm, each is moved with probability
  ``β`` by ``ε̂/β`` (ESAM's stochastic weight perturbation, Du et al. 2022).

Every rule has three forms of the same formula: :meth:`PerturbationRule.perturbation`, written
with plain differentiable ops (the single-tensor reference, and what second-order SAM,
``analysis.sam_gradients`` and ``analysis.sharpness`` differentiate or evaluate), and the in-place
kernels of :meth:`PerturbationRule.perturb_`: the reference applied in place (``foreach=False``)
or a ``torch._foreach_*`` kernel (the default) that must agree with it in float64.

Cost of the foreach kernel (p = 2, no scale, the common case): the norm reads ``g`` once and
``w ← w + s·g`` is one fused ``addcmul`` on CPU (``_foreach_mul`` + ``_foreach_add_`` on
accelerators, which keeps the multi-tensor fast path); the scale ``s = ρ/‖g‖`` stays a 0-d tensor,
so there is no host sync.

Distributed note: every global reduction (the norm here, the dot products of the variants) goes
through :mod:`flatmin.optim._vec`, the one place where a sharded (DTensor) path would reduce its
local partial sums across the mesh.

References:
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv:2010.01412. Kwon et al., "ASAM", ICML 2021, arXiv:2102.11600. Kim et al.,
    "Fisher SAM: Information Geometry and Sharpness Aware Minimisation", ICML 2022,
    arXiv:2206.04920. Mueller et al., "Normalization Layers Are All That Sharpness-Aware
    Minimization Needs", NeurIPS 2023, arXiv:2306.04226. Du et al., "Efficient Sharpness-aware
    Minimization", ICLR 2022, arXiv:2110.03141.
"""

from flatmin.optim.rules._formula import (
    Fisher,
    LpBall,
    PerturbationRule,
    PerturbGroup,
    dual_exponent,
)
from flatmin.optim.rules._selection import RandomSubset, Subset, normalization_parameters, sam_on

__all__ = [
    "Fisher",
    "LpBall",
    "PerturbGroup",
    "PerturbationRule",
    "RandomSubset",
    "Subset",
    "dual_exponent",
    "normalization_parameters",
    "sam_on",
]
