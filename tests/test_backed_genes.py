"""Backed h5ad files whose genes are not the model's: matched by name, read lazily by rows."""

from __future__ import annotations

import hashlib
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_ext.base import align_genes
from scvi_ext.base._sampler import BlockAnnDataLoader
from scvi_ext.data import CollectionCounts, simulate
from scvi_ext.data._collection import DenseRowReader
from scvi_ext.model import CAN, CELLULAR, ScNym

TRAIN = {"max_epochs": 1, "batch_size": 32, "enable_progress_bar": False}
MISSING = "lacks 6 of the model's 60 genes"
CSC = "stores its counts on disk as CSC"
#: Rows scvi-tools reads at once to check that a registered matrix holds counts.
SCVI_COUNT_CHECK_ROWS = 100


@pytest.fixture(scope="module")
def data():
    """A reference (in memory) and a 300-cell query."""
    adata = simulate(
        n_cells=600, n_genes=60, n_cell_types=3, n_batches=2, n_markers=10, seed=3,
        query_fraction=0.5,
    )  # fmt: skip
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.layers["counts"] = adata.X.copy()
    is_query = (adata.obs["condition"] == "query").to_numpy()
    return adata[~is_query].copy(), adata[is_query].copy()


@pytest.fixture(scope="module")
def models(data):
    """A classifier (CAN) and an embedding model (CELLULAR) on X, ScNym on a counts layer."""
    reference, _ = data
    can_data, cellular_data, scnym_data = reference.copy(), reference.copy(), reference.copy()
    CAN.setup_anndata(can_data, labels_key="cell_type")
    can = CAN(can_data, n_capsules=4, capsule_dim=8, attention_dim=4, kernel_size=3)
    can.train(**TRAIN)
    CELLULAR.setup_anndata(cellular_data, labels_key="cell_type", batch_key="batch")
    cellular = CELLULAR(cellular_data, n_latent=8, n_hidden=(32, 16))
    cellular.train(**TRAIN)
    ScNym.setup_anndata(
        scnym_data, labels_key="cell_type", unlabeled_category=None, layer="counts"
    )
    scnym = ScNym(scnym_data, n_hidden=16)
    scnym.train(**TRAIN)
    return {"can": can, "cellular": cellular, "scnym": scnym}


def _other_genes(query: ad.AnnData, missing: bool) -> ad.AnnData:
    """The query's genes shuffled; with ``missing``, 6 of the model's dropped and 3 extra
    genes added (extra genes must be dropped, missing ones read as zeros)."""
    order = np.random.default_rng(1).permutation(query.n_vars)
    if not missing:
        return query[:, order].copy()
    kept = query[:, order[6:]]
    rng = np.random.default_rng(2)
    extra = sp.csr_matrix(rng.poisson(3.0, (query.n_obs, 3)).astype(np.float32))
    counts = sp.hstack([kept.X, extra], format="csr")
    var = pd.DataFrame(index=[*kept.var_names, "extra_1", "extra_2", "extra_3"])
    return ad.AnnData(X=counts, obs=query.obs.copy(), var=var, layers={"counts": counts.copy()})


def _write(adata: ad.AnnData, path, storage: str):
    """``adata`` written with its X as CSR, CSC or dense."""
    adata = adata.copy()
    if storage == "dense":
        adata.X = np.asarray(adata.X.toarray())
    elif storage == "csc":
        adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(path)
    return path


def _digest(path) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def _outputs(models: dict, adata: ad.AnnData) -> dict:
    return {
        "can": models["can"].predict_proba(adata),
        "cellular": models["cellular"].get_latent_representation(adata),
    }


@pytest.mark.parametrize("missing", [False, True], ids=["reordered", "missing"])
@pytest.mark.parametrize("storage", ["csr", "dense", "csc"])
def test_backed_queries_with_other_genes_give_the_in_memory_outputs(
    data, models, tmp_path, storage, missing
):
    """CSR, dense and CSC files, genes reordered or missing (plus extra ones): the backed
    file gives exactly the outputs of the same file read into memory, and stays unchanged."""
    path = _write(_other_genes(data[1], missing), tmp_path / "query.h5ad", storage)
    before = _digest(path)
    expected_warnings = ([MISSING] if missing else []) + ([CSC] if storage == "csc" else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = _outputs(models, ad.read_h5ad(path))
        backed = ad.read_h5ad(path, backed="r")
        observed = _outputs(models, backed)
    messages = [str(warning.message) for warning in caught]
    for message in expected_warnings:
        assert any(message in text for text in messages), (message, messages)
    if not missing:  # no gene is missing: no warning says one is
        assert not any("of the model's 60 genes" in text for text in messages), messages
    for name in expected:
        np.testing.assert_array_equal(observed[name], expected[name])
    assert list(backed.obs.columns) == list(data[1].obs.columns)  # the user's AnnData untouched
    assert not any(key.startswith("_scvi") for key in backed.uns)
    backed.file.close()
    assert _digest(path) == before


def test_a_backed_csc_file_with_the_models_genes_is_read_once_and_refused_for_training(
    data, models, tmp_path
):
    """A CSC file cannot be read by cells (anndata would read all of it per minibatch):
    with the model's own genes too, inference and load read it into memory once, with a
    warning and the in-memory outputs; training from it is refused with the fix."""
    path = _write(data[1], tmp_path / "query.h5ad", "csc")
    expected = _outputs(models, ad.read_h5ad(path))
    backed = ad.read_h5ad(path, backed="r")
    with pytest.warns(UserWarning, match=CSC):
        observed = _outputs(models, backed)
    for name in expected:
        np.testing.assert_array_equal(observed[name], expected[name])
    models["can"].save(tmp_path / "can")
    with pytest.warns(UserWarning, match=CSC):
        loaded = CAN.load(tmp_path / "can", adata=backed)
    np.testing.assert_array_equal(loaded.predict_proba(), expected["can"])
    with pytest.raises(ValueError, match=r"adata.X is stored on disk as CSC \(by gene\): its"):
        CAN.setup_anndata(backed, labels_key="cell_type")
    backed.file.close()


@pytest.mark.parametrize("missing", [False, True], ids=["reordered", "missing"])
@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_backed_queries_stay_on_disk_and_are_read_a_minibatch_at_a_time(
    data, models, tmp_path, monkeypatch, storage, missing
):
    """No read of the file spans more rows than scvi-tools' own count check (100 rows) or a
    minibatch: the whole matrix is never read, as a column selection (``X[:, genes]``) or a
    conversion (``csr_matrix(X)``) would."""
    query = _other_genes(data[1], missing=missing)
    path = _write(query, tmp_path / "query.h5ad", storage)
    with h5py.File(path, "r") as file:
        indptr = file["X/indptr"][...] if storage == "csr" else None
    largest_read = (
        int(np.max(indptr[SCVI_COUNT_CHECK_ROWS:] - indptr[:-SCVI_COUNT_CHECK_ROWS]))
        if storage == "csr"
        else SCVI_COUNT_CHECK_ROWS * query.n_vars
    )
    total = int(indptr[-1]) if storage == "csr" else query.n_obs * query.n_vars
    assert largest_read < total / 2
    monkeypatch.setattr("scvi_ext.data._validation._ROW_CHUNK", 32)  # counts checked by rows
    sizes: list[int] = []
    original = h5py.Dataset.__getitem__

    def recording(dataset, key):
        value = original(dataset, key)
        if dataset.name in ("/X", "/X/data"):
            sizes.append(int(np.size(value)))
        return value

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    backed = ad.read_h5ad(path, backed="r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with models["can"].registered_anndata(backed) as light:
            assert isinstance(light.X, CollectionCounts)
        models["can"].predict_proba(backed, batch_size=32)
        models["cellular"].get_latent_representation(backed, batch_size=32)
    assert sum(MISSING in str(warning.message) for warning in caught) == (3 if missing else 0)
    assert sizes, "nothing was read from the file"
    assert sum(sizes) >= 2 * total  # every cell was read, by both models
    assert max(sizes) <= largest_read


def test_a_backed_file_with_counts_in_a_layer(data, models, tmp_path):
    """A model set up on a counts layer reads a backed file's layer (X holds other values),
    genes matched by name, as in memory."""
    query = _other_genes(data[1], missing=True)
    query.X = query.X.astype(np.float32) * 0.5  # not counts: reading X would be refused
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    scnym = models["scnym"]
    with pytest.warns(UserWarning, match=MISSING):
        expected = scnym.predict_proba(ad.read_h5ad(path))
    with pytest.warns(UserWarning, match=MISSING):
        observed = scnym.predict_proba(ad.read_h5ad(path, backed="r"))
    np.testing.assert_array_equal(observed, expected)


@pytest.mark.parametrize(
    ("storage", "genes"), [("csr", "missing"), ("dense", "missing"), ("dense", "the model's")]
)
def test_a_query_model_trains_from_a_backed_file(data, models, tmp_path, storage, genes):
    """``load_query_data`` on a backed query (missing genes, or a dense file on the model's
    genes, whose rows h5py reads only in increasing order) trains with block-shuffled
    minibatches read from disk, and its data gives the in-memory file's latent."""
    query = _other_genes(data[1], missing=True) if genes == "missing" else data[1]
    path = _write(query, tmp_path / "query.h5ad", storage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        query_model = CELLULAR.load_query_data(
            ad.read_h5ad(path, backed="r"), models["cellular"], unfrozen=True
        )
        assert isinstance(query_model.adata.X, CollectionCounts)
        query_model.train(**TRAIN)
        assert isinstance(query_model.trainer.train_dataloader, BlockAnnDataLoader)
        expected = query_model.get_latent_representation(ad.read_h5ad(path))
    n_warned = sum(MISSING in str(warning.message) for warning in caught)
    assert n_warned == (2 if genes == "missing" else 0)
    np.testing.assert_array_equal(query_model.get_latent_representation(), expected)


@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_backed_rows_with_the_models_genes_equal_the_in_memory_matrix(data, tmp_path, storage):
    """The lazy matrix equals the in-memory aligned matrix for any rows, in any order,
    repeated or none, and for row slices."""
    reference, query = data
    genes = pd.Index(reference.var_names)
    other = _other_genes(query, missing=True)
    path = _write(other, tmp_path / "query.h5ad", storage)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.warns(UserWarning, match=MISSING):
        expected = sp.csr_matrix(align_genes(other.X, other.var_names, genes))
    with pytest.warns(UserWarning, match=MISSING):
        lazy = align_genes(backed.X, backed.var_names, genes)
    assert isinstance(lazy, CollectionCounts)
    assert lazy.shape == (query.n_obs, len(genes))
    rng = np.random.default_rng(0)
    for rows in (
        rng.permutation(query.n_obs)[:40],
        np.array([5, 5, 3, 200, 4]),
        np.array([], dtype=np.int64),
        np.arange(query.n_obs),
    ):
        block = lazy[rows]
        assert block.shape == (len(rows), len(genes))
        assert (block != expected[rows]).nnz == 0
    assert (lazy[10:90] != expected[10:90]).nnz == 0
    reordered = _other_genes(query, missing=False)
    path = _write(reordered, tmp_path / "reordered.h5ad", storage)
    permuted = align_genes(ad.read_h5ad(path, backed="r").X, reordered.var_names, genes)
    assert (permuted[np.arange(query.n_obs)] != sp.csr_matrix(query.X)).nnz == 0


def test_dense_row_reader_reads_runs_of_rows_as_slices(tmp_path, monkeypatch):
    matrix = np.arange(200 * 7, dtype=np.float32).reshape(200, 7)
    with h5py.File(tmp_path / "dense.h5", "w") as file:
        file["X"] = matrix
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(dataset, key):
        reads.append(key)
        return original(dataset, key)

    with h5py.File(tmp_path / "dense.h5", "r") as file:
        reader = DenseRowReader(file["X"])
        rows = np.array([150, 3, 4, 5, 151, 9, 199])
        monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
        block = reader[rows]
        monkeypatch.undo()
        np.testing.assert_array_equal(block.toarray(), matrix[rows])
        assert reads == [slice(3, 10), slice(150, 152), slice(199, 200)]
        with pytest.raises(TypeError, match="cannot read rows of a ndarray from disk"):
            CollectionCounts.from_backed(matrix)
