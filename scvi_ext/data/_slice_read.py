"""Rows of a backed CSR matrix read with one slice read per run of consecutive rows.

A backed CSR matrix read through anndata with an index array costs one ``h5py`` read per
row (two: values and gene indices). Minibatches made of a few runs of consecutive rows, each
read with one slice, cost a few reads instead (docs/scale.md, "What limits throughput").
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata.abc import CSRDataset

#: Rows not asked for that a slice read may span rather than start a new read: reading 8
#: unwanted rows (about 40 kB at 700 stored values a cell) costs less than one more read.
MAX_GAP = 8


def row_runs(rows: np.ndarray, max_gap: int = MAX_GAP) -> list[tuple[int, int]]:
    """``(start, stop)`` slices covering sorted ``rows``, one per run of rows closer than
    ``max_gap`` rows to the previous one."""
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    starts = rows[np.concatenate([[0], cuts])]
    stops = rows[np.concatenate([cuts - 1, [len(rows) - 1]])] + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


class SliceReadCSR(CSRDataset):
    """A backed CSR matrix whose rows are read with one slice read per run of rows.

    Reads the values and gene indices of each run (see :func:`row_runs`) straight from the
    file's arrays (its ``indptr`` is held in memory: 8 bytes a cell), so a minibatch of a
    few runs costs a few reads, not two per row.
    """

    def __init__(self, matrix: CSRDataset):
        self.matrix = matrix
        group = matrix.group
        self._values, self._genes = group["data"], group["indices"]
        self._indptr = np.asarray(group["indptr"][...])

    @property
    def shape(self) -> tuple[int, int]:
        """Rows x genes."""
        return self.matrix.shape

    def to_memory(self) -> sp.csr_matrix:
        """The whole matrix in memory."""
        return self.matrix.to_memory()

    def __getitem__(self, index):
        """Rows ``index`` (integer array or list; in any order, repeated or not) as a CSR
        matrix; other indices: anndata's."""
        if not isinstance(index, list | np.ndarray) or np.asarray(index).dtype == bool:
            return self.matrix[index]
        rows = np.asarray(index, dtype=np.int64)
        unique_rows, position = np.unique(rows, return_inverse=True)
        if len(unique_rows) < len(rows):  # each row read once, then repeated
            return self[unique_rows][position.ravel()]
        order = None
        if len(rows) > 1 and np.any(np.diff(rows) < 0):
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
        runs = np.asarray(row_runs(rows), dtype=np.int64).reshape(-1, 2)
        low, high = self._indptr[runs[:, 0]], self._indptr[runs[:, 1]]
        values = [self._values[a:b] for a, b in zip(low.tolist(), high.tolist(), strict=True)]
        genes = [self._genes[a:b] for a, b in zip(low.tolist(), high.tolist(), strict=True)]
        values = np.concatenate(values) if values else np.zeros(0, np.float32)
        genes = np.concatenate(genes) if genes else np.zeros(0, np.int32)
        lengths = self._indptr[rows + 1] - self._indptr[rows]
        if len(values) > lengths.sum():  # runs span rows not asked for: keep the asked ones
            run_of_row = np.searchsorted(runs[:, 0], rows, side="right") - 1
            run_offset = np.concatenate([[0], np.cumsum(high - low)[:-1]])
            first = run_offset[run_of_row] + self._indptr[rows] - low[run_of_row]
            ends = np.cumsum(lengths)
            take = np.repeat(first - (ends - lengths), lengths) + np.arange(ends[-1])
            values, genes = values[take], genes[take]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        result = sp.csr_matrix((values, genes, indptr), shape=(len(rows), self.shape[1]))
        if order is not None:
            result = result[np.argsort(order)]
        return result
