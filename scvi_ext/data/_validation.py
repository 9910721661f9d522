"""Input checks run at the door of every model: clear errors, nothing coerced."""

from collections.abc import Iterable, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.abc import CSCDataset

# Rows (dense or backed matrices) or stored values (in-memory sparse) checked at once.
_ROW_CHUNK = 10_000
_VALUE_CHUNK = 10_000_000
_N_EXAMPLES = 20


def is_collection(adata: object) -> bool:
    """``adata`` is a collection of files (:func:`~scvi_ext.data.read_collection`)."""
    from ._collection import Collection

    return isinstance(adata, Collection)


def check_backed_open(adata: ad.AnnData, name: str = "adata") -> None:
    """A backed AnnData (or each file of a collection) must still be open.

    anndata silently reopens a closed file at the next access; the file may have been
    replaced since, so the models refuse it instead.

    Raises
    ------
    ValueError
        Naming the closed file and how to reopen it.
    """
    from scvi.dataloaders import CollectionAdapter

    if isinstance(adata, CollectionAdapter) and not is_collection(adata):
        raise ValueError(
            f"{name} is scvi-tools' CollectionAdapter, whose AnnCollection holds every layer "
            "of its files in memory; open the files with "
            "scvi_ext.data.read_collection(paths, layer=...) instead."
        )
    if is_collection(adata):
        for path, file in zip(adata.paths, adata.files, strict=True):
            if not file.id.valid:
                raise ValueError(
                    f"{name} reads files of which {path} was closed; open them again with "
                    f"scvi_ext.data.read_collection({adata.paths!r}) and pass that."
                )
        return
    if adata.isbacked and not adata.file.is_open:
        path = str(adata.filename)
        reopen = (
            f"mudata.read_h5mu({path!r}, backed=True)"
            if path.endswith(".h5mu")
            else f"anndata.read_h5ad({path!r}, backed='r')"
        )
        raise ValueError(
            f"{name} is backed by {path}, whose file was closed; reopen it with {reopen} "
            "and pass that."
        )


def _count_matrix(adata: ad.AnnData, layer: str | None) -> tuple[object, str]:
    check_backed_open(adata)
    if layer is None:
        if adata.X is None:
            raise ValueError(
                "adata.X is None; put raw counts in adata.X or pass the layer that holds "
                "them via `layer=`."
            )
        return adata.X, "adata.X"
    if layer not in list(adata.layers.keys()):
        available = ", ".join(repr(name) for name in adata.layers.keys()) or "none"
        raise ValueError(
            f"layer '{layer}' is not in adata.layers; available layers: {available}. "
            "Pass the layer holding raw counts, or layer=None for adata.X."
        )
    return adata.layers[layer], f"adata.layers['{layer}']"


def _value_blocks(matrix: object) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield (stored values, row totals or None) in bounded pieces, never densifying."""
    if sp.issparse(matrix):
        values = matrix.data
        for start in range(0, values.size, _VALUE_CHUNK):
            yield values[start : start + _VALUE_CHUNK], None
        yield values[:0], np.asarray(matrix.sum(axis=1)).ravel()
        return
    n_rows = matrix.shape[0]
    for start in range(0, n_rows, _ROW_CHUNK):
        block = matrix[start : start + _ROW_CHUNK]
        if sp.issparse(block):
            yield block.data, np.asarray(block.sum(axis=1)).ravel()
        else:
            block = np.asarray(block)
            yield block.ravel(), block.sum(axis=1)


def validate_counts(adata: ad.AnnData, layer: str | None = None) -> None:
    """Check that ``adata.X`` (or ``adata.layers[layer]``) holds raw counts.

    Rejects NaN, infinite, negative and non-integer values and cells with zero total
    counts. Sparse matrices are checked through their stored values, dense and backed
    matrices in chunks of rows, so nothing large is densified. The AnnData is not
    modified.

    Parameters
    ----------
    adata
        The AnnData to check.
    layer
        Layer holding the counts; ``None`` for ``adata.X``.

    Raises
    ------
    ValueError
        Naming the matrix and what to do.
    """
    matrix, where = _count_matrix(adata, layer)
    if isinstance(matrix, CSCDataset):
        raise ValueError(
            f"{where} is stored on disk as CSC (by gene): its cells cannot be read a "
            "minibatch at a time (each minibatch would read the whole file). Load it into "
            "memory (adata = adata.to_memory()) or write the counts as CSR "
            "(adata.X = scipy.sparse.csr_matrix(adata.X) before write_h5ad) and open that."
        )
    n_nan = n_inf = n_negative = n_fractional = n_empty_cells = 0
    for values, row_totals in _value_blocks(matrix):
        if values.dtype.kind == "f":
            nan = np.isnan(values)
            inf = np.isinf(values)
            n_nan += int(nan.sum())
            n_inf += int(inf.sum())
            finite = values[~(nan | inf)]
            n_negative += int((finite < 0).sum())
            n_fractional += int((finite != np.round(finite)).sum())
        elif values.dtype.kind in "iu":
            n_negative += int((values < 0).sum())
        elif values.dtype.kind != "b":
            raise ValueError(
                f"{where} has dtype {values.dtype}; counts must be numeric. Pass raw counts."
            )
        if row_totals is not None:
            n_empty_cells += int((row_totals == 0).sum())

    if n_nan:
        raise ValueError(
            f"{where} contains NaN values; found {n_nan}. Counts must be finite: remove "
            "the affected cells or genes, or pass the layer holding raw counts via `layer=`."
        )
    if n_inf:
        raise ValueError(
            f"{where} contains infinite values; found {n_inf}. Counts must be finite: "
            "remove the affected cells or genes, or pass the layer holding raw counts via "
            "`layer=`."
        )
    if n_negative:
        raise ValueError(
            f"{where} contains negative values; found {n_negative}. This looks like scaled "
            "or centred data: pass raw counts, e.g. a counts layer via `layer=`; models "
            "normalise internally."
        )
    if n_fractional:
        raise ValueError(
            f"{where} contains non-integer values; found {n_fractional}. This looks like "
            "normalised or log-transformed data: pass raw counts, e.g. a counts layer via "
            "`layer=`; models normalise internally."
        )
    if n_empty_cells:
        raise ValueError(
            f"{where} has {n_empty_cells} cells with zero total counts; remove them, e.g. "
            "`sc.pp.filter_cells(adata, min_counts=1)`."
        )


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an integer of at least 1 (a bool is not)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1


def check_positive_ints(**values: object) -> None:
    """Raise ``ValueError("<name> must be a positive integer, not <value>.")`` for the first
    of ``values`` that is not (:func:`is_positive_int`)."""
    for name, value in values.items():
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer, not {value!r}.")


def check_minibatch_counts(counts: np.ndarray | sp.spmatrix, where: str, hint: str = "") -> None:
    """Check a minibatch of counts (cells x genes) as :func:`validate_counts` checks a matrix.

    A cheap test of the values a model is about to read (negative, non-integer or
    non-finite values, cells with zero total counts), for data that may have changed since
    it was checked; on failure, :func:`validate_counts`'s error naming ``where``, then
    ``hint``.

    Raises
    ------
    ValueError
        Naming ``where`` and what to do.
    """
    values = counts.data if sp.issparse(counts) else np.asarray(counts)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    if (
        (values < 0).any()
        or (values != np.round(values)).any()
        or not (np.isfinite(totals) & (totals > 0)).all()
    ):
        try:
            validate_counts(ad.AnnData(X=counts))
        except ValueError as error:
            message = str(error).replace("adata.X", where, 1)
            raise ValueError(f"{message} {hint}".rstrip()) from None


def _obs_column(adata: ad.AnnData, key: str, role: str) -> pd.Series:
    if key not in adata.obs.columns:
        available = ", ".join(repr(str(column)) for column in adata.obs.columns) or "none"
        raise ValueError(
            f"{role} '{key}' is not a column of adata.obs; available columns: {available}."
        )
    return adata.obs[key]


def validate_labels(adata: ad.AnnData, labels_key: str, unlabeled_category: str | None) -> None:
    """Check a cell-type column for a semi-supervised (scANVI-style) model.

    The column must exist, have no missing values, and hold at least two labelled
    classes (classes other than ``unlabeled_category``). The AnnData is not modified.

    Parameters
    ----------
    adata
        The AnnData to check.
    labels_key
        Column of ``adata.obs`` with the cell types.
    unlabeled_category
        Value marking unlabeled cells, or ``None`` when every cell is labelled.

    Raises
    ------
    ValueError
        Naming the column and what to do.
    """
    labels = _obs_column(adata, labels_key, "labels_key")
    values = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) else labels
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        raise ValueError(
            f"adata.obs['{labels_key}'] holds {values.dtype} values, not cell type names; "
            f"models predict names. Convert the column, e.g. adata.obs['{labels_key}'] = "
            f"adata.obs['{labels_key}'].astype(str), or map the codes to their names."
        )
    n_missing = int(labels.isna().sum())
    if n_missing:
        fill_value = unlabeled_category if unlabeled_category is not None else "Unknown"
        hint = "" if unlabeled_category is not None else " (and pass it as unlabeled_category)"
        raise ValueError(
            f"adata.obs['{labels_key}'] has {n_missing} missing (NaN) labels; fill them with "
            f"the unlabeled category{hint}, e.g. adata.obs['{labels_key}'] = "
            f"adata.obs['{labels_key}'].astype(object).fillna('{fill_value}')."
        )
    if isinstance(labels.dtype, pd.CategoricalDtype):
        unused = [
            name
            for name in labels.cat.categories.difference(pd.unique(labels.dropna()))
            if str(name) != str(unlabeled_category)
        ]
        if unused:
            raise ValueError(
                f"adata.obs['{labels_key}'] has categories that no cell carries ({unused[:5]}): "
                "the model would learn them as cell types without cells. Drop them first: "
                f"adata.obs['{labels_key}'] = adata.obs['{labels_key}']"
                ".cat.remove_unused_categories()."
            )
    classes = pd.unique(np.asarray(labels, dtype=object))
    if unlabeled_category is not None:
        classes = [label for label in classes if str(label) != str(unlabeled_category)]
    if len(classes) == 0:
        raise ValueError(
            f"No cell in adata.obs['{labels_key}'] is labelled: every cell has the "
            f"unlabeled_category '{unlabeled_category}'. The reference needs labelled cells; "
            "check labels_key and unlabeled_category."
        )
    if len(classes) == 1:
        raise ValueError(
            f"labels_key '{labels_key}' has only one cell type ('{classes[0]}') among "
            "labelled cells; a classifier needs at least two. Check labels_key, or add "
            "reference cells of other types."
        )


def validate_obs_key(adata: ad.AnnData, key: str, role: str) -> None:
    """Check that ``key`` is an ``obs`` column without missing values.

    Parameters
    ----------
    adata
        The AnnData to check (not modified).
    key
        Column of ``adata.obs``.
    role
        The argument the column was passed as, e.g. ``"batch_key"``; used in messages.

    Raises
    ------
    ValueError
        When the column is missing or holds NaN values.
    """
    values = _obs_column(adata, key, role)
    n_missing = int(values.isna().sum())
    if n_missing:
        raise ValueError(
            f"{role} '{key}' has {n_missing} missing (NaN) values in adata.obs; fill them "
            "(e.g. with 'unknown') or remove those cells."
        )


def validate_gene_overlap(
    reference_var_names: Iterable[str],
    query_var_names: Iterable[str],
    min_fraction: float = 0.5,
) -> dict:
    """Report how many reference genes the query has, and fail when too few.

    Parameters
    ----------
    reference_var_names
        Genes of the reference (e.g. ``reference_adata.var_names``).
    query_var_names
        Genes of the query.
    min_fraction
        Smallest accepted fraction of reference genes present in the query.

    Returns
    -------
    Dict with ``n_reference_genes``, ``n_query_genes``, ``n_shared``,
    ``fraction_shared`` and ``missing_genes`` (up to 20 reference genes absent from
    the query, in reference order).

    Raises
    ------
    ValueError
        When ``fraction_shared < min_fraction`` or the reference has no genes.
    """
    reference = pd.Index(np.asarray(list(reference_var_names), dtype=object)).unique()
    query = pd.Index(np.asarray(list(query_var_names), dtype=object)).unique()
    if len(reference) == 0:
        raise ValueError("The reference has no genes; check reference_var_names.")
    present = reference.isin(query)
    n_shared = int(present.sum())
    report = {
        "n_reference_genes": len(reference),
        "n_query_genes": len(query),
        "n_shared": n_shared,
        "fraction_shared": n_shared / len(reference),
        "missing_genes": [str(gene) for gene in reference[~present][:_N_EXAMPLES]],
    }
    if report["fraction_shared"] < min_fraction:
        examples = ", ".join(report["missing_genes"][:5])
        raise ValueError(
            f"The query shares only {n_shared} of {len(reference)} reference genes "
            f"({report['fraction_shared']:.1%}; minimum fraction {min_fraction}). Check "
            "that both use the same gene identifiers (symbols vs Ensembl IDs); missing "
            f"reference genes include: {examples}."
        )
    return report
