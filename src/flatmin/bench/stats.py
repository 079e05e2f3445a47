"""Statistics of the benchmark report: paired differences, confidence intervals, Holm's method.

* A method is compared with the baseline **paired by seed** (same initialisation, same batch
  order): ``d_s = acc_method(s) − acc_baseline(s)``.
* Its cell is the mean of ``d`` ± the half-width of its 95 % confidence interval,
  ``t_{0.975, n−1} · sd(d) / √n`` (Student's t, sample sd with ddof = 1).
* The p-value is the two-sided paired t-test (``scipy.stats.ttest_rel``), and the p-values of all
  cells of a table are corrected together with Holm's step-down method (family-wise error rate
  ≤ 5 %): sorted ascending, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``.
* **Power.** The minimum detectable effect of a cell is the true mean difference that a
  two-sided paired t-test at α = 0.05 (uncorrected) detects with 80 % power, given the cell's
  ``n`` seeds and the observed sd of its paired differences: exact, from the noncentral t
  distribution (``scipy.stats.nct``; the normal approximation ``(z_{0.975} + z_{0.8}) sd / √n``
  underestimates it by a quarter at n = 5: 1.25 sd instead of 1.68 sd).
* **Zero variance.** When every seed gives the same difference (up to float rounding, 1e-9
  relative; e.g. identical predictions),
  the t statistic is undefined: such a cell has no p-value, is excluded from the Holm family, is
  never marked, and shows ``=`` instead of an interval. This is the one rule for all of them.

References:
    Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 1979.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "ALPHA",
    "POWER",
    "Cell",
    "holm",
    "mean_ci",
    "min_detectable_effect",
    "paired_difference",
    "t_test_power",
    "with_holm",
]

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Cell:
    """Mean and 95 % confidence interval over seeds (of accuracies, or of paired differences).

    Attributes:
        mean, std: in percent (``std`` is ``nan`` with one seed).
        n: number of seeds (paired seeds for a difference).
        ci: half-width of the 95 % confidence interval of the mean (``nan`` with one seed).
        p: paired t-test p-value (``None``: not tested — one seed, or zero variance).
        p_holm: Holm-corrected p-value within its table (``None``: not tested).
        constant: every seed gave the same value.
    """

    mean: float
    std: float
    n: int
    ci: float = math.nan
    p: float | None = None
    p_holm: float | None = None
    constant: bool = False

    @property
    def significant(self) -> bool:
        """Holm-corrected ``p < 0.05``."""
        return self.p_holm is not None and self.p_holm < ALPHA

    def format(self, *, signed: bool = False, digits: int = 2) -> str:
        """``97.12 ± 0.30`` (± the CI half-width), ``+0.25 ± 0.05*``, ``+0.28 =``; ``–`` empty."""
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        mean = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        if self.constant and self.n > 1:
            return f"{mean} ="
        ci = "n/a" if math.isnan(self.ci) else f"{self.ci:.{digits}f}"
        return f"{mean} ± {ci}" + ("*" if signed and self.significant else "")


def mean_ci(values: Sequence[float]) -> Cell:
    """Mean, sample std (ddof = 1) and 95 % t-interval half-width of ``values``."""
    if not values:
        return Cell(math.nan, math.nan, 0)
    arr = np.asarray(values, dtype=np.float64)
    n = int(arr.size)
    if n == 1:
        return Cell(float(arr[0]), math.nan, 1)
    from scipy.stats import t

    std = float(arr.std(ddof=1))
    ci = float(t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n)
    # Equal up to rounding: differences of accuracies k/n carry float noise of ~1e-14.
    constant = bool(np.ptp(arr) <= 1e-9 * max(1.0, float(np.abs(arr).max())))
    return Cell(float(arr.mean()), std, n, ci, constant=constant)


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float]) -> Cell | None:
    """Mean ± 95 % CI of ``method[s] − baseline[s]`` over the common seeds, with a paired t-test.

    Returns:
        The difference cell (``p`` from ``scipy.stats.ttest_rel``; ``None`` with one seed or zero
        variance), or ``None`` without common seeds.
    """
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    cell = mean_ci([method[s] - baseline[s] for s in seeds])
    if cell.n < 2 or cell.constant:
        return cell
    from scipy.stats import ttest_rel

    p = float(ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return replace(cell, p=p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def with_holm(cells: Mapping[Hashable, Cell | None]) -> dict[Hashable, Cell | None]:
    """``cells`` with ``p_holm`` set, correcting every tested cell together (one family)."""
    keys = [k for k, c in cells.items() if c is not None and c.p is not None]
    adjusted = holm([cells[k].p for k in keys])  # type: ignore[union-attr, misc]
    out = dict(cells)
    for k, p in zip(keys, adjusted, strict=True):
        out[k] = replace(cells[k], p_holm=p)  # type: ignore[type-var]
    return out


def t_test_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample (paired) t-test with ``n`` pairs at true mean ``effect``.

    ``P(|T| > t_{1-α/2, n-1})`` with ``T`` noncentral t, ``n - 1`` degrees of freedom and
    noncentrality ``effect · √n / sd``.
    """
    from scipy.stats import nct, t

    df = n - 1
    crit = float(t.ppf(1 - alpha / 2, df))
    ncp = effect * math.sqrt(n) / sd
    # P(T < -c) as P(T' > c) with T' of noncentrality -ncp: nct.cdf returns nan far in its
    # lower tail (scipy 1.17), the survival function does not.
    return float(nct.sf(crit, df, ncp) + nct.sf(crit, df, -ncp))


def min_detectable_effect(sd: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true mean difference a paired t-test detects with ``power``.

    Solves :func:`t_test_power` ``(δ, sd, n) = power`` for ``δ > 0`` (exact noncentral t, see
    the module docstring). Same unit as ``sd``.

    Args:
        sd: standard deviation of the paired differences (> 0).
        n: number of pairs (>= 2).
        power: the target power, in (alpha, 1).
        alpha: two-sided significance level.

    Returns:
        ``δ``; ``nan`` when ``sd`` is not a positive finite number (e.g. zero variance).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"Invalid n: {n!r} (expected an int >= 2)")
    if not alpha < power < 1:
        raise ValueError(f"Invalid power: {power} (expected in ({alpha}, 1))")
    if not (math.isfinite(sd) and sd > 0):
        return math.nan
    from scipy.optimize import brentq

    # The power grows with the effect; the normal approximation's effect is a lower bound.
    low = sd / math.sqrt(n) * 1e-3
    high = 10.0 * sd / math.sqrt(n)
    while t_test_power(high, sd, n, alpha) < power:
        high *= 2
    return float(brentq(lambda d: t_test_power(d, sd, n, alpha) - power, low, high, xtol=1e-12))
