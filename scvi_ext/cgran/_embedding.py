"""Cell and gene vectors of CGRAN: SVD or NN matrix factorisation, and the fold-in of cells.

Both factorisations end as two (genes x d) matrices: the gene vectors ``G`` and the
fold-in ``P`` that maps a cell's normalised expression ``m`` to its cell vector ``m P``.
SVD: ``G = V S^1/2`` and ``P = V S^-1/2`` (so ``m P`` is exactly the row of ``U S^1/2`` of a
training cell). Matrix factorisation: ``P = G (G^T G)^-1``, the least-squares cell vector
against the fixed gene vectors. Every cell, in training and after, is folded in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

#: Singular values below this fraction of the largest are treated as zero.
RANK_TOLERANCE = 1e-6

MinibatchSource = Callable[[], Iterable[torch.Tensor]]


def fit_svd(minibatches: MinibatchSource, n_embedding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gene vectors and fold-in of the truncated SVD of the normalised training matrix.

    The matrix is read once, minibatch by minibatch, to accumulate ``M^T M`` (genes x genes,
    float64); its top ``n_embedding`` eigenvectors and eigenvalues are ``V`` and ``S^2``.
    Directions of (numerically) zero singular value fold in to zero.

    Parameters
    ----------
    minibatches
        Returns an iterable of (cells, genes) normalised expression minibatches.
    n_embedding
        Dimension ``d`` of the vectors.
    """
    gram = None
    for x in minibatches():
        x = x.double()
        gram = x.T @ x if gram is None else gram.addmm_(x.T, x)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    top = torch.argsort(eigenvalues, descending=True)[:n_embedding]
    singular = eigenvalues[top].clamp_min(0).sqrt()
    vectors = eigenvectors[:, top]
    # a deterministic sign: the largest loading of each vector is positive
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
    vectors = vectors * signs
    kept = singular > RANK_TOLERANCE * singular.max().clamp_min(1e-30)
    root = singular.sqrt()
    inverse_root = torch.where(kept, 1.0 / root.clamp_min(1e-30), torch.zeros_like(root))
    return (vectors * root).float(), (vectors * inverse_root).float()


def least_squares_fold_in(gene_vectors: torch.Tensor) -> torch.Tensor:
    """``G (G^T G)^-1``: ``m`` times it is the least-squares cell vector of expression ``m``."""
    gene_vectors = gene_vectors.double()
    return torch.linalg.pinv(gene_vectors.T, rtol=RANK_TOLERANCE).float()


def fit_matrix_factorisation(
    minibatches: MinibatchSource,
    n_cells: int,
    n_genes: int,
    n_embedding: int,
    n_epochs: int = 130,
    lr: float = 0.005,
    dropout_rate: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gene vectors and fold-in of an NN matrix factorisation ``min MSE(M, C G^T)`` (eq. 4).

    Cell vectors ``C`` and gene vectors ``G`` start at N(0, 1/sqrt(d)) and are fitted with
    Adam, dropout on both, one step per minibatch (read in order, so the cells of a
    minibatch are known by position). Only ``G`` is kept: cells are folded in by least
    squares (:func:`least_squares_fold_in`), the value ``C`` converges to for a fixed ``G``.
    """
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(n_embedding)
    cells = nn.Parameter(torch.randn(n_cells, n_embedding, generator=generator) * scale)
    genes = nn.Parameter(torch.randn(n_genes, n_embedding, generator=generator) * scale)
    optimizer = torch.optim.Adam([cells, genes], lr=lr)
    dropout = nn.Dropout(dropout_rate)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(n_epochs):
            start = 0
            for x in minibatches():
                rows = slice(start, start + len(x))
                start += len(x)
                reconstruction = dropout(cells[rows]) @ dropout(genes).T
                loss = torch.mean((reconstruction - x) ** 2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    gene_vectors = genes.detach()
    return gene_vectors, least_squares_fold_in(gene_vectors)


def kmeans_groups(gene_vectors: torch.Tensor, group_size: int, seed: int = 0) -> torch.Tensor:
    """Gene cluster grouping: k-means of the gene vectors into ``ceil(genes / group_size)``
    groups (scikit-learn, 10 starts); groups may be unequal or, in principle, empty."""
    from sklearn.cluster import KMeans

    n_groups = math.ceil(len(gene_vectors) / group_size)
    kmeans = KMeans(n_clusters=n_groups, n_init=10, random_state=seed)
    codes = kmeans.fit_predict(gene_vectors.double().cpu().numpy())
    return torch.from_numpy(codes.astype(np.int64))


def uniform_groups(n_genes: int, group_size: int) -> torch.Tensor:
    """Uniform grouping: genes in their order, ``group_size`` at a time (the last may be
    smaller)."""
    return torch.arange(n_genes) // group_size
