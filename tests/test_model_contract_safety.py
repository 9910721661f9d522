"""Safety at the door, the same for every model (scvi_ext.base.InferenceMixin and friends)."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_ext.base import ClassifierModule, EmbeddingModule, InferenceModule
from scvi_ext.base._sampler import BlockAnnDataLoader
from scvi_ext.data import simulate
from scvi_ext.model import CAN, CELLULAR, CGRAN, LatentClassifier, ScNym

TRAIN = {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False}


def _data():
    adata = simulate(n_cells=360, n_genes=60, n_cell_types=3, n_batches=2, n_markers=10, seed=3)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    query = (adata.obs["condition"] == "query").to_numpy()
    return adata[~query].copy(), adata[query].copy()


def _scnym(reference):
    ScNym.setup_anndata(reference, labels_key="cell_type", unlabeled_category=None)
    return ScNym(reference, n_hidden=32)


def _cellular(reference):
    CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    return CELLULAR(reference, n_latent=8, n_hidden=(32, 16))


def _latent_classifier(reference):
    upstream = _cellular(reference.copy())
    upstream.train(**TRAIN)
    return LatentClassifier.from_model(upstream, reference, n_hidden1=16, n_hidden2=16)


def _can(reference):
    CAN.setup_anndata(reference, labels_key="cell_type")
    return CAN(reference, n_capsules=6, capsule_dim=16, attention_dim=8, kernel_size=3)


def _cgran(reference):
    CGRAN.setup_anndata(reference, labels_key="cell_type")
    return CGRAN(reference, n_embedding=16, n_heads=4, head_dims=(8, 4), group_size=25)


BUILDERS = {
    "scnym": _scnym,
    "cellular": _cellular,
    "latent_classifier": _latent_classifier,
    "can": _can,
    "cgran": _cgran,
}
#: The papers' learning rate (1e-4) needs their 50-75 epochs; these tests train for 2 to 10.
TEST_PLAN_KWARGS = {"can": {"lr": 1e-2}, "cgran": {"lr": 1e-2}}


def _train_settings(name: str, **settings) -> dict:
    """``TRAIN`` updated with ``settings``, and the model's test ``plan_kwargs``."""
    return {**TRAIN, **settings, "plan_kwargs": TEST_PLAN_KWARGS.get(name)}


MODEL_CLASSES = {
    "scnym": ScNym,
    "cellular": CELLULAR,
    "latent_classifier": LatentClassifier,
    "can": CAN,
    "cgran": CGRAN,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def trained(request, tmp_path_factory):
    """(name, trained model, reference, query, save folder) for each model."""
    reference, query = _data()
    model = BUILDERS[request.param](reference)
    model.train(**_train_settings(request.param))
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save(folder)
    return request.param, model, reference, query, folder


def test_modules_satisfy_the_protocols_of_their_capabilities(trained):
    _, model, *_ = trained
    assert isinstance(model.module, InferenceModule)
    assert isinstance(model.module, EmbeddingModule)
    assert isinstance(model.module, ClassifierModule)


def test_genes_are_matched_by_name_in_predict_and_load(trained):
    name, model, _, query, folder = trained
    expected = model.predict_proba(query)
    reversed_genes = query[:, ::-1].copy()
    np.testing.assert_allclose(model.predict_proba(reversed_genes), expected, atol=1e-6)
    if name != "latent_classifier":  # it reads the upstream embedding, not genes
        loaded = MODEL_CLASSES[name].load(folder, adata=reversed_genes)
        np.testing.assert_allclose(loaded.predict_proba(), expected, atol=1e-6)
        assert reversed_genes.var_names[0] == query.var_names[-1]  # the user's copy untouched


def test_other_gene_names_are_refused_with_the_alignment_report(trained):
    _, model, _, query, _ = trained
    renamed = query.copy()
    renamed.var_names = [f"other_{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="shares only 0 of 60 reference genes"):
        model.predict(renamed)


@pytest.mark.parametrize(
    ("transform", "message"),
    [(np.log1p, "non-integer values"), (lambda x: -x, "negative values")],
)
def test_query_counts_are_validated_at_predict_and_annotate(trained, transform, message):
    _, model, _, query, _ = trained
    bad = query.copy()
    bad.X = sp.csr_matrix(transform(np.asarray(sp.csr_matrix(bad.X).todense())))
    with pytest.raises(ValueError, match=message):
        model.predict(bad)
    with pytest.raises(ValueError, match=message):
        model.annotate(bad)


@pytest.mark.parametrize("edit", ["in_place", "replaced"])
def test_counts_normalised_after_setup_are_refused_by_predict_and_train(trained, edit):
    """scanpy normalises in place after the model was set up: the next predict and train
    read non-integer minibatches and stop, naming the matrix and what to do."""
    name, model, reference, _, _ = trained
    if name == "latent_classifier":
        pytest.skip("it reads the upstream model's embedding, not counts")
    assert model.adata is reference
    counts = reference.X
    if edit == "in_place":  # as sc.pp.log1p does to a sparse matrix
        raw_values = counts.data.copy()
        counts.data[:] = np.log1p(counts.data)
    else:
        reference.X = sp.csr_matrix(np.log1p(counts.toarray()))
    message = (
        r"adata\.X contains non-integer values; found \d+\. .* It held raw counts when setup "
        "checked it"
    )
    try:
        with pytest.raises(ValueError, match=message):
            model.predict()
        with pytest.raises(ValueError, match=message):
            model.train(**_train_settings(name, max_epochs=1))
    finally:  # the fixture's reference stays raw counts for the other tests
        if edit == "in_place":
            counts.data[:] = raw_values
        reference.X = counts


def test_annotate_writes_only_its_documented_keys(trained):
    _, model, _, query, _ = trained
    query = query.copy()  # the fixture's query stays as it was for the other tests
    before = query.copy()
    model.annotate(query, key_added="m")
    assert set(query.obs) - set(before.obs) == {"m_prediction", "m_confidence", "m_novelty"}
    assert set(query.obsm) - set(before.obsm) == {"X_m"}
    pd.testing.assert_frame_equal(query.obs[list(before.obs)], before.obs)
    pd.testing.assert_frame_equal(query.var, before.var)
    assert (query.X != before.X).nnz == 0
    assert query.uns.keys() == before.uns.keys()
    assert query.layers.keys() == before.layers.keys()


def test_a_model_loaded_without_data_stays_without_data(trained):
    name, model, _, query, folder = trained
    loaded = MODEL_CLASSES[name].load(folder, adata=False)
    np.testing.assert_allclose(loaded.predict_proba(query), model.predict_proba(query), atol=1e-6)
    assert loaded.adata is None
    with pytest.raises(ValueError, match="loaded without data"):
        loaded.predict()


def test_a_damaged_model_file_is_named(trained, tmp_path):
    name, model, *_ = trained
    folder = tmp_path / "damaged"
    model.save(folder)
    (folder / "model.pt").write_bytes(b"not a model")
    message = (
        f"Could not read the saved {MODEL_CLASSES[name].__name__} in "
        rf"{re.escape(str(folder / 'model.pt'))} \(.+\)\. The file is missing, damaged or "
        r"not a scvi-tools model; save the model again\."
    )
    with pytest.raises(ValueError, match=message):
        MODEL_CLASSES[name].load(folder, adata=False)


def test_the_temperature_keeps_the_predicted_class_and_is_saved(trained, tmp_path):
    name, model, reference, *_ = trained
    fitted = model.calibration_temperature
    try:
        model.calibration_temperature_ = 2.5
        softened = model.predict_proba()
        raw = model.predict_proba(calibrated=False)
        np.testing.assert_array_equal(softened.argmax(axis=1), raw.argmax(axis=1))
        assert softened.max(axis=1).mean() < raw.max(axis=1).mean()
        model.save(tmp_path / "softened")
        loaded = MODEL_CLASSES[name].load(tmp_path / "softened", adata=False)
        assert loaded.calibration_temperature == 2.5
    finally:
        model.calibration_temperature_ = fitted


def test_calibration_is_skipped_when_every_validation_cell_is_right(trained):
    _, model, reference, *_ = trained
    right = np.flatnonzero(model.predict(reference) == reference.obs["cell_type"].to_numpy())
    before = model.calibration_temperature
    assert model.calibrate(indices=right) == before


@pytest.mark.parametrize("name", list(BUILDERS))
def test_untrained_models_refuse_to_predict_and_train_checks_its_arguments(name):
    reference, query = _data()
    model = BUILDERS[name](reference)
    with pytest.raises(RuntimeError, match="is not trained; call model.train"):
        model.predict(query)
    with pytest.raises(ValueError, match="max_epochs must be at least 1"):
        model.train(max_epochs=0)
    assert not model.is_trained_
    with pytest.raises(ValueError, match=r"Unknown plan_kwargs \['lrr'\].*valid keys: .*'lr'"):
        model.train(max_epochs=1, plan_kwargs={"lrr": 0.1})


@pytest.mark.parametrize("name", ["scnym", "cellular"])
def test_editing_the_registered_genes_is_a_clear_error(name):
    reference, _ = _data()
    model = BUILDERS[name](reference)
    model.train(**TRAIN)
    reference._inplace_subset_var(np.arange(40))
    with pytest.raises(ValueError, match="changed after setup: it has 40 genes, the model 60"):
        model.predict()
    with pytest.raises(ValueError, match="changed after setup"):
        model.train(**TRAIN)


def test_setup_refuses_an_absent_unlabeled_category_and_integer_labels():
    reference, _ = _data()
    with pytest.raises(ValueError, match="unlabeled_category 'unknown' is not a value"):
        ScNym.setup_anndata(reference, labels_key="cell_type", unlabeled_category="unknown")
    coded = reference.copy()
    coded.obs["code"] = coded.obs["cell_type"].astype("category").cat.codes
    with pytest.raises(ValueError, match="holds int8 values, not cell type names"):
        CELLULAR.setup_anndata(coded, labels_key="code")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_training_and_prediction_on_backed_anndata(name, tmp_path):
    """Training reads a backed reference in shuffled blocks of rows (not single cells, nor
    the whole matrix at once); prediction reads a backed query."""
    reference, query = _data()
    reference.write_h5ad(tmp_path / "reference.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "reference.h5ad", backed="r")
    backed_query = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    train = _train_settings(name, max_epochs=10, batch_size=32)
    if name == "latent_classifier":
        upstream = _cellular(backed)
        upstream.train(**train)
        model = LatentClassifier.from_model(upstream, n_hidden1=16, n_hidden2=16)
    else:
        model = upstream = BUILDERS[name](backed)
    model.train(**train)
    # the model that read the genes from disk (the classifier reads its embedding)
    loader = upstream.trainer.train_dataloader
    loaders = [side for side in getattr(loader, "loaders", {"": loader}).values() if side]
    assert loaders and all(isinstance(side, BlockAnnDataLoader) for side in loaders)
    accuracy = (model.predict(backed_query) == query.obs["cell_type"].to_numpy()).mean()
    assert accuracy > 0.6  # 3 cell types: chance is 1/3
    backed.file.close()
    backed_query.file.close()


def test_missing_genes_read_as_zeros_with_a_warning_and_duplicates_are_refused(trained):
    _, model, _, query, _ = trained
    fewer = query[:, 10:].copy()  # 50 of the model's 60 genes: the first 10 are missing
    with pytest.warns(UserWarning, match="lacks 10 of the model's 60 genes"):
        observed = model.predict_proba(fewer)
    counts = query.X.toarray()
    counts[:, :10] = 0
    zeroed = query.copy()
    zeroed.X = sp.csr_matrix(counts)
    np.testing.assert_allclose(observed, model.predict_proba(zeroed), atol=1e-6)
    duplicated = query.copy()
    duplicated.var_names = [duplicated.var_names[0]] + list(duplicated.var_names[:-1])
    with pytest.raises(ValueError, match="duplicated gene names"):
        model.predict(duplicated)


def test_a_model_without_data_cannot_train_or_calibrate(trained):
    name, _, _, _, folder = trained
    loaded = MODEL_CLASSES[name].load(folder, adata=False)
    with pytest.raises(ValueError, match="has no data to train on"):
        loaded.train(**TRAIN)
    with pytest.raises(ValueError, match="calibrate reads labelled cells"):
        loaded.calibrate()


def test_a_model_saved_with_other_weights_says_so(tmp_path):
    import torch

    reference, _ = _data()
    model = _scnym(reference)
    model.train(**TRAIN)
    model.save(tmp_path / "model")
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=False)
    saved["attr_dict"]["init_params_"]["non_kwargs"]["n_hidden"] = 16  # not the saved 32
    torch.save(saved, tmp_path / "model" / "model.pt")
    with pytest.raises(ValueError, match="does not fit this version of ScNym"):
        ScNym.load(tmp_path / "model", adata=False)
