r"""Rényi-DP accountant for the Gaussian mechanism released once per round (no subsampling).

Every site releases its noisy group statistics once per round over *all* its data, so there is no
sampling amplification. One release with noise multiplier σ (noise std σ·Δ₂) has Rényi
divergence of order α (Mironov 2017, "Rényi Differential Privacy", Prop. 7)

.. math::  \varepsilon_{\mathrm{RDP}}(\alpha) = \frac{\alpha}{2\sigma^2},

and R releases compose additively: ε_RDP(α) = R α / (2σ²) = ρ α with ρ = R / (2σ²). Sites hold
disjoint samples, so a sample's loss is that of its own site's R releases.

Conversion to (ε, δ)-DP, minimised over real α > 1:

* ``"classic"`` (Mironov 2017, Prop. 3): ε = min_α [ρ α + log(1/δ)/(α − 1)]; in closed form
  α* = 1 + √(log(1/δ)/ρ) and ε = ρ + 2 √(ρ log(1/δ)).
* ``"improved"`` (Balle et al. 2020, "Hypothesis testing interpretations and Rényi DP", Thm 21;
  the one Opacus uses): ε = min_α [ρ α + log((α − 1)/α) − (log δ + log α)/(α − 1)]. Never looser
  than the classic one; **the default**, used to calibrate σ.

``orders`` restricts the minimum to a finite list of α (as Opacus does); without it the minimum
is over all real α > 1 (a log-spaced grid refined by a bounded scalar minimisation).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.optimize import minimize_scalar

CONVERSIONS = ("improved", "classic")
DEFAULT_CONVERSION = "improved"


def gaussian_rdp(alpha: float | np.ndarray, sigma: float, releases: int = 1) -> float | np.ndarray:
    """R α / (2σ²): the RDP of ``releases`` Gaussian mechanisms with noise multiplier σ."""
    return releases * np.asarray(alpha, dtype=float) / (2.0 * sigma * sigma)


def _conversion_terms(alpha: np.ndarray, delta: float, conversion: str) -> np.ndarray:
    """ε − ε_RDP(α) for the chosen RDP → (ε, δ) conversion."""
    if conversion == "classic":
        return math.log(1.0 / delta) / (alpha - 1.0)
    if conversion == "improved":
        return np.log1p(-1.0 / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1.0)
    raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float,
                     conversion: str = DEFAULT_CONVERSION) -> tuple[float, float]:
    """(ε, best α) from RDP values at finite ``orders`` (each > 1)."""
    alpha = np.asarray(orders, dtype=float)
    values = np.asarray(rdp, dtype=float) + _conversion_terms(alpha, delta, conversion)
    best = int(np.nanargmin(values))
    return float(max(values[best], 0.0)), float(alpha[best])


def gaussian_epsilon(sigma: float, releases: int, delta: float,
                     conversion: str = DEFAULT_CONVERSION,
                     orders: Sequence[float] | None = None) -> float:
    """Total ε after ``releases`` Gaussian mechanisms with noise multiplier σ, at δ."""
    _check(sigma=sigma, releases=releases, delta=delta)
    if orders is not None:
        alpha = np.asarray(orders, dtype=float)
        return epsilon_from_rdp(alpha, gaussian_rdp(alpha, sigma, releases), delta, conversion)[0]
    rho = releases / (2.0 * sigma * sigma)
    if conversion == "classic":
        return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))

    # f(α) on a log grid of α − 1, then refined between the grid neighbours of the best point.
    def objective(log_excess: float) -> float:
        alpha = 1.0 + math.exp(log_excess)
        return float(rho * alpha + _conversion_terms(np.array(alpha), delta, conversion))

    grid = np.linspace(math.log(1e-6), math.log(1e7), 400)
    values = [objective(x) for x in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    refined = minimize_scalar(objective, bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-12})
    return float(max(min(refined.fun, values[i]), 0.0))


def calibrate_sigma(epsilon: float, delta: float, releases: int,
                    conversion: str = DEFAULT_CONVERSION, rtol: float = 1e-6) -> float:
    """Smallest σ (to ``rtol``) whose total ε over ``releases`` is ≤ ``epsilon``, by bisection.

    ε(σ) decreases monotonically in σ, so bisection on log σ keeps the invariant
    ε(hi) ≤ target < ε(lo) and returns ``hi``: the budget is never exceeded.
    """
    _check(sigma=1.0, releases=releases, delta=delta)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    lo, hi = 1e-3, 1.0
    while gaussian_epsilon(hi, releases, delta, conversion) > epsilon:
        lo, hi = hi, hi * 2.0
    while gaussian_epsilon(lo, releases, delta, conversion) <= epsilon:
        lo /= 2.0
    while (hi - lo) > rtol * hi:
        mid = math.sqrt(lo * hi)
        if gaussian_epsilon(mid, releases, delta, conversion) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


class GaussianAccountant:
    """Counts releases of a Gaussian mechanism with fixed σ and reports the ε spent so far."""

    def __init__(self, sigma: float, delta: float, conversion: str = DEFAULT_CONVERSION) -> None:
        _check(sigma=sigma, releases=1, delta=delta)
        self.sigma, self.delta, self.conversion = sigma, delta, conversion
        self.releases = 0

    def step(self, releases: int = 1) -> None:
        self.releases += releases

    @property
    def epsilon(self) -> float:
        """ε after the releases so far (0 before any)."""
        if self.releases == 0:
            return 0.0
        return gaussian_epsilon(self.sigma, self.releases, self.delta, self.conversion)


def _check(*, sigma: float, releases: int, delta: float) -> None:
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if not isinstance(releases, int) or releases < 1:
        raise ValueError(f"releases must be a positive integer, got {releases!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
