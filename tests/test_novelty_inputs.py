"""novelty_score(method="query_neighbours") checks the counts and gene names it reads."""

import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scvi_ext.data import simulate
from scvi_ext.model import ScNym

NON_INTEGER = (
    "{where} contains non-integer values; found {n}. This looks like normalised or "
    "log-transformed data: pass raw counts, e.g. a counts layer via `layer=`; models "
    "normalise internally."
)


@pytest.fixture(scope="module")
def model_and_query():
    adata = simulate(n_cells=240, n_genes=30, n_cell_types=3, n_batches=1, n_markers=6, seed=3)
    query = (adata.obs["condition"] == "query").to_numpy()
    reference, cells = adata[~query].copy(), adata[query].copy()
    ScNym.setup_anndata(reference, labels_key="cell_type", unlabeled_category=None)
    model = ScNym(reference, n_hidden=8)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    return model, reference, cells


def _log_normalised(adata):
    lognorm = adata.copy()
    lognorm.X = sp.csr_matrix(lognorm.X, dtype=np.float32)
    lognorm.X.data = np.log1p(lognorm.X.data)
    return lognorm


def test_log_normalised_cells_are_refused_as_by_predict(model_and_query):
    model, reference, cells = model_and_query
    lognorm = _log_normalised(cells)
    n_fractional = int((lognorm.X.data != np.round(lognorm.X.data)).sum())
    message = NON_INTEGER.format(where="adata.X", n=n_fractional)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.predict(lognorm)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.novelty_score(lognorm, method="query_neighbours")
    lognorm_reference = _log_normalised(reference)
    n_fractional = int((lognorm_reference.X.data != np.round(lognorm_reference.X.data)).sum())
    message = NON_INTEGER.format(where="reference.X", n=n_fractional)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.novelty_score(cells, method="query_neighbours", reference=lognorm_reference)


def test_only_the_cells_and_genes_read_are_checked(model_and_query):
    model, _, cells = model_and_query
    score = model.novelty_score(cells, method="query_neighbours")
    extra = cells.copy()
    extra.X = extra.X.toarray()
    extra.X[0, 0] = 0.5  # a cell left out by indices
    indices = np.arange(1, cells.n_obs)
    np.testing.assert_allclose(
        model.novelty_score(extra, indices, method="query_neighbours"),
        model.novelty_score(cells, indices, method="query_neighbours"),
    )
    shuffled = cells[:, cells.var_names[::-1]].copy()  # genes matched by name
    np.testing.assert_allclose(model.novelty_score(shuffled, method="query_neighbours"), score)


def test_duplicated_gene_names_are_refused(model_and_query):
    model, _, cells = model_and_query
    with pytest.warns(UserWarning, match="Variable names are not unique"):
        duplicated = ad.concat([cells, cells[:, :1]], axis=1)  # every gene, one twice
    message = (
        f"adata has duplicated gene names (e.g. ['{cells.var_names[0]}']), so its genes "
        "cannot be matched to the model's by name; make them unique on a copy first "
        "(adata = adata.copy(); adata.var_names_make_unique())."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.novelty_score(duplicated, method="query_neighbours")


def test_cells_without_counts_are_refused(model_and_query):
    from scvi_ext.base import registered_counts

    model, _, cells = model_and_query
    empty = ad.AnnData(obs=cells.obs, var=cells.var)
    message = "cells.X is None; put the raw counts the model was trained on there."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        registered_counts(empty, model.registry_, "cells")


def test_counts_of_the_models_layer_are_checked(model_and_query):
    _, reference, cells = model_and_query
    reference, cells = reference.copy(), cells.copy()
    for adata in (reference, cells):
        adata.layers["counts"] = adata.X.toarray()
    cells.layers["counts"][0, 0] = -1.0
    ScNym.setup_anndata(reference, labels_key="cell_type", unlabeled_category=None, layer="counts")
    model = ScNym(reference, n_hidden=8)  # the score does not use the network
    message = (
        "adata.layers['counts'] contains negative values; found 1. This looks like scaled or "
        "centred data: pass raw counts, e.g. a counts layer via `layer=`; models normalise "
        "internally."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.novelty_score(cells, method="query_neighbours")
