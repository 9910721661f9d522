"""CELLULAR losses (thesis 2.3.1-2.3.2), vectorised over the minibatch.

Every function works on a whole minibatch at once: pairwise similarities are one matrix
product and per-class averages are scatter sums, so a training step has no Python loop
over cells or pairs. Cells left out (``include``) are masked, never indexed away, so a step
never waits for the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scvi_ext.base import class_means, class_sums


def _weighted_class_mean(
    per_cell: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_g weights[g] * mean(per_cell[valid & groups == g])`` over groups with cells."""
    n_groups = len(weights)
    valid_f = valid.to(per_cell.dtype)
    sums = torch.zeros(n_groups, dtype=per_cell.dtype, device=per_cell.device)
    counts = torch.zeros_like(sums)
    sums = sums.index_add(0, groups, torch.where(valid, per_cell, torch.zeros_like(per_cell)))
    counts = counts.index_add(0, groups, valid_f)
    present = counts > 0
    means = sums / counts.clamp_min(1.0)
    return (means * weights.to(per_cell) * present).sum()


def _log_ratio(
    logits: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """``log(sum_pos exp / (sum_pos exp + sum_neg exp))`` row-wise, in log space."""
    neg_inf = torch.finfo(logits.dtype).min
    log_positive = torch.logsumexp(logits.masked_fill(~positive, neg_inf), dim=1)
    log_all = torch.logsumexp(logits.masked_fill(~(positive | negative), neg_inf), dim=1)
    return log_positive - log_all


def _other_cell_pairs(z: torch.Tensor, include: torch.Tensor | None) -> torch.Tensor:
    """Pairs of distinct cells, both included."""
    pairs = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    if include is not None:
        pairs = pairs & include[:, None] & include[None, :]
    return pairs


def cosine_logits(z: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Pairwise cosine similarities divided by the temperature."""
    normalized = F.normalize(z, dim=1, eps=1e-8)
    return normalized @ normalized.T / temperature


def cell_type_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    temperature: torch.Tensor | float,
    include: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted soft nearest-neighbour loss on cell types (thesis eq. 2.9, 2.13).

    For each cell ``b`` with at least one other cell of its type and one cell of another
    type: ``-log(sum_same exp(s/T) / (sum_same exp(s/T) + sum_other exp(s/T)))`` with ``s``
    the cosine similarity (the cell itself excluded). Per-type means are weighted by
    ``weights`` and summed.

    Parameters
    ----------
    z
        Embeddings, cells x dimensions.
    labels
        Cell type codes, in ``[0, len(weights))`` for included cells.
    weights
        Per-type weights (:func:`scvi_ext.base.class_weights`).
    temperature
        Temperature ``T``.
    include
        Boolean mask of the cells that take part (default: all), e.g. the labelled ones.
    """
    logits = cosine_logits(z, temperature)
    pairs = _other_cell_pairs(z, include)
    same = labels[:, None] == labels[None, :]
    positive = same & pairs
    negative = ~same & pairs
    valid = positive.any(dim=1) & negative.any(dim=1)
    per_cell = -_log_ratio(logits, positive, negative)
    groups = labels.clamp(0, len(weights) - 1)  # excluded cells are not valid
    return _weighted_class_mean(per_cell, valid, groups, weights)


def batch_mixing_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    batches: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 0.5,
    eps: float = 1e-6,
    include: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted batch-mixing loss (thesis eq. 2.11, 2.14).

    Among cells of the same type: positives are cells of the same batch, negatives cells
    of other batches; the per-cell term is ``1 / (-log(p))`` with ``p`` the soft
    nearest-neighbour ratio, so that minimising it spreads each batch inside its type
    cluster. ``-log(p)`` is clamped below by ``eps``. Per-batch means are weighted by
    ``weights`` and summed.

    Parameters
    ----------
    z
        Embeddings.
    labels
        Cell type codes.
    batches
        Batch codes in ``[0, len(weights))``.
    weights
        Per-batch weights.
    temperature
        Fixed temperature (reference code: 0.5).
    eps
        Lower bound of ``-log(p)``.
    include
        Boolean mask of the cells that take part (default: all).
    """
    logits = cosine_logits(z, temperature)
    pairs = _other_cell_pairs(z, include)
    same_type = labels[:, None] == labels[None, :]
    same_batch = batches[:, None] == batches[None, :]
    positive = same_type & same_batch & pairs
    negative = same_type & ~same_batch & pairs
    valid = positive.any(dim=1) & negative.any(dim=1)
    neg_log = (-_log_ratio(logits, positive, negative)).clamp_min(eps)
    per_cell = torch.where(valid, 1.0 / neg_log, torch.zeros_like(neg_log))
    return _weighted_class_mean(per_cell, valid, batches, weights)


def centroid_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    reference_distances: torch.Tensor,
    include: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the minibatch's and the reference's relative centroid distances (eq. 2.16).

    Centroids of the types present in the minibatch, their Euclidean distance matrix,
    divided by its maximum over the pairs the reference knows (non-zero entries of
    ``reference_distances``: pairs never seen in one batch are 0 there and masked); the
    reference entries are divided by their own maximum over the same pairs. 0 when fewer
    than two types with a known pair are present.

    Parameters
    ----------
    z
        Embeddings.
    labels
        Cell type codes, in ``[0, n_labels)`` for included cells.
    reference_distances
        ``n_labels x n_labels`` reference matrix (:func:`reference_centroid_distances`).
    include
        Boolean mask of the cells that take part (default: all).
    """
    n_labels = reference_distances.shape[0]
    one_hot = F.one_hot(labels.clamp(0, n_labels - 1), n_labels).to(z.dtype)
    if include is not None:
        one_hot = one_hot * include[:, None].to(z.dtype)
    counts = one_hot.sum(dim=0)
    centroids = one_hot.T @ z / counts.clamp_min(1.0)[:, None]
    present = counts > 0
    mask = present[:, None] & present[None, :] & (reference_distances != 0)
    squared = (centroids[:, None, :] - centroids[None, :, :]).pow(2).sum(dim=-1)
    zeros = torch.zeros_like(squared)
    # distances are >= 0, so the maximum over all entries is the maximum over the mask
    model = torch.where(mask, squared.clamp_min(1e-12).sqrt(), zeros)
    reference = torch.where(mask, reference_distances.to(z), zeros)
    model = model / model.max().clamp_min(1e-12)
    reference = reference / reference.max().clamp_min(1e-12)
    squared_error = (model - reference).pow(2) * mask
    return squared_error.sum() / mask.sum().clamp_min(1)


def reference_centroid_distances(
    embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray, n_labels: int
) -> np.ndarray:
    """Reference matrix of the centroid loss (thesis Algorithm 1, step 1) from cells.

    The centroids of each cell type in each batch, then :func:`batch_centroid_distances`.

    Parameters
    ----------
    embedding
        Cells x components (the thesis: 100-component PCA of the normalised data).
    labels
        Cell type codes in ``[0, n_labels)``.
    batches
        Batch codes.
    n_labels
        Number of cell types.
    """
    n_batches = int(np.max(batches)) + 1
    groups = torch.as_tensor(np.asarray(batches) * n_labels + np.asarray(labels))
    sums, counts = class_sums(torch.as_tensor(embedding), groups, n_batches * n_labels)
    centroids = class_means(sums, counts).reshape(n_batches, n_labels, -1).numpy()
    return batch_centroid_distances(centroids, counts.reshape(n_batches, n_labels).numpy() > 0)


def batch_centroid_distances(centroids: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Reference matrix of the centroid loss from per-batch cell type centroids.

    For each batch, the Euclidean distances between the centroids of the cell types it
    contains; averaged over the batches where both types occur, 0 for pairs never seen
    together, divided by the maximum.

    Parameters
    ----------
    centroids
        Batches x cell types x components.
    present
        Batches x cell types: whether the batch has cells of the type.
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    diff = centroids[:, :, None, :] - centroids[:, None, :, :]
    distances = np.sqrt((diff**2).sum(axis=-1))
    both = present[:, :, None] & present[:, None, :]
    total = np.where(both, distances, 0.0).sum(axis=0)
    n_seen = both.sum(axis=0)
    mean = np.where(n_seen > 0, total / np.maximum(n_seen, 1), 0.0)
    largest = mean.max()
    return mean / largest if largest > 0 else mean
