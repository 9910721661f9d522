"""Data on disk for every model: several h5ad files as one collection, closed and read-only files."""

from __future__ import annotations

import hashlib
import tracemalloc

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from test_gmvae import FAST, SMALL
from test_model_contract_safety import BUILDERS, _data, _train_settings

from scvi_ext.data import read_collection
from scvi_ext.model import CAN, CELLULAR, CGRAN, GMVAE, LatentClassifier, ScNym


def _files(tmp_path):
    """The reference in two files (the second with its genes reversed), the query in one."""
    reference, query = _data()
    for adata in (reference, query):
        adata.layers["counts"] = adata.X.copy()
    half = reference.n_obs // 2
    reference[:half].write_h5ad(tmp_path / "part1.h5ad")
    reference[half:, ::-1].write_h5ad(tmp_path / "part2.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    parts = [tmp_path / "part1.h5ad", tmp_path / "part2.h5ad"]
    return reference, query, parts, tmp_path / "query.h5ad"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def counts_layer(monkeypatch):
    """A collection is read through a layer: the builders' setup calls get ``layer="counts"``."""
    for cls in (ScNym, CELLULAR, CAN, CGRAN):

        def setup(adata, _setup=cls.setup_anndata, **kwargs):
            kwargs.setdefault("layer", "counts")
            return _setup(adata, **kwargs)

        monkeypatch.setattr(cls, "setup_anndata", setup)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_classifier_trains_and_predicts_from_a_collection_of_files(
    name, tmp_path, counts_layer
):
    """Training reads two files as one (genes matched by name), prediction a third; the
    predictions equal those of the in-memory query, and no file or obs is written."""
    _, query, parts, query_path = _files(tmp_path)
    digests = [_digest(path) for path in [*parts, query_path]]
    collection = read_collection(parts, label="file")
    train = _train_settings(name, max_epochs=10, batch_size=32)
    if name == "latent_classifier":
        upstream = BUILDERS["cellular"](collection)
        upstream.train(**train)
        model = LatentClassifier.from_model(upstream, n_hidden1=16, n_hidden2=16)
    else:
        model = BUILDERS[name](collection)
    model.train(**train)
    query_collection = read_collection([query_path])
    expected = model.predict_proba(query)
    np.testing.assert_allclose(model.predict_proba(query_collection), expected, atol=1e-6)
    accuracy = (model.predict(query_collection) == query.obs["cell_type"].to_numpy()).mean()
    assert accuracy > 0.6  # 3 cell types: chance is 1/3
    assert list(query_collection.obs.columns) == list(query.obs.columns)  # nothing written
    assert [_digest(path) for path in [*parts, query_path]] == digests


def test_gmvae_trains_and_embeds_from_a_collection_of_files(tmp_path):
    _, query, parts, query_path = _files(tmp_path)
    collection = read_collection(parts)
    GMVAE.setup_anndata(collection, batch_key="batch", layer="counts")
    model = GMVAE(collection, **SMALL)
    model.train(**{**FAST, "max_epochs": 2})
    latent = model.get_latent_representation(read_collection([query_path]))
    np.testing.assert_allclose(latent, model.get_latent_representation(query), atol=1e-5)


def test_collections_without_the_layer_or_as_csc_are_refused(tmp_path):
    reference, _, parts, _ = _files(tmp_path)
    with pytest.raises(
        ValueError, match=r"part1.h5ad has no layer 'raw' \(its layers: 'counts'\)"
    ):
        read_collection(parts, layer="raw")
    csc = reference.copy()
    csc.layers["counts"] = sp.csc_matrix(csc.layers["counts"])
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(
        ValueError, match=r"csc.h5ad stores layer 'counts' as csc_matrix; a collection reads"
    ):
        read_collection([parts[0], tmp_path / "csc.h5ad"])


def _scnym_on(reference):
    ScNym.setup_anndata(reference, labels_key="cell_type", unlabeled_category=None)
    model = ScNym(reference, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    return model


def test_a_collection_with_other_genes_is_read_with_the_models_genes_by_name(tmp_path):
    """Reordered genes give the in-memory prediction; missing genes read as zero counts,
    as for an AnnData (same warning, same prediction); a query of other genes is refused."""
    reference, query, _, _ = _files(tmp_path)
    model = _scnym_on(reference)
    query[:, ::-1].write_h5ad(tmp_path / "reversed.h5ad")
    reversed_collection = read_collection([tmp_path / "reversed.h5ad"])
    np.testing.assert_allclose(
        model.predict_proba(reversed_collection), model.predict_proba(query), atol=1e-6
    )
    assert list(reversed_collection.var_names) == list(query.var_names[::-1])  # untouched
    from_x = read_collection([tmp_path / "reversed.h5ad"], layer=None)  # the files' X
    np.testing.assert_allclose(model.predict_proba(from_x), model.predict_proba(query), atol=1e-6)
    fewer = query[:, 5:]
    fewer.write_h5ad(tmp_path / "fewer.h5ad")
    with pytest.warns(UserWarning, match="lacks 5 of the model's 60 genes"):
        expected = model.predict_proba(fewer)
    with pytest.warns(UserWarning, match="lacks 5 of the model's 60 genes"):
        observed = model.predict_proba(read_collection([tmp_path / "fewer.h5ad"]))
    np.testing.assert_allclose(observed, expected, atol=1e-6)
    query[:, :10].write_h5ad(tmp_path / "ten.h5ad")
    with pytest.raises(
        ValueError, match=r"The query shares only 10 of 60 reference genes \(16.7%"
    ):
        model.predict(read_collection([tmp_path / "ten.h5ad"]))


def test_collection_counts_match_the_files_for_any_row_order(tmp_path):
    """The collection's counts equal the concatenated files' counts (genes matched by name),
    whatever rows are asked and in whatever order."""
    reference, _, parts, _ = _files(tmp_path)
    counts = read_collection(parts).layers["counts"]
    expected = sp.csr_matrix(reference.layers["counts"])
    rows = np.random.default_rng(0).permutation(reference.n_obs)[:50]
    assert counts.shape == expected.shape
    assert (counts[rows] != expected[rows]).nnz == 0
    assert (counts[10:200] != expected[10:200]).nnz == 0
    assert (counts[7] != expected[7]).nnz == 0
    assert (counts.to_memory() != expected).nnz == 0
    with pytest.raises(IndexError, match="a collection's counts are indexed by cells only"):
        counts[:10, :5]


def test_read_collection_leaves_the_counts_on_disk(tmp_path):
    """Opening files holds their obs, var and row offsets in memory, not their counts
    (anndata's backed mode would load every layer)."""
    rng = np.random.default_rng(0)
    counts = sp.random(4000, 500, density=0.5, format="csr", dtype=np.float32, random_state=rng)
    counts.data = np.ceil(counts.data * 10)
    adata = ad.AnnData(X=None, layers={"counts": counts}, shape=counts.shape)
    adata.write_h5ad(tmp_path / "big.h5ad")
    stored = counts.data.nbytes + counts.indices.nbytes  # 8 MB
    tracemalloc.start()
    collection = read_collection([tmp_path / "big.h5ad"])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < stored / 8
    assert (collection.layers["counts"][:100] != counts[:100]).nnz == 0


def test_scvi_tools_own_collection_adapter_is_refused(tmp_path):
    from anndata.experimental import AnnCollection
    from scvi.dataloaders import CollectionAdapter

    _, _, parts, _ = _files(tmp_path)
    adapter = CollectionAdapter(AnnCollection([ad.read_h5ad(parts[0], backed="r")]))
    with pytest.raises(ValueError, match=r"open the files with scvi_ext.data.read_collection\("):
        ScNym.setup_anndata(adapter, labels_key="cell_type", layer="counts")


def test_closed_collections_are_refused_at_every_entry(tmp_path):
    reference, _, parts, query_path = _files(tmp_path)
    message = r"part1.h5ad was closed; open them again with scvi_ext.data.read_collection\("
    collection = read_collection(parts)
    ScNym.setup_anndata(
        collection, labels_key="cell_type", unlabeled_category=None, layer="counts"
    )
    model = ScNym(collection, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    collection.close()
    with pytest.raises(ValueError, match=message):
        model.predict()
    with pytest.raises(ValueError, match=message):
        model.train(max_epochs=1, enable_progress_bar=False)
    closed = read_collection(parts)
    closed.close()
    with pytest.raises(ValueError, match=message):
        ScNym.setup_anndata(closed, labels_key="cell_type", layer="counts")
    query = read_collection([query_path])
    query.close()
    with pytest.raises(ValueError, match=r"query.h5ad was closed"):
        _scnym_on(reference).predict(query)


def test_closed_backed_files_are_refused_at_every_entry(tmp_path):
    reference, query, _, query_path = _files(tmp_path)
    reference.write_h5ad(tmp_path / "reference.h5ad")
    backed = ad.read_h5ad(tmp_path / "reference.h5ad", backed="r")
    backed.file.close()
    message = "whose file was closed; reopen it with anndata.read_h5ad"
    with pytest.raises(ValueError, match=message):
        ScNym.setup_anndata(backed, labels_key="cell_type", unlabeled_category=None)
    backed = ad.read_h5ad(tmp_path / "reference.h5ad", backed="r")
    ScNym.setup_anndata(backed, labels_key="cell_type", unlabeled_category=None)
    model = ScNym(backed, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "model")
    backed.file.close()
    with pytest.raises(ValueError, match=message):
        model.predict()
    with pytest.raises(ValueError, match=message):
        model.train(max_epochs=1, enable_progress_bar=False)
    backed_query = ad.read_h5ad(query_path, backed="r")
    backed_query.file.close()
    with pytest.raises(ValueError, match=message):
        model.predict(backed_query)
    with pytest.raises(ValueError, match=message):
        ScNym.load(tmp_path / "model", adata=backed_query)


def _small_file(path, genes) -> None:
    counts = sp.csr_matrix(np.arange(3 * len(genes), dtype=np.float32).reshape(3, -1))
    adata = ad.AnnData(X=counts, layers={"counts": counts})
    adata.var_names = genes
    adata.write_h5ad(path)


def _closed(path) -> bool:
    """Whether no handle of this process holds ``path`` open (HDF5 refuses a second mode)."""
    try:
        h5py.File(path, "r+").close()
    except OSError:
        return False
    return True


def test_read_collection_refuses_one_path_no_paths_and_duplicated_genes(tmp_path):
    with pytest.raises(TypeError) as error:
        read_collection("f0.h5ad")
    assert str(error.value) == (
        "paths is one path ('f0.h5ad'); pass a list of paths, e.g. read_collection(['f0.h5ad'])."
    )
    with pytest.raises(TypeError, match=r"^paths is one path \("):
        read_collection(tmp_path / "f0.h5ad")
    with pytest.raises(ValueError) as error:
        read_collection([])
    assert str(error.value) == "paths is empty; pass a list of one or more h5ad paths."
    _small_file(tmp_path / "ok.h5ad", ["a", "b", "c"])
    _small_file(tmp_path / "dup.h5ad", ["a", "b", "a"])
    with pytest.raises(ValueError) as error:
        read_collection([tmp_path / "ok.h5ad", tmp_path / "dup.h5ad"])
    assert str(error.value) == (
        f"{tmp_path / 'dup.h5ad'} has duplicated gene names (e.g. ['a']); a collection "
        "matches genes by name. Make them unique in a copy (adata = anndata.read_h5ad(path); "
        "adata.var_names_make_unique(); adata.write_h5ad(new_path)) and read that."
    )
    assert _closed(tmp_path / "ok.h5ad") and _closed(tmp_path / "dup.h5ad")
    with pytest.raises(FileNotFoundError):  # not a ValueError: the first file is closed too
        read_collection([tmp_path / "ok.h5ad", tmp_path / "missing.h5ad"])
    assert _closed(tmp_path / "ok.h5ad")
