"""Features along the genome: peaks by their coordinates, genes by their linked peaks."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: A peak name: chromosome, then start and end, separated by ``_``, ``:`` or ``-``.
PEAK_PATTERN = re.compile(r"^(?P<chrom>[^_:\-]+)[_:\-](?P<start>\d+)[_:\-](?P<end>\d+)$")


def _chromosome_rank(chrom: str) -> tuple[int, str]:
    """chr1 < chr2 < ... < chr22 < chrX < chrY < chrM < other names (alphabetical)."""
    name = chrom.removeprefix("chr")
    if name.isdigit():
        return int(name), ""
    special = {"X": 1000, "Y": 1001, "M": 1002, "MT": 1002}
    return special.get(name, 2000), name


def peak_positions(peak_names: Sequence[str]) -> pd.DataFrame | None:
    """``chrom_rank``, ``chrom`` and ``start`` of each peak named ``chr_start_end``.

    Returns ``None`` when a name does not follow the pattern.
    """
    rows = []
    for name in map(str, peak_names):
        match = PEAK_PATTERN.match(name)
        if match is None:
            return None
        rank, _ = _chromosome_rank(match["chrom"])
        rows.append((rank, match["chrom"], int(match["start"])))
    return pd.DataFrame(rows, columns=["chrom_rank", "chrom", "start"])


def genome_order(peak_names: Sequence[str]) -> np.ndarray:
    """Indices that sort peaks named ``chr_start_end`` along the genome.

    Peaks whose names do not parse keep their order (with a warning): the convolutions then
    see neighbours in the order the user gave.
    """
    positions = peak_positions(peak_names)
    if positions is None:
        warnings.warn(
            "ATAC features are not all named chr_start_end (e.g. chr1_3000_3500); they are "
            "kept in the given order, so the 1-D convolutions may not see genomic neighbours.",
            UserWarning,
            stacklevel=2,
        )
        return np.arange(len(peak_names))
    return np.lexsort((positions["start"].to_numpy(), positions["chrom_rank"].to_numpy()))


def gene_genome_order(
    gene_names: Sequence[str],
    peak_names: Sequence[str],
    gene_region_map: sp.spmatrix | np.ndarray | None,
) -> np.ndarray:
    """Indices that sort genes by the genomic position of their linked peaks.

    A gene's position is the mean rank (along the genome) of the peaks it is linked to in
    ``gene_region_map`` (genes x peaks, non-zero = linked). Genes without a linked peak,
    or every gene when there is no map, follow in the given order.

    Raises
    ------
    ValueError
        When the map's shape is not (genes, peaks).
    """
    n_genes = len(gene_names)
    if gene_region_map is None:
        return np.arange(n_genes)
    links = sp.csr_matrix(gene_region_map)
    if links.shape != (n_genes, len(peak_names)):
        raise ValueError(
            f"gene_region_map has shape {links.shape}; it must be genes x peaks "
            f"({n_genes} x {len(peak_names)}) in the order of the registered modalities."
        )
    peak_rank = np.empty(len(peak_names))
    peak_rank[genome_order(peak_names)] = np.arange(len(peak_names))
    links.data = np.ones_like(links.data, dtype=float)
    n_links = np.asarray(links.sum(1)).ravel()
    mean_rank = np.asarray(links @ peak_rank).ravel() / np.maximum(n_links, 1)
    mean_rank[n_links == 0] = np.inf
    return np.lexsort((np.arange(n_genes), mean_rank))
