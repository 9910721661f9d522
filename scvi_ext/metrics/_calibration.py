from collections.abc import Sequence

import numpy as np
import pandas as pd


def _calibration_inputs(
    y_true: Sequence, y_pred: Sequence, confidence: Sequence, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell correctness (bool) and confidence (float64), validated."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    confidence = np.asarray(confidence, dtype=np.float64)
    if not (y_true.ndim == y_pred.ndim == confidence.ndim == 1):
        raise ValueError("y_true, y_pred and confidence must be one-dimensional.")
    if not (y_true.size == y_pred.size == confidence.size):
        raise ValueError(
            "y_true, y_pred and confidence must have the same length; got "
            f"{y_true.size}, {y_pred.size} and {confidence.size}."
        )
    if confidence.size == 0:
        raise ValueError("y_true, y_pred and confidence are empty.")
    if np.isnan(confidence).any() or (confidence < 0).any() or (confidence > 1).any():
        raise ValueError(
            "confidence must be in [0, 1] (the maximum predicted probability per cell)."
        )
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}.")
    return y_true == y_pred, confidence


def reliability_curve(
    y_true: Sequence, y_pred: Sequence, confidence: Sequence, n_bins: int = 15
) -> pd.DataFrame:
    """Accuracy and mean confidence per confidence bin, for reliability diagrams.

    Bins are equal-width on [0, 1], closed on the left (``[lower, upper)``); a
    confidence of exactly 1.0 goes in the last bin.

    Parameters
    ----------
    y_true, y_pred
        Array-likes of labels of the same length.
    confidence
        Confidence (maximum class probability) of each prediction, in [0, 1].
    n_bins
        Number of bins.

    Returns
    -------
    One row per bin (empty bins included) with columns ``bin_lower``, ``bin_upper``,
    ``count``, ``accuracy`` and ``mean_confidence`` (NaN for empty bins).
    """
    correct, confidence = _calibration_inputs(y_true, y_pred, confidence, n_bins)
    n_bins = int(n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # floor(confidence * n_bins): a confidence of exactly k / n_bins opens bin k (the
    # linspace edges can lie a rounding error above k / n_bins)
    bin_index = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    n_correct = np.bincount(bin_index, weights=correct.astype(np.float64), minlength=n_bins)
    confidence_sum = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_accuracy = np.where(count > 0, n_correct / count, np.nan)
        mean_confidence = np.where(count > 0, confidence_sum / count, np.nan)
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count,
            "accuracy": bin_accuracy,
            "mean_confidence": mean_confidence,
        }
    )


def expected_calibration_error(
    y_true: Sequence, y_pred: Sequence, confidence: Sequence, n_bins: int = 15
) -> float:
    """Expected calibration error (ECE) of predictions with their confidence.

    ``sum_b (n_b / n) * |accuracy_b - mean confidence_b|`` over equal-width bins of
    the confidence on [0, 1] (see :func:`reliability_curve` for the bins).

    Parameters
    ----------
    y_true, y_pred
        Array-likes of labels of the same length.
    confidence
        Confidence (maximum class probability) of each prediction, in [0, 1].
    n_bins
        Number of bins.

    Returns
    -------
    The ECE, in [0, 1]; 0 is perfectly calibrated.
    """
    curve = reliability_curve(y_true, y_pred, confidence, n_bins)
    filled = curve[curve["count"] > 0]
    weights = filled["count"] / filled["count"].sum()
    gaps = (filled["accuracy"] - filled["mean_confidence"]).abs()
    return float((weights * gaps).sum())
