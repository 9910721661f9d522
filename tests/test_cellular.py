"""CELLULAR: losses against a looped implementation, training, save/load, query, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scvi import REGISTRY_KEYS

from scvi_ext.benchmark.cellular_reference import (
    looped_batch_mixing_loss,
    looped_cell_type_loss,
    looped_cellular_loss,
    looped_centroid_loss,
)
from scvi_ext.cellular import (
    CELLULAR,
    CELLULARModule,
    batch_mixing_loss,
    cell_type_loss,
    centroid_loss,
    class_weights,
    reference_centroid_distances,
)
from scvi_ext.data import datasets_available, simulate

TRAIN = {"enable_progress_bar": False, "enable_model_summary": False}


# ---------------------------------------------------------------------- looped references
def looped_reference_distances(embedding, labels, batches, n_labels):
    result = np.zeros((n_labels, n_labels))
    for a in range(n_labels):
        for b in range(n_labels):
            distances = []
            for batch in np.unique(batches):
                in_a = (batches == batch) & (labels == a)
                in_b = (batches == batch) & (labels == b)
                if in_a.any() and in_b.any():
                    ca, cb = embedding[in_a].mean(0), embedding[in_b].mean(0)
                    distances.append(np.linalg.norm(ca - cb))
            result[a, b] = np.mean(distances) if distances else 0.0
    return result / result.max()


@pytest.fixture
def small_batch():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(48, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (48,), generator=generator)
    labels[:2] = 4  # a type with only two cells
    labels[2] = 5  # a type with a single cell (no positive pair)
    batches = torch.randint(0, 3, (48,), generator=generator)
    return z, labels, batches


def test_cell_type_loss_matches_loop(small_batch):
    z, labels, _ = small_batch
    weights = class_weights(labels.numpy(), 6).double()
    for temperature in (0.1, 0.25, 1.0):
        vectorised = cell_type_loss(z, labels, weights, temperature)
        looped = looped_cell_type_loss(z, labels, weights, temperature)
        torch.testing.assert_close(vectorised, looped, rtol=1e-9, atol=1e-9)


def test_batch_loss_matches_loop(small_batch):
    z, labels, batches = small_batch
    weights = class_weights(batches.numpy(), 3).double()
    vectorised = batch_mixing_loss(z, labels, batches, weights, 0.5)
    looped = looped_batch_mixing_loss(z, labels, batches, weights, 0.5)
    torch.testing.assert_close(vectorised, looped, rtol=1e-9, atol=1e-9)


def test_centroid_loss_matches_loop(small_batch):
    z, labels, batches = small_batch
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(48, 5))
    n_labels = 7  # type 6 is absent from the minibatch
    ref = reference_centroid_distances(embedding, labels.numpy(), batches.numpy(), n_labels)
    np.testing.assert_allclose(
        ref, looped_reference_distances(embedding, labels.numpy(), batches.numpy(), n_labels)
    )
    ref = torch.as_tensor(ref)
    ref[0, 1] = ref[1, 0] = 0.0  # a pair never seen in one batch is masked
    vectorised = centroid_loss(z, labels, ref)
    looped = looped_centroid_loss(z, labels, pd.DataFrame(ref.numpy()))
    torch.testing.assert_close(vectorised, looped, rtol=1e-9, atol=1e-9)


@pytest.fixture
def module_and_weights(small_batch):
    """A float64 module with a random symmetric reference matrix and its class weights."""
    _, labels, batches = small_batch
    module = CELLULARModule(n_input=8, n_labels=6, n_batch=3).double()
    distances = torch.rand(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    module.reference_distances.copy_((distances + distances.T).fill_diagonal_(0.0))
    module.label_weights.copy_(class_weights(labels.numpy(), 6))
    module.batch_weights.copy_(class_weights(batches.numpy(), 3))
    return module, module.label_weights, module.batch_weights


def module_loss_terms(module, z, labels, batches) -> dict[str, torch.Tensor]:
    """``module.loss`` of an embedding: the total and its three terms."""
    tensors = {
        REGISTRY_KEYS.LABELS_KEY: labels[:, None],
        REGISTRY_KEYS.BATCH_KEY: batches[:, None],
    }
    output = module.loss(tensors, {"z": z}, {})
    return {"loss": output.loss, **output.extra_metrics}


def test_module_loss_matches_the_looped_loss_of_the_speed_benchmark(
    small_batch, module_and_weights
):
    """The throughput benchmark compares CELLULAR with loops computing this same loss."""
    z, labels, batches = small_batch
    module, label_weights, batch_weights = module_and_weights
    vectorised = module_loss_terms(module, z, labels, batches)["loss"]
    looped = looped_cellular_loss(
        z,
        labels,
        batches,
        label_weights,
        batch_weights,
        pd.DataFrame(module.reference_distances.numpy()),
        module.current_temperature(),
    )
    torch.testing.assert_close(vectorised, looped, rtol=1e-9, atol=1e-9)


def test_module_loss_leaves_unlabeled_cells_out(small_batch, module_and_weights):
    z, labels, batches = small_batch
    module, _, _ = module_and_weights
    with_unlabeled = labels.clone()
    with_unlabeled[::3] = 6  # the unlabeled category's code
    labelled = with_unlabeled < 6
    masked = module_loss_terms(module, z, with_unlabeled, batches)
    subset = module_loss_terms(module, z[labelled], labels[labelled], batches[labelled])
    for name in ("cell_type_loss", "batch_loss", "centroid_loss", "loss"):
        assert float(subset[name]) > 0, name
        torch.testing.assert_close(masked[name], subset[name], rtol=1e-9, atol=1e-9)
    unlabeled = torch.full_like(labels, 6)
    nothing = module_loss_terms(module, z, unlabeled, batches)
    assert all(float(value) == 0.0 for value in nothing.values())


def test_losses_have_gradients_and_handle_degenerate_batches(small_batch):
    z, labels, batches = small_batch
    z = z.clone().requires_grad_(True)
    weights = class_weights(labels.numpy(), 6).double()
    loss = cell_type_loss(z, labels, weights, 0.25) + batch_mixing_loss(
        z, labels, batches, class_weights(batches.numpy(), 3).double()
    )
    loss.backward()
    assert torch.isfinite(z.grad).all()
    one_type = torch.zeros(10, dtype=torch.long)
    zero = cell_type_loss(z[:10], one_type, weights, 0.25)
    assert zero.item() == 0.0


# ---------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def adata():
    data = simulate(n_cells=400, n_genes=120, n_cell_types=4, n_batches=3, seed=1)
    return data[data.obs["condition"] == "reference"].copy()


@pytest.fixture(scope="module")
def trained(adata):
    scvi.settings.seed = 0
    data = adata.copy()
    CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(data, n_latent=8, n_hidden=(32, 16))
    model.train(max_epochs=3, batch_size=64, **TRAIN)
    return model


def test_training_and_inductive_embedding(trained, adata):
    model = trained
    assert model.is_trained_
    assert float(model.module.library_size) > 0
    assert model.module.reference_distances.max() == pytest.approx(1.0)
    for key in ("train_cell_type_loss", "train_batch_loss", "train_centroid_loss"):
        assert key in model.history
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 8)
    unseen = adata[:50].copy()
    before = unseen.obs.copy()
    np.testing.assert_allclose(model.get_latent_representation(unseen), z[:50], atol=1e-5)
    assert unseen.obs.equals(before), "the user's AnnData must not be modified"
    accuracy = (model.predict() == adata.obs["cell_type"].astype(str).to_numpy()).mean()
    assert accuracy > 0.5


def test_minibatch_statistics_equal_those_of_the_whole_matrix(trained, adata):
    """fit_statistics reads minibatches; the same library size and centroid distances come
    from the dense matrix, a full PCA and the cell-level reference function."""
    from sklearn.decomposition import PCA

    from scvi_ext.data import log_normalise

    counts = adata.X.toarray()
    library_size = counts.sum(axis=1).mean()
    assert float(trained.module.library_size) == pytest.approx(library_size, rel=1e-6)
    normalised = log_normalise(counts, library_size).toarray()
    embedding = PCA(n_components=8, svd_solver="full").fit_transform(normalised)
    labels = adata.obs["cell_type"].astype("category").cat.codes.to_numpy()
    batches = adata.obs["batch"].astype("category").cat.codes.to_numpy()
    expected = reference_centroid_distances(embedding, labels, batches, 4)
    np.testing.assert_allclose(trained.module.reference_distances.numpy(), expected, atol=1e-4)


def test_prediction_centroids_are_the_class_means_of_the_trained_latent(trained, adata):
    """Summed minibatch by minibatch after training, no latent of every cell held."""
    z = trained.get_latent_representation()
    labels = adata.obs["cell_type"].astype("category").cat.codes.to_numpy()
    expected = np.stack([z[labels == code].mean(axis=0) for code in range(4)])
    np.testing.assert_allclose(trained.module.centroids.numpy(), expected, atol=1e-5)


def test_cell_type_representations(trained, adata):
    for method in ("centroid", "median", "medoid"):
        table = trained.cell_type_representations(method=method)
        assert table.shape == (4, 8)
        assert list(table.index) == sorted(adata.obs["cell_type"].astype(str).unique())
    z = trained.get_latent_representation()
    medoids = trained.cell_type_representations(method="medoid").to_numpy()
    assert all((np.abs(z - row).sum(axis=1) < 1e-6).any() for row in medoids)
    with pytest.raises(ValueError, match="method"):
        trained.cell_type_representations(method="mode")


def test_save_load_identical(trained, adata, tmp_path):
    trained.save(tmp_path / "model", save_anndata=False)
    z = trained.get_latent_representation()
    loaded = CELLULAR.load(tmp_path / "model", adata=trained.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    bare = CELLULAR.load(tmp_path / "model", adata=False)
    np.testing.assert_array_equal(bare.get_latent_representation(adata), z)
    np.testing.assert_array_equal(bare.predict(adata), trained.predict())


def test_seeded_determinism(adata):
    outputs = []
    for _ in range(2):
        scvi.settings.seed = 3
        data = adata.copy()
        CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
        model = CELLULAR(data, n_latent=4, n_hidden=(16,))
        model.train(max_epochs=2, batch_size=64, **TRAIN)
        outputs.append(model.get_latent_representation())
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_query_with_new_batches(trained, adata):
    query = adata[:60].copy()
    query.obs["batch"] = "new_donor"
    query.obs["cell_type"] = "Unknown"
    model = CELLULAR.load_query_data(query, trained)
    assert not any(p.requires_grad for p in model.module.parameters())
    np.testing.assert_allclose(
        model.get_latent_representation(), trained.get_latent_representation()[:60], atol=1e-5
    )


def test_a_frozen_query_model_predicts_as_the_reference_and_refuses_to_train(trained, adata):
    query = adata[:60].copy()
    query.obs["batch"] = "new_donor"
    model = CELLULAR.load_query_data(query, trained)
    np.testing.assert_allclose(model.predict_proba(query), trained.predict_proba(query), atol=1e-6)
    with pytest.raises(ValueError, match="This CELLULAR has no trainable weight.*unfrozen=True"):
        model.train(max_epochs=1, **TRAIN)


def test_a_query_model_without_labelled_cells_refuses_to_train(trained, adata):
    """Every CELLULAR loss reads cell types: without any, training would only produce NaN."""
    query = adata[:60].copy()
    query.obs["batch"] = "new_donor"
    query.obs["cell_type"] = "a type the reference never saw"
    with pytest.warns(UserWarning, match="treated as 'Unknown'"):
        model = CELLULAR.load_query_data(query, trained, unfrozen=True)
    with pytest.raises(ValueError, match="This CELLULAR has no labelled cell to train on"):
        model.train(max_epochs=1, **TRAIN)
    labelled = adata[:60].copy()
    labelled.obs["batch"] = "new_donor"
    model = CELLULAR.load_query_data(labelled, trained, unfrozen=True)
    model.train(max_epochs=1, batch_size=32, **TRAIN)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()


def test_loss_term_switches(adata):
    data = adata.copy()
    CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
    with pytest.raises(ValueError, match="non-zero"):
        CELLULAR(data, cell_type_weight=0, batch_weight=0, centroid_weight=0)
    model = CELLULAR(data, n_latent=4, n_hidden=(16,), centroid_weight=0.0, batch_weight=0.0)
    model.train(max_epochs=1, batch_size=64, **TRAIN)
    assert float(model.history["train_centroid_loss"].iloc[-1, 0]) == 0.0
    assert float(model.history["train_batch_loss"].iloc[-1, 0]) == 0.0


def test_bad_inputs(adata):
    data = adata.copy()
    with pytest.raises(ValueError, match="labels_key 'celltype'"):
        CELLULAR.setup_anndata(data, labels_key="celltype", batch_key="batch")
    one_batch = adata.copy()
    one_batch.obs["batch"] = "b0"
    with pytest.raises(ValueError, match="single batch"):
        CELLULAR.setup_anndata(one_batch, labels_key="cell_type", batch_key="batch")
    lonely = adata.copy()
    lonely.obs["cell_type"] = lonely.obs["cell_type"].astype(str)
    in_b0 = (lonely.obs["batch"] == "batch_0").to_numpy()
    lonely.obs.loc[in_b0[: lonely.n_obs] & (np.arange(lonely.n_obs) < 30), "cell_type"] = "rare"
    with pytest.warns(UserWarning, match="one batch"):
        CELLULAR.setup_anndata(lonely, labels_key="cell_type", batch_key="batch")
    logged = adata.copy()
    logged.X = np.log1p(logged.X.toarray())
    with pytest.raises(ValueError, match="non-integer"):
        CELLULAR.setup_anndata(logged, labels_key="cell_type", batch_key="batch")
    with pytest.raises(ValueError, match="batch_key 'donor'"):
        CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="donor")
    CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
    with pytest.raises(RuntimeError, match="This CELLULAR is not trained; call model.train"):
        CELLULAR(data).get_latent_representation()


@pytest.mark.skipif(not datasets_available(), reason="shared datasets absent")
def test_kang_donors_left_out_donor():
    from scvi_ext.data import load_dataset, select_genes

    adata = load_dataset("kang_donors")
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 2500, replace=False))].copy()
    adata = select_genes(adata, method="cellular")
    donors = adata.obs["donor"].astype(str)
    held_out = donors == donors.unique()[0]
    reference, query = adata[~held_out].copy(), adata[held_out].copy()
    scvi.settings.seed = 0
    CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="donor")
    model = CELLULAR(reference, n_latent=32, n_hidden=(256, 128))
    model.train(max_epochs=4, **TRAIN)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    accuracy = (model.predict(query) == truth).mean()
    n_types = len(np.unique(truth))
    assert accuracy > max(0.6, 2.0 / n_types)


def test_loading_with_cells_of_new_batches_points_to_inference(trained, adata, tmp_path):
    """load makes the cells the model's own data, in its batches; inference on them, which
    ignores the batch, is what the message points to."""
    trained.save(tmp_path / "cellular")
    query = adata[:60].copy()
    query.obs["batch"] = "new_donor"
    with pytest.raises(
        ValueError,
        match=r"batches this CELLULAR was not trained on \(\['new_donor'\].*adata=False",
    ):
        CELLULAR.load(tmp_path / "cellular", adata=query)
    loaded = CELLULAR.load(tmp_path / "cellular", adata=False)
    np.testing.assert_allclose(
        loaded.get_latent_representation(query),
        trained.get_latent_representation(adata[:60].copy()),
        atol=1e-6,
    )
