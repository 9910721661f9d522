from numbers import Real

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.abc import CSCDataset, CSRDataset

from ._validation import check_backed_open

# method -> default number of genes (None: all genes)
GENE_SELECTION_DEFAULTS: dict[str, int | None] = {
    "cellular": 2000,
    "can": 1000,
    "cgran": 1000,
    "scnym": None,
}
_CAN_SCALE = 1e5


def select_genes(
    adata: ad.AnnData,
    method: str,
    n_top_genes: int | None = None,
    layer: str | None = None,
) -> ad.AnnData:
    """Restrict an AnnData of raw counts to the genes a method's paper uses.

    The selection is computed on log-normalised values of a temporary copy of the
    counts; the returned AnnData is a new object holding the input's matrices
    (counts stay in ``X``, layers are kept) for the selected genes only, in their
    original order. The input is not modified.

    ``"cellular"``
        2000 highly variable genes, scanpy ``highly_variable_genes(flavor="cell_ranger")``
        on counts scaled to the mean library size and ``log1p``-transformed (genes
        without counts are never selected). Ties at the cut-off may add a few genes.
    ``"can"``, ``"cgran"``
        The 1000 genes of largest variance of ``log1p(counts / total * 1e5)``.
    ``"scnym"``
        All genes (scNym trains on the full gene set); a copy is returned.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or in ``layer``.
    method
        ``"cellular"``, ``"can"``, ``"cgran"`` or ``"scnym"`` (case-insensitive).
    n_top_genes
        Override the paper's number of genes (not allowed for ``"scnym"``). When it is
        at least the number of genes, all genes are kept.
    layer
        Layer holding the counts used for the selection; ``None`` for ``X``.

    Returns
    -------
    A new AnnData restricted to the selected genes.
    """
    method_name = method.lower()
    if method_name not in GENE_SELECTION_DEFAULTS:
        raise ValueError(
            f"Unknown gene selection method '{method}'; valid methods: "
            f"{', '.join(GENE_SELECTION_DEFAULTS)}."
        )
    if method_name == "scnym":
        if n_top_genes is not None:
            raise ValueError(
                "method='scnym' uses all genes; do not pass n_top_genes (or pick another method)."
            )
        return adata.copy()
    n_top = GENE_SELECTION_DEFAULTS[method_name] if n_top_genes is None else n_top_genes
    if n_top < 1:
        raise ValueError(f"n_top_genes must be positive, got {n_top}.")
    if n_top >= adata.n_vars:
        return adata.copy()

    if layer is None:
        counts = adata.X
    elif layer in adata.layers:
        counts = adata.layers[layer]
    else:
        raise ValueError(
            f"layer '{layer}' is not in adata.layers; available layers: "
            f"{', '.join(repr(name) for name in adata.layers) or 'none'}."
        )
    counts = sp.csr_matrix(counts, dtype=np.float64)
    if method_name == "cellular":
        selected = _cell_ranger_hvgs(counts, n_top)
    else:
        selected = _top_variance_genes(counts, n_top)
    return adata[:, np.sort(selected)].copy()


def _library_sizes(counts: sp.csr_matrix) -> np.ndarray:
    totals = np.asarray(counts.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0  # empty cells stay all-zero
    return totals


def log_normalise(counts, target: np.ndarray | float) -> sp.csr_matrix:
    """``log1p(counts / total * target)`` of a cells x genes matrix, as a new CSR matrix.

    Empty cells stay all-zero; a floating ``counts`` dtype is kept (integers become float64).
    """
    counts = sp.csr_matrix(counts)
    if not np.issubdtype(counts.dtype, np.floating):
        counts = counts.astype(np.float64)
    scale = (target / _library_sizes(counts)).astype(counts.dtype)
    normalised = sp.csr_matrix(sp.diags(scale) @ counts)
    np.log1p(normalised.data, out=normalised.data)
    return normalised


def log_normalised_anndata(adata: ad.AnnData, target: float = 1e4) -> ad.AnnData:
    """A new AnnData of :func:`log_normalise`-d counts (``X``), for scanpy and scikit-learn.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (sparse or dense; a backed AnnData is read whole).
    target
        Total count of each cell after scaling (1e4: log1p of counts per 10,000, the
        scanpy and CellTypist convention).

    Returns
    -------
    AnnData with float32 CSR ``X`` and the input's ``obs_names`` and ``var_names`` (no
    other annotations); the input is not modified.

    Raises
    ------
    TypeError
        When ``adata`` is not an AnnData.
    ValueError
        When ``adata.X`` is None, ``target`` is not a positive finite number, or a backed
        ``adata``'s file was closed.
    """
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData, not {type(adata).__name__}.")
    check_backed_open(adata)
    if adata.X is None:
        raise ValueError("adata.X is None; put the raw counts in X (adata.X = adata.layers[...]).")
    if isinstance(target, bool) or not (isinstance(target, Real) and 0 < target < np.inf):
        raise ValueError(f"target must be a positive finite number, got {target!r}.")
    counts = adata.X
    if isinstance(counts, CSRDataset | CSCDataset):  # backed sparse: read it whole
        counts = counts.to_memory()
    counts = sp.csr_matrix(counts, dtype=np.float32)
    return ad.AnnData(
        X=log_normalise(counts, target),
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )


def _cell_ranger_hvgs(counts: sp.csr_matrix, n_top: int) -> np.ndarray:
    import scanpy as sc  # imported here: scanpy is slow to import

    expressed = np.flatnonzero(counts.getnnz(axis=0) > 0)
    if n_top >= expressed.size:
        return expressed
    mean_library_size = float(np.asarray(counts.sum(axis=1)).mean())
    log_counts = log_normalise(counts, mean_library_size)[:, expressed]
    # scanpy's numba code can reset the OpenMP thread count that torch shares; keep the
    # caller's torch setting
    n_threads = torch.get_num_threads()
    hvg = sc.pp.highly_variable_genes(
        ad.AnnData(X=log_counts),
        flavor="cell_ranger",
        n_top_genes=n_top,
        inplace=False,
    )
    torch.set_num_threads(n_threads)
    return expressed[np.asarray(hvg["highly_variable"], dtype=bool)]


def _top_variance_genes(counts: sp.csr_matrix, n_top: int) -> np.ndarray:
    log_counts = log_normalise(counts, _CAN_SCALE)
    mean = np.asarray(log_counts.mean(axis=0)).ravel()
    mean_square = np.asarray(log_counts.multiply(log_counts).mean(axis=0)).ravel()
    variance = mean_square - mean**2
    return np.argsort(-variance, kind="stable")[:n_top]
