"""Differential privacy for what leaves a site (floor 1: imports torch, numpy, scipy, opacus only).

* :mod:`~fedfair_med.privacy.mechanism` — per-sample clipping and the Gaussian mechanism for the
  group sums and counts FlexFair / FairFed share;
* :mod:`~fedfair_med.privacy.accountant` — RDP accounting of that mechanism over rounds and the
  calibration of its noise multiplier to a total (ε, δ);
* :mod:`~fedfair_med.privacy.dpsgd` — optional DP-SGD (Opacus) for the local training itself;
* :mod:`~fedfair_med.privacy.settings` — the ``privacy`` run option and the run's ledger.

See ``docs/privacy.md`` for what is and is not protected.
"""

from fedfair_med.privacy.accountant import (
    CONVERSIONS, GaussianAccountant, calibrate_sigma, epsilon_from_rdp, gaussian_epsilon, gaussian_rdp,
)
from fedfair_med.privacy.mechanism import (
    clamp_noisy_statistics, clip_risk, gaussian_mechanism, privatize_group_statistics,
    statistics_sensitivity,
)
from fedfair_med.privacy.settings import (
    DPSGDSettings, PrivacyLedger, PrivacySettings, StatisticsPrivacy, parse_privacy, privacy_problems,
)

__all__ = [
    "CONVERSIONS", "DPSGDSettings", "GaussianAccountant", "PrivacyLedger", "PrivacySettings",
    "StatisticsPrivacy", "calibrate_sigma", "clamp_noisy_statistics", "clip_risk", "epsilon_from_rdp",
    "gaussian_epsilon", "gaussian_mechanism", "gaussian_rdp", "parse_privacy", "privacy_problems",
    "privatize_group_statistics", "statistics_sensitivity",
]
