from collections.abc import Sequence

import numpy as np
from sklearn import metrics as sk_metrics

from ._calibration import expected_calibration_error


def _labels(y_true: Sequence, y_pred: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.ndim != 1:
        raise ValueError("y_true and y_pred must be one-dimensional.")
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true and y_pred have different lengths ({y_true.size} and {y_pred.size})."
        )
    if y_true.size == 0:
        raise ValueError("y_true and y_pred are empty.")
    return y_true, y_pred


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of cells whose predicted label equals the true label.

    Parameters
    ----------
    y_true, y_pred
        Array-likes of labels (strings or codes) of the same length.
    """
    y_true, y_pred = _labels(y_true, y_pred)
    return float(sk_metrics.accuracy_score(y_true, y_pred))


def balanced_accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Mean over true classes of the per-class recall.

    Parameters
    ----------
    y_true, y_pred
        Array-likes of labels of the same length.
    """
    y_true, y_pred = _labels(y_true, y_pred)
    return float(sk_metrics.balanced_accuracy_score(y_true, y_pred))


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """Unweighted mean of per-class F1 over the classes in ``y_true`` or ``y_pred``.

    A predicted class absent from ``y_true`` counts with F1 = 0 (sklearn convention).

    Parameters
    ----------
    y_true, y_pred
        Array-likes of labels of the same length.
    """
    y_true, y_pred = _labels(y_true, y_pred)
    return float(sk_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))


def weighted_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """Mean of per-class F1 weighted by the class sizes in ``y_true``.

    Parameters
    ----------
    y_true, y_pred
        Array-likes of labels of the same length.
    """
    y_true, y_pred = _labels(y_true, y_pred)
    return float(sk_metrics.f1_score(y_true, y_pred, average="weighted", zero_division=0))


def classification_report(
    y_true: Sequence, y_pred: Sequence, confidence: Sequence | None = None
) -> dict[str, float]:
    """All classification metrics at once.

    Parameters
    ----------
    y_true, y_pred
        Array-likes of labels of the same length.
    confidence
        Optional confidence (maximum class probability) per cell; adds ``ece``.

    Returns
    -------
    Dict with ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1`` and,
    when ``confidence`` is given, ``ece``.
    """
    report = {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "weighted_f1": weighted_f1(y_true, y_pred),
    }
    if confidence is not None:
        report["ece"] = expected_calibration_error(y_true, y_pred, confidence)
    return report
