"""Classification, calibration and novelty-detection metrics."""

from ._calibration import expected_calibration_error, reliability_curve
from ._classification import (
    accuracy,
    balanced_accuracy,
    classification_report,
    macro_f1,
    weighted_f1,
)
from ._matching import (
    foscttm,
    matched_label_fraction,
    matching_aupr,
    matching_log_likelihood,
    matching_score,
    matching_top_k,
)
from ._novelty import novelty_auroc, novelty_precision_coverage

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "classification_report",
    "expected_calibration_error",
    "foscttm",
    "macro_f1",
    "matched_label_fraction",
    "matching_aupr",
    "matching_log_likelihood",
    "matching_score",
    "matching_top_k",
    "novelty_auroc",
    "novelty_precision_coverage",
    "reliability_curve",
    "weighted_f1",
]
