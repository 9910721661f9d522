"""GMVAE (issue 14): the model contract's tests for an embedding model, and its own behaviour."""

import warnings

import anndata as ad
import numpy as np
import pytest
import scvi
import torch
from anndata import AnnData
from conftest import ddp_rank_results, requires_shared_data

from scvi_ext.base import ClassifierModule, EmbeddingModule, InferenceModule
from scvi_ext.data import simulate
from scvi_ext.gmvae import GMVAE, GMVAEModule, pyro_enumerated_elbo
from scvi_ext.model import LatentClassifier

SMALL = {"n_latent": 8, "n_hidden": 32, "n_components": 6}
FAST = {
    "max_epochs": 25,
    "batch_size": 64,
    "plan_kwargs": {"lr": 3e-3},
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def _simulated() -> tuple[AnnData, AnnData]:
    adata = simulate(n_cells=480, n_genes=100, n_cell_types=4, n_batches=2, n_markers=15, seed=1)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    query = (adata.obs["condition"] == "query").to_numpy()
    return adata[~query].copy(), adata[query].copy()


def _trained(reference: AnnData, seed: int = 0, **train) -> GMVAE:
    scvi.settings.seed = seed
    model = GMVAE(reference, **SMALL)
    model.train(**{**FAST, **train})
    return model


@pytest.fixture(scope="module")
def reference_model():
    """(GMVAE trained on the reference condition with a batch covariate, reference, query)."""
    reference, query = _simulated()
    GMVAE.setup_anndata(reference, batch_key="batch", labels_key="cell_type")
    return _trained(reference), reference, query


def test_module_is_an_inference_and_embedding_module_not_a_classifier(reference_model):
    model, _, _ = reference_model
    assert isinstance(model.module, InferenceModule)
    assert isinstance(model.module, EmbeddingModule)
    assert not isinstance(model.module, ClassifierModule)


def test_training_logs_the_negative_elbo_and_the_elbo_per_stage(reference_model):
    model, _, _ = reference_model
    for name in ("train_loss", "train_elbo", "validation_loss", "validation_elbo"):
        assert name in model.history, sorted(model.history)
    first, last = model.history["train_elbo"].iloc[[0, -1], 0]
    assert last > first + 10  # the ELBO rose


def test_latent_separates_the_query_cell_types_and_clusters_agree_above_chance(reference_model):
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import KNeighborsClassifier

    model, reference, query = reference_model
    latent = model.get_latent_representation(query)
    assert latent.shape == (query.n_obs, SMALL["n_latent"])
    assert "_scvi_uuid" not in query.uns  # the user's AnnData is untouched
    knn = KNeighborsClassifier(15).fit(model.get_latent_representation(), reference.obs.cell_type)
    assert knn.score(latent, query.obs["cell_type"]) > 0.8  # chance: 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clusters = model.predict_cluster(query)
    assert adjusted_rand_score(query.obs["cell_type"], clusters) > 0.15  # chance: 0


def test_query_with_genes_reversed_gets_the_same_latent_and_clusters(reference_model):
    model, _, query = reference_model
    reversed_genes = query[:, ::-1].copy()
    np.testing.assert_allclose(
        model.get_latent_representation(reversed_genes),
        model.get_latent_representation(query),
        atol=1e-5,
    )
    soft = model.predict_cluster(reversed_genes, soft=True)
    np.testing.assert_allclose(soft, model.predict_cluster(query, soft=True), atol=1e-6)


def test_predict_cluster_is_the_argmax_of_the_soft_assignment(reference_model):
    model, _, query = reference_model
    soft = model.predict_cluster(query, soft=True)
    assert soft.shape == (query.n_obs, SMALL["n_components"])
    assert list(soft.index) == list(query.obs_names)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(model.predict_cluster(query), soft.to_numpy().argmax(axis=1))


def test_collapsed_components_are_reported_by_warning_and_attribute(reference_model):
    model, _, query = reference_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        most_used = int(np.bincount(model.predict_cluster(query)).argmax())
    bias = model.module.y_logits.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[most_used] = -1e4  # no cell can choose the most used component
        with pytest.warns(UserWarning, match="components have no cell assigned") as caught:
            clusters = model.predict_cluster(query)
        counts = np.bincount(clusters, minlength=SMALL["n_components"])
        empty = np.flatnonzero(counts == 0).tolist()
        assert most_used in empty
        assert model.collapsed_components == empty
        assert f"no cell assigned: {empty}" in str(caught[0].message)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    model.predict_cluster(query)
    assert most_used not in model.collapsed_components


def test_pyro_enumerated_elbo_equals_the_torch_elbo_on_a_minibatch(reference_model):
    model, _, _ = reference_model
    tensors = next(iter(model.iter_minibatches(batch_size=64)))
    model.module.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        torch_elbo = np.mean([-model.module.negative_elbo(tensors).mean() for _ in range(50)])
        _, _, output = model.module(tensors)
    pyro_elbo = pyro_enumerated_elbo(model.module, tensors, num_particles=50)
    # same objective: Pyro's KL of z is a Monte Carlo estimate, torch's is analytic
    assert abs(pyro_elbo - torch_elbo) < 0.005 * abs(torch_elbo), (pyro_elbo, torch_elbo)
    np.testing.assert_allclose(float(output.extra_metrics["elbo"]), -float(output.loss), rtol=1e-6)


def test_the_pyro_backend_trains_the_same_networks(reference_model):
    _, reference, _ = reference_model
    scvi.settings.seed = 0
    model = GMVAE(reference, **SMALL)
    before = model.module.px_scale.weight.detach().clone()
    model.train(max_epochs=3, backend="pyro", batch_size=64, plan_kwargs={"lr": 3e-3})
    assert "elbo_train" in model.history
    assert not torch.equal(before, model.module.px_scale.weight)
    assert model.get_latent_representation().shape == (reference.n_obs, SMALL["n_latent"])
    with pytest.raises(ValueError, match=r"Unknown plan_kwargs \['weight_decay'\]"):
        model.train(max_epochs=1, backend="pyro", plan_kwargs={"weight_decay": 0.1})
    with pytest.raises(ValueError, match="max_epochs must be at least 1, not 0"):
        model.train(max_epochs=0, backend="pyro")
    with pytest.raises(ValueError, match="backend must be 'torch' or 'pyro'"):
        model.train(max_epochs=1, backend="jax")


def test_elbo_reconstruction_error_and_normalized_expression_follow_scvi(reference_model):
    model, reference, query = reference_model
    elbo = model.get_elbo(query)
    reconstruction = model.get_reconstruction_error(query)["reconstruction_loss"]
    assert np.isfinite(elbo) and elbo < 0 < reconstruction
    assert elbo < -reconstruction + 5  # ELBO = -(reconstruction + KL); sampling noise aside
    assert model.get_elbo(query, return_mean=False).shape == (query.n_obs,)
    expression = model.get_normalized_expression(query)
    assert expression.shape == (query.n_obs, query.n_vars)
    np.testing.assert_allclose(expression.sum(axis=1), 1.0, atol=1e-4)
    genes = list(query.var_names[:3])
    batch = reference.obs["batch"].cat.categories[0]
    subset = model.get_normalized_expression(
        query, transform_batch=batch, gene_list=genes, library_size=1e4
    )
    assert list(subset.columns) == genes and (subset.to_numpy() > 0).all()
    with pytest.raises(ValueError, match="transform_batch 'nope' is not a batch"):
        model.get_normalized_expression(query, transform_batch="nope")


def test_non_count_data_is_refused_with_a_message(reference_model):
    model, reference, query = reference_model
    logged = reference.copy()
    logged.X = np.log1p(logged.X.toarray() if hasattr(logged.X, "toarray") else logged.X)
    with pytest.raises(ValueError, match="non-integer values.*log-transformed data: pass raw"):
        GMVAE.setup_anndata(logged, batch_key="batch")
    logged_query = query.copy()
    logged_query.X = logged.X[: query.n_obs]
    with pytest.raises(ValueError, match="non-integer values"):
        model.get_latent_representation(logged_query)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        GMVAE(reference, likelihood="gaussian")


@pytest.mark.parametrize("likelihood", ["zinb", "poisson"])
def test_other_likelihoods_train(likelihood):
    reference, _ = _simulated()
    GMVAE.setup_anndata(reference)
    model = GMVAE(reference, likelihood=likelihood, **SMALL)
    model.train(**{**FAST, "max_epochs": 2})
    assert np.isfinite(model.get_elbo())


def test_seeded_training_is_deterministic(reference_model):
    _, reference, _ = reference_model
    first, second = (_trained(reference, seed=3, max_epochs=3) for _ in range(2))
    np.testing.assert_array_equal(
        first.get_latent_representation(), second.get_latent_representation()
    )


def test_save_load_gives_identical_outputs_and_second_save_needs_overwrite(
    reference_model, tmp_path
):
    model, reference, query = reference_model
    folder = str(tmp_path / "gmvae")
    model.save(folder)
    loaded = GMVAE.load(folder, adata=reference)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    without_data = GMVAE.load(folder, adata=False)
    assert without_data.adata is None
    np.testing.assert_array_equal(
        without_data.predict_cluster(query, soft=True), model.predict_cluster(query, soft=True)
    )
    with pytest.raises(ValueError, match="loaded without data"):
        without_data.get_latent_representation()
    with pytest.raises(ValueError, match="already exists"):
        model.save(folder)
    model.save(folder, overwrite=True)


def test_query_mapping_to_new_batches_trains_only_the_decoders_new_batch_columns(
    reference_model,
):
    model, reference, query = reference_model
    query = query.copy()
    query.obs["batch"] = "new_" + query.obs["batch"].astype(str)
    query_model = GMVAE.load_query_data(query, model)
    before = {key: value.clone() for key, value in query_model.module.state_dict().items()}
    query_model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
    after = query_model.module.state_dict()
    changed = {
        key
        for key in before
        if not torch.equal(before[key], after[key]) and not key.endswith("num_batches_tracked")
    }
    first = "decoder.fc_layers.Layer 0.0.weight"
    # scvi's default freeze_batchnorm_decoder=False: the decoder's BatchNorm adapts too
    batch_norm = {
        f"decoder.fc_layers.Layer 0.1.{name}"
        for name in ("weight", "bias", "running_mean", "running_var")
    }
    assert changed == {first} | batch_norm
    n_reference_columns = SMALL["n_latent"] + reference.obs["batch"].nunique()
    old, new = slice(0, n_reference_columns), slice(n_reference_columns, None)
    assert after[first].shape[1] == n_reference_columns + 2
    assert torch.equal(before[first][:, old], after[first][:, old])
    assert not torch.equal(before[first][:, new], after[first][:, new])
    assert query_model.get_latent_representation().shape == (query.n_obs, SMALL["n_latent"])


def test_latent_classifier_from_gmvae_predicts_the_query_above_chance(reference_model):
    model, _, query = reference_model
    classifier = LatentClassifier.from_model(model, n_hidden1=32, n_hidden2=32)
    classifier.train(max_epochs=20, batch_size=64, enable_progress_bar=False)
    assert (classifier.predict(query) == query.obs["cell_type"].to_numpy()).mean() > 0.7


def test_training_and_embedding_on_backed_anndata(tmp_path):
    reference, query = _simulated()
    reference.write_h5ad(tmp_path / "reference.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "reference.h5ad", backed="r")
    backed_query = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    GMVAE.setup_anndata(backed, batch_key="batch")
    model = GMVAE(backed, **SMALL)
    model.train(**{**FAST, "max_epochs": 2})
    assert model.get_latent_representation(backed_query).shape == (query.n_obs, 8)
    assert model.predict_cluster(backed_query).shape == (query.n_obs,)
    backed.file.close()
    backed_query.file.close()


def test_transform_batch_decodes_as_that_batch_and_encodes_each_cell_with_its_own():
    """As scVI's: with ``encode_covariates=True`` the posterior still reads the cell's own
    batch; only the decoder reads ``transform_batch``."""
    module = GMVAEModule(n_input=20, n_batch=3, encode_covariates=True, **SMALL).eval()
    own_batch = torch.tensor([[1], [2], [1]])
    tensors = {"X": torch.ones(3, 20), "batch": own_batch}
    seen: dict[str, torch.Tensor] = {}
    encode, decode = module.encode, module.decode

    def recording_encode(x, batch_index):
        seen["encoder"] = batch_index.clone()
        return encode(x, batch_index)

    def recording_decode(z, batch_index, library):
        seen["decoder"] = batch_index.clone()
        return decode(z, batch_index, library)

    module.encode, module.decode = recording_encode, recording_decode
    module.normalized_expression(tensors, transform_batch=0)
    assert torch.equal(seen["encoder"], own_batch)
    assert torch.equal(seen["decoder"], torch.zeros_like(own_batch))


def test_normalized_expression_arguments_are_checked(reference_model):
    model, _, query = reference_model
    with pytest.raises(ValueError, match="n_samples must be an integer of at least 1, not 0"):
        model.get_normalized_expression(query, n_samples=0)
    with pytest.raises(ValueError, match="library_size must be a number > 0 or 'latent'"):
        model.get_normalized_expression(query, library_size="observed")
    with pytest.raises(ValueError, match="library_size must be a number > 0 or 'latent'"):
        model.get_normalized_expression(query, library_size=0)
    gene = str(query.var_names[1])
    one_gene = model.get_normalized_expression(query, gene_list=gene)  # a name, not letters
    assert list(one_gene.columns) == [gene]


def test_cells_of_unknown_batches_point_to_load_query_data(reference_model, tmp_path):
    """New batches, a missing batch column or NaN batches are refused with a message at
    inference and at load, not with scvi's ``extend_categories`` error or a TypeError."""
    model, _, query = reference_model
    new_batches = query.copy()
    new_batches.obs["batch"] = "new_" + new_batches.obs["batch"].astype(str)
    unknown = r"has batches this GMVAE was not trained on \(\['new_batch_0', 'new_batch_1'\]"
    with pytest.raises(ValueError, match=unknown + r".*GMVAE.load_query_data\(adata, model\)"):
        model.get_latent_representation(new_batches)
    without_batch = query.copy()
    del without_batch.obs["batch"]
    with pytest.raises(ValueError, match=r"adata.obs has no column 'batch' \(the batch_key of"):
        model.predict_cluster(without_batch)
    with pytest.raises(ValueError, match="no column 'batch', the reference's batch_key; add"):
        GMVAE.load_query_data(without_batch, model)
    missing = query.copy()
    missing.obs["batch"] = missing.obs["batch"].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(
        ValueError, match=r"\['batch'\] \(the batch_key of this GMVAE\) has 1 missing"
    ):
        model.get_elbo(missing)
    model.save(tmp_path / "gmvae")
    with pytest.raises(ValueError, match=unknown):
        GMVAE.load(tmp_path / "gmvae", adata=new_batches)
    assert "_scvi_uuid" not in new_batches.uns


def test_pyro_training_after_a_first_training_runs_in_train_mode():
    """scvi leaves the module in eval mode after training (and load, query mapping): the
    Pyro plan puts the networks back in train mode (dropout, BatchNorm statistics)."""
    from lightning.pytorch.callbacks import Callback

    class RecordMode(Callback):
        def __init__(self):
            self.modes: list[bool] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append(pl_module.module.gmvae.training)

    reference, _ = _simulated()
    GMVAE.setup_anndata(reference, batch_key="batch")
    model = GMVAE(reference, **SMALL)
    model.train(**{**FAST, "max_epochs": 1})
    assert not model.module.training  # scvi's eval mode after training
    recorder = RecordMode()
    model.train(**{**FAST, "max_epochs": 1}, backend="pyro", callbacks=[recorder])
    assert recorder.modes and all(recorder.modes)


@pytest.mark.parametrize("backend", ["torch", "pyro"])
def test_counts_log_transformed_after_setup_stop_training_on_either_backend(backend):
    reference, _ = _simulated()
    GMVAE.setup_anndata(reference, batch_key="batch")
    model = GMVAE(reference, **SMALL)
    reference.X.data[:] = np.log1p(reference.X.data)  # as sc.pp.log1p does, in place
    with pytest.raises(ValueError, match=r"adata\.X contains non-integer values; found \d+"):
        model.train(**{**FAST, "max_epochs": 1}, backend=backend)


def test_component_balance_penalty_is_zero_for_balanced_use_and_log_k_for_one_component():
    from scvi_ext.gmvae import GMVAEModule

    module = GMVAEModule(n_input=10, n_components=4)
    confident = torch.full((8, 4), -30.0)
    confident[torch.arange(8), torch.arange(8) % 4] = 30.0  # sure of one component each
    assert float(module.component_balance_penalty(confident)) == pytest.approx(0, abs=1e-5)
    assert float(module.component_balance_penalty(torch.zeros(8, 4))) == pytest.approx(0)
    one = torch.full((8, 4), -30.0)
    one[:, 2] = 30.0  # every cell in component 2
    assert float(module.component_balance_penalty(one)) == pytest.approx(np.log(4), abs=1e-5)
    half = torch.full((8, 4), -30.0)
    half[:, :2] = 30.0  # components 0 and 1 shared by all cells, 2 and 3 empty
    assert float(module.component_balance_penalty(half)) == pytest.approx(np.log(2), abs=1e-5)


def test_component_balance_adds_the_penalty_to_the_loss_not_to_the_elbo(reference_model):
    model, reference, _ = reference_model
    tensors = next(iter(model.iter_minibatches(batch_size=64)))
    model.module.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        inference, _, plain = model.module(tensors)
        model.module.component_balance = 2.0
        try:
            torch.manual_seed(0)
            _, _, balanced = model.module(tensors)
        finally:
            model.module.component_balance = 0.0
    penalty = model.module.component_balance_penalty(inference["qy_logits"])
    assert float(penalty) > 0
    np.testing.assert_allclose(
        float(balanced.loss), float(plain.loss) + 2 * float(penalty), rtol=1e-5
    )
    assert float(balanced.extra_metrics["elbo"]) == pytest.approx(
        float(plain.extra_metrics["elbo"]), rel=1e-6
    )


def test_component_balance_trains_saves_loads_and_refuses_bad_values(reference_model, tmp_path):
    _, reference, query = reference_model
    scvi.settings.seed = 0
    model = GMVAE(reference, component_balance=1.0, **SMALL)
    model.train(**{**FAST, "max_epochs": 2})
    assert "train_component_balance_penalty" in model.history, sorted(model.history)
    model.save(tmp_path / "balanced")
    loaded = GMVAE.load(tmp_path / "balanced", adata=reference)
    assert loaded.module.component_balance == 1.0
    np.testing.assert_array_equal(
        loaded.predict_cluster(query, soft=True), model.predict_cluster(query, soft=True)
    )
    for bad in (-1.0, float("nan"), "10"):
        message = rf"component_balance must be a number >= 0 \(0: off\), not {bad!r}\."
        with pytest.raises(ValueError, match=message):
            GMVAE(reference, component_balance=bad, **SMALL)
    with pytest.raises(ValueError, match="component_balance is a term of the torch loss"):
        model.train(max_epochs=1, backend="pyro")


def test_mixture_lr_factor_gives_the_mixture_parameters_their_own_learning_rate(
    reference_model,
):
    from scvi_ext.gmvae import GMVAETrainingPlan

    _, reference, _ = reference_model
    names = ("prior_means", "prior_log_scales", "z_mean_offset", "z_log_scale_offset")
    module = GMVAE(reference, **SMALL).module
    plan = GMVAETrainingPlan(module, lr=1e-3, mixture_lr_factor=30)
    optimizer = plan._create_optimizer(module.parameters())
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, pytest.approx(3e-2)]
    mixture = {id(getattr(module, name)) for name in names}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == mixture
    assert len(optimizer.param_groups[0]["params"]) == len(list(module.parameters())) - 4
    moved = {}
    for factor in (1, 30):
        scvi.settings.seed = 0
        model = GMVAE(reference, **SMALL)
        before = model.module.prior_means.detach().clone()
        train = {**FAST, "max_epochs": 2, "plan_kwargs": {"lr": 1e-4, "mixture_lr_factor": factor}}
        model.train(**train)
        moved[factor] = float((model.module.prior_means.detach() - before).abs().max())
    # Adam moves each by about lr per step: 10 steps (2 epochs of 5 minibatches)
    assert moved[1] < 1.2e-3 and 25 * moved[1] < moved[30] < 35 * moved[1], moved
    for bad in (0, "30"):
        with pytest.raises(ValueError, match=r"mixture_lr_factor must be a number > 0 \(1: the"):
            GMVAETrainingPlan(module, mixture_lr_factor=bad)
    gaussian = GMVAE(reference, posterior="gaussian", **SMALL).module  # MogPrior's parameters
    optimizer = GMVAETrainingPlan(gaussian, lr=1e-3, mixture_lr_factor=30)._create_optimizer(
        gaussian.parameters()
    )
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {
        id(p) for p in gaussian.mog_prior.parameters()
    }
    assert len(optimizer.param_groups[1]["params"]) == 3  # means, log-scales, logits


#: The default (mixture) module's state, as before ``posterior`` was added.
MIXTURE_STATE = [
    "z_mean_offset",
    "z_log_scale_offset",
    "prior_means",
    "prior_log_scales",
    "px_log_theta",
    "prior_logits",
    "encoder.fc_layers.Layer 0.0.weight",
    "encoder.fc_layers.Layer 0.0.bias",
    "encoder.fc_layers.Layer 0.1.weight",
    "encoder.fc_layers.Layer 0.1.bias",
    "encoder.fc_layers.Layer 0.1.running_mean",
    "encoder.fc_layers.Layer 0.1.running_var",
    "encoder.fc_layers.Layer 0.1.num_batches_tracked",
    "y_logits.weight",
    "y_logits.bias",
    "z_mean.weight",
    "z_mean.bias",
    "z_log_scale.weight",
    "z_log_scale.bias",
    "decoder.fc_layers.Layer 0.0.weight",
    "decoder.fc_layers.Layer 0.0.bias",
    "decoder.fc_layers.Layer 0.1.weight",
    "decoder.fc_layers.Layer 0.1.bias",
    "decoder.fc_layers.Layer 0.1.running_mean",
    "decoder.fc_layers.Layer 0.1.running_var",
    "decoder.fc_layers.Layer 0.1.num_batches_tracked",
    "px_scale.weight",
    "px_scale.bias",
]


@pytest.fixture(scope="module")
def gaussian_model(reference_model):
    """(GMVAE with ``posterior="gaussian"`` trained as ``reference_model``, reference, query)."""
    _, reference, query = reference_model
    scvi.settings.seed = 0
    model = GMVAE(reference, posterior="gaussian", **SMALL)
    model.train(**FAST)
    return model, reference, query


def test_default_posterior_is_the_mixture_with_unchanged_parameters(reference_model):
    model, reference, _ = reference_model
    assert model.module.posterior == "mixture"
    assert list(model.module.state_dict()) == MIXTURE_STATE
    assert "posterior='mixture'" in model._model_summary_string
    states = []
    for kwargs in ({}, {"posterior": "mixture"}):
        scvi.settings.seed = 5
        states.append(GMVAE(reference, **SMALL, **kwargs).module.state_dict())
    for name in MIXTURE_STATE:
        assert torch.equal(states[0][name], states[1][name]), name


def test_gaussian_posterior_uses_scvi_mog_prior_trains_and_separates_the_query(gaussian_model):
    from scvi.module.base import MogPrior
    from sklearn.neighbors import KNeighborsClassifier

    model, reference, query = gaussian_model
    module = model.module
    assert isinstance(module.mog_prior, MogPrior)
    names = {name for name, _ in module.named_parameters()}
    assert {"mog_prior.prior_means", "mog_prior.prior_logits"} <= names
    assert not {"y_logits.weight", "z_mean_offset", "prior_means"} & names
    assert "posterior='gaussian'" in model._model_summary_string
    first, last = model.history["train_elbo"].iloc[[0, -1], 0]
    assert last > first + 10  # the ELBO rose
    latent = model.get_latent_representation(query)
    assert latent.shape == (query.n_obs, SMALL["n_latent"])
    knn = KNeighborsClassifier(15).fit(model.get_latent_representation(), reference.obs.cell_type)
    assert knn.score(latent, query.obs["cell_type"]) > 0.8  # chance: 0.25


def test_gaussian_posterior_elbo_terms_one_decode_per_cell_and_kl_y_zero(gaussian_model):
    from scvi import REGISTRY_KEYS

    model, _, query = gaussian_model
    tensors = next(iter(model.iter_minibatches(batch_size=64)))
    model.module.eval()
    with torch.no_grad():
        inference, generative, output = model.module(tensors)
    counts = tensors[REGISTRY_KEYS.X_KEY]
    cells = counts.shape[0]
    assert inference["z"].shape == (cells, SMALL["n_latent"])
    assert generative["px_rate"].shape == counts.shape  # one decode per cell, not K
    assert torch.equal(output.kl_local["kl_y"], torch.zeros(cells))
    assert (output.kl_local["kl_z"] > 0).float().mean() > 0.9  # a Monte Carlo KL
    np.testing.assert_allclose(float(output.extra_metrics["elbo"]), -float(output.loss), rtol=1e-6)
    elbo = model.get_elbo(query)
    reconstruction = model.get_reconstruction_error(query)["reconstruction_loss"]
    assert np.isfinite(elbo) and elbo < 0 < reconstruction and elbo < -reconstruction + 5
    expression = model.get_normalized_expression(query, n_samples=2)
    assert expression.shape == (query.n_obs, query.n_vars)
    np.testing.assert_allclose(expression.sum(axis=1), 1.0, atol=1e-4)


def test_gaussian_posterior_clusters_are_the_prior_responsibilities_at_the_mean(gaussian_model):
    model, _, query = gaussian_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        soft = model.predict_cluster(query, soft=True)
        clusters = model.predict_cluster(query)
    assert soft.shape == (query.n_obs, SMALL["n_components"])
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(clusters, soft.to_numpy().argmax(axis=1))
    # p(y | z) from MogPrior's own mixture: log pi_k + log N(z; mu_k, sigma_k), normalised
    mog = model.module.mog_prior
    z = torch.as_tensor(model.get_latent_representation(query))
    with torch.no_grad():
        mixture = mog.get_prior(z)
        log_joint = mixture.mixture_distribution.logits + mixture.component_distribution.log_prob(
            z[:, None]
        )
        expected = torch.softmax(log_joint, dim=-1).numpy()
    np.testing.assert_allclose(soft.to_numpy(), expected, atol=1e-5)


def test_gaussian_posterior_reports_collapsed_components(gaussian_model):
    model, _, query = gaussian_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        most_used = int(np.bincount(model.predict_cluster(query)).argmax())
    logits = model.module.mog_prior.prior_logits
    saved = logits.detach().clone()
    try:
        with torch.no_grad():
            logits[most_used] = -1e4  # the prior gives it no weight: no cell is assigned
        with pytest.warns(UserWarning, match="components have no cell assigned") as caught:
            clusters = model.predict_cluster(query)
        empty = np.flatnonzero(np.bincount(clusters, minlength=SMALL["n_components"]) == 0)
        assert most_used in empty.tolist()
        assert model.collapsed_components == empty.tolist()
        assert f"no cell assigned: {empty.tolist()}" in str(caught[0].message)
    finally:
        with torch.no_grad():
            logits.copy_(saved)


def test_gaussian_posterior_save_load_gives_identical_outputs(gaussian_model, tmp_path):
    model, reference, query = gaussian_model
    model.save(tmp_path / "gaussian")
    loaded = GMVAE.load(tmp_path / "gaussian", adata=reference)
    assert loaded.module.posterior == "gaussian" and loaded.init_params_ == model.init_params_
    np.testing.assert_array_equal(
        loaded.get_latent_representation(query), model.get_latent_representation(query)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collapsed components: tested above
        np.testing.assert_array_equal(
            loaded.predict_cluster(query, soft=True), model.predict_cluster(query, soft=True)
        )


def test_gaussian_posterior_refuses_pyro_balance_mixture_lr_and_bad_values(gaussian_model):
    model, reference, _ = gaussian_model
    pyro_message = (
        "backend='pyro' trains the mixture posterior only (MogPrior's KL is a torch loss): "
        "train with backend='torch', or build the GMVAE with posterior='mixture'."
    )
    with pytest.raises(ValueError) as caught:
        model.train(max_epochs=1, backend="pyro")
    assert str(caught.value) == pyro_message
    with pytest.raises(ValueError) as caught:
        GMVAE(reference, posterior="gaussian", component_balance=1.0, **SMALL)
    assert str(caught.value) == (
        "component_balance acts on q(y | x), which posterior='gaussian' does not have: "
        "pass component_balance=0, or posterior='mixture'."
    )
    with pytest.raises(ValueError) as caught:
        GMVAE(reference, posterior="mog", **SMALL)
    assert str(caught.value) == "posterior must be one of ('mixture', 'gaussian'), not 'mog'."


@requires_shared_data
def test_real_data_latent_separates_kang_cell_types_well_above_chance():
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from scvi_ext.data import load_dataset, select_genes

    adata = load_dataset("kang_ifnb")
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 800, replace=False)].copy()
    adata = select_genes(adata, method="can", n_top_genes=300)
    GMVAE.setup_anndata(adata, batch_key="condition")
    scvi.settings.seed = 0
    model = GMVAE(adata, n_latent=10, n_hidden=64, n_components=7)
    model.train(max_epochs=15, batch_size=128, plan_kwargs={"lr": 3e-3}, enable_progress_bar=False)
    labels = adata.obs["cell_type"].astype(str)
    knn = KNeighborsClassifier(15)
    accuracy = cross_val_score(knn, model.get_latent_representation(), labels, cv=3).mean()
    majority = labels.value_counts(normalize=True).iloc[0]
    assert accuracy > 0.7 > majority + 0.35, (accuracy, majority)


DDP_SCRIPT = """
import scvi

from test_gmvae import FAST, SMALL, _simulated

from scvi_ext.gmvae import GMVAE

scvi.settings.seed = 0
reference, query = _simulated()
GMVAE.setup_anndata(reference, batch_key="batch")
model = GMVAE(reference, **SMALL)
model.train(**{**FAST, "max_epochs": 2}, accelerator="cpu", devices=2, strategy="ddp")
result = model.get_latent_representation(query).shape[0]
"""


def test_cpu_ddp_with_two_processes_trains_and_both_ranks_embed(tmp_path):
    assert ddp_rank_results(DDP_SCRIPT, tmp_path) == [str(_simulated()[1].n_obs)] * 2
