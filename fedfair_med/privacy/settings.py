"""The ``privacy`` run option, parsed and checked, and what a run needs from it.

``privacy: {}`` (the default) is off and leaves every number of a run unchanged. Keys:

* ``statistics_epsilon`` ε, ``statistics_delta`` δ, ``clip`` C (default 1.0): (ε, δ)-DP for the
  group sums and counts FlexFair / FairFed sites share, over the whole run;
* ``dp_sgd: {noise_multiplier: z, max_grad_norm: C, delta: δ (default 1e-5)}``: DP-SGD
  (Opacus) for each site's local training, so the model updates are protected too;
* ``conversion``: the RDP → (ε, δ) conversion used to calibrate σ, ``improved`` (default) or
  ``classic`` (see :mod:`fedfair_med.privacy.accountant`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fedfair_med.privacy.accountant import (
    CONVERSIONS, DEFAULT_CONVERSION, calibrate_sigma, gaussian_epsilon,
)
from fedfair_med.privacy.mechanism import noise_generator, noise_seed

STATISTICS_KEYS = ("statistics_epsilon", "statistics_delta", "clip")
KNOWN_KEYS = (*STATISTICS_KEYS, "dp_sgd", "conversion")
DP_SGD_KEYS = ("noise_multiplier", "max_grad_norm", "delta")
DEFAULT_DP_SGD_DELTA = 1e-5
UNIT = "one training sample at one site (add/remove adjacency)"


@dataclass(frozen=True)
class DPSGDSettings:
    noise_multiplier: float
    max_grad_norm: float
    delta: float = DEFAULT_DP_SGD_DELTA


@dataclass(frozen=True)
class PrivacySettings:
    """Parsed ``privacy`` option; ``statistics_epsilon`` None means shared statistics are exact."""

    statistics_epsilon: float | None = None
    statistics_delta: float | None = None
    clip: float = 1.0
    dp_sgd: DPSGDSettings | None = None
    conversion: str = DEFAULT_CONVERSION

    @property
    def protects_statistics(self) -> bool:
        return self.statistics_epsilon is not None

    @property
    def active(self) -> bool:
        return self.protects_statistics or self.dp_sgd is not None


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def privacy_problems(raw: Any) -> list[str]:
    """Every problem with a ``privacy`` mapping, one clear line each (empty list: valid)."""
    if not isinstance(raw, Mapping):
        return [f"privacy: must be a mapping, got {raw!r}"]
    problems = []
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        problems.append(f"privacy: unknown key(s) {unknown}; known: {list(KNOWN_KEYS)}")
    has_eps, has_delta = "statistics_epsilon" in raw, "statistics_delta" in raw
    if has_eps != has_delta:
        problems.append("privacy: statistics_epsilon and statistics_delta must be given together")
    if has_eps and not _positive(raw["statistics_epsilon"]):
        problems.append(f"privacy.statistics_epsilon: must be > 0, got {raw['statistics_epsilon']!r}")
    if has_delta and not _probability(raw["statistics_delta"]):
        problems.append(f"privacy.statistics_delta: must be in (0, 1), got {raw['statistics_delta']!r}")
    if "clip" in raw and not _positive(raw["clip"]):
        problems.append(f"privacy.clip: must be > 0, got {raw['clip']!r}")
    if "clip" in raw and not has_eps:
        problems.append("privacy.clip: only used with statistics_epsilon / statistics_delta")
    if "conversion" in raw and raw["conversion"] not in CONVERSIONS:
        problems.append(f"privacy.conversion: use one of {list(CONVERSIONS)}, got {raw['conversion']!r}")
    if "dp_sgd" in raw:
        dp = raw["dp_sgd"]
        if not isinstance(dp, Mapping):
            problems.append(f"privacy.dp_sgd: must be a mapping, got {dp!r}")
        else:
            unknown = sorted(set(dp) - set(DP_SGD_KEYS))
            if unknown:
                problems.append(f"privacy.dp_sgd: unknown key(s) {unknown}; known: {list(DP_SGD_KEYS)}")
            for key in ("noise_multiplier", "max_grad_norm"):
                if key not in dp:
                    problems.append(f"privacy.dp_sgd.{key}: required")
                elif not _positive(dp[key]):
                    problems.append(f"privacy.dp_sgd.{key}: must be > 0, got {dp[key]!r}")
            if "delta" in dp and not _probability(dp["delta"]):
                problems.append(f"privacy.dp_sgd.delta: must be in (0, 1), got {dp['delta']!r}")
    return problems


def parse_privacy(raw: Mapping[str, Any] | None) -> PrivacySettings:
    """:class:`PrivacySettings` from the run option; ValueError listing every problem."""
    raw = {} if raw is None else raw
    problems = privacy_problems(raw)
    if problems:
        raise ValueError("; ".join(problems))
    dp = raw.get("dp_sgd")
    return PrivacySettings(
        statistics_epsilon=float(raw["statistics_epsilon"]) if "statistics_epsilon" in raw else None,
        statistics_delta=float(raw["statistics_delta"]) if "statistics_delta" in raw else None,
        clip=float(raw.get("clip", 1.0)),
        dp_sgd=DPSGDSettings(float(dp["noise_multiplier"]), float(dp["max_grad_norm"]),
                             float(dp.get("delta", DEFAULT_DP_SGD_DELTA))) if dp else None,
        conversion=raw.get("conversion", DEFAULT_CONVERSION),
    )


@dataclass(frozen=True)
class StatisticsPrivacy:
    """What a site needs to privatise its group statistics: C, the calibrated σ and the seed.

    Algorithms that share group statistics (FlexFair, FairFed) hold one of these as
    ``statistics_privacy`` (None = exact statistics); the runtime sets it.
    """

    clip: float
    sigma: float
    run_seed: int

    def generator(self, round_index: int, site: str) -> torch.Generator:
        """The noise source for one site's release in one round (independent of all others)."""
        return noise_generator(noise_seed(self.run_seed, round_index, site))


class PrivacyLedger:
    """A run's privacy: calibrates σ once, then reports the budget spent after each round."""

    def __init__(self, settings: PrivacySettings, *, rounds: int, seed: int) -> None:
        self.settings, self.rounds = settings, rounds
        self.statistics: StatisticsPrivacy | None = None
        if settings.protects_statistics:
            sigma = calibrate_sigma(settings.statistics_epsilon, settings.statistics_delta, rounds,
                                    settings.conversion)
            self.statistics = StatisticsPrivacy(clip=settings.clip, sigma=sigma, run_seed=seed)

    @classmethod
    def from_option(cls, raw: Mapping[str, Any] | None, *, rounds: int, seed: int) -> "PrivacyLedger":
        return cls(parse_privacy(raw), rounds=rounds, seed=seed)

    @property
    def active(self) -> bool:
        return self.settings.active

    def statistics_epsilon(self, rounds_done: int) -> float:
        """ε spent by the shared statistics after ``rounds_done`` releases (one per round)."""
        assert self.statistics is not None
        return gaussian_epsilon(self.statistics.sigma, rounds_done, self.settings.statistics_delta,
                                self.settings.conversion)

    def round_record(self, rounds_done: int, dp_sgd_epsilon: Mapping[str, float]) -> dict[str, Any]:
        """The ``privacy`` entry of a metrics.jsonl round record."""
        record: dict[str, Any] = {}
        if self.statistics is not None:
            record.update(epsilon=self.statistics_epsilon(rounds_done),
                          delta=self.settings.statistics_delta, sigma=self.statistics.sigma)
        if self.settings.dp_sgd is not None:
            record["dp_sgd"] = {"epsilon": dict(dp_sgd_epsilon), "delta": self.settings.dp_sgd.delta,
                                "noise_multiplier": self.settings.dp_sgd.noise_multiplier}
        return record

    def summary(self, rounds_done: int, dp_sgd_epsilon: Mapping[str, float]) -> dict[str, Any]:
        """The content of ``privacy.json``: the final budget and how it was accounted."""
        out: dict[str, Any] = {"unit": UNIT}
        if self.statistics is not None:
            out["statistics"] = {
                "epsilon": self.statistics_epsilon(rounds_done),
                "target_epsilon": self.settings.statistics_epsilon,
                "delta": self.settings.statistics_delta, "sigma": self.statistics.sigma,
                "clip": self.statistics.clip, "releases": rounds_done,
                "accountant": f"RDP of the Gaussian mechanism, {self.settings.conversion} conversion",
            }
        if self.settings.dp_sgd is not None:
            dp = self.settings.dp_sgd
            out["dp_sgd"] = {
                "epsilon": dict(dp_sgd_epsilon), "delta": dp.delta,
                "noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm,
                "accountant": "Opacus RDP (Poisson-subsampled Gaussian), per site",
            }
        return out
