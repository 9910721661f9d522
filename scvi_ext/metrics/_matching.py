"""Cross-modality cell matching metrics (NeurIPS 2021 matching task, FOSCTTM).

A matching matrix ``P`` has one row per RNA cell and one column per ATAC cell, both in the
order of the true pairs (row ``i`` and column ``i`` are the same cell); rows sum to 1. The
metrics that read probability mass (:func:`matching_score`, :func:`matching_log_likelihood`,
:func:`matched_label_fraction`) check that ``P`` is row-stochastic; the ranking metrics
(:func:`matching_top_k`, :func:`matching_aupr`) read any scores.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp


def _csr(matrix, stochastic: bool, name: str = "P") -> sp.csr_matrix:
    """``matrix`` as a float64 CSR matrix, checked 2-D (and row-stochastic if asked)."""
    if np.ndim(matrix) != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix (RNA cells x ATAC cells), not {np.ndim(matrix)}-D."
        )
    matrix = sp.csr_matrix(matrix, dtype=np.float64)
    if not stochastic:
        return matrix
    need = "pass probabilities (non-negative, each row summing to 1), e.g. from CrossAttentionMatcher.match."
    if (matrix.data < 0).any():
        raise ValueError(f"{name} has negative entries; {need}")
    sums = matrix.sum(1).A1
    bad = np.flatnonzero(~np.isclose(sums, 1.0, rtol=0.0, atol=1e-3))
    if len(bad):
        raise ValueError(f"Row {bad[0]} of {name} sums to {sums[bad[0]]:.4g}; {need}")
    return matrix


def _square_csr(matrix, stochastic: bool = True, name: str = "P") -> sp.csr_matrix:
    matrix = _csr(matrix, stochastic, name)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"{name} has shape {matrix.shape}; matching metrics need the same cells in rows "
            "(RNA) and columns (ATAC), in the same order."
        )
    return matrix


def matching_score(matrix) -> float:
    """The competition's score: mean probability placed on the true pair, ``mean_i P[i, i]``.

    Random matching scores ``1 / n``; a perfect one 1.

    Raises
    ------
    ValueError
        If ``P`` is not a square (same cells in rows and columns) row-stochastic matrix.
    """
    matrix = _square_csr(matrix)
    return float(matrix.diagonal().mean())


def matching_log_likelihood(matrix, floor: float = 1e-6) -> float:
    """Mean log-probability of the true pair, ``mean_i log max(P[i, i], floor)``.

    Rewards probabilities as confident as they are right: random matching scores
    ``log(1 / n)``, a perfect one 0, and each row sure of a wrong cell ``log(floor)``
    (a true pair of probability 0, e.g. outside the kept ``top_k``, would otherwise be
    ``-inf``).

    Raises
    ------
    ValueError
        If ``P`` is not a square (same cells in rows and columns) row-stochastic matrix.
    """
    matrix = _square_csr(matrix)
    return float(np.log(np.maximum(matrix.diagonal(), floor)).mean())


def matching_top_k(matrix, k: int) -> float:
    """Fraction of rows whose true pair is among their ``k`` largest entries (a true pair
    of probability 0 is never found; ties count against it).

    Raises
    ------
    ValueError
        If ``P`` is not a square matrix (the same cells in rows and columns).
    """
    matrix = _square_csr(matrix, stochastic=False)
    true = matrix.diagonal()
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    n_above = np.bincount(rows[matrix.data > true[rows]], minlength=matrix.shape[0])
    n_tied = np.bincount(rows[matrix.data == true[rows]], minlength=matrix.shape[0]) - 1
    return float(((true > 0) & (n_above + n_tied < k)).mean())


def matched_label_fraction(matrix, row_labels, column_labels) -> float:
    """Mean probability mass each row puts on columns with its own label (e.g. cell type).

    ``P`` may have other cells in its columns than in its rows (any shape).

    Raises
    ------
    ValueError
        If ``P`` is not a 2-D row-stochastic matrix, or the labels are not one per row
        (``row_labels``) and one per column (``column_labels``).
    """
    matrix = _csr(matrix, stochastic=True)
    row_labels, column_labels = np.asarray(row_labels), np.asarray(column_labels)
    for labels, name, axis in ((row_labels, "row", 0), (column_labels, "column", 1)):
        if labels.shape != (matrix.shape[axis],):
            raise ValueError(
                f"{name}_labels has shape {labels.shape} but P has {matrix.shape[axis]} "
                f"{name}s; pass one label per {name} of P."
            )
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    same = row_labels[rows] == column_labels[matrix.indices]
    mass = np.bincount(rows, weights=matrix.data * same, minlength=matrix.shape[0])
    return float(mass.mean())


def matching_aupr(matrix) -> float:
    """Area under the precision-recall curve (average precision) of the entries of ``P`` as
    scores of "same cell", the ``n`` true pairs among all ``n x n`` entries.

    Entries not stored score 0 and tie with each other (one threshold). Equal to
    ``sklearn.metrics.average_precision_score`` on the dense matrix.

    Raises
    ------
    ValueError
        If ``P`` is not a square matrix (the same cells in rows and columns).
    """
    matrix = _square_csr(matrix, stochastic=False)
    n = matrix.shape[0]
    true = matrix.diagonal()
    rows = np.repeat(np.arange(n), np.diff(matrix.indptr))
    values = matrix.data
    positive = (rows == matrix.indices) & (values > 0)
    stored = values > 0
    values, positive = values[stored], positive[stored]
    order = np.argsort(-values, kind="stable")
    values, positive = values[order], positive[order]
    last_of_tie = np.r_[values[1:] != values[:-1], True] if len(values) else np.array([], bool)
    true_positives = np.cumsum(positive)[last_of_tie]
    predicted = (np.arange(len(values)) + 1)[last_of_tie]
    recall_steps = np.diff(np.r_[0, true_positives]) / n
    precision = true_positives / predicted
    ap = float((recall_steps * precision).sum())
    n_missed = n - int((true > 0).sum())
    if n_missed:  # every unstored entry at score 0: one last threshold with all n^2 entries
        ap += n_missed / n * (n / (n * n))
    return ap


def foscttm(
    x: np.ndarray,
    y: np.ndarray,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    direction: Literal["both", "x_to_y", "y_to_x"] = "both",
    block_size: int = 1024,
) -> float:
    """Fraction Of Samples Closer Than the True Match (lower is better; random 0.5).

    For each cell ``i`` of ``x``, the fraction of cells of ``y`` strictly closer to
    ``x_i`` than its true match ``y_i`` (and the other way round), averaged over cells and,
    with ``direction="both"``, over the two directions. Computed ``block_size`` rows at a
    time: memory ``block_size x n``.

    Parameters
    ----------
    x, y
        Embeddings of the same cells in the two modalities (cells x dimensions, same order).
    metric
        ``"euclidean"`` or ``"cosine"`` distance.
    direction
        ``"x_to_y"``, ``"y_to_x"`` or ``"both"`` (their mean).
    block_size
        Rows compared at a time.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(
            f"x and y have shapes {x.shape} and {y.shape}; FOSCTTM needs the same cells, in "
            "the same order, embedded in the same space."
        )
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'euclidean' or 'cosine', not {metric!r}.")

    def one_way(a: np.ndarray, b: np.ndarray) -> float:
        closer = np.empty(len(a))
        b_norms = (b * b).sum(1)
        for start in range(0, len(a), block_size):
            block = a[start : start + block_size]
            distances = (block * block).sum(1)[:, None] - 2 * block @ b.T + b_norms[None]
            rows = np.arange(len(block))
            true = distances[rows, start + rows]
            closer[start : start + len(block)] = (distances < true[:, None] - 1e-12).sum(1)
        return float((closer / (len(b) - 1)).mean())

    if direction == "x_to_y":
        return one_way(x, y)
    if direction == "y_to_x":
        return one_way(y, x)
    if direction == "both":
        return (one_way(x, y) + one_way(y, x)) / 2
    raise ValueError(f"direction must be 'both', 'x_to_y' or 'y_to_x', not {direction!r}.")
