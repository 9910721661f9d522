"""Several h5ad files read as one AnnData-like object, their counts left on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.abc import CSRDataset
from anndata.experimental import AnnCollection
from anndata.io import read_elem, sparse_dataset
from scvi.dataloaders import CollectionAdapter

from ._slice_read import SliceReadCSR, row_runs


class DenseRowReader:
    """Rows of a dense cells x genes h5py dataset, read by slices and returned as CSR.

    Each run of rows (see :func:`~scvi_ext.data._slice_read.row_runs`) is one slice read of
    whole rows, so a minibatch never reads more than its runs; h5py's own fancy indexing
    would need sorted columns, and a column selection would read every cell.

    Parameters
    ----------
    matrix
        A 2-D h5py dataset (a backed AnnData's dense ``X``).
    """

    def __init__(self, matrix: h5py.Dataset):
        if matrix.ndim != 2:
            raise ValueError(f"expected a cells x genes dataset, got shape {matrix.shape}")
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        """Rows x genes."""
        return self.matrix.shape

    def __getitem__(self, index) -> sp.csr_matrix:
        """Rows ``index`` (as :meth:`CollectionCounts.__getitem__` takes) as a CSR matrix."""
        rows = _row_indices(index, self.shape[0])
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        blocks = []
        for start, stop in row_runs(sorted_rows):
            first, last = np.searchsorted(sorted_rows, [start, stop])
            blocks.append(self.matrix[start:stop][sorted_rows[first:last] - start])
        if not blocks:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.matrix.dtype)
        dense = np.concatenate(blocks)
        return sp.csr_matrix(dense[np.argsort(order)])


class CollectionCounts(CSRDataset):
    """The counts of several files as one cells x genes matrix, read from disk by slices.

    Rows are read from each file with :class:`SliceReadCSR` (one slice read per run of
    consecutive rows) and their genes taken in the collection's order, by name; genes a
    file lacks read as zero counts. Nothing but each file's ``indptr`` is held in memory.

    One backed matrix (a backed AnnData's ``X``, CSR or dense) read with other genes is a
    collection of one file: :meth:`from_backed`.

    Parameters
    ----------
    readers
        One reader per file, in the collection's order of cells (:class:`SliceReadCSR`, or
        :class:`DenseRowReader` for a dense matrix).
    columns
        Per file, the file's column of each of the collection's genes (-1: absent), or
        ``None`` when the file's genes are the collection's, in order.
    """

    def __init__(
        self,
        readers: Sequence[SliceReadCSR | DenseRowReader],
        columns: Sequence[np.ndarray | None],
    ):
        self.readers = list(readers)
        self.columns = list(columns)
        self.starts = np.cumsum([0] + [reader.shape[0] for reader in self.readers])
        first = self.columns[0]
        self._n_genes = self.readers[0].shape[1] if first is None else len(first)

    @property
    def shape(self) -> tuple[int, int]:
        """Cells x genes."""
        return int(self.starts[-1]), self._n_genes

    @property
    def dtype(self) -> np.dtype:
        """The values' type (the first file's)."""
        return self.readers[0].matrix.dtype

    @classmethod
    def from_backed(cls, matrix: CSRDataset | h5py.Dataset) -> CollectionCounts:
        """One backed matrix (CSR, or dense cells x genes) as the counts of a one-file
        collection, its rows read from disk by slices.

        Raises
        ------
        TypeError
            When ``matrix`` is neither a backed CSR matrix nor a 2-D h5py dataset.
        """
        if isinstance(matrix, CollectionCounts):
            return matrix
        if isinstance(matrix, SliceReadCSR):
            reader = matrix
        elif isinstance(matrix, CSRDataset):
            reader = SliceReadCSR(matrix)
        elif isinstance(matrix, h5py.Dataset):
            reader = DenseRowReader(matrix)
        else:
            raise TypeError(f"cannot read rows of a {type(matrix).__name__} from disk")
        return cls([reader], [None])

    def with_genes(self, positions: np.ndarray) -> CollectionCounts:
        """The same files read with the collection's genes ``positions`` (-1: a zero column)."""
        columns = []
        for reader, file_columns in zip(self.readers, self.columns, strict=True):
            own = np.arange(reader.shape[1]) if file_columns is None else file_columns
            columns.append(np.where(positions >= 0, own[np.maximum(positions, 0)], -1))
        return CollectionCounts(self.readers, columns)

    def to_memory(self) -> sp.csr_matrix:
        """The whole matrix in memory."""
        return self[np.arange(self.shape[0])]

    def _genes_of(self, part: int, block: sp.csr_matrix) -> sp.csr_matrix:
        columns = self.columns[part]
        if columns is None:
            return block
        present = columns >= 0
        if present.all():
            return block[:, columns]
        selection = sp.csr_matrix(
            (
                np.ones(int(present.sum()), block.dtype),
                (columns[present], np.flatnonzero(present)),
            ),
            shape=(block.shape[1], len(columns)),
        )
        return sp.csr_matrix(block @ selection)

    def __getitem__(self, index) -> sp.csr_matrix:
        """Rows ``index`` (integer, slice, integer or boolean array; in any order, repeated
        or not) as a CSR matrix."""
        rows = _row_indices(index, self.shape[0])
        unique_rows, position = np.unique(rows, return_inverse=True)  # each row read once
        parts = np.searchsorted(self.starts, unique_rows, side="right") - 1
        blocks = []
        for part in np.unique(parts).tolist():
            local = unique_rows[parts == part] - self.starts[part]
            blocks.append(self._genes_of(part, self.readers[part][local]))
        if not blocks:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        result = sp.vstack(blocks, format="csr")
        if len(unique_rows) < len(rows) or np.any(np.diff(rows) < 0):
            result = result[position.ravel()]
        return result


def _row_indices(index, n_rows: int) -> np.ndarray:
    """Row numbers of an integer, slice, integer array or boolean mask."""
    if isinstance(index, tuple):
        raise IndexError("a collection's counts are indexed by cells only")
    if isinstance(index, slice):
        return np.arange(*index.indices(n_rows), dtype=np.int64)
    rows = np.atleast_1d(np.asarray(index))
    if rows.dtype == bool:
        return np.flatnonzero(rows)
    rows = rows.astype(np.int64)
    return np.where(rows < 0, rows + n_rows, rows)


class _Layers(Mapping):
    """The layer a collection was read through (none when read from the files' ``X``)."""

    def __init__(self, name: str | None, counts: CollectionCounts):
        self.names = [] if name is None else [name]
        self.counts = counts

    def __getitem__(self, key: str) -> CollectionCounts:
        if key not in self.names:
            raise KeyError(key)
        return self.counts

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class Collection(CollectionAdapter):
    """Several h5ad files as one AnnData-like object (scvi-tools' ``CollectionAdapter``).

    ``obs`` (the columns all files share) is in memory; the counts stay on disk and are
    read through ``X`` or ``layers[layer]`` (the same :class:`CollectionCounts`). The files
    are opened read-only. scvi-tools' adapter keeps ``uns`` (where registration stores the AnnData's
    id) in one dictionary shared by every adapter, so two registered collections would
    overwrite each other's id; this one keeps its own.
    """

    def __init__(
        self,
        collection: AnnCollection,
        files: Sequence[h5py.File],
        layer: str | None,
        counts: CollectionCounts,
        var_names: pd.Index | None = None,
    ):
        super().__init__(collection)
        self.uns = {}
        self.files = list(files)
        self.paths = [os.fspath(file.filename) for file in self.files]
        self.layer = layer
        self.counts = counts
        self.var_names = pd.Index(collection.var_names if var_names is None else var_names)

    @property
    def layers(self) -> Mapping[str, CollectionCounts]:
        """The counts, as the layer the files were read through."""
        return _Layers(self.layer, self.counts)

    @property
    def X(self) -> CollectionCounts:  # noqa: N802 (AnnData's name)
        """The counts (the same as ``layers[layer]``)."""
        return self.counts

    @property
    def var(self) -> pd.DataFrame:
        """The genes (names only)."""
        return pd.DataFrame(index=self.var_names)

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return self.counts.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """Cells x genes."""
        return self.counts.shape

    def close(self) -> None:
        """Close the files (a closed collection is refused by every model)."""
        for file in self.files:
            file.close()

    def with_obs(
        self,
        obs: pd.DataFrame,
        layer: str | None,
        counts: CollectionCounts | None = None,
        var_names: pd.Index | None = None,
    ) -> Collection:
        """The same files with their own ``obs`` (a light copy), their counts in ``layer``
        (``None``: ``X`` only), and optionally read with other genes
        (:meth:`CollectionCounts.with_genes`) named ``var_names``."""
        view = Collection(
            self.collection,
            self.files,
            layer,
            self.counts if counts is None else counts,
            self.var_names if var_names is None else var_names,
        )
        view.obs = obs
        return view


def _open(path: str | os.PathLike, layer: str | None) -> tuple[h5py.File, ad.AnnData, CSRDataset]:
    file = h5py.File(path, "r")
    try:
        return file, *_read_part(file, os.fspath(path), layer)
    except BaseException:
        file.close()
        raise


def _read_part(file: h5py.File, path: str, layer: str | None) -> tuple[ad.AnnData, CSRDataset]:
    where = "X" if layer is None else f"layer '{layer}'"
    layers = file.get("layers", {})
    if layer is not None and layer not in layers:
        available = ", ".join(repr(name) for name in layers) or "none"
        raise ValueError(
            f"{path} has no layer '{layer}' (its layers: {available}); pass the "
            "layer holding raw counts, or layer=None for X."
        )
    group = file["X"] if layer is None else layers[layer]
    encoding = group.attrs.get("encoding-type", "array")
    if encoding != "csr_matrix":
        raise ValueError(
            f"{path} stores {where} as {encoding}; a collection reads cells by "
            "rows from a CSR matrix. Store the counts as scipy.sparse.csr_matrix and write "
            "the file again."
        )
    var = read_elem(file["var"])
    if not var.index.is_unique:
        repeated = list(var.index[var.index.duplicated()].unique()[:5])
        raise ValueError(
            f"{path} has duplicated gene names (e.g. {repeated}); a collection matches genes "
            "by name. Make them unique in a copy (adata = anndata.read_h5ad(path); "
            "adata.var_names_make_unique(); adata.write_h5ad(new_path)) and read that."
        )
    # The counts as X are never read whole: AnnCollection reads one row when built.
    part = ad.AnnData(X=sparse_dataset(group), obs=read_elem(file["obs"]), var=var)
    return part, part.X


def read_collection(
    paths: Sequence[str | os.PathLike], label: str | None = None, layer: str | None = "counts"
) -> Collection:
    """Open several h5ad files read-only as one collection that every model takes.

    Genes are matched by name across files (the genes all files share, in the first file's
    order); ``obs`` holds the columns all files share. Register it with a model's
    ``setup_anndata(collection, ...)``: its counts are both ``X`` and ``layers[layer]``. Only ``obs``, ``var`` and each file's
    row offsets are loaded into memory; the counts are read from disk, a minibatch at a
    time, by slices of consecutive rows. ``collection.close()`` closes the files.

    Parameters
    ----------
    paths
        The h5ad files (a list, even of one file); each needs the counts as CSR in
        ``layers[layer]`` (or ``X``) and unique gene names.
    label
        Optional ``obs`` column naming, for each cell, the file it came from (its index in
        ``paths``).
    layer
        The layer holding raw counts in every file; ``None``: the files' ``X``.

    Raises
    ------
    TypeError
        When ``paths`` is one path rather than a list of paths, or holds other than paths.
    ValueError
        When ``paths`` is empty, or a file lacks ``layer``, stores the counts other than
        as CSR or has duplicated gene names. The files opened are closed on any error.
    """
    if isinstance(paths, str | bytes | os.PathLike):
        raise TypeError(
            f"paths is one path ({os.fsdecode(paths)!r}); pass a list of paths, e.g. "
            f"read_collection([{os.fsdecode(paths)!r}])."
        )
    if not isinstance(paths, Iterable):
        raise TypeError(f"pass a list of paths, not {type(paths).__name__}.")
    paths = list(paths)
    if not paths:
        raise ValueError("paths is empty; pass a list of one or more h5ad paths.")
    others = [path for path in paths if not isinstance(path, str | os.PathLike)]
    if others:
        raise TypeError(f"pass a list of paths (str or os.PathLike); got {others[0]!r}.")
    opened = []
    try:
        for path in paths:
            opened.append(_open(path, layer))
        files, parts, matrices = zip(*opened, strict=True)
        collection = AnnCollection(list(parts), join_obs="inner", join_vars="inner", label=label)
        genes = pd.Index(collection.var_names)
        columns = []
        for part in parts:
            own = pd.Index(part.var_names)
            columns.append(None if own.equals(genes) else own.get_indexer(genes))
        counts = CollectionCounts([SliceReadCSR(matrix) for matrix in matrices], columns)
    except BaseException:
        for file, _, _ in opened:
            file.close()
        raise
    return Collection(collection, files, layer, counts)
