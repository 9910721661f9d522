"""Matching at scale: top-k scores in blocks, sparse probabilities, one-to-one assignments.

Nothing here holds a dense ``n_rna x n_atac`` matrix: scores are computed ``block_size``
rows at a time and only the ``top_k`` best columns of each row are kept, so memory grows
as ``n_rna * top_k``.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.special import logsumexp

Assignment = Literal["bipartite", "ot"] | None
TemperatureFit = Literal["likelihood", "score"]
TEMPERATURE_FITS = ("likelihood", "score")

#: Temperatures tried when a softmax temperature is fitted on paired cells (scores of
#: unit-norm embeddings lie in [-1 - alpha, 1 + alpha]: at 10, P is nearly uniform).
TEMPERATURE_GRID = np.geomspace(1e-4, 10.0, 51)


def check_top_k(top_k: int) -> None:
    """Raise unless ``top_k`` (candidates kept per row) is at least 1.

    Raises
    ------
    ValueError
        If ``top_k`` is below 1.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}.")


def check_assignment(assignment: object) -> None:
    """Raise unless ``assignment`` is ``"bipartite"``, ``"ot"`` or ``None``.

    Raises
    ------
    ValueError
        If ``assignment`` is none of them.
    """
    if assignment not in ("bipartite", "ot", None):
        raise ValueError(f"assignment must be 'bipartite', 'ot' or None, not {assignment!r}.")


def check_temperature(temperature: float) -> None:
    """Raise unless ``temperature`` (of a softmax) is a positive finite number: a negative
    one reverses the ranking, 0 divides by zero.

    Raises
    ------
    ValueError
        If ``temperature`` is not a positive finite number.
    """
    if isinstance(temperature, bool) or not (
        isinstance(temperature, Real) and 0 < temperature < np.inf
    ):
        raise ValueError(
            f"temperature must be a positive finite number (e.g. 0.05), not {temperature!r}."
        )


@torch.inference_mode()
def top_k_scores(
    x: np.ndarray, y: np.ndarray, top_k: int, block_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` largest inner products ``x_i . y_j`` of each row ``i``, best first.

    Parameters
    ----------
    x, y
        Embeddings (cells x dimensions) of the two modalities.
    top_k
        Columns kept per row (at most ``len(y)``).
    block_size
        Rows scored at a time: memory is ``block_size * len(y)`` scores.

    Returns
    -------
    Column indices (int32) and scores (float32), both ``len(x) x min(top_k, len(y))``.
    """
    k = min(int(top_k), len(y))
    y_tensor = torch.as_tensor(np.asarray(y, dtype=np.float32))
    indices = np.empty((len(x), k), dtype=np.int32)
    scores = np.empty((len(x), k), dtype=np.float32)
    for start in range(0, len(x), block_size):
        block = torch.as_tensor(np.asarray(x[start : start + block_size], dtype=np.float32))
        values, columns = torch.topk(block @ y_tensor.T, k, dim=1)
        indices[start : start + len(block)] = columns.numpy()
        scores[start : start + len(block)] = values.numpy()
    return indices, scores


def _row_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    logits = scores.astype(np.float64) / temperature
    logits -= logits.max(1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(1, keepdims=True)


def _row_softmax_float32(scores: np.ndarray, temperature: float, block: int = 4096):
    """:func:`_row_softmax` in float32, a block of rows at a time (memory of the output)."""
    weights = np.empty(scores.shape, dtype=np.float32)
    for start in range(0, len(scores), block):
        weights[start : start + block] = _row_softmax(scores[start : start + block], temperature)
    return weights


def probabilities(
    indices: np.ndarray, scores: np.ndarray, n_columns: int, temperature: float
) -> sp.csr_matrix:
    """Row-wise softmax of ``scores / temperature`` over the kept columns, as a CSR matrix.

    Each row sums to 1 and has at most ``indices.shape[1]`` non-zeros.

    Raises
    ------
    ValueError
        If ``temperature`` is not a positive finite number.
    """
    check_temperature(temperature)
    n_rows, k = indices.shape
    weights = _row_softmax_float32(scores, temperature)
    index_dtype = np.int32 if n_rows * k < np.iinfo(np.int32).max else np.int64
    indptr = np.arange(0, n_rows * k + 1, k, dtype=index_dtype)
    matrix = sp.csr_matrix(
        (weights.ravel(), indices.astype(index_dtype).ravel(), indptr),  # a copy: sorted below
        shape=(n_rows, n_columns),
    )
    matrix.sort_indices()
    return matrix


def true_pair_log_probabilities(
    indices: np.ndarray, scores: np.ndarray, temperature: float
) -> np.ndarray:
    """Log-probability of the true pair (row ``i`` with column ``i``) of each row under the
    softmax of ``scores / temperature`` over the kept columns.

    A true pair outside the kept columns counts as the row's last kept candidate (the
    row's smallest probability): its score is at most that candidate's, so this is the
    most it could get, and a temperature that makes such a row confident about wrong
    cells is still penalised.

    Raises
    ------
    ValueError
        If ``temperature`` is not a positive finite number.
    """
    check_temperature(temperature)
    logits = scores.astype(np.float64) / temperature
    log_normaliser = logsumexp(logits, axis=1)
    is_true = indices == np.arange(len(indices))[:, None]
    true_logits = np.where(is_true.any(1), np.where(is_true, logits, 0.0).sum(1), logits.min(1))
    return true_logits - log_normaliser


def fit_temperature(
    indices: np.ndarray,
    scores: np.ndarray,
    temperature_fit: TemperatureFit = "likelihood",
    grid: np.ndarray = TEMPERATURE_GRID,
) -> float:
    """The softmax temperature of the grid that best predicts the true pairs of paired
    cells (row ``i`` with column ``i``).

    Parameters
    ----------
    indices, scores
        Kept columns and their scores per row (:func:`top_k_scores`), rows and columns the
        same cells in the same order.
    temperature_fit
        ``"likelihood"``: maximise the mean log-probability of the true pair
        (:func:`true_pair_log_probabilities`), so P is as confident as the model is right
        (a weak model gets a large temperature, a near-uniform P). ``"score"``: maximise
        the mean probability of the true pair (the competition score); it rewards
        sharpening rows even when most of them are wrong, so a weak model gets nearly
        one-hot rows on wrong cells.
    grid
        Temperatures tried.
    """
    if temperature_fit not in TEMPERATURE_FITS:
        raise ValueError(
            f"temperature_fit must be 'likelihood' or 'score', not {temperature_fit!r}."
        )
    rows = np.arange(len(indices))
    is_true = indices == rows[:, None]

    def objective(temperature: float) -> float:
        if temperature_fit == "likelihood":
            return float(true_pair_log_probabilities(indices, scores, temperature).mean())
        return float((_row_softmax(scores, temperature) * is_true).sum(1).mean())

    values = [objective(float(temperature)) for temperature in grid]
    return float(grid[int(np.argmax(values))])


def entropic_ot(
    scores: sp.csr_matrix, epsilon: float, n_iter: int = 1000, tol: float = 1e-6
) -> sp.csr_matrix:
    """Entropic optimal transport between uniform marginals on the sparse support of ``scores``.

    Sinkhorn scaling (cost ``-score``, regularisation ``epsilon``) on the stored entries
    only, so memory stays linear in the number of non-zeros; with every column stored it is
    POT's ``ot.sinkhorn(a, b, -scores, epsilon)``. Each row of the kernel is shifted by its
    maximum (absorbed by the row scaling), so the kernel never overflows. Rows of the plan
    are rescaled to sum to 1.

    Parameters
    ----------
    scores
        Rows x columns similarity, CSR; absent entries cannot be transported to.
    epsilon
        Entropic regularisation (the softmax temperature plays this role).
    n_iter, tol
        Sinkhorn iterations at most, and the relative tolerance on the row marginals.
    """
    kernel = sp.csr_matrix(scores, dtype=np.float64, copy=True)
    n_rows, n_columns = kernel.shape
    counts = np.diff(kernel.indptr)
    row_max = np.zeros(n_rows)
    nonempty = counts > 0
    row_max[nonempty] = np.maximum.reduceat(kernel.data, kernel.indptr[:-1][nonempty])
    kernel.data = np.exp((kernel.data - np.repeat(row_max, counts)) / epsilon)
    kernel_t = sp.csr_matrix(kernel.T)
    a, b = np.full(n_rows, 1.0 / n_rows), np.full(n_columns, 1.0 / n_columns)
    v = np.ones(n_columns)
    row_mass = kernel @ v
    for _ in range(n_iter):
        u = np.divide(a, row_mass, out=np.zeros(n_rows), where=row_mass > 0)
        column_mass = kernel_t @ u
        v = np.divide(b, column_mass, out=np.zeros(n_columns), where=column_mass > 0)
        row_mass = kernel @ v
        if np.abs(u * row_mass - a).max() * n_rows < tol:  # row marginals, relative
            break
    plan = sp.diags(u) @ kernel @ sp.diags(v)
    return _normalise_rows(sp.csr_matrix(plan))


def _normalise_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    sums = np.asarray(matrix.sum(1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / np.where(sums > 0, sums, 1.0)) @ matrix)


def bipartite_assignment(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """One-to-one matching of maximal likelihood (sum of log probabilities) on the stored
    entries of a row-stochastic CSR matrix, as a 0/1 matrix.

    Every cell of the smaller side is matched. So that a full matching always exists on
    the sparse candidates, the smaller side also gets one fallback edge per cell (a fixed
    random permutation, never the row order, which may be the true pairing) weighted below
    every stored entry; rows left without a partner (more rows
    than columns) keep their probabilities, so every row still sums to 1.
    """
    n_rows, n_columns = matrix.shape
    weights = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    weights.eliminate_zeros()  # candidates of probability 0 are not edges
    weights.data = np.log(weights.data)
    weights.data += 2.0 - weights.data.min()  # stored entries >= 2; absent = no edge
    n_pairs = min(n_rows, n_columns)
    rng = np.random.default_rng(0)  # a fixed random permutation: never the row order itself
    fallback_rows = rng.permutation(n_rows)[:n_pairs]
    fallback_columns = rng.permutation(n_columns)[:n_pairs]
    fallback = sp.csr_matrix(
        (np.ones(n_pairs), (fallback_rows, fallback_columns)), shape=matrix.shape
    )
    weights = weights.maximum(fallback)
    matched_rows, matched_columns = min_weight_full_bipartite_matching(weights, maximize=True)
    one_hot = sp.csr_matrix(
        (np.ones(len(matched_rows)), (matched_rows, matched_columns)), shape=matrix.shape
    )
    unmatched = np.ones(n_rows, dtype=bool)
    unmatched[matched_rows] = False
    kept = sp.diags(unmatched.astype(float)) @ sp.csr_matrix(matrix, dtype=np.float64)
    return sp.csr_matrix(kept + one_hot)


def assign(matrix: sp.csr_matrix, assignment: Assignment, temperature: float) -> sp.csr_matrix:
    """Apply a one-to-one post-processing to a row-stochastic matching matrix.

    ``None`` returns it unchanged; ``"bipartite"`` the maximum-likelihood one-to-one
    matching; ``"ot"`` the entropic optimal transport plan between uniform marginals
    (MatchCLOT) on the same support, with the softmax temperature as regularisation.

    Raises
    ------
    ValueError
        If ``assignment`` is unknown, or it is ``"ot"`` and ``temperature`` is not a
        positive finite number.
    """
    check_assignment(assignment)
    if assignment is None:
        return matrix
    if assignment == "bipartite":
        return bipartite_assignment(matrix)
    check_temperature(temperature)
    log_probabilities = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    log_probabilities.data = temperature * np.log(np.clip(log_probabilities.data, 1e-300, None))
    return entropic_ot(log_probabilities, epsilon=temperature)


def match_embeddings(
    x: np.ndarray,
    y: np.ndarray,
    top_k: int = 1000,
    temperature: float = 0.05,
    assignment: Assignment = None,
    block_size: int = 1024,
    rescore: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> sp.csr_matrix:
    """Row-stochastic sparse matching matrix from two embeddings (inner-product scores).

    ``rescore(indices, scores)``, when given, returns new scores for the kept candidates
    (e.g. a re-ranking term). See :func:`top_k_scores`, :func:`probabilities`,
    :func:`assign`.

    Raises
    ------
    ValueError
        If ``top_k`` is below 1, ``temperature`` is not a positive finite number or
        ``assignment`` is unknown.
    """
    check_top_k(top_k)
    check_temperature(temperature)  # before the scores, not after
    check_assignment(assignment)
    indices, scores = top_k_scores(x, y, top_k, block_size)
    if rescore is not None:
        scores = rescore(indices, scores)
    matrix = probabilities(indices, scores, len(y), temperature)
    return assign(matrix, assignment, temperature)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
