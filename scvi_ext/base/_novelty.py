"""Novelty of query cells judged against the reference cells themselves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from scvi_ext.data import log_normalise
from scvi_ext.data._validation import check_minibatch_counts, check_positive_ints

from ._anndata import registry_gene_names

#: Library size each cell is scaled to before ``log1p`` (counts input).
TARGET_SUM = 1e4
#: Cells the joint PCA is fitted on at most (a seeded subsample; all cells are projected).
PCA_FIT_CELLS = 10_000


def query_neighbour_score(
    reference,
    query,
    n_neighbors: int = 50,
    n_comps: int = 30,
    counts: bool = True,
    max_cells: int = 20_000,
    seed: int = 0,
) -> np.ndarray:
    """How much more the query than the reference fills each query cell's neighbourhood.

    Reference and query cells share one PCA (of log-normalised counts, or of the values as
    given with ``counts=False``); for each query cell its ``n_neighbors`` nearest other
    cells are counted by side, ``q`` in the query and ``r`` in the reference. The score is
    the density ratio ``(q / n_query) / (q / n_query + r / n_reference)``: about 0.5 where
    the query is as dense as the reference, 1 where no reference cell is near (a cell type
    the reference lacks). It judges the query as a whole: a cell's score depends on the
    other query cells, and a query far from the whole reference (another condition or
    technology) scores high everywhere.

    Parameters
    ----------
    reference, query
        Cells x genes matrices (dense or sparse) with the same genes in the same order.
    n_neighbors
        Neighbours counted per query cell; the query needs at least this many cells.
    n_comps
        Principal components of the joint PCA (none when the values have fewer columns).
    counts
        The matrices hold counts: scale each cell to 10^4 and take ``log1p`` first.
    max_cells
        Cells of each side that can be neighbours (a seeded subsample beyond it); every
        query cell is scored. The PCA is fitted on at most :data:`PCA_FIT_CELLS` of them.
    seed
        Seed of the subsamples and the PCA solver.

    Returns
    -------
    One score per query cell, in [0, 1].

    Raises
    ------
    ValueError
        When ``n_neighbors``, ``n_comps`` or ``max_cells`` is not a positive integer, the
        genes differ, the reference is empty, the query has fewer than ``n_neighbors``
        cells, or (``counts=True``) a matrix does not hold raw counts.
    """
    check_positive_ints(n_neighbors=n_neighbors, n_comps=n_comps, max_cells=max_cells)
    n_query, n_reference = query.shape[0], reference.shape[0]
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"The query has {query.shape[1]} genes and the reference {reference.shape[1]}; "
            "give both the same genes in the same order."
        )
    if n_reference == 0:
        raise ValueError("The reference has no cells to compare the query with.")
    if n_query < n_neighbors:
        raise ValueError(
            f"The query has {n_query} cells; comparing it with the reference needs at least "
            f"n_neighbors={n_neighbors}. Score fewer cells with a per-cell score (e.g. "
            "method='entropy')."
        )
    rng = np.random.default_rng(seed)

    def subsample(n: int, size: int) -> np.ndarray:
        return np.arange(n) if n <= size else np.sort(rng.choice(n, size, replace=False))

    pool_reference, pool_query = subsample(n_reference, max_cells), subsample(n_query, max_cells)
    if counts:
        reference = sp.csr_matrix(reference, dtype=np.float32)
        query = sp.csr_matrix(query, dtype=np.float32)
        for where, matrix in (("the reference", reference), ("the query", query)):
            check_minibatch_counts(
                matrix, where, "Pass counts=False to score values that are not counts."
            )
        reference = log_normalise(reference, TARGET_SUM)
        query = log_normalise(query, TARGET_SUM)
    stack = sp.vstack if sp.issparse(reference) or sp.issparse(query) else np.vstack
    pool = stack([reference[pool_reference], query[pool_query]])
    if pool.shape[1] > n_comps:
        fit_cells = pool[subsample(pool.shape[0], PCA_FIT_CELLS)]
        fit_cells = fit_cells.toarray() if sp.issparse(fit_cells) else fit_cells
        n_comps = min(n_comps, len(fit_cells) - 1)
        pca = PCA(n_comps, svd_solver="randomized", random_state=seed).fit(fit_cells)
        pool, query = pca.transform(pool), pca.transform(query)
    pool = np.asarray(pool.toarray() if sp.issparse(pool) else pool, dtype=np.float32)
    query = np.asarray(query.toarray() if sp.issparse(query) else query, dtype=np.float32)
    n_pool_reference, n_pool_query = len(pool_reference), len(pool_query)
    k = min(n_neighbors, len(pool) - 1)
    neighbours = (
        NearestNeighbors(n_neighbors=k + 1).fit(pool).kneighbors(query, return_distance=False)
    )
    # Drop each query cell itself where it is in the pool (else the farthest neighbour).
    own_index = np.full(n_query, -1)
    own_index[pool_query] = n_pool_reference + np.arange(n_pool_query)
    order = np.argsort(neighbours == own_index[:, None], axis=1, kind="stable")
    neighbours = np.take_along_axis(neighbours, order, axis=1)[:, :k]
    in_query = (neighbours >= n_pool_reference).sum(axis=1) / n_pool_query
    in_reference = (neighbours < n_pool_reference).sum(axis=1) / n_pool_reference
    return in_query / (in_query + in_reference)


def registered_counts(adata: AnnData, registry: dict, name: str):
    """Counts of a model's registered genes (in its order, matched by name) from ``adata``.

    Reads ``adata.layers[layer]`` when the model was set up with ``layer``, else
    ``adata.X``. ``name`` names ``adata`` in the errors.

    Raises
    ------
    ValueError
        When ``adata`` has duplicated gene names, lacks a gene of the model or its layer,
        or the counts read are not raw counts
        (:func:`~scvi_ext.data.validate_counts`'s checks, naming the matrix).
    """
    genes = registry_gene_names(registry)
    layer = registry["setup_args"].get("layer")
    var_names = pd.Index(adata.var_names.astype(str))
    if not var_names.is_unique:
        duplicated = list(var_names[var_names.duplicated()].unique()[:3])
        raise ValueError(
            f"{name} has duplicated gene names (e.g. {duplicated}), so its genes cannot be "
            f"matched to the model's by name; make them unique on a copy first "
            f"({name} = {name}.copy(); {name}.var_names_make_unique())."
        )
    missing = genes.difference(var_names)
    if len(missing):
        raise ValueError(
            f"{name} lacks {len(missing)} of the {len(genes)} genes the model was trained on "
            f"(e.g. {list(missing[:3])}); give it the same genes."
        )
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"{name} has no layer '{layer}' (the model's counts).")
    matrix = adata.X if layer is None else adata.layers[layer]
    where = f"{name}.X" if layer is None else f"{name}.layers['{layer}']"
    if matrix is None:
        raise ValueError(f"{where} is None; put the raw counts the model was trained on there.")
    counts = matrix[:, var_names.get_indexer(genes)]
    check_minibatch_counts(counts, where)
    return counts
