"""Fairness maths: gap metrics (EA, DP, EO), per-group tables with CIs, and the FlexFair penalty.

The penalty lives in :mod:`fedfair_med.fairness.penalty` and criteria in
:mod:`fedfair_med.fairness.criteria`; the evaluation-side helpers are re-exported here.
"""

from fedfair_med.fairness.metrics import (
    demographic_parity_gap,
    equal_accuracy_gap,
    equal_opportunity_gap,
    expected_calibration_error,
    group_calibration_error,
    group_means,
    group_roc_auc,
    within_group_roc_auc,
    is_missing,
    roc_auc,
)
from fedfair_med.fairness.tables import age_bands, bootstrap_ci, group_table, intersect

__all__ = [
    "age_bands",
    "bootstrap_ci",
    "demographic_parity_gap",
    "equal_accuracy_gap",
    "equal_opportunity_gap",
    "expected_calibration_error",
    "group_calibration_error",
    "group_means",
    "group_roc_auc",
    "within_group_roc_auc",
    "group_table",
    "intersect",
    "is_missing",
    "roc_auc",
]
