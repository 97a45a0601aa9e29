r"""Fairness gaps of a trained model, as defined in the FlexFair paper (Xing et al., "Achieving flexible fairness metrics in federated medical imaging", Nature Communications 2025).

Each gap is the largest absolute distance between a group's mean and the pooled mean:

.. math::

    \mathrm{EA} = \max_k \big|\,\mathbb{E}[m \mid A = k] - \mathbb{E}[m]\,\big|

    \mathrm{DP} = \max_k \big|\,\mathbb{E}[s \mid A = k] - \mathbb{E}[s]\,\big|

    \mathrm{EO} = \max_k \big|\,\mathbb{E}[s \mid A = k, Y = 1] - \mathbb{E}[s \mid Y = 1]\,\big|

where *m* is a per-sample metric (per-image Dice, or 1/0 correctness), *s* is the positive-class
probability P(ŷ = 1 | x) (or, with ``threshold``, the decision 1[score ≥ threshold]) and the
expectations are sample means. Because the pooled mean weights every sample equally, a site's
term is the mean per-image Dice over that site's images, not a mean of site means. For two
groups of sizes n_a and n_b (n = n_a + n_b), D − D_a = (n_b/n)(D_b − D_a), so

.. math::

    \mathrm{EA} = \frac{\max(n_a, n_b)}{n}\,\big|D_a - D_b\big|

which is half the difference only when the two sites are the same size.

Missing sensitive values (``""``, ``None`` or NaN) are left out of both the group terms *and*
the pooled mean, so the gap compares like with like: the groups partition exactly the samples
the pooled mean is taken over.

Signatures follow fairlearn (keyword-only ``sensitive_features``); for the thresholded forms the
values equal ``MetricFrame(...).difference(method="to_overall")`` with ``selection_rate`` (DP)
and ``true_positive_rate`` (EO).
"""

from __future__ import annotations

import math
from typing import Any, Hashable

import numpy as np

from fedfair_med.contracts import is_missing
from fedfair_med.fairness.gap import max_gap

__all__ = [
    "is_missing",
    "group_means",
    "equal_accuracy_gap",
    "demographic_parity_gap",
    "equal_opportunity_gap",
    "roc_auc",
    "expected_calibration_error",
    "group_roc_auc",
    "within_group_roc_auc",
    "group_calibration_error",
]


def _as_array(values: Any, name: str) -> np.ndarray:
    """A 1-D numpy array from a list, numpy array, pandas Series or torch tensor."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor without importing torch
        values = values.detach().cpu().numpy()
    elif hasattr(values, "to_numpy"):  # pandas Series / Index / single-column frame
        values = values.to_numpy()
    array = np.asarray(values)
    if array.dtype.kind in "US" and isinstance(values, (list, tuple)) and any(
            v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        # numpy would turn None / NaN among strings into the strings "None" / "nan" — a group
        array = np.asarray(values, dtype=object)
    if array.ndim == 0:
        raise ValueError(f"{name} must be a 1-D sequence, got a scalar")
    if array.ndim > 1:
        if array.ndim == 2 and 1 in array.shape:
            array = array.reshape(-1)
        else:
            raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _as_float_array(values: Any, name: str) -> np.ndarray:
    array = _as_array(values, name)
    try:
        out = array.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric") from None
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _group_keys(sensitive_features: Any, n: int) -> tuple[list[Hashable], np.ndarray]:
    """Plain-Python group labels and the mask of samples whose label is known."""
    features = _as_array(sensitive_features, "sensitive_features")
    if len(features) != n:
        raise ValueError(
            f"length mismatch: {n} values but {len(features)} sensitive_features"
        )
    keys = [f.item() if isinstance(f, np.generic) else f for f in features.tolist()]
    known = np.fromiter((not is_missing(k) for k in keys), dtype=bool, count=len(keys))
    return keys, known


def group_means(values: Any, *, sensitive_features: Any) -> dict[Hashable, tuple[int, float]]:
    """{group: (n_k, mean of values over group k)}, in sorted group order.

    Samples with a missing sensitive feature belong to no group. Raises ValueError on empty
    input or a length mismatch.
    """
    v = _as_float_array(values, "values")
    if len(v) == 0:
        raise ValueError("values is empty")
    return {k: (n, total / n) for k, (n, total) in _group_sums(v, sensitive_features).items()}


def _group_sums(v: np.ndarray, sensitive_features: Any) -> dict[Hashable, tuple[int, float]]:
    """{group: (n_k, Σ of values over group k)}, in sorted group order; sums in sample order."""
    keys, known = _group_keys(sensitive_features, len(v))
    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for key, value, ok in zip(keys, v.tolist(), known.tolist()):
        if not ok:
            continue
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1
    try:
        order = sorted(counts)
    except TypeError:  # mixed label types: fall back to their text
        order = sorted(counts, key=str)
    return {k: (counts[k], sums[k]) for k in order}


def _max_gap_to_pooled(values: np.ndarray, sensitive_features: Any) -> float:
    """max_k |mean(values | k) − mean(values over samples with a known group)|
    (:func:`fedfair_med.fairness.gap.max_gap`, pooled mean straight from the values)."""
    if len(values) == 0:
        raise ValueError("input is empty: no samples to compute a gap over")
    keys, known = _group_keys(sensitive_features, len(values))
    if not known.any():
        raise ValueError("every sample has a missing sensitive feature; no groups to compare")
    groups = _group_sums(values, sensitive_features).values()
    return max_gap([total for _, total in groups], [n for n, _ in groups],
                   pooled=float(values[known].mean()))


def equal_accuracy_gap(metric: Any, *, sensitive_features: Any) -> float:
    r"""Equal-accuracy gap EA = max_k |mean(m | A = k) − mean(m)|.

    ``metric`` holds one value per sample (per-image Dice, or 1/0 correctness), so the per-site
    term is the mean over that site's samples and the pooled mean is over all samples.
    """
    return _max_gap_to_pooled(_as_float_array(metric, "metric"), sensitive_features)


def _scores(y_true: Any, y_pred: Any, threshold: float | None) -> tuple[np.ndarray | None, np.ndarray]:
    scores = _as_float_array(y_pred, "y_pred")
    if len(scores) == 0:
        raise ValueError("y_pred is empty")
    truth = None
    if y_true is not None:
        truth = _as_array(y_true, "y_true")
        if len(truth) != len(scores):
            raise ValueError(f"length mismatch: {len(truth)} y_true but {len(scores)} y_pred")
    if threshold is not None:
        scores = (scores >= float(threshold)).astype(np.float64)
    return truth, scores


def demographic_parity_gap(
    y_true: Any, y_pred: Any, *, sensitive_features: Any, threshold: float | None = None
) -> float:
    r"""Demographic-parity gap DP = max_k |E[s | A = k] − E[s]|.

    ``y_pred`` are scores P(y = 1 | x) and s is the score itself (FlexFair's form); with
    ``threshold``, s = 1[y_pred ≥ threshold], i.e. the gap in P(ŷ = 1). ``y_true`` is accepted
    for fairlearn symmetry and ignored (only its length is checked).
    """
    _, s = _scores(y_true, y_pred, threshold)
    return _max_gap_to_pooled(s, sensitive_features)


def equal_opportunity_gap(
    y_true: Any,
    y_pred: Any,
    *,
    sensitive_features: Any,
    threshold: float | None = None,
    pos_label: Any = 1,
) -> float:
    r"""Equal-opportunity gap EO = max_k |E[s | A = k, Y = 1] − E[s | Y = 1]|.

    The demographic-parity gap restricted to the truly positive samples; with ``threshold`` it
    is the largest difference of a group's true-positive rate from the pooled one. Raises
    ValueError when no sample has ``y_true == pos_label``.
    """
    if y_true is None:
        raise ValueError("equal_opportunity_gap needs y_true")
    truth, s = _scores(y_true, y_pred, threshold)
    features = _as_array(sensitive_features, "sensitive_features")
    if len(features) != len(s):
        raise ValueError(f"length mismatch: {len(s)} y_pred but {len(features)} sensitive_features")
    positive = np.asarray(truth == pos_label, dtype=bool)
    if not positive.any():
        raise ValueError(f"no sample has y_true == {pos_label!r}; equal opportunity is undefined")
    return _max_gap_to_pooled(s[positive], features[positive])


# ---- discrimination and calibration per group -------------------------------------------------
# A DP or EO gap can be small because a model is equally *bad* for everyone (constant scores
# give DP = 0). Per-group AUC and calibration error show whether the model still ranks and
# means what it says inside each group, so a fairer-looking model cannot hide a worse one.
def _binary_truth(y_true: Any, pos_label: Any, n: int) -> np.ndarray:
    truth = _as_array(y_true, "y_true")
    if len(truth) != n:
        raise ValueError(f"length mismatch: {len(truth)} y_true but {n} scores")
    return np.asarray(truth == pos_label, dtype=bool)


def roc_auc(y_true: Any, y_score: Any, *, pos_label: Any = 1) -> float:
    r"""Area under the ROC curve, the Mann–Whitney probability that a positive outranks a negative.

    .. math::

        \mathrm{AUC} = \frac{1}{n_+ n_-} \sum_{i: y_i = 1} \sum_{j: y_j = 0}
        \Big(\mathbb{1}[s_i > s_j] + \tfrac12 \mathbb{1}[s_i = s_j]\Big)

    computed from average ranks (ties count one half), as ``sklearn.metrics.roc_auc_score``.
    Returns NaN when only one class is present (the AUC is undefined, not 0.5).
    """
    from scipy.stats import rankdata

    scores = _as_float_array(y_score, "y_score")
    if len(scores) == 0:
        raise ValueError("y_score is empty")
    positive = _binary_truth(y_true, pos_label, len(scores))
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(y_true: Any, y_prob: Any, *, n_bins: int = 10, pos_label: Any = 1) -> float:
    r"""Expected calibration error with ``n_bins`` equal-width probability bins.

    .. math::

        \mathrm{ECE} = \sum_{b=1}^{B} \frac{n_b}{n}\,\big|\,\bar y_b - \bar p_b\,\big|

    where bin b holds the samples with p in ((b−1)/B, b/B] (the first bin includes 0: the bins
    of ``sklearn.calibration.calibration_curve(strategy="uniform")``), ȳ_b is their share of
    positives and p̄_b their mean predicted probability; empty bins add nothing.
    0 for a perfectly calibrated model; a constant score equal to the base rate also gives 0,
    which is why it is reported beside the AUC, never alone.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    prob = _as_float_array(y_prob, "y_prob")
    if len(prob) == 0:
        raise ValueError("y_prob is empty")
    if prob.min() < 0 or prob.max() > 1:
        raise ValueError("y_prob must hold probabilities in [0, 1]")
    positive = _binary_truth(y_true, pos_label, len(prob)).astype(np.float64)
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], prob, side="left")
    total = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        total += in_bin.sum() * abs(positive[in_bin].mean() - prob[in_bin].mean())
    return float(total / len(prob))


def _per_group(function: Any, y_true: Any, y_score: Any, sensitive_features: Any,
               **kwargs: Any) -> dict[Hashable, float]:
    scores = _as_float_array(y_score, "y_score")
    truth = _as_array(y_true, "y_true")
    if len(truth) != len(scores):
        raise ValueError(f"length mismatch: {len(truth)} y_true but {len(scores)} y_score")
    keys, known = _group_keys(sensitive_features, len(scores))
    order = list(group_means(np.zeros(len(scores)), sensitive_features=sensitive_features))
    out: dict[Hashable, float] = {}
    for key in order:
        members = known & np.fromiter((k == key for k in keys), dtype=bool, count=len(keys))
        out[key] = function(truth[members], scores[members], **kwargs)
    return out


def group_roc_auc(y_true: Any, y_score: Any, *, sensitive_features: Any, pos_label: Any = 1) -> dict[Hashable, float]:
    """{group: ROC AUC of the scores within the group}, NaN for a group holding one class only.

    The per-group form of :func:`roc_auc` (fairlearn: ``MetricFrame(metrics=roc_auc_score,
    ...).by_group``); samples with a missing sensitive feature belong to no group.
    """
    return _per_group(roc_auc, y_true, y_score, sensitive_features, pos_label=pos_label)


def within_group_roc_auc(y_true: Any, y_score: Any, *, sensitive_features: Any,
                         pos_label: Any = 1) -> float:
    r"""ROC AUC over the (positive, negative) pairs that share a group: how well the scores rank
    cases *within* a group (a hospital), whatever their level differs between groups.

    .. math::

        \mathrm{AUC}_{\mathrm{within}} = \frac{\sum_g n_{g+} n_{g-} \mathrm{AUC}_g}{\sum_g n_{g+} n_{g-}}

    Pooled AUC also credits a model for ranking one group's cases above another's, i.e. for
    telling the groups apart where their prevalences differ (HAM10000's sites: 0.4 % to 42 %
    malignant test rows); this one does not. Groups holding one class add no pairs; NaN when
    no group holds both classes.
    """
    scores = _as_float_array(y_score, "y_score")
    positive = _binary_truth(y_true, pos_label, len(scores))
    keys, known = _group_keys(sensitive_features, len(scores))
    weighted = pairs = 0.0
    for key in {k for k, ok in zip(keys, known) if ok}:
        members = known & np.fromiter((k == key for k in keys), dtype=bool, count=len(keys))
        n_pos, n_neg = int(positive[members].sum()), int((~positive[members]).sum())
        if n_pos and n_neg:
            weighted += n_pos * n_neg * roc_auc(positive[members], scores[members], pos_label=True)
            pairs += n_pos * n_neg
    return weighted / pairs if pairs else float("nan")


def group_calibration_error(y_true: Any, y_prob: Any, *, sensitive_features: Any, n_bins: int = 10,
                            pos_label: Any = 1) -> dict[Hashable, float]:
    """{group: :func:`expected_calibration_error` over the group's samples} (bins as overall)."""
    return _per_group(expected_calibration_error, y_true, y_prob, sensitive_features,
                      n_bins=n_bins, pos_label=pos_label)
