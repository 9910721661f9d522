"""ScNym: the scvi-tools contract, MixMatch/adversary behaviour, query mapping, bad inputs."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
import torch.nn.functional as F
from conftest import query_mask, requires_shared_data
from scvi import REGISTRY_KEYS

from scvi_ext.base import LABELLED, UNLABELED
from scvi_ext.model import ScNym
from scvi_ext.scnym import DOMAIN_KEY, ScNymModule, ScNymTrainingPlan, sharpen

FAST = {"max_epochs": 10, "batch_size": 64, "enable_progress_bar": False}


def trained(adata, **setup):
    unlabeled = "Unknown" if (adata.obs["labels"] == "Unknown").any() else None
    ScNym.setup_anndata(adata, labels_key="labels", unlabeled_category=unlabeled, **setup)
    model = ScNym(adata, n_hidden=32)
    model.train(**FAST)
    return model


def snapshot(adata) -> dict:
    """What a user owns: counts, layers, var, obs columns, uns keys (scvi's _scvi_* aside)."""
    user_obs = [c for c in adata.obs.columns if not c.startswith("_scvi")]
    return {
        "X": adata.X.copy(),
        "layers": {key: value.copy() for key, value in adata.layers.items()},
        "var": adata.var.copy(),
        "obs": adata.obs[user_obs].copy(),
        "uns": [key for key in adata.uns if not key.startswith("_scvi")],
    }


def test_accuracy_well_above_chance_on_simulated_shift(sim_adata):
    model = trained(sim_adata)
    query = query_mask(sim_adata)
    predictions = model.predict()
    truth = sim_adata.obs["cell_type"].astype(str).to_numpy()
    assert (predictions[query] == truth[query]).mean() > 0.7  # chance: 0.25


def test_soft_predictions_have_scanvi_layout(sim_adata):
    model = trained(sim_adata)
    soft = model.predict(soft=True)
    assert sorted(soft.columns) == ["type_0", "type_1", "type_2", "type_3"]
    assert list(soft.columns) == list(model.label_names)
    assert soft.index.equals(sim_adata.obs_names)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(model.predict(), soft.idxmax(axis=1).to_numpy())
    np.testing.assert_allclose(model.predict_confidence(), soft.max(axis=1), rtol=1e-6)
    assert model.get_latent_representation().shape == (sim_adata.n_obs, 32)


def test_save_load_gives_identical_predictions(sim_adata, tmp_path):
    model = trained(sim_adata)
    model.save(tmp_path / "model")
    loaded = ScNym.load(tmp_path / "model", adata=sim_adata)
    pd.testing.assert_frame_equal(model.predict(soft=True), loaded.predict(soft=True))
    with pytest.raises(ValueError, match="already exists"):
        model.save(tmp_path / "model")
    model.save(tmp_path / "model", overwrite=True)


def test_load_without_adata_then_predict_new_data(sim_adata, tmp_path):
    model = trained(sim_adata)
    model.save(tmp_path / "model")
    loaded = ScNym.load(tmp_path / "model", adata=False)
    new = sim_adata.copy()
    del new.obs["labels"]  # new data need no labels column
    obs_before, uns_before = new.obs.copy(), dict(new.uns)
    np.testing.assert_array_equal(loaded.predict(new), model.predict())
    pd.testing.assert_frame_equal(new.obs, obs_before)
    assert dict(new.uns).keys() == uns_before.keys()


def test_two_seeded_runs_are_identical(sim_adata):
    scvi.settings.seed = 3
    first = trained(sim_adata.copy()).predict(soft=True)
    scvi.settings.seed = 3
    second = trained(sim_adata.copy()).predict(soft=True)
    pd.testing.assert_frame_equal(first, second)


def test_user_anndata_untouched_beyond_documented_keys(sim_adata):
    sim_adata.layers["raw"] = sim_adata.X.copy()
    before = snapshot(sim_adata)
    model = trained(sim_adata)
    model.predict()
    model.annotate(key_added="scnym")
    after = snapshot(sim_adata)
    assert list(after["obs"].columns) == list(before["obs"].columns) + [
        "scnym_prediction",
        "scnym_confidence",
        "scnym_novelty",
    ]
    assert (before["X"] != sim_adata.X).nnz == 0
    assert list(after["layers"]) == list(before["layers"]) == ["raw"]
    assert (before["layers"]["raw"] != sim_adata.layers["raw"]).nnz == 0
    pd.testing.assert_frame_equal(before["var"], sim_adata.var)
    pd.testing.assert_frame_equal(before["obs"], sim_adata.obs[before["obs"].columns])
    assert after["uns"] == before["uns"] == ["simulation"]
    assert set(sim_adata.uns) - set(before["uns"]) == {"_scvi_manager_uuid", "_scvi_uuid"}
    assert list(sim_adata.obsm) == ["X_scnym"]


def test_second_train_runs_in_train_mode(sim_adata):
    model = trained(sim_adata)
    assert not model.module.training  # scvi leaves the module in eval mode
    modes = []
    original = model.module.classify_normalized

    def spy(*args, **kwargs):
        modes.append(model.module.training)
        return original(*args, **kwargs)

    model.module.classify_normalized = spy
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert any(modes), "the second train() never ran a step in train mode"


def test_the_weights_of_the_best_validation_epoch_are_kept(sim_adata):
    ScNym.setup_anndata(sim_adata, labels_key="labels", unlabeled_category="Unknown")
    model = ScNym(sim_adata, n_hidden=32)
    model.train(**{**FAST, "max_epochs": 20})
    losses = model.history["validation_loss"]["validation_loss"].to_numpy(dtype=float)
    assert len(losses) == 20
    assert losses.argmin() < len(losses) - 1  # the last epoch's weights are not the best
    indices = model.validation_indices
    logits = model.map_minibatches(model.module.predict_logits, indices=indices)
    codes = model.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY).ravel()[indices]
    kept_loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(codes).long())
    assert float(kept_loss) == pytest.approx(losses.min(), rel=1e-4)


def test_schedules_ramp_to_paper_values(sim_adata):
    """Sigmoid ramps exp(-5 (1 - epoch / ramp)^2): adversary to 0.1 over 20 epochs (paper),
    unsupervised weight to 1.0 over 100 (reference code)."""
    model = trained(sim_adata)
    history = model.history
    adversary = history["adversary_weight"]["adversary_weight"].to_numpy(dtype=float)
    unsup = history["unsupervised_weight"]["unsupervised_weight"].to_numpy(dtype=float)
    epoch = np.arange(FAST["max_epochs"])
    np.testing.assert_allclose(adversary, 0.1 * np.exp(-5 * (1 - epoch / 20) ** 2), rtol=1e-5)
    np.testing.assert_allclose(unsup, np.exp(-5 * (1 - epoch / 100) ** 2), rtol=1e-5)


def test_sharpen_lowers_entropy():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    sharp = sharpen(p, 0.5)
    np.testing.assert_allclose(sharp.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(sharp[0].numpy(), np.array([0.36, 0.09, 0.01]) / 0.46, rtol=1e-5)


def test_novelty_threshold_returns_unlabeled_category(sim_adata):
    model = trained(sim_adata)
    scores = model.novelty_score()
    assert scores.min() >= 0 and scores.max() <= 1
    threshold = float(np.median(scores))
    predictions = model.predict(novelty_threshold=threshold)
    np.testing.assert_array_equal(predictions == "Unknown", scores > threshold)
    assert (scores > threshold).sum() > 0
    np.testing.assert_array_equal(
        predictions[scores <= threshold], model.predict()[scores <= threshold]
    )


def test_novelty_methods_and_query_neighbours_against_the_labelled_cells(sim_adata, tmp_path):
    from scvi_ext.metrics import novelty_auroc

    data = sim_adata.copy()
    left_out = sorted(data.obs["cell_type"].unique())[0]
    is_reference = (data.obs["labels"] != "Unknown").to_numpy()
    data = data[~(is_reference & (data.obs["cell_type"] == left_out).to_numpy())].copy()
    model = trained(data)
    query = data[data.obs["labels"] == "Unknown"].copy()
    is_novel = (query.obs["cell_type"] == left_out).to_numpy()

    entropy = model.novelty_score(query, method="entropy")
    assert entropy.min() >= 0 and entropy.max() <= 1 + 1e-6
    score = model.novelty_score(query, method="query_neighbours")  # vs the labelled cells
    assert score.shape == (query.n_obs,)
    assert novelty_auroc(is_novel, score) > 0.9
    reference = data[data.obs["labels"] != "Unknown"]
    np.testing.assert_allclose(
        score, model.novelty_score(query, method="query_neighbours", reference=reference)
    )
    with pytest.raises(ValueError, match="pass them as adata="):
        model.novelty_score(method="query_neighbours")
    with pytest.raises(ValueError, match="method must be one of"):
        model.novelty_score(query, method="centroid_distance")
    with pytest.raises(ValueError, match="adata lacks 1 of the 100 genes"):
        model.novelty_score(query[:, 1:], method="query_neighbours")

    model.save(tmp_path / "model")
    bare = ScNym.load(tmp_path / "model", adata=False)
    with pytest.raises(ValueError, match="pass reference=<AnnData with the reference counts>"):
        bare.novelty_score(query, method="query_neighbours")
    np.testing.assert_allclose(
        bare.novelty_score(query, method="query_neighbours", reference=reference), score
    )


def _minibatch(labels: list[int], n_genes: int = 20) -> dict:
    generator = torch.Generator().manual_seed(len(labels))
    return {
        REGISTRY_KEYS.X_KEY: torch.poisson(torch.full((len(labels), n_genes), 3.0), generator),
        REGISTRY_KEYS.LABELS_KEY: torch.tensor(labels)[:, None],
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(len(labels), 1),
    }


def test_pseudolabel_threshold_leaves_unconfident_query_cells_out():
    module = ScNymModule(n_input=20, n_labels=3)
    batch = {LABELLED: _minibatch([0, 1, 2, 0]), UNLABELED: _minibatch([3, 3, 3, 3])}
    passed = {}
    for threshold in (None, 0.999):
        plan = ScNymTrainingPlan(module, pseudolabel_min_confidence=threshold)
        step = plan.module_loss_step

        def spy(stage, tensors, loss_kwargs, threshold=threshold, step=step):
            passed[threshold] = loss_kwargs
            return step(stage, tensors, loss_kwargs)

        plan.module_loss_step = spy
        plan.training_step(batch, 0)
    assert passed[None]["cell_weights"] is None
    # an untrained model is never 99.9% confident: every query cell is left out
    assert passed[0.999]["cell_weights"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    tensors = {
        key: torch.cat([batch[LABELLED][key], batch[UNLABELED][key]]) for key in batch[LABELLED]
    }
    output = module(tensors, loss_kwargs=passed[0.999])[2]
    assert float(output.extra_metrics["unsupervised_loss"]) == 0.0


def test_the_adversary_learns_registered_domains_else_labelled_vs_query():
    module = ScNymModule(n_input=20, n_labels=3, n_domains=3).eval()
    tensors = _minibatch([0, 1, 3, 3, 2, 3])
    outputs = module.inference(tensors[REGISTRY_KEYS.X_KEY], tensors[REGISTRY_KEYS.BATCH_KEY])
    domain_logits = module.domain_adversary(outputs["z"])
    domains = torch.tensor([2, 0, 1, 2, 1, 0])
    registered = module.loss(
        {**tensors, DOMAIN_KEY: domains[:, None]}, outputs, {}, adversary_weight=0.1
    )
    default = module.loss(tensors, outputs, {}, adversary_weight=0.1)
    query = torch.tensor([0, 0, 1, 1, 0, 1])
    torch.testing.assert_close(
        registered.extra_metrics["adversarial_loss"], F.cross_entropy(domain_logits, domains)
    )
    torch.testing.assert_close(
        default.extra_metrics["adversarial_loss"], F.cross_entropy(domain_logits, query)
    )


def test_setup_with_domain_key_sizes_the_adversary_by_its_domains(sim_adata):
    sim_adata.obs["site"] = np.resize(["a", "b", "c"], sim_adata.n_obs)
    model = trained(sim_adata, batch_key="batch", domain_key="site")
    assert model.module.domain_adversary[-1].out_features == 3
    assert model.predict().shape == (sim_adata.n_obs,)


def test_empty_unlabeled_side_trains_supervised(sim_adata):
    reference = sim_adata[~query_mask(sim_adata)].copy()
    model = trained(reference)
    truth = reference.obs["cell_type"].astype(str).to_numpy()
    assert (model.predict() == truth).mean() > 0.8


def test_scanvi_and_scnym_share_one_setup(sim_adata):
    scvi.model.SCANVI.setup_anndata(sim_adata, labels_key="labels", unlabeled_category="Unknown")
    scanvi = scvi.model.SCANVI(sim_adata, n_latent=5)
    scanvi.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    scnym = trained(sim_adata)
    scanvi_soft = scanvi.predict(soft=True)
    scnym_soft = scnym.predict(soft=True)
    assert list(scanvi_soft.columns) == list(scnym_soft.columns)
    assert scanvi_soft.index.equals(scnym_soft.index)


# ---------------------------------------------------------------- query mapping
@pytest.mark.parametrize("reloaded", [False, True])
def test_scarches_query_mapping_trains_only_new_batch_weights_and_the_adversary(
    sim_adata, tmp_path, reloaded
):
    """The same weights train in a query model fresh from load_query_data and in one saved
    and loaded again."""
    query = query_mask(sim_adata)
    reference = sim_adata[~query].copy()
    model = trained(reference, batch_key="batch")
    model.save(tmp_path / "ref")

    query_adata = sim_adata[query].copy()
    query_adata.obs["batch"] = "new_" + query_adata.obs["batch"].astype(str)
    query_adata.obs["labels"] = query_adata.obs["cell_type"].astype(str)
    query_adata.obs.loc[query_adata.obs_names[:5], "labels"] = "never_seen_type"
    query_adata = ScNym.prepare_query_anndata(query_adata, tmp_path / "ref")  # a Path works
    assert query_adata.uns["gene_alignment"]["fraction_shared"] == 1.0
    with pytest.warns(UserWarning, match="never saw"):
        q = ScNym.load_query_data(query_adata, str(tmp_path / "ref"))
    assert "_scvi_uuid" not in query_adata.uns
    if reloaded:
        q.save(tmp_path / "query")
        q = ScNym.load(tmp_path / "query", adata=query_adata)

    before = {k: v.detach().clone() for k, v in q.module.state_dict().items()}
    q.train(
        max_epochs=3,
        batch_size=64,
        enable_progress_bar=False,
    )
    after = q.module.state_dict()
    changed = {
        k
        for k in before
        if not torch.equal(before[k], after[k]) and not k.endswith("num_batches_tracked")
    }

    first = "encoder.fc_layers.Layer 0.0.weight"
    adversary = {k for k in before if k.startswith("domain_adversary")}
    assert len(adversary) == 4
    assert changed == {first} | adversary
    n_genes = sim_adata.n_vars  # of the first layer, only the new batches' columns train
    assert torch.equal(before[first][:, :n_genes], after[first][:, :n_genes])
    assert not torch.equal(before[first][:, n_genes:], after[first][:, n_genes:])
    assert q.predict().shape == (query_adata.n_obs,)


def test_query_with_too_few_reference_genes_fails(sim_adata, tmp_path):
    model = trained(sim_adata)
    query = sim_adata[:, :30].copy()
    with pytest.raises(ValueError, match="shares only"):
        ScNym.prepare_query_anndata(query, model)


def test_query_mapping_matches_genes_by_name(sim_adata):
    model = trained(sim_adata)
    query = sim_adata[query_mask(sim_adata)].copy()
    aligned = ScNym.load_query_data(query, model)
    shuffled = ScNym.load_query_data(query[:, ::-1].copy(), model)
    for q in (aligned, shuffled):
        q.is_trained_ = True  # predict with the reference weights, no query training
    np.testing.assert_allclose(shuffled.predict_proba(), aligned.predict_proba(), atol=1e-6)


def test_prediction_ignores_domains_and_names_unknown_or_missing_batches(sim_adata):
    """Domains steer the adversary only: a query's new (or absent) domain changes nothing.
    Batches are a covariate of the first layer: new or missing ones are clear errors."""
    sim_adata.obs["tech"] = np.where(query_mask(sim_adata), "10x", "smart-seq")
    ScNym.setup_anndata(
        sim_adata,
        labels_key="labels",
        batch_key="batch",
        domain_key="tech",
        unlabeled_category="Unknown",
    )
    model = ScNym(sim_adata, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    query = sim_adata[query_mask(sim_adata)].copy()
    expected = model.predict_proba(query)
    new_domain = query.copy()
    new_domain.obs["tech"] = "drop-seq"
    np.testing.assert_array_equal(model.predict_proba(new_domain), expected)
    del new_domain.obs["tech"]
    np.testing.assert_array_equal(model.predict_proba(new_domain), expected)
    new_batch = query.copy()
    new_batch.obs["batch"] = "donor_9"
    with pytest.raises(ValueError, match=r"batches this ScNym was not trained on \(\['donor_9'\]"):
        model.predict(new_batch)
    del new_batch.obs["batch"]
    with pytest.raises(ValueError, match="adata.obs has no column 'batch' \\(the batch_key"):
        model.get_latent_representation(new_batch)


def test_minibatches_of_one_cell_are_refused_when_a_side_is_empty(sim_adata):
    labelled = sim_adata[~query_mask(sim_adata)].copy()
    ScNym.setup_anndata(labelled, labels_key="cell_type", unlabeled_category=None)
    with pytest.raises(
        ValueError,
        match="batch_size=1 is too small for ScNym: its BatchNorm layers need minibatches of at least 2",
    ):
        ScNym(labelled, n_hidden=8).train(max_epochs=1, batch_size=1)


# ---------------------------------------------------------------- bad inputs
def _with_x(adata, transform):
    bad = adata.copy()
    dense = bad.X.toarray()
    transform(dense)
    bad.X = sp.csr_matrix(dense)
    return bad


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (lambda x: x.__setitem__((0, 0), np.nan), "contains NaN values"),
        (lambda x: x.__setitem__((0, 0), np.inf), "contains infinite values"),
        (lambda x: x.__setitem__((0, 0), -1.0), "contains negative values"),
        (lambda x: x.__setitem__((0, 0), 0.5), "contains non-integer values"),
        (lambda x: x.__setitem__(0, 0.0), "has 1 cells with zero total counts"),
    ],
)
def test_bad_counts_fail_at_setup(sim_adata, transform, message):
    bad = _with_x(sim_adata, transform)
    with pytest.raises(ValueError, match=f"^adata.X {message}"):
        ScNym.setup_anndata(bad, labels_key="labels", unlabeled_category="Unknown")


def test_log_normalised_layer_fails(sim_adata):
    sim_adata.layers["lognorm"] = sim_adata.X.copy()
    sim_adata.layers["lognorm"].data = np.log1p(sim_adata.layers["lognorm"].data)
    with pytest.raises(ValueError, match=r"adata.layers\['lognorm'\] contains non-integer"):
        ScNym.setup_anndata(sim_adata, labels_key="labels", layer="lognorm")


def test_missing_labels_column_fails(sim_adata):
    with pytest.raises(ValueError, match="labels_key 'celltype' is not a column"):
        ScNym.setup_anndata(sim_adata, labels_key="celltype")


def test_single_class_fails(sim_adata):
    sim_adata.obs["labels"] = np.where(query_mask(sim_adata), "Unknown", "T cell")
    with pytest.raises(ValueError, match="has only one cell type"):
        ScNym.setup_anndata(sim_adata, labels_key="labels", unlabeled_category="Unknown")


def test_no_labelled_cell_fails(sim_adata):
    sim_adata.obs["labels"] = "Unknown"
    with pytest.raises(ValueError, match="is labelled"):
        ScNym.setup_anndata(sim_adata, labels_key="labels", unlabeled_category="Unknown")


def test_missing_batch_and_domain_columns_fail(sim_adata):
    with pytest.raises(ValueError, match="batch_key 'donor' is not a column"):
        ScNym.setup_anndata(sim_adata, labels_key="labels", batch_key="donor")
    with pytest.raises(ValueError, match="domain_key 'tech' is not a column"):
        ScNym.setup_anndata(sim_adata, labels_key="labels", domain_key="tech")


def test_bad_plan_arguments_fail(sim_adata):
    ScNym.setup_anndata(sim_adata, labels_key="labels", unlabeled_category="Unknown")
    model = ScNym(sim_adata, n_hidden=16)
    with pytest.raises(ValueError, match="pseudolabel_min_confidence"):
        model.train(max_epochs=1, plan_kwargs={"pseudolabel_min_confidence": 1.5})
    with pytest.raises(ValueError, match="optimizer 'Lion' is not supported"):
        model.train(max_epochs=1, plan_kwargs={"optimizer": "Lion"})


# ---------------------------------------------------------------- real data
@requires_shared_data
def test_kang_control_to_stimulated_well_above_chance():
    from scvi_ext.data import load_dataset

    adata = load_dataset("kang_ifnb")
    query = (adata.obs["condition"] == "stimulated").to_numpy()
    adata.obs["labels"] = np.where(query, "Unknown", adata.obs["cell_type"].astype(str))
    ScNym.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    model = ScNym(adata)
    model.train(max_epochs=8, enable_progress_bar=False)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    accuracy = (model.predict()[query] == truth[query]).mean()
    assert accuracy > 0.6  # 7 types: chance is about 0.3 (the largest class)
