r"""The Gaussian mechanism with per-sample clipping, for the group statistics a site shares.

FlexFair and FairFed sites share per-group sums of a per-sample risk r_i and per-group counts.
Unit of privacy: **one training sample at one site**, with add/remove adjacency (D and D' differ
by one sample). With each sample's risk clipped to [0, C], adding or removing one sample changes
one group's sum by at most C and that group's count by exactly 1, so the L2 sensitivity of the
released vector (sums, counts) is

.. math::

    \Delta_2 = p \sqrt{C^2 + 1}

where p is the number of passes in which a sample can enter the sums (the local epochs when
statistics are accumulated during training, else 1). Extra whole-site sums of another clipped
per-sample value (FairFed's task-loss sum) add C² per coordinate: Δ₂ = p √((1 + m) C² + 1).
The Gaussian mechanism releases value + N(0, (σ Δ₂)² I); σ (the noise multiplier) alone sets the
privacy loss, which :mod:`fedfair_med.privacy.accountant` composes over rounds.
"""

from __future__ import annotations

import hashlib
import math

import torch

#: Server-side floor for a noisy count before dividing by it (noise can make counts ≤ 0).
COUNT_FLOOR = 1e-6


def statistics_sensitivity(clip: float, *, passes: int = 1, extra_sums: int = 0) -> float:
    """Δ₂ = p √((1 + m) C² + 1) of (group sums, group counts, m extra sums); see module docstring."""
    if clip <= 0 or passes < 1 or extra_sums < 0:
        raise ValueError("clip must be > 0, passes ≥ 1 and extra_sums ≥ 0")
    return passes * math.sqrt((1 + extra_sums) * clip * clip + 1.0)


def clip_risk(risk: torch.Tensor, clip: float) -> torch.Tensor:
    """Each sample's contribution clamped to [0, C]: a sample above C contributes exactly C."""
    return risk.clamp(min=0.0, max=clip)


def gaussian_mechanism(values: torch.Tensor, *, sensitivity: float, sigma: float,
                       generator: torch.Generator) -> torch.Tensor:
    """``values`` + N(0, (σ Δ₂)²) per coordinate, in float64 (the noise never depends on data)."""
    if sigma < 0 or sensitivity <= 0:
        raise ValueError("sigma must be ≥ 0 and sensitivity > 0")
    values = values.detach().to(torch.float64)
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float64)
    return values + (sigma * sensitivity) * noise


def privatize_group_statistics(
    sums: torch.Tensor,
    counts: torch.Tensor,
    *,
    clip: float,
    sigma: float,
    generator: torch.Generator,
    passes: int = 1,
    extra_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Noisy (sums, counts[, extra_sums]) released in one Gaussian mechanism.

    The caller must already have clipped every per-sample value entering ``sums`` and
    ``extra_sums`` to [0, ``clip``] (:func:`clip_risk`); the noise is calibrated to that bound.
    All parts share one sensitivity, so the release is a single mechanism with noise multiplier σ.
    """
    extra = extra_sums.reshape(-1) if extra_sums is not None else torch.zeros(0)
    sensitivity = statistics_sensitivity(clip, passes=passes, extra_sums=extra.numel())
    flat = torch.cat([sums.reshape(-1).to(torch.float64), counts.reshape(-1).to(torch.float64),
                      extra.to(torch.float64)])
    noisy = gaussian_mechanism(flat, sensitivity=sensitivity, sigma=sigma, generator=generator)
    k = sums.numel()
    out = (noisy[:k].reshape(sums.shape), noisy[k:2 * k].reshape(counts.shape))
    if extra_sums is not None:
        out = out + (noisy[2 * k:].reshape(extra_sums.shape),)
    return out


def clamp_noisy_statistics(sums: torch.Tensor, counts: torch.Tensor,
                           clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Server post-processing (free under DP): counts ≥ 1e-6, sums in [0, C·count].

    Keeps every group risk sums/counts inside [0, C], the range of the clipped per-sample risk.
    """
    counts = counts.to(torch.float64).clamp_min(COUNT_FLOOR)
    sums = torch.minimum(sums.to(torch.float64).clamp_min(0.0), clip * counts)
    return sums, counts


def noise_seed(run_seed: int, round_index: int, site: str, purpose: str = "statistics") -> int:
    """A stable 63-bit seed from the run seed, round and site, so private runs stay reproducible."""
    digest = hashlib.sha256(f"privacy/{purpose}/{run_seed}/{round_index}/{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
