"""Negative binomial count simulator for tests, tutorials and scale benchmarks.

The simulator generates cells in chunks and assembles the CSR matrix from per-chunk
CSR pieces, so memory stays bounded by one dense chunk plus the sparse result. A
million-cell run is a plain call (not part of the test suite)::

    from scvi_ext.data import simulate

    adata = simulate(n_cells=1_000_000, n_genes=2000, chunk_size=50_000)
"""

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

from ._soma import check_destination, write_soma_chunks, written_in_place_of

# Entries with a mean below this are drawn by inverse-CDF sampling (cheap: most of
# them are zero); larger means are drawn as gamma-Poisson.
_INVERSION_MAX_MEAN = 3.0
# Spread (log scale) of the gene base expression and of the cell library sizes.
_GENE_LOG_SD = 1.5
_LIBRARY_LOG_SD = 0.4


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_cell_types: int = 5,
    n_batches: int = 2,
    query_fraction: float = 0.3,
    n_markers: int = 20,
    marker_fold_change: float = 4.0,
    batch_effect: float = 0.3,
    condition_shift: float = 1.0,
    mean_library_size: float = 2000.0,
    dispersion: float = 5.0,
    seed: int | None = 0,
    chunk_size: int = 50_000,
) -> ad.AnnData:
    """Simulate single-cell counts from a negative binomial (gamma-Poisson) model.

    Each gene has a log-normal base expression. Each cell type up-regulates its own
    ``n_markers`` marker genes by ``marker_fold_change``. Each batch multiplies every
    gene mean by a log-normal factor with log-scale standard deviation
    ``batch_effect``. The last ``query_fraction`` of the cells form the ``"query"``
    condition, which changes one program in every cell type: a shared,
    interferon-like program of ``n_markers`` genes is up-regulated by
    ``marker_fold_change ** condition_shift`` and half of each type's markers lose
    ``min(1, condition_shift / 2)`` of their (log) fold change. Library sizes are
    log-normal with mean ``mean_library_size``.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the count matrix.
    n_cell_types, n_batches
        Number of cell types (``"type_0"``, ...) and batches (``"batch_0"``, ...);
        cells are assigned uniformly at random.
    query_fraction
        Fraction of cells (the last ones) in the ``"query"`` condition.
    n_markers
        Marker genes per cell type, and size of the condition program.
    marker_fold_change
        Fold change of marker genes in their cell type.
    batch_effect
        Standard deviation of the log batch factor of each gene.
    condition_shift
        Strength of the query condition shift (0 disables it).
    mean_library_size
        Expected total count per cell.
    dispersion
        Inverse dispersion ``theta`` of the negative binomial
        (variance ``mu + mu**2 / theta``; larger means closer to Poisson).
    seed
        Seed of the :class:`numpy.random.Generator`; the result is a deterministic
        function of the seed and does not depend on ``chunk_size``.
    chunk_size
        Number of cells generated at once; the per-chunk working memory is about
        ``40 * chunk_size * n_genes`` bytes.

    Returns
    -------
    AnnData with float32 CSR counts in ``X``; ``obs`` columns ``cell_type``,
    ``batch`` and ``condition`` (categorical); ``var`` columns ``marker_of`` (the cell
    type a gene marks, ``""`` otherwise; when programs overlap, which happens if
    ``(n_cell_types + 1) * n_markers > n_genes``, the last type wins) and
    ``condition_program`` (bool); the ground
    truth (marker genes, condition program, markers lost in the query and the
    parameters) in ``uns["simulation"]``.
    """
    obs, var, uns, chunks = _simulation(**locals())  # locals(): the arguments above
    return ad.AnnData(X=_stack_csr(list(chunks), n_genes), obs=obs, var=var, uns=uns)


def write_simulated(
    path: str | Path,
    overwrite: bool = False,
    format: Literal["h5ad", "soma"] = "h5ad",
    **simulate_kwargs,
) -> Path:
    """Write :func:`simulate`'s cells to an h5ad file or a TileDB-SOMA experiment, chunk by
    chunk, in bounded memory.

    The file holds the same cells as ``simulate(**simulate_kwargs)``, but only one chunk
    of counts is in memory at a time (about ``40 * chunk_size * n_genes`` bytes), so a
    million cells x 2000 genes, several GB of counts, is written on a small machine.
    Read an h5ad without loading it: ``anndata.read_h5ad(path, backed="r")``; train from
    an experiment with :class:`~scvi_ext.base.SomaDataModule`.

    Parameters
    ----------
    path
        The ``.h5ad`` file, or the experiment's folder, to write.
    overwrite
        Replace an existing h5ad (HDF5) file, or TileDB-SOMA experiment for
        ``format="soma"``; any other existing path is never replaced. The old one is kept
        when writing fails.
    format
        ``"h5ad"``, or ``"soma"``: an experiment as :func:`~scvi_ext.data.write_soma`
        writes it (counts, ``obs`` and ``var``; no ``uns``).
    **simulate_kwargs
        Arguments of :func:`simulate` (``n_cells``, ``n_genes``, ``chunk_size``, ...).

    Returns
    -------
    The path written.

    Raises
    ------
    ValueError
        When ``format`` is unknown, ``path`` is a URI or a :func:`simulate` argument is out
        of range.
    TypeError
        When a keyword is not an argument of :func:`simulate`.
    FileExistsError
        When ``path`` exists and ``overwrite`` is False, or it exists and is not what
        ``format`` writes.
    """
    if format not in ("h5ad", "soma"):
        raise ValueError(f"format must be 'h5ad' or 'soma', not {format!r}.")
    if format == "soma":
        import tiledbsoma

        path = check_destination(
            path, overwrite, tiledbsoma.Experiment.exists, "a TileDB-SOMA experiment"
        )
    else:
        path = check_destination(path, overwrite, h5py.is_hdf5, "an HDF5 (.h5ad) file")
    unknown = sorted(set(simulate_kwargs) - set(inspect.signature(simulate).parameters))
    if unknown:
        raise TypeError(f"write_simulated got unknown simulate() argument(s): {unknown}.")
    obs, var, uns, chunks = _simulation(**{**_SIMULATE_DEFAULTS, **simulate_kwargs})
    if format == "soma":
        write_soma_chunks(path, obs, var, chunks, overwrite=overwrite)
        return path
    with written_in_place_of(path) as partial:
        first = next(chunks)
        ad.AnnData(X=first, obs=obs.iloc[: first.shape[0]], var=var, uns=uns).write_h5ad(partial)
        with h5py.File(partial, "r+") as handle:
            counts = sparse_dataset(handle["X"])
            for chunk in chunks:
                counts.append(chunk)
            del handle["obs"]
            write_elem(handle, "obs", obs)
    return path


def _simulation(
    *,
    n_cells: int,
    n_genes: int,
    n_cell_types: int,
    n_batches: int,
    query_fraction: float,
    n_markers: int,
    marker_fold_change: float,
    batch_effect: float,
    condition_shift: float,
    mean_library_size: float,
    dispersion: float,
    seed: int | None,
    chunk_size: int,
) -> tuple[pd.DataFrame, pd.DataFrame, dict, Iterator[sp.csr_matrix]]:
    """``obs``, ``var``, ``uns`` and a generator of CSR count chunks (see :func:`simulate`)."""
    _check_simulate_args(
        n_cells,
        n_genes,
        n_cell_types,
        n_batches,
        query_fraction,
        n_markers,
        marker_fold_change,
        batch_effect,
        mean_library_size,
        dispersion,
        chunk_size,
    )
    params = dict(
        n_cells=n_cells,
        n_genes=n_genes,
        n_cell_types=n_cell_types,
        n_batches=n_batches,
        query_fraction=query_fraction,
        n_markers=n_markers,
        marker_fold_change=marker_fold_change,
        batch_effect=batch_effect,
        condition_shift=condition_shift,
        mean_library_size=mean_library_size,
        dispersion=dispersion,
        seed="none" if seed is None else seed,
    )
    # Separate streams for the parameters and for each kind of per-entry draw keep the
    # sequence of draws independent of chunk_size.
    param_seq, uniform_seq, gamma_seq, poisson_seq = np.random.SeedSequence(seed).spawn(4)
    rng = np.random.default_rng(param_seq)
    uniform_rng = np.random.default_rng(uniform_seq)
    gamma_rng = np.random.default_rng(gamma_seq)
    poisson_rng = np.random.default_rng(poisson_seq)

    markers, program, lost_markers = _choose_programs(rng, n_genes, n_cell_types, n_markers)
    profiles = _group_profiles(
        rng,
        n_genes,
        n_cell_types,
        n_batches,
        markers,
        program,
        lost_markers,
        np.log(marker_fold_change),
        batch_effect,
        condition_shift,
    )
    cell_types = rng.integers(n_cell_types, size=n_cells)
    batches = rng.integers(n_batches, size=n_cells)
    n_query = int(round(n_cells * query_fraction))
    is_query = np.arange(n_cells) >= n_cells - n_query
    groups = (cell_types * n_batches + batches) * 2 + is_query
    library_sizes = mean_library_size * np.exp(
        rng.normal(-(_LIBRARY_LOG_SD**2) / 2, _LIBRARY_LOG_SD, size=n_cells)
    )

    def chunks() -> Iterator[sp.csr_matrix]:
        for start in range(0, n_cells, chunk_size):
            stop = min(start + chunk_size, n_cells)
            means = profiles[groups[start:stop]]
            means *= library_sizes[start:stop, None].astype(np.float32)
            yield _sample_chunk(means, float(dispersion), uniform_rng, gamma_rng, poisson_rng)
            del means

    type_names = [f"type_{i}" for i in range(n_cell_types)]
    gene_names = [f"gene_{i}" for i in range(n_genes)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_types, type_names),
            "batch": pd.Categorical.from_codes(batches, [f"batch_{i}" for i in range(n_batches)]),
            "condition": pd.Categorical.from_codes(is_query.astype(int), ["reference", "query"]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    marker_of = np.full(n_genes, "", dtype=object)
    for type_idx, genes in enumerate(markers):
        marker_of[genes] = type_names[type_idx]
    var = pd.DataFrame(
        {
            "marker_of": pd.Categorical(marker_of, categories=["", *type_names]),
            "condition_program": np.isin(np.arange(n_genes), program),
        },
        index=gene_names,
    )
    uns = {
        "simulation": {
            "marker_genes": {
                type_names[i]: [gene_names[g] for g in genes] for i, genes in enumerate(markers)
            },
            "condition_program_genes": [gene_names[g] for g in program],
            "lost_marker_genes": {
                type_names[i]: [gene_names[g] for g in genes]
                for i, genes in enumerate(lost_markers)
            },
            "params": params,
        }
    }
    return obs, var, uns, chunks()


_SIMULATE_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(simulate).parameters.items()
}


def _check_simulate_args(
    n_cells: int,
    n_genes: int,
    n_cell_types: int,
    n_batches: int,
    query_fraction: float,
    n_markers: int,
    marker_fold_change: float,
    batch_effect: float,
    mean_library_size: float,
    dispersion: float,
    chunk_size: int,
) -> None:
    positive = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_batches": n_batches,
        "chunk_size": chunk_size,
        "marker_fold_change": marker_fold_change,
        "mean_library_size": mean_library_size,
        "dispersion": dispersion,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}.")
    if not 0 <= query_fraction <= 1:
        raise ValueError(f"query_fraction must be in [0, 1], got {query_fraction}.")
    if not 0 <= n_markers <= n_genes:
        raise ValueError(f"n_markers must be in [0, n_genes={n_genes}], got {n_markers}.")
    if batch_effect < 0:
        raise ValueError(f"batch_effect must be non-negative, got {batch_effect}.")


def _choose_programs(
    rng: np.random.Generator, n_genes: int, n_cell_types: int, n_markers: int
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Marker genes per type, the condition program and the markers lost in the query.

    Programs are disjoint when ``(n_cell_types + 1) * n_markers <= n_genes``;
    otherwise each is drawn independently.
    """
    n_programs = n_cell_types + 1
    if n_programs * n_markers <= n_genes:
        order = rng.permutation(n_genes)
        blocks = [np.sort(order[i * n_markers : (i + 1) * n_markers]) for i in range(n_programs)]
    else:
        blocks = [
            np.sort(rng.choice(n_genes, size=n_markers, replace=False)) for _ in range(n_programs)
        ]
    markers, program = blocks[:n_cell_types], blocks[n_cell_types]
    lost_markers = [
        np.sort(rng.choice(genes, size=len(genes) // 2, replace=False)) for genes in markers
    ]
    return markers, program, lost_markers


def _group_profiles(
    rng: np.random.Generator,
    n_genes: int,
    n_cell_types: int,
    n_batches: int,
    markers: list[np.ndarray],
    program: np.ndarray,
    lost_markers: list[np.ndarray],
    log_fold_change: float,
    batch_effect: float,
    condition_shift: float,
) -> np.ndarray:
    """Gene proportions (rows sum to 1) per (type, batch, condition) group, float32."""
    base = rng.normal(0.0, _GENE_LOG_SD, size=n_genes)
    batch_log = rng.normal(0.0, batch_effect, size=(n_batches, n_genes))
    kept_fraction = max(0.0, 1.0 - condition_shift / 2)
    profiles = np.empty((n_cell_types, n_batches, 2, n_genes))
    for type_idx in range(n_cell_types):
        type_log = base.copy()
        type_log[markers[type_idx]] += log_fold_change
        query_log = type_log.copy()
        query_log[program] += condition_shift * log_fold_change
        query_log[lost_markers[type_idx]] -= (1.0 - kept_fraction) * log_fold_change
        for batch_idx in range(n_batches):
            profiles[type_idx, batch_idx, 0] = type_log + batch_log[batch_idx]
            profiles[type_idx, batch_idx, 1] = query_log + batch_log[batch_idx]
    profiles = profiles.reshape(-1, n_genes)
    profiles = np.exp(profiles - profiles.max(axis=1, keepdims=True))
    profiles /= profiles.sum(axis=1, keepdims=True)
    return profiles.astype(np.float32)


def _sample_chunk(
    means: np.ndarray,
    theta: float,
    uniform_rng: np.random.Generator,
    gamma_rng: np.random.Generator,
    poisson_rng: np.random.Generator,
) -> sp.csr_matrix:
    """Draw negative binomial counts for a dense chunk of means; returns float32 CSR.

    Small means use inverse-CDF sampling: one uniform per entry decides the (mostly
    zero) entries with a single comparison to P(0), and only the non-zero entries
    walk the CDF. Large means use gamma-Poisson. ``means`` is overwritten.
    """
    n_rows, n_cols = means.shape
    uniforms = uniform_rng.random(means.shape, dtype=np.float32)
    large = means >= _INVERSION_MAX_MEAN
    # P(0) = (1 + mu / theta) ** -theta, in a scratch buffer (float32 log1p is slow;
    # log(1 + x) is accurate enough to decide zeros).
    zero_prob = np.divide(means, theta)
    zero_prob += 1.0
    np.log(zero_prob, out=zero_prob)
    zero_prob *= -theta
    np.exp(zero_prob, out=zero_prob)
    walk = np.greater_equal(uniforms, zero_prob)
    del zero_prob
    walk &= ~large
    walk_idx = np.flatnonzero(walk)
    del walk
    large_idx = np.flatnonzero(large)
    del large
    flat_means = means.reshape(-1)
    walk_counts = _nb_inverse_cdf(
        flat_means[walk_idx].astype(np.float64),
        uniforms.reshape(-1)[walk_idx].astype(np.float64),
        theta,
    )
    del uniforms
    large_means = flat_means[large_idx].astype(np.float64)
    rates = gamma_rng.standard_gamma(theta, size=large_means.size) * (large_means / theta)
    large_counts = poisson_rng.poisson(rates)

    # Reuse the means buffer for the dense counts, then read its non-zeros row-major.
    flat_counts = flat_means
    flat_counts.fill(0.0)
    flat_counts[walk_idx] = walk_counts
    flat_counts[large_idx] = large_counts
    nonzero_idx = np.flatnonzero(flat_counts)
    data = flat_counts[nonzero_idx]
    indptr = np.searchsorted(nonzero_idx, np.arange(n_rows + 1) * n_cols)
    indices = (nonzero_idx % n_cols).astype(np.int32)
    return sp.csr_matrix((data, indices, indptr.astype(np.int64)), shape=(n_rows, n_cols))


def _nb_inverse_cdf(means: np.ndarray, uniforms: np.ndarray, theta: float) -> np.ndarray:
    """Smallest k >= 1 with CDF(k) > u, for entries already known to be non-zero."""
    counts = np.zeros(means.size, dtype=np.float64)
    active = np.arange(means.size)
    success = means / (means + theta)
    pmf = np.exp(-theta * np.log1p(means / theta))
    cdf = pmf.copy()
    k = 0
    while active.size:
        k += 1
        pmf *= (k - 1 + theta) / k * success
        cdf += pmf
        done = (uniforms < cdf) | (pmf == 0)  # pmf == 0: float underflow in the far tail
        counts[active[done]] = k
        keep = ~done
        active, success, pmf, cdf, uniforms = (
            active[keep],
            success[keep],
            pmf[keep],
            cdf[keep],
            uniforms[keep],
        )
    return counts


def _stack_csr(pieces: list[sp.csr_matrix], n_genes: int) -> sp.csr_matrix:
    """Concatenate CSR row blocks, releasing each block once it is copied."""
    nnz = sum(piece.nnz for piece in pieces)
    n_rows = sum(piece.shape[0] for piece in pieces)
    index_dtype = np.int32 if max(nnz, n_genes) < np.iinfo(np.int32).max else np.int64
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=index_dtype)
    indptr = np.empty(n_rows + 1, dtype=index_dtype)
    indptr[0] = 0
    row, offset = 0, 0
    pieces.reverse()
    while pieces:
        piece = pieces.pop()
        n_piece_rows = piece.shape[0]
        data[offset : offset + piece.nnz] = piece.data
        indices[offset : offset + piece.nnz] = piece.indices
        indptr[row + 1 : row + n_piece_rows + 1] = piece.indptr[1:] + offset
        row += n_piece_rows
        offset += piece.nnz
        del piece
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_genes))
