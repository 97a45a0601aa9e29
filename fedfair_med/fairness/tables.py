r"""Per-group tables with bootstrap confidence intervals, and the group labels they are built on.

A fairness gap is a difference of group means, and small groups (a rare age band at one site)
have noisy means; every row therefore carries its sample count, a 95 % interval and a ``small``
flag so a reader does not over-read a gap driven by a handful of images.

The interval is the percentile bootstrap of the mean: draw B resamples of size n with
replacement, take each resample's mean :math:`\bar x^{*}_b`, and report the
:math:`(1-\ell)/2` and :math:`(1+\ell)/2` quantiles of :math:`\{\bar x^{*}_b\}` for level ℓ.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from fedfair_med.contracts import MISSING, age_band, is_missing
from fedfair_med.fairness.metrics import _as_array, _as_float_array

__all__ = ["bootstrap_ci", "group_table", "intersect", "age_bands", "GROUP_TABLE_COLUMNS"]

GROUP_TABLE_COLUMNS = ["attribute", "group", "n", "metric", "ci_low", "ci_high", "small"]

# Resamples are drawn in chunks so memory stays ~16 MB whatever n_boot × n is.
_MAX_DRAWS_PER_CHUNK = 2_000_000


def bootstrap_ci(
    values: Any, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean; (nan, nan) when there are fewer than 2 values.

    Deterministic for a given ``seed`` (a fresh ``numpy.random.default_rng(seed)`` per call).
    """
    x = _as_float_array(values, "values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    n = len(x)
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def group_table(
    values: Any,
    *,
    sensitive_features: Any,
    attribute_name: str,
    n_boot: int = 1000,
    seed: int = 0,
    min_group_size: int = 10,
) -> pd.DataFrame:
    """One row per group: attribute, group, n, metric (group mean), ci_low, ci_high, small.

    Samples with a missing feature are left out; rows are in sorted group order; ``small`` is
    ``n < min_group_size``.
    """
    x = _as_float_array(values, "values")
    features = _as_array(sensitive_features, "sensitive_features")
    if len(features) != len(x):
        raise ValueError(f"length mismatch: {len(x)} values but {len(features)} sensitive_features")
    labels = [f.item() if isinstance(f, np.generic) else f for f in features.tolist()]
    members: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        if not is_missing(label):
            members.setdefault(label, []).append(i)
    try:
        order = sorted(members)
    except TypeError:
        order = sorted(members, key=str)
    rows = []
    for label in order:
        group_values = x[members[label]]
        low, high = bootstrap_ci(group_values, n_boot=n_boot, seed=seed)
        rows.append({
            "attribute": attribute_name,
            "group": label,
            "n": int(len(group_values)),
            "metric": float(group_values.mean()),
            "ci_low": low,
            "ci_high": high,
            "small": bool(len(group_values) < min_group_size),
        })
    return pd.DataFrame(rows, columns=GROUP_TABLE_COLUMNS)


def intersect(*features: Any, names: Sequence[str] | None = None) -> list[str]:
    """Intersectional labels such as ``"female & >60"``; ``""`` when any part is missing.

    With ``names`` each part is prefixed by its attribute, e.g. ``"sex=female & age_band=>60"``.
    """
    if not features:
        raise ValueError("intersect needs at least one feature")
    columns = [_as_array(f, f"features[{i}]").tolist() for i, f in enumerate(features)]
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"length mismatch between features: {sorted(lengths)}")
    if names is not None and len(names) != len(columns):
        raise ValueError(f"{len(names)} names for {len(columns)} features")
    out = []
    for parts in zip(*columns):
        if any(is_missing(p) for p in parts):
            out.append(MISSING)
            continue
        texts = [str(p) for p in parts]
        if names is not None:
            texts = [f"{name}={text}" for name, text in zip(names, texts)]
        out.append(" & ".join(texts))
    return out


def age_bands(ages: Any, edges: Sequence[float] = (60,)) -> list[str]:
    """Age-band label per sample (see :func:`fedfair_med.contracts.age_band`)."""
    edges = tuple(float(e) for e in edges)
    if not edges or list(edges) != sorted(set(edges)):
        raise ValueError(f"age edges must be strictly increasing, got {edges}")
    return [age_band(a, edges) for a in _as_array(ages, "ages").tolist()]
