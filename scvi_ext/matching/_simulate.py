"""Paired RNA/ATAC counts from a shared cell state, for tests and examples."""

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from mudata import MuData


def simulate_paired(n_cells=400, n_genes=120, n_peaks=600, n_types=4, seed=0) -> MuData:
    """Paired RNA (Poisson) and ATAC (Bernoulli) counts from a shared cell state; peaks
    named chr_start_end, in shuffled genomic order."""
    rng = np.random.default_rng(seed)
    types = rng.integers(n_types, size=n_cells)
    state = rng.normal(0, 1.5, size=(n_types, 6))[types] + rng.normal(0, 0.7, (n_cells, 6))
    rna = rng.poisson(np.exp(state @ rng.normal(0, 0.6, (6, n_genes)) + 1.0))
    logits = state @ rng.normal(0, 0.8, (6, n_peaks)) - 1.5
    atac = rng.binomial(1, 1 / (1 + np.exp(-logits)))
    atac[:, 0] += 1  # no cell without a peak
    cells = pd.Index([f"cell{i}" for i in range(n_cells)])
    obs = pd.DataFrame(
        {"cell_type": [f"type{t}" for t in types], "batch": rng.choice(["a", "b"], n_cells)},
        index=cells,
    )
    starts = rng.permutation(n_peaks) * 1000 + 100
    peaks = [f"chr{1 + i % 3}_{start}_{start + 500}" for i, start in enumerate(starts)]
    genes = [f"gene{i}" for i in range(n_genes)]
    return MuData(
        {
            "rna": AnnData(
                sp.csr_matrix(rna, dtype=np.float32), obs=obs.copy(), var=pd.DataFrame(index=genes)
            ),
            "atac": AnnData(
                sp.csr_matrix(atac, dtype=np.float32),
                obs=obs.copy(),
                var=pd.DataFrame(index=peaks),
            ),
        }
    )
