"""Write counts to a TileDB-SOMA experiment chunk by chunk (``tiledbsoma.io`` conventions)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Measurement and ``X`` layer written by :func:`write_soma` (read by ``SomaDataModule``).
SOMA_MEASUREMENT = "RNA"
SOMA_LAYER = "counts"


def write_soma(
    adata: ad.AnnData,
    uri: str | os.PathLike,
    *,
    layer: str | None = None,
    overwrite: bool = False,
    chunk_size: int = 20_000,
) -> str:
    """Write the counts, ``obs`` and ``var`` of an AnnData to a TileDB-SOMA experiment.

    The experiment follows ``tiledbsoma.io`` conventions: measurement ``"RNA"``, ``X``
    layer ``"counts"`` (float32), ``obs_names`` in the ``obs`` column ``"obs_id"`` and gene
    names in the ``var`` column ``"var_id"``. Counts are read and written ``chunk_size``
    cells at a time, so a backed AnnData (``anndata.read_h5ad(path, backed="r")``) is
    written in bounded memory. Train from it with
    :class:`~scvi_ext.base.SomaDataModule`.

    Parameters
    ----------
    adata
        AnnData in memory or backed.
    uri
        Folder of the experiment (local).
    layer
        Layer holding the counts (default: ``X``).
    overwrite
        Replace an existing experiment (otherwise :class:`FileExistsError`).
    chunk_size
        Cells read and written at once.

    Returns
    -------
    The experiment's URI.
    """
    if layer is not None and layer not in adata.layers:
        raise ValueError(
            f"layer '{layer}' is not in adata.layers (available: {list(adata.layers)}); "
            "pass the layer of raw counts, or layer=None for adata.X."
        )
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError("adata.X is None; pass the layer holding the counts as layer=... .")

    def chunks() -> Iterable[sp.csr_matrix]:
        for start in range(0, adata.n_obs, chunk_size):
            yield sp.csr_matrix(matrix[start : start + chunk_size])

    return write_soma_chunks(uri, adata.obs, adata.var, chunks(), overwrite=overwrite)


def write_soma_chunks(
    uri: str | os.PathLike,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    chunks: Iterable[sp.spmatrix],
    overwrite: bool = False,
) -> str:
    """Write an experiment whose counts come as consecutive row blocks (see :func:`write_soma`).

    ``obs`` and ``var`` (their index: cell and gene names) are written by
    ``tiledbsoma.io.from_anndata`` with an empty count matrix; the blocks are then appended
    to the ``X`` layer one at a time.
    """
    import pyarrow as pa
    import tiledbsoma
    import tiledbsoma.io

    uri = os.fspath(uri)
    if Path(uri).exists():
        if not overwrite:
            raise FileExistsError(f"{uri} exists; pass overwrite=True to replace it.")
        shutil.rmtree(uri)
    n_obs, n_vars = len(obs), len(var)
    skeleton = ad.AnnData(
        X=sp.csr_matrix((n_obs, n_vars), dtype=np.float32), obs=obs.copy(), var=var.copy()
    )
    tiledbsoma.io.from_anndata(uri, skeleton, SOMA_MEASUREMENT, X_layer_name=SOMA_LAYER)
    del skeleton
    start = 0
    with tiledbsoma.Experiment.open(uri, "w") as experiment:
        counts = experiment.ms[SOMA_MEASUREMENT].X[SOMA_LAYER]
        for chunk in chunks:
            block = sp.coo_matrix(chunk)
            if block.shape[1] != n_vars:
                raise ValueError(f"A chunk has {block.shape[1]} genes, var {n_vars}.")
            table = pa.Table.from_pydict(
                {
                    "soma_dim_0": block.row.astype(np.int64) + start,
                    "soma_dim_1": block.col.astype(np.int64),
                    "soma_data": block.data.astype(np.float32),
                }
            )
            if table.num_rows:
                counts.write(table)
            start += block.shape[0]
            del block, table
    if start != n_obs:
        raise ValueError(f"The chunks hold {start} cells, obs {n_obs}.")
    return uri
