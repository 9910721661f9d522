"""Shared fixtures: small simulated data and the real-data switch."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scvi  # noqa: E402

from scvi_ext.data import datasets_available, simulate  # noqa: E402

requires_shared_data = pytest.mark.skipif(
    not datasets_available(), reason="../shared/datasets (or SCVI_EXT_DATA) is not available"
)


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0
    yield


@pytest.fixture
def sim_adata():
    """Reference + query cells: query cells carry the label 'Unknown' in obs['labels']."""
    adata = simulate(n_cells=480, n_genes=100, n_cell_types=4, n_batches=2, n_markers=15, seed=1)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[(adata.obs["condition"] == "query").to_numpy()] = "Unknown"
    adata.obs["labels"] = labels
    return adata


def query_mask(adata) -> np.ndarray:
    """Cells of the query condition."""
    return (adata.obs["condition"] == "query").to_numpy()
