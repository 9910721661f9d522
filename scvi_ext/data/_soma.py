"""Write counts to a TileDB-SOMA experiment chunk by chunk (``tiledbsoma.io`` conventions)."""

from __future__ import annotations

import glob
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import is_positive_int

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
        Replace an existing TileDB-SOMA experiment at ``uri``; any other existing path is
        never replaced.
    chunk_size
        Cells read and written at once (a positive integer).

    Returns
    -------
    The experiment's URI.

    Raises
    ------
    TypeError
        When ``adata`` is not an AnnData, ``uri`` not a path, ``overwrite`` not a bool or
        ``chunk_size`` not an integer.
    ValueError
        When ``chunk_size`` is not positive, or ``layer`` (or ``X``) holds no counts.
    FileExistsError
        When ``uri`` exists and ``overwrite`` is False, or it exists and is not a
        TileDB-SOMA experiment.
    """
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData, not {type(adata).__name__}.")
    if not is_positive_int(chunk_size):
        raise ValueError(
            f"chunk_size must be a positive integer (cells per chunk), not {chunk_size!r}."
        )
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
    to the ``X`` layer one at a time. The experiment is written next to ``uri`` and moved
    there once complete: when writing fails, nothing is left behind and an experiment
    that ``overwrite=True`` would replace is kept.

    Raises
    ------
    TypeError
        When ``uri`` is not a path, ``obs`` or ``var`` not a DataFrame, or ``overwrite``
        not a bool.
    FileExistsError
        See :func:`check_destination`.
    ValueError
        When ``uri`` is a URI (``scheme://``), a block's genes differ from ``var``, or the blocks' cells
        from ``obs``.
    """
    import pyarrow as pa
    import tiledbsoma
    import tiledbsoma.io

    for name, frame in (("obs", obs), ("var", var)):
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"{name} must be a pandas DataFrame, not {type(frame).__name__}.")
    path = check_destination(
        uri, overwrite, tiledbsoma.Experiment.exists, "a TileDB-SOMA experiment"
    )
    n_obs, n_vars = len(obs), len(var)
    with written_in_place_of(path) as partial:
        skeleton = ad.AnnData(
            X=sp.csr_matrix((n_obs, n_vars), dtype=np.float32), obs=obs.copy(), var=var.copy()
        )
        tiledbsoma.io.from_anndata(
            os.fspath(partial), skeleton, SOMA_MEASUREMENT, X_layer_name=SOMA_LAYER
        )
        del skeleton
        start = 0
        with tiledbsoma.Experiment.open(os.fspath(partial), "w") as experiment:
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
    return os.fspath(path)


def check_destination(
    path: str | os.PathLike, overwrite: bool, is_ours: Callable[[str], bool], kind: str
) -> Path:
    """Check that ``path`` may be written: it is free, or ``overwrite`` and it is ``kind``.

    Parameters
    ----------
    path
        The file or folder to write.
    overwrite
        Whether an existing ``kind`` at ``path`` may be replaced.
    is_ours
        Whether the existing ``path`` (as a string) is ``kind``.
    kind
        What the writer writes (``"a TileDB-SOMA experiment"``), for the messages.

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    TypeError
        When ``path`` is not a str or PathLike, or ``overwrite`` not a bool.
    ValueError
        When ``path`` is a URI (``scheme://``): only local paths are written.
    FileExistsError
        When ``path`` exists and ``overwrite`` is False, or it exists and is not ``kind``.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"the path must be a str or os.PathLike, not {type(path).__name__}.")
    if "://" in os.fspath(path):
        raise ValueError(
            f"{os.fspath(path)} is a URI; pass a local path (copy the result elsewhere after)."
        )
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, not {overwrite!r}.")
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    if path.is_symlink() or not is_ours(os.fspath(path)):
        raise FileExistsError(
            f"{path} exists and is not {kind}; overwrite=True replaces only {kind}. "
            "Write to another path, or move or delete this one yourself."
        )
    return path


@contextmanager
def written_in_place_of(path: Path) -> Iterator[Path]:
    """A new path next to ``path`` to write to; it replaces ``path`` when the block ends.

    Check ``path`` with :func:`check_destination` first: an existing ``path`` is removed.
    When the block raises, what was written is removed and ``path`` is left as it was.
    Partial writes of ``path`` left by a killed process are named in a warning (they may
    be large), not removed: another process may still be writing one.
    """
    leftovers = sorted(path.parent.glob(f".partial-{'?' * 8}.{glob.escape(path.name)}"))
    if leftovers:
        warnings.warn(
            f"{', '.join(p.name for p in leftovers)} in {path.parent} "
            f"{'is a partial write' if len(leftovers) == 1 else 'are partial writes'} of "
            f"{path.name} left by an interrupted run (or one still running); delete "
            f"{'it' if len(leftovers) == 1 else 'them'} to free the disk space.",
            UserWarning,
            stacklevel=4,  # the caller of write_soma / write_simulated
        )
    partial = path.with_name(f".partial-{uuid.uuid4().hex[:8]}.{path.name}")
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if path.exists():
        _remove(path)
    os.replace(partial, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
