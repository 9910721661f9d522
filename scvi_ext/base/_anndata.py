"""AnnData helpers shared by the models: registry look-ups, genes matched by name, light copies."""

from __future__ import annotations

import logging
import warnings

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from anndata.abc import CSCDataset, CSRDataset
from scvi import REGISTRY_KEYS

from scvi_ext.data import CollectionCounts, check_backed_open, is_collection, validate_gene_overlap

logger = logging.getLogger(__name__)

#: Default minimum fraction of the model's genes a new AnnData must have.
MIN_GENE_FRACTION = 0.5


def registry_label_names(registry: dict) -> tuple[list[str], str | None]:
    """Cell type names in code order (the unlabeled category left out) and that category.

    scvi moves the unlabeled category to the last code, so column ``k`` of a soft
    prediction is ``names[k]``, as in scANVI.
    """
    state = registry["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"]
    unlabeled = state.get("unlabeled_category")
    names = [name for name in state["categorical_mapping"] if name != unlabeled]
    return names, unlabeled


def registry_known_labels(registry: dict) -> list[str] | None:
    """The cell types of a model with labels, else ``None``."""
    if REGISTRY_KEYS.LABELS_KEY not in registry["field_registries"]:
        return None
    return registry_label_names(registry)[0]


def registry_gene_names(registry: dict) -> pd.Index:
    """The features a model was registered with, in its order (genes for count models)."""
    state = registry["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]
    return pd.Index([str(name) for name in state["column_names"]])


def _csc_columns_in_memory(matrix: CSCDataset, columns: np.ndarray, name: str) -> sp.csr_matrix:
    """The columns ``columns`` (sorted, unique) of a backed CSC matrix, read into memory.

    A CSC file stores cells by gene, so no minibatch of cells can be read without reading
    every column; reading the model's columns once costs what one minibatch would.
    """
    warnings.warn(
        f"{name} stores its counts on disk as CSC (by gene), whose cells cannot be read a "
        f"minibatch at a time: the model's {len(columns)} genes are read into memory. To "
        "read cells from disk, write the counts as CSR (adata.X = "
        "scipy.sparse.csr_matrix(adata.X) before write_h5ad).",
        UserWarning,
        stacklevel=4,
    )
    return sp.csr_matrix(matrix[:, columns])


def holds_backed_csc(adata: AnnData, layer: str | None) -> bool:
    """The counts of ``adata`` (``X`` or ``layers[layer]``) are a CSC matrix on disk (a
    closed file is refused first: reading ``X`` would reopen it)."""
    check_backed_open(adata)
    if layer is None:
        return isinstance(adata.X, CSCDataset)
    return layer in adata.layers and isinstance(adata.layers[layer], CSCDataset)


def align_genes(matrix, var_names: pd.Index, genes: pd.Index, name: str = "adata"):
    """The columns of ``matrix`` (cells x ``var_names``) reordered to ``genes``, matched by name.

    Genes of ``genes`` absent from ``var_names`` become zero columns (with a warning); extra
    genes are dropped. ``matrix`` is returned as it is when the genes already match. A
    matrix on disk (a backed AnnData's CSR or dense ``X``, a collection's counts) stays
    there: the result is a :class:`~scvi_ext.data.CollectionCounts` that reads each
    minibatch's rows by slices and takes their genes then; a backed CSC matrix (which
    cannot be read by rows) has the model's genes read into memory, with a warning.

    Raises
    ------
    ValueError
        When ``var_names`` has duplicates, or holds fewer than :data:`MIN_GENE_FRACTION` of
        ``genes`` (the message carries the alignment report).
    """
    var_names = pd.Index(var_names.astype(str))
    if var_names.equals(genes):
        return matrix
    if not var_names.is_unique:
        duplicated = list(var_names[var_names.duplicated()].unique()[:3])
        raise ValueError(
            f"{name} has duplicated gene names (e.g. {duplicated}); make them unique first "
            "(AnnData.var_names_make_unique())."
        )
    report = validate_gene_overlap(genes, var_names, MIN_GENE_FRACTION)
    columns = var_names.get_indexer(genes)
    present = columns >= 0
    if isinstance(matrix, CSCDataset):
        kept = np.unique(columns[present])
        matrix = _csc_columns_in_memory(matrix, kept, name)
        columns = np.where(present, np.searchsorted(kept, columns), -1)
    on_files = isinstance(matrix, CSRDataset | h5py.Dataset)
    if on_files:  # a collection's counts, or a backed matrix as a collection of one file
        matrix = CollectionCounts.from_backed(matrix)
    if present.all():
        logger.info("Genes of %s matched to the model's by name (reordered or subset).", name)
        return matrix.with_genes(columns) if on_files else matrix[:, columns]
    warnings.warn(
        f"{name} lacks {len(genes) - report['n_shared']} of the model's {len(genes)} genes "
        f"(e.g. {report['missing_genes'][:3]}); they are read as zero counts.",
        UserWarning,
        stacklevel=3,
    )
    if on_files:
        return matrix.with_genes(columns)
    selection = sp.csr_matrix(
        (np.ones(int(present.sum())), (columns[present], np.flatnonzero(present))),
        shape=(matrix.shape[1], len(genes)),
    )
    return sp.csr_matrix(matrix) @ selection


def registered_obs(
    adata: AnnData, setup_args: dict, known_labels: list[str] | None
) -> pd.DataFrame:
    """A copy of the ``obs`` columns the setup names, labels the reference never saw unlabeled.

    Labels absent from ``known_labels`` and a missing labels column become the unlabeled
    category (with a warning for the former).
    """
    check_backed_open(adata)
    obs_keys = [
        value
        for key, value in setup_args.items()
        if key.endswith("_key") and isinstance(value, str) and value in adata.obs
    ]
    obs = adata.obs[obs_keys].copy()
    labels_key = setup_args.get("labels_key")
    unlabeled = setup_args.get("unlabeled_category")
    if labels_key is not None:
        if labels_key not in obs:
            obs[labels_key] = unlabeled
        elif known_labels is not None and unlabeled is not None:
            labels = obs[labels_key].astype(str)
            unseen = ~labels.isin(list(known_labels) + [unlabeled])
            if unseen.any():
                names = sorted(labels[unseen].unique())
                warnings.warn(
                    f"adata.obs['{labels_key}'] has cell types the reference model never saw "
                    f"({names}); they are treated as '{unlabeled}' (unlabeled).",
                    UserWarning,
                    stacklevel=3,
                )
                labels[unseen] = unlabeled
            obs[labels_key] = pd.Categorical(labels)
    return obs


def _collection_view(adata, obs: pd.DataFrame, layer: str | None, genes: pd.Index | None):
    """A collection over the same files with its own ``obs``, its counts in the model's
    ``layer`` and read with the model's genes."""
    if genes is None:
        return adata.with_obs(obs, layer)
    counts = align_genes(adata.counts, adata.var_names, genes)
    return adata.with_obs(obs, layer, counts, genes)


def detached_anndata(
    adata: AnnData,
    setup_args: dict,
    known_labels: list[str] | None = None,
    genes: pd.Index | None = None,
) -> AnnData:
    """A light AnnData that shares (or aligns) the count matrix of ``adata`` and owns its ``obs``.

    scvi registration writes ``_scvi_*`` columns and ``uns`` entries into the AnnData it is
    given; working on this object keeps the user's AnnData untouched. A backed matrix stays
    on disk (a dense one is read through :class:`~scvi_ext.data.CollectionCounts`, whose
    rows may be asked in any order). A collection of
    files (:func:`~scvi_ext.data.read_collection`) gives a collection over the same files
    with its own ``obs``, read with the model's genes by name. Labels absent from
    ``known_labels`` (cell types the reference never saw) and a missing labels column
    become the unlabeled category.

    Parameters
    ----------
    adata
        The user's AnnData.
    setup_args
        The model's ``setup_anndata`` arguments (``layer``, ``labels_key``, ...).
    known_labels
        Cell types of the reference.
    genes
        The model's genes: the matrix is matched to them by name (:func:`align_genes`).
    """
    layer = setup_args.get("layer")
    obs = registered_obs(adata, setup_args, known_labels)
    if is_collection(adata):
        return _collection_view(adata, obs, layer, genes)
    if layer is not None and layer not in adata.layers:
        raise ValueError(
            f"layer '{layer}' is not in adata.layers (available: {list(adata.layers)}); "
            "the model was set up with counts in this layer."
        )
    matrix = adata.X if layer is None else adata.layers[layer]
    var_names = adata.var_names
    if genes is not None and matrix is not None:
        matrix, var_names = align_genes(matrix, adata.var_names, genes), genes
    if isinstance(matrix, CSCDataset):  # kept by align_genes: the genes matched
        matrix = _csc_columns_in_memory(matrix, np.arange(matrix.shape[1]), "adata")
    if isinstance(matrix, h5py.Dataset):  # rows read by slices, in any order (h5py: sorted)
        matrix = CollectionCounts.from_backed(matrix)
    var = pd.DataFrame(index=pd.Index(var_names).copy())
    if layer is None:
        return AnnData(X=matrix, obs=obs, var=var)
    return AnnData(X=None, obs=obs, var=var, layers={layer: matrix})
