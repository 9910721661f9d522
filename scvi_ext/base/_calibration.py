"""Temperature scaling of class probabilities (Guo et al., ICML 2017)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

#: Bounds of the fitted temperature.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    Parameters
    ----------
    logits
        Cells x classes logits of held-out labelled cells (finite values).
    labels
        Class code of each cell: integers from 0 to ``n_classes - 1`` (columns of ``logits``).

    Returns
    -------
    ``T`` in [0.05, 20]; ``T > 1`` softens over-confident probabilities, ``T < 1`` sharpens
    under-confident ones. The predicted class never changes.

    Raises
    ------
    ValueError
        When ``logits`` is not 2-D or not finite, ``labels`` is not 1-D, not integer, not
        one per row of ``logits``, empty, or outside the columns of ``logits``.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (cells x classes); got shape {logits.shape}.")
    if labels.ndim != 1:
        raise ValueError(
            f"labels must be 1-D (one class code per cell); got shape {labels.shape}. "
            "Flatten them first, e.g. labels.ravel()."
        )
    if len(labels) != len(logits):
        raise ValueError(
            f"logits has {len(logits)} rows and labels {len(labels)} entries; give one "
            "label per row of logits."
        )
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one labelled cell.")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class codes, not dtype {labels.dtype}.")
    n_classes = logits.shape[1]
    outside = labels[(labels < 0) | (labels >= n_classes)]
    if outside.size:
        raise ValueError(
            f"labels must be class codes from 0 to {n_classes - 1} (the columns of logits); "
            f"found {outside.size} outside, e.g. {outside[0]}."
        )
    n_not_finite = int((~np.isfinite(logits)).sum())
    if n_not_finite:
        raise ValueError(
            f"logits has {n_not_finite} NaN or infinite values; fit on finite logits."
        )

    def negative_log_likelihood(log_temperature: float) -> float:
        scaled = log_softmax(logits / np.exp(log_temperature), axis=1)
        return -float(scaled[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(
        negative_log_likelihood,
        bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)),
        method="bounded",
    )
    return float(np.exp(result.x))
