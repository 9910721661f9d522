"""LatentClassifier on CELLULAR, scVI, scANVI and PCA inputs: training, query, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scvi
import torch
import torch.nn.functional as F
from conftest import (
    assert_balanced_classes_weight_the_loss_refitted_per_train,
    inverse_frequency_weights,
)
from scvi import REGISTRY_KEYS

from scvi_ext.base import class_weights, labelled_cross_entropy
from scvi_ext.cellular import CELLULAR
from scvi_ext.classifier import (
    NOVELTY_METHODS,
    LatentClassifier,
    LatentClassifierModule,
    NovelTypeReport,
)
from scvi_ext.data import datasets_available, simulate
from scvi_ext.metrics import novelty_auroc

TRAIN = {"enable_progress_bar": False, "enable_model_summary": False}
FAST_PLAN = {"plan_kwargs": {"warmup_epochs": 0}}


@pytest.fixture(scope="module")
def data():
    adata = simulate(n_cells=500, n_genes=120, n_cell_types=4, n_batches=3, seed=2)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    rng = np.random.default_rng(0)
    is_query = rng.random(adata.n_obs) < 0.3
    return adata[~is_query].copy(), adata[is_query].copy()


@pytest.fixture(scope="module")
def cellular(data):
    reference, _ = data
    scvi.settings.seed = 0
    reference = reference.copy()
    CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(reference, n_latent=8, n_hidden=(32, 16))
    model.train(max_epochs=6, batch_size=64, **TRAIN)
    return model


@pytest.fixture(scope="module")
def classifier(cellular):
    scvi.settings.seed = 0
    clf = LatentClassifier.from_model(cellular, n_hidden1=32, n_hidden2=32)
    clf.train(max_epochs=15, batch_size=64, **FAST_PLAN, **TRAIN)
    return clf


def accuracy(predictions, adata):
    return float((np.asarray(predictions) == adata.obs["cell_type"].to_numpy()).mean())


def test_from_cellular_predicts_query_counts(classifier, cellular, data):
    _, query = data
    before = query.obs.copy()
    assert accuracy(classifier.predict(query), query) > 0.6
    assert query.obs.equals(before) and not query.obsm, "the query must not be modified"
    soft = classifier.predict(query, soft=True)
    assert isinstance(soft, pd.DataFrame)
    assert list(soft.columns) == sorted(data[0].obs["cell_type"].unique())
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        classifier.get_latent_representation(query),
        cellular.get_latent_representation(query),
        atol=1e-6,
    )


def test_upstream_stays_frozen(cellular, data):
    before = {k: v.clone() for k, v in cellular.module.state_dict().items()}
    clf = LatentClassifier.from_model(cellular, n_hidden1=16, n_hidden2=16)
    clf.train(max_epochs=2, **TRAIN)
    for key, value in cellular.module.state_dict().items():
        assert (value == before[key]).all(), key


def test_save_load_keeps_upstream(classifier, data, tmp_path):
    _, query = data
    classifier.save(tmp_path / "clf")
    assert (tmp_path / "clf" / "upstream" / "model.pt").exists()
    loaded = LatentClassifier.load(tmp_path / "clf")
    assert isinstance(loaded.upstream_model, CELLULAR)
    np.testing.assert_array_equal(loaded.predict_proba(query), classifier.predict_proba(query))
    for method in ("centroid_distance", "neighbour_distance"):
        np.testing.assert_array_equal(
            loaded.novelty_score(query, method=method),
            classifier.novelty_score(query, method=method),
        )
    with pytest.raises(ValueError, match="pass reference=<the training AnnData>"):
        loaded.novelty_score(query)
    np.testing.assert_array_equal(
        loaded.novelty_score(query, reference=data[0]), classifier.novelty_score(query)
    )
    with_data = LatentClassifier.load(tmp_path / "clf", adata=query)
    np.testing.assert_array_equal(with_data.predict(), classifier.predict(query))


def test_novelty(classifier, data):
    _, query = data
    for method in NOVELTY_METHODS:
        score = classifier.novelty_score(query, method=method)
        assert score.shape == (query.n_obs,) and np.isfinite(score).all()
    assert LatentClassifier.default_novelty_method == "query_neighbours"
    np.testing.assert_array_equal(
        classifier.novelty_score(query), classifier.novelty_score(query, method="query_neighbours")
    )
    with pytest.raises(ValueError, match="pass them as adata="):
        classifier.novelty_score(method="query_neighbours")
    threshold = float(np.median(classifier.novelty_score(query)))
    flagged = classifier.predict(query, novelty_threshold=threshold) == "Unknown"
    np.testing.assert_array_equal(flagged, classifier.novelty_score(query) > threshold)
    with pytest.raises(ValueError, match="method"):
        classifier.novelty_score(query, method="magic")
    report = classifier.detect_novel(query, threshold=0.25)
    assert isinstance(report, NovelTypeReport)
    assert report.novel_detected == (report.min_likelihood < 0.25)
    assert report.cell_flags.sum() == (report.likelihood < 0.25).sum()
    assert list(report.cell_flags.index) == list(query.obs_names)
    assert 0.0 <= report.min_likelihood <= 1.0


def test_scvi_and_scanvi_upstream(data, tmp_path):
    reference, query = data
    reference = reference.copy()
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(reference, batch_key="batch", labels_key="cell_type")
    vae = scvi.model.SCVI(reference, n_latent=6, n_hidden=32)
    vae.train(max_epochs=8, **TRAIN)
    scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    scanvi.train(max_epochs=2, **TRAIN)
    for upstream in (vae, scanvi):
        clf = LatentClassifier.from_model(upstream, n_hidden1=32, n_hidden2=32)
        clf.train(max_epochs=10, batch_size=32, **FAST_PLAN, **TRAIN)
        proba = clf.predict_proba(query)
        assert proba.shape == (query.n_obs, 4)
        path = tmp_path / type(upstream).__name__
        clf.save(path)
        loaded = LatentClassifier.load(path)
        assert type(loaded.upstream_model) is type(upstream)
        np.testing.assert_allclose(loaded.predict_proba(query), proba, atol=1e-5)


def test_pca_and_layer_inputs(data):
    reference, query = data
    pca = reference.copy()
    sc.pp.normalize_total(pca)
    sc.pp.log1p(pca)
    pca.layers["log"] = pca.X.copy()
    sc.pp.pca(pca, n_comps=10)
    LatentClassifier.setup_anndata(pca, labels_key="cell_type", obsm_key="X_pca")
    clf = LatentClassifier(pca, n_hidden1=32, n_hidden2=32)
    clf.train(max_epochs=10, batch_size=32, **FAST_PLAN, **TRAIN)
    assert accuracy(clf.predict(), reference) > 0.5
    untrained = LatentClassifier(pca, n_hidden1=8, n_hidden2=8)
    with pytest.raises(
        RuntimeError, match="This LatentClassifier is not trained; call model.train"
    ):
        untrained.novelty_score(method="query_neighbours")
    score = clf.novelty_score(method="query_neighbours")  # against the kept training cells
    assert ((score >= 0) & (score <= 1)).all() and 0.3 < score.mean() < 0.7
    with pytest.raises(ValueError, match="reference= is for a classifier with an upstream"):
        clf.novelty_score(method="query_neighbours", reference=pca)
    broken = pca.copy()
    broken.obsm["X_pca"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"adata.obsm\['X_pca'\] has NaN or infinite values"):
        clf.predict(broken)
    LatentClassifier.setup_anndata(pca, labels_key="cell_type", layer="log")
    clf = LatentClassifier(pca, n_hidden1=32, n_hidden2=32)
    clf.train(max_epochs=10, batch_size=32, **FAST_PLAN, **TRAIN)
    assert accuracy(clf.predict(), reference) > 0.5
    broken = pca[:, ::-1].copy()  # genes in another order: matched by name
    np.testing.assert_allclose(clf.predict_proba(broken), clf.predict_proba(pca), atol=1e-6)
    broken.layers["log"][0, 0] = np.inf
    with pytest.raises(ValueError, match="the representation of adata has NaN or infinite"):
        clf.predict(broken)


def test_a_representation_in_a_dataframe_is_matched_by_column_name(cellular, data):
    reference, query = data
    named = reference.copy()
    columns = [f"dim_{i}" for i in range(8)]
    named.obsm["X_emb"] = pd.DataFrame(
        cellular.get_latent_representation(reference), index=named.obs_names, columns=columns
    )
    LatentClassifier.setup_anndata(named, labels_key="cell_type", obsm_key="X_emb")
    clf = LatentClassifier(named, n_hidden1=16, n_hidden2=16)
    clf.train(max_epochs=1, **TRAIN)
    latent = cellular.get_latent_representation(query)
    as_array = query.copy()
    as_array.obsm["X_emb"] = latent
    expected = clf.predict_proba(as_array)
    shuffled = query.copy()
    shuffled.obsm["X_emb"] = pd.DataFrame(latent, index=query.obs_names, columns=columns)
    shuffled.obsm["X_emb"] = shuffled.obsm["X_emb"][columns[::-1]]
    np.testing.assert_array_equal(clf.predict_proba(shuffled), expected)
    shuffled.obsm["X_emb"].columns = [f"pc_{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"has columns \['pc_0'.*trained on \['dim_0'"):
        clf.predict(shuffled)
    narrow = query.copy()
    narrow.obsm["X_emb"] = latent[:, :5]
    with pytest.raises(ValueError, match=r"adata.obsm\['X_emb'\] has 5 columns, the classifier"):
        clf.predict(narrow)


def test_a_dataframe_representation_for_a_classifier_trained_on_an_array(cellular, data):
    reference, query = data
    emb = reference.copy()
    emb.obsm["X_emb"] = cellular.get_latent_representation(reference)
    LatentClassifier.setup_anndata(emb, labels_key="cell_type", obsm_key="X_emb")
    clf = LatentClassifier(emb, n_hidden1=16, n_hidden2=16)
    clf.train(max_epochs=1, **TRAIN)
    as_array = query.copy()
    as_array.obsm["X_emb"] = cellular.get_latent_representation(query)
    as_frame = query.copy()
    as_frame.obsm["X_emb"] = pd.DataFrame(as_array.obsm["X_emb"], index=query.obs_names)
    np.testing.assert_array_equal(clf.predict_proba(as_frame), clf.predict_proba(as_array))
    with pytest.raises(
        ValueError, match="batch_size=1 is too small for LatentClassifier: its BatchNorm"
    ):
        clf.train(max_epochs=1, batch_size=1, **TRAIN)


def test_overwriting_a_saved_classifier_drops_its_upstream_model(classifier, data, tmp_path):
    """A classifier on a representation saved over one with an upstream model must not load
    with that upstream model, which would embed the cells in place of their representation."""
    reference, query = data
    classifier.save(tmp_path / "clf")
    pca = reference.copy()
    pca.obsm["X_pca"] = np.asarray(sc.pp.pca(np.log1p(pca.X.toarray()), n_comps=8))
    LatentClassifier.setup_anndata(pca, labels_key="cell_type", obsm_key="X_pca")
    on_pca = LatentClassifier(pca, n_hidden1=16, n_hidden2=16)
    on_pca.train(max_epochs=1, **TRAIN)
    on_pca.save(tmp_path / "clf", overwrite=True)
    assert not (tmp_path / "clf" / "upstream").exists()
    loaded = LatentClassifier.load(tmp_path / "clf")
    assert loaded.upstream_model is None
    query = query.copy()
    query.obsm["X_pca"] = np.random.default_rng(0).normal(size=(query.n_obs, 8))
    np.testing.assert_array_equal(loaded.predict_proba(query), on_pca.predict_proba(query))


def test_query_neighbours_flags_a_type_left_out_of_training(data):
    reference, query = data
    left_out = sorted(reference.obs["cell_type"].unique())[0]
    known = reference[reference.obs["cell_type"] != left_out].copy()
    scvi.settings.seed = 0
    CELLULAR.setup_anndata(known, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(known, n_latent=8, n_hidden=(32, 16))
    model.train(max_epochs=6, batch_size=64, **TRAIN)
    clf = LatentClassifier.from_model(model, n_hidden1=32, n_hidden2=32)
    clf.train(max_epochs=10, batch_size=64, **FAST_PLAN, **TRAIN)
    is_novel = (query.obs["cell_type"] == left_out).to_numpy()
    score = clf.novelty_score(query)
    assert novelty_auroc(is_novel, score) > 0.9
    assert score[is_novel].mean() > score[~is_novel].mean() + 0.2
    with pytest.raises(ValueError, match="adata lacks 1 of the 120 genes"):
        clf.novelty_score(query[:, 1:])
    no_layer = query.copy()
    no_layer.layers["counts"] = no_layer.X.copy()
    reference_in_layer = known.copy()
    reference_in_layer.layers["counts"] = reference_in_layer.X.copy()
    CELLULAR.setup_anndata(reference_in_layer, labels_key="cell_type", layer="counts")
    layered = CELLULAR(reference_in_layer, n_latent=8, n_hidden=(32, 16))
    layered.train(max_epochs=1, batch_size=64, **TRAIN)
    layered_clf = LatentClassifier.from_model(layered, n_hidden1=16, n_hidden2=16)
    layered_clf.train(max_epochs=1, **TRAIN)
    assert layered_clf.novelty_score(no_layer).shape == (query.n_obs,)
    del no_layer.layers["counts"]
    with pytest.raises(ValueError, match="adata has no layer 'counts'"):
        layered_clf.novelty_score(no_layer)


def test_bad_inputs(data):
    reference, _ = data
    adata = reference.copy()
    with pytest.raises(ValueError, match="obsm_key 'X_nope'"):
        LatentClassifier.setup_anndata(adata, labels_key="cell_type", obsm_key="X_nope")
    adata.obsm["X_bad"] = np.full((adata.n_obs, 3), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        LatentClassifier.setup_anndata(adata, labels_key="cell_type", obsm_key="X_bad")
    adata.obsm["X_ok"] = np.zeros((adata.n_obs, 3))
    with pytest.raises(ValueError, match="labels_key 'celltype'"):
        LatentClassifier.setup_anndata(adata, labels_key="celltype", obsm_key="X_ok")
    with pytest.raises(ValueError, match="either"):
        LatentClassifier.setup_anndata(adata, labels_key="cell_type", obsm_key="X_ok", layer="x")


def test_seeded_determinism(cellular):
    outputs = []
    for _ in range(2):
        scvi.settings.seed = 5
        clf = LatentClassifier.from_model(cellular, n_hidden1=16, n_hidden2=16)
        clf.train(max_epochs=2, **TRAIN)
        outputs.append(clf.predict_proba())
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_adam_eps_is_pytorchs_by_default_and_plan_kwargs_override_it(cellular):
    def trained_eps(**train):
        clf = LatentClassifier.from_model(cellular, n_hidden1=16, n_hidden2=16)
        clf.train(max_epochs=1, **train, **TRAIN)
        optimizer = clf.trainer.optimizers[0]
        assert isinstance(optimizer, torch.optim.Adam)
        return optimizer.param_groups[0]["eps"]

    assert trained_eps() == 1e-8  # the reference code's Adam, not scvi's 0.01
    assert trained_eps(plan_kwargs={"eps": 0.01}) == 0.01


def test_tune(cellular):
    clf = LatentClassifier.from_model(cellular, n_hidden1=16, n_hidden2=16)
    study = clf.tune(n_trials=2, max_epochs=2, hidden_choices=(16, 32))
    assert len(study.trials) == 2
    assert set(clf.tuned_params_) == {"n_hidden1", "n_hidden2", "dropout_rate", "lr"}
    assert clf.module.network[1].out_features == clf.tuned_params_["n_hidden1"]
    assert clf.is_trained_


@pytest.mark.parametrize("balance", [True, "sqrt"])
def test_balanced_classes_weight_the_loss_by_inverse_type_frequency(data, balance):
    reference, _ = data  # LatentClassifier has no query mapping: a query trains its own
    assert_balanced_classes_weight_the_loss_refitted_per_train(
        LatentClassifier, reference.copy(), None, {"n_hidden1": 16, "n_hidden2": 16}, balance
    )
    adata = reference.copy()
    LatentClassifier.setup_anndata(adata, labels_key="cell_type")
    with pytest.raises(
        ValueError, match="balance_classes must be True, False or 'sqrt', not 'yes'"
    ):
        LatentClassifier(adata, balance_classes="yes")


def test_tune_keeps_the_class_balanced_loss_and_refits_it_on_the_rebuilt_module(cellular):
    clf = LatentClassifier.from_model(cellular, n_hidden1=16, n_hidden2=16, balance_classes=True)
    clf.tune(n_trials=1, max_epochs=1, hidden_choices=(16,))
    assert clf.module.balance_classes  # the module tune rebuilt, its weights fitted anew
    expected = inverse_frequency_weights(cellular.adata.obs["cell_type"], clf.label_names)
    np.testing.assert_allclose(clf.module.label_weights.numpy(), expected, rtol=1e-6)


@pytest.mark.skipif(not datasets_available(), reason="shared datasets absent")
def test_kang_ifnb_control_to_stimulated():
    from scvi_ext.data import load_dataset, select_genes

    adata = load_dataset("kang_ifnb")
    reference = adata[adata.obs["condition"] == "control"].copy()
    query = adata[adata.obs["condition"] == "stimulated"].copy()
    reference = select_genes(reference, method="cellular")
    query = query[:, reference.var_names].copy()
    scvi.settings.seed = 0
    CELLULAR.setup_anndata(reference, labels_key="cell_type")
    model = CELLULAR(reference, n_latent=32, n_hidden=(256, 128))
    model.train(max_epochs=8, **TRAIN)
    clf = LatentClassifier.from_model(model, n_hidden1=128, n_hidden2=128)
    clf.train(max_epochs=20, **FAST_PLAN, **TRAIN)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    acc = float((clf.predict(query) == truth).mean())
    majority = pd.Series(truth).value_counts(normalize=True).iloc[0]
    assert acc > max(0.6, majority + 0.1)


def test_neighbour_distance_is_the_kth_nearest_cosine_distance():
    module = LatentClassifierModule(n_input=2, n_labels=2)
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5])
    module.reference_cells[:4] = torch.stack([angles.cos(), angles.sin()], dim=1)
    module.n_reference_cells.fill_(4)
    x = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    distance = module.neighbour_distance({REGISTRY_KEYS.X_KEY: x}, k=2)
    expected = torch.tensor([1 - np.cos(0.1), 1 - np.cos(np.pi / 2 + 0.1)], dtype=torch.float32)
    torch.testing.assert_close(distance, expected)
    module.n_reference_cells.fill_(0)
    with pytest.raises(RuntimeError, match="train the classifier first"):
        module.neighbour_distance({REGISTRY_KEYS.X_KEY: x})


def test_labelled_cross_entropy_averages_over_labelled_cells_only():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 3, 2, 3, 1, 1])  # code 3 = the unlabeled category
    labelled = labels < 3
    expected = F.cross_entropy(logits[labelled], labels[labelled])
    torch.testing.assert_close(labelled_cross_entropy(logits, labels, 3), expected)
    none = labelled_cross_entropy(logits, torch.full((6,), 3), 3)
    assert float(none) == 0.0
    none.backward()  # still part of the graph


def test_class_weighted_cross_entropy_is_torchs_weighted_mean_over_labelled_cells():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 3, 2, 3, 1, 1])
    weights = class_weights(labels.numpy(), 3)  # 1 cell of types 0 and 2, 2 of type 1
    torch.testing.assert_close(weights, torch.tensor([0.4, 0.2, 0.4]))
    root = torch.tensor([1, 2**-0.5, 1]) / (2 + 2**-0.5)  # N_i^-1/2, normalised
    torch.testing.assert_close(class_weights(labels.numpy(), 3, power=0.5), root)
    labelled = labels < 3
    expected = F.cross_entropy(logits[labelled], labels[labelled], weight=weights)
    torch.testing.assert_close(labelled_cross_entropy(logits, labels, 3, weights), expected)
    equal = labelled_cross_entropy(logits, labels, 3, torch.ones(3))
    torch.testing.assert_close(equal, labelled_cross_entropy(logits, labels, 3))
    assert float(labelled_cross_entropy(logits, torch.full((6,), 3), 3, weights)) == 0.0
