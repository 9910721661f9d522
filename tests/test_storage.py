"""Data on disk for every model: several h5ad files as one collection, closed and read-only files."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pytest
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


def test_collections_without_the_layer_or_with_other_genes_are_refused(tmp_path):
    reference, query, parts, query_path = _files(tmp_path)
    with pytest.raises(
        ValueError, match=r"part1.h5ad has no layer 'raw' \(its layers: 'counts'\)"
    ):
        read_collection(parts, layer="raw")
    collection = read_collection(parts)
    with pytest.raises(ValueError, match="An AnnCollection is read through a layer"):
        ScNym.setup_anndata(collection, labels_key="cell_type", unlabeled_category=None)
    ScNym.setup_anndata(reference, labels_key="cell_type", unlabeled_category=None)
    model = ScNym(reference, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    query[:, ::-1].write_h5ad(tmp_path / "reversed.h5ad")
    with pytest.raises(ValueError, match="not the model's 60 genes in the model's order"):
        model.predict(read_collection([tmp_path / "reversed.h5ad"]))


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
