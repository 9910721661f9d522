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
        Cells x classes logits of held-out labelled cells.
    labels
        Class code of each cell.

    Returns
    -------
    ``T`` in [0.05, 20]; ``T > 1`` softens over-confident probabilities, ``T < 1`` sharpens
    under-confident ones. The predicted class never changes.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one labelled cell.")

    def negative_log_likelihood(log_temperature: float) -> float:
        scaled = log_softmax(logits / np.exp(log_temperature), axis=1)
        return -float(scaled[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(
        negative_log_likelihood,
        bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)),
        method="bounded",
    )
    return float(np.exp(result.x))
