"""Shared base: paired splitter, plan helpers, gradient reversal, CPU DDP training."""

import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import ddp_rank_results, query_mask
from scvi import REGISTRY_KEYS

from scvi_ext.base import (
    LABELLED,
    UNLABELED,
    PairedDataLoader,
    PairedDataSplitter,
    class_weights,
    fit_temperature,
    labelled_class_weights,
    labelled_mask,
    query_neighbour_score,
    sigmoid_ramp,
)
from scvi_ext.model import ScNym
from scvi_ext.nn import grad_reverse


def manager_of(adata):
    ScNym.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    return ScNym(adata, n_hidden=8).adata_manager


def test_labelled_mask_follows_unlabeled_category(sim_adata):
    manager = manager_of(sim_adata)
    np.testing.assert_array_equal(labelled_mask(manager), ~query_mask(sim_adata))


def test_labelled_class_weights_count_only_labelled_cells(sim_adata):
    ScNym.setup_anndata(
        sim_adata, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
    )
    manager = ScNym(sim_adata, n_hidden=8).adata_manager
    labelled = ~query_mask(sim_adata)
    # batches: the unlabeled cells hold real batch codes, so the mask decides the weights
    weights = labelled_class_weights(manager, REGISTRY_KEYS.BATCH_KEY, 2)
    counts = sim_adata.obs["batch"][labelled].value_counts()[["batch_0", "batch_1"]].to_numpy()
    assert counts[0] != counts[1]  # all cells would give equal weights (240 and 240)
    np.testing.assert_allclose(weights.numpy(), (1 / counts) / (1 / counts).sum(), rtol=1e-6)
    # labels: the unlabeled category is coded last and gets no weight
    mapping = manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
    assert mapping[-1] == "Unknown"
    weights = labelled_class_weights(manager, REGISTRY_KEYS.LABELS_KEY, 4)
    counts = sim_adata.obs["labels"][labelled].value_counts()[list(mapping[:4])].to_numpy()
    np.testing.assert_allclose(weights.numpy(), (1 / counts) / (1 / counts).sum(), rtol=1e-6)


def test_paired_loader_pairs_every_step_and_cycles_the_shorter_side(sim_adata):
    manager = manager_of(sim_adata)
    labelled, unlabeled = np.arange(100), np.arange(400, 430)
    loader = PairedDataLoader(manager, labelled, unlabeled, batch_size=16)
    steps = list(loader)
    assert len(steps) == len(loader) == 7  # ceil(100 / 16): the longer side sets the epoch
    # 100 labelled cells: 6 minibatches of 16 and one of 4 (kept: not under MIN_LAST_BATCH);
    # 30 unlabeled cells: minibatches of 16 and 14, restarted when they run out
    sizes = {
        side: [len(step[side][REGISTRY_KEYS.X_KEY]) for step in steps]
        for side in (LABELLED, UNLABELED)
    }
    assert sizes[LABELLED] == [16] * 6 + [4]
    assert sizes[UNLABELED] == [16, 14] * 3 + [16]


def test_paired_loader_empty_side_yields_none(sim_adata):
    manager = manager_of(sim_adata)
    loader = PairedDataLoader(manager, np.arange(52), np.array([], dtype=int), batch_size=16)
    steps = list(loader)
    assert len(steps) == 4
    assert all(step[UNLABELED] is None for step in steps)
    with pytest.raises(ValueError, match="at least one"):
        PairedDataLoader(manager, np.array([], dtype=int), np.array([], dtype=int))


def test_splitter_holds_out_labelled_cells_only(sim_adata):
    manager = manager_of(sim_adata)
    splitter = PairedDataSplitter(manager, train_size=0.8, batch_size=32)
    splitter.setup()
    n_labelled = int((~query_mask(sim_adata)).sum())
    assert len(splitter.val_idx) == n_labelled - int(np.ceil(0.8 * n_labelled))
    assert not query_mask(sim_adata)[splitter.val_idx].any()
    assert query_mask(sim_adata)[splitter.unlabeled_idx].all()
    assert len(np.intersect1d(splitter.train_idx, splitter.val_idx)) == 0
    assert len(splitter.train_idx) + len(splitter.val_idx) == sim_adata.n_obs


def test_query_neighbour_score_is_the_neighbourhood_density_ratio():
    reference = np.array([[0.0], [0.1], [0.2], [0.3]])
    query = np.array([[0.12], [0.18], [10.0], [10.1], [10.25]])
    score = query_neighbour_score(reference, query, n_neighbors=2, counts=False)
    # 0.12 and 0.18: one reference and one query neighbour -> (1/5) / (1/5 + 1/4)
    np.testing.assert_allclose(score, [4 / 9, 4 / 9, 1.0, 1.0, 1.0])


def test_query_neighbour_score_counts_dense_or_sparse_and_subsampled():
    rng = np.random.default_rng(0)
    reference = rng.poisson(2.0, (300, 40)).astype(float)
    novel_program = np.r_[np.full(5, 20.0), np.full(35, 2.0)]  # 5 genes up in a new type
    query = np.vstack([rng.poisson(2.0, (60, 40)), rng.poisson(novel_program, (60, 40))])
    dense = query_neighbour_score(reference, query, n_neighbors=15, n_comps=10)
    sparse = query_neighbour_score(
        sp.csr_matrix(reference), sp.csr_matrix(query), n_neighbors=15, n_comps=10
    )
    np.testing.assert_allclose(dense, sparse, atol=1e-6)
    assert dense[60:].mean() > 0.9 > 0.6 > dense[:60].mean()
    subsampled = query_neighbour_score(reference, query, n_neighbors=15, max_cells=50)
    assert subsampled.shape == (120,) and ((0 <= subsampled) & (subsampled <= 1)).all()
    assert subsampled[60:].mean() > subsampled[:60].mean() + 0.3


def test_query_neighbour_score_bad_inputs():
    reference, query = np.zeros((10, 3)), np.ones((20, 3))
    with pytest.raises(ValueError, match="The query has 4 genes and the reference 3"):
        query_neighbour_score(reference, np.ones((20, 4)))
    with pytest.raises(ValueError, match="The reference has no cells"):
        query_neighbour_score(reference[:0], query)
    with pytest.raises(ValueError, match="The query has 20 cells; .* at least n_neighbors=50"):
        query_neighbour_score(reference, query)


@pytest.mark.parametrize("argument", ["n_neighbors", "n_comps", "max_cells"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_query_neighbour_score_needs_positive_integer_sizes(argument, value):
    with pytest.raises(
        ValueError, match=rf"^{argument} must be a positive integer, not {value}\.$"
    ):
        query_neighbour_score(np.ones((10, 3)), np.ones((20, 3)), **{argument: value})


def test_query_neighbour_score_checks_counts():
    reference, query = np.ones((10, 3)), np.ones((20, 3))
    query[0, 0] = 0.5
    message = (
        "the query contains non-integer values; found 1. This looks like normalised or "
        "log-transformed data: pass raw counts, e.g. a counts layer via `layer=`; models "
        "normalise internally. Pass counts=False to score values that are not counts."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        query_neighbour_score(reference, query, n_neighbors=5)
    reference[3] = 0
    with pytest.raises(ValueError, match="^the reference has 1 cells with zero total counts"):
        query_neighbour_score(reference, query, n_neighbors=5)
    assert query_neighbour_score(reference, query, n_neighbors=5, counts=False).shape == (20,)


def test_sigmoid_ramp():
    assert sigmoid_ramp(0, 20) == pytest.approx(np.exp(-5))
    assert sigmoid_ramp(10, 20) == pytest.approx(np.exp(-1.25))
    assert sigmoid_ramp(20, 20) == 1.0 and sigmoid_ramp(50, 20) == 1.0
    assert sigmoid_ramp(3, 0) == 1.0


def test_gradient_reversal_scales_and_flips_gradient():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 0.1) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [-0.1, -0.2, -0.3], rtol=1e-6)


DDP_SCRIPT = """
import scvi
from scvi_ext.data import simulate
from scvi_ext.model import ScNym

scvi.settings.seed = 0
adata = simulate(n_cells=300, n_genes=60, n_cell_types=3, n_markers=10, seed=2)
labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
labels[(adata.obs["condition"] == "query").to_numpy()] = "Unknown"
adata.obs["labels"] = labels
ScNym.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
model = ScNym(adata, n_hidden=16)
model.train(max_epochs=2, batch_size=32, accelerator="cpu", devices=2, strategy="ddp",
            enable_progress_bar=False)
result = model.predict().shape[0]
"""


def test_cpu_ddp_with_two_processes_trains(tmp_path):
    # both ranks finished and predicted every cell
    assert ddp_rank_results(DDP_SCRIPT, tmp_path) == ["300"] * 2


def test_plan_logs_cell_weighted_epoch_means_and_keeps_the_best_epoch(monkeypatch):
    from types import SimpleNamespace

    from scvi_ext.scnym import ScNymModule, ScNymTrainingPlan

    plan = ScNymTrainingPlan(ScNymModule(n_input=5, n_labels=2))
    reduce = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor)
    plan._trainer = SimpleNamespace(sanity_checking=False, strategy=reduce, current_epoch=0)
    logged = {}
    monkeypatch.setattr(plan, "log", lambda name, value, **kwargs: logged.update({name: value}))

    plan.log_step("validation", {"validation_loss": torch.tensor(1.0), "other": 0.5}, n_cells=30)
    plan.log_step("validation", {"validation_loss": torch.tensor(3.0)}, n_cells=10)
    plan.log_step("validation", {"no_cells": torch.tensor(7.0)}, n_cells=0)
    plan.log_step("validation", {"counted": torch.tensor(0.25)}, n_cells=torch.tensor(4))
    plan.log_step("validation", {"counted": torch.tensor(1.0)}, n_cells=torch.tensor(12))
    plan.on_validation_epoch_end()
    assert float(logged["validation_loss"]) == pytest.approx(1.5)  # (30 x 1 + 10 x 3) / 40
    assert float(logged["other"]) == pytest.approx(0.5)
    assert np.isnan(float(logged["no_cells"]))
    assert float(logged["counted"]) == pytest.approx(0.8125)  # counts on the device
    assert plan.best_validation_loss == pytest.approx(1.5)
    assert plan._best_state is not None

    logged.clear()  # the sanity check's steps are dropped, not logged
    plan._trainer.sanity_checking = True
    plan.log_step("validation", {"validation_loss": torch.tensor(0.1)}, n_cells=5)
    plan.on_validation_epoch_end()
    assert logged == {}
    plan._trainer.sanity_checking = False
    plan.on_validation_epoch_end()
    assert logged == {} and plan.best_validation_loss == pytest.approx(1.5)


def test_create_optimizer_fuses_adam_and_leaves_others_alone():
    from scvi_ext.base import create_optimizer

    weights = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))]
    adam = create_optimizer(torch.optim.Adam, iter(weights), lr=1e-3)  # a generator is fine
    assert adam.defaults["fused"] is True
    assert len(adam.param_groups[0]["params"]) == 2
    adadelta = create_optimizer(torch.optim.Adadelta, weights, lr=1.0)
    assert not adadelta.defaults.get("fused")
    elsewhere = [torch.nn.Parameter(torch.zeros(2, device="meta"))]  # no fused kernel there
    assert not create_optimizer(torch.optim.Adam, elsewhere, lr=1e-3).defaults.get("fused")


def _meta_minibatch(n_cells: int, n_genes: int, label: int) -> dict:
    return {
        REGISTRY_KEYS.X_KEY: torch.ones(n_cells, n_genes, device="meta"),
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(n_cells, 1, device="meta"),
        REGISTRY_KEYS.LABELS_KEY: torch.full((n_cells, 1), label, device="meta"),
    }


@pytest.mark.parametrize("plan_name", ["scnym", "latent_classifier", "cellular"])
def test_plan_steps_run_on_the_modules_device_without_waiting_for_it(plan_name):
    # No GPU here: the meta device stands in for one. It has no data, so any tensor made on
    # the CPU, any .item()/bool() and any boolean-mask indexing in a step raises: each
    # would be a device mismatch or a wait for the GPU in every step.
    from scvi_ext.cellular import CELLULARModule, CELLULARTrainingPlan
    from scvi_ext.classifier import LatentClassifierModule, LatentClassifierTrainingPlan
    from scvi_ext.scnym import ScNymModule, ScNymTrainingPlan

    n_genes, n_labels = 20, 3
    if plan_name == "scnym":
        plan = ScNymTrainingPlan(
            ScNymModule(n_input=n_genes, n_labels=n_labels), pseudolabel_min_confidence=0.5
        )
        train_batch = {
            LABELLED: _meta_minibatch(4, n_genes, 0),
            UNLABELED: _meta_minibatch(4, n_genes, n_labels),
        }
    else:
        if plan_name == "latent_classifier":
            plan = LatentClassifierTrainingPlan(LatentClassifierModule(n_genes, n_labels))
        else:
            module = CELLULARModule(n_genes, n_labels, n_batch=2, n_latent=4, n_hidden=(8,))
            module.label_weights.fill_(1.0 / n_labels)
            module.batch_weights.fill_(0.5)
            plan = CELLULARTrainingPlan(module)
        train_batch = _meta_minibatch(4, n_genes, n_labels)  # unlabeled cells mixed in
        train_batch[REGISTRY_KEYS.LABELS_KEY][:2] = 1
    plan = plan.to("meta")
    loss = plan.training_step(train_batch, 0)
    assert loss.device.type == "meta"
    assert loss.shape == ()
    plan.validation_step(_meta_minibatch(4, n_genes, 0), 0)


def test_fit_temperature_softens_overconfident_and_sharpens_underconfident_logits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=2000)
    predicted = np.where(rng.random(2000) < 0.7, labels, rng.integers(0, 4, size=2000))
    one_hot = np.eye(4)[predicted]
    assert fit_temperature(10.0 * one_hot, labels) > 3  # 99.9% confident, 70% right
    assert fit_temperature(0.2 * one_hot, labels) < 0.5  # 30% confident, 70% right
    assert fit_temperature(np.log(np.where(one_hot, 0.775, 0.075)), labels) == pytest.approx(
        1.0, abs=0.1
    )  # calibrated already: P(right) = 0.7 + 0.3 / 4


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros(4), [0, 1, 0, 1], "logits must be 2-D (cells x classes); got shape (4,)."),
        (
            np.zeros((4, 2)),
            [[0], [1], [0], [1]],
            "labels must be 1-D (one class code per cell); got shape (4, 1). Flatten them "
            "first, e.g. labels.ravel().",
        ),
        (
            np.zeros((4, 2)),
            [0, 1],
            "logits has 4 rows and labels 2 entries; give one label per row of logits.",
        ),
        (np.zeros((0, 2)), [], "fit_temperature needs at least one labelled cell."),
        (np.zeros((2, 2)), [0.0, 1.0], "labels must be integer class codes, not dtype float64."),
        (
            np.zeros((3, 2)),
            [0, -1, 2],
            "labels must be class codes from 0 to 1 (the columns of logits); found 2 "
            "outside, e.g. -1.",
        ),
        (
            np.array([[0.0, np.nan], [np.inf, 1.0]]),
            [0, 1],
            "logits has 2 NaN or infinite values; fit on finite logits.",
        ),
    ],
)
def test_fit_temperature_rejects_bad_input(logits, labels, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fit_temperature(logits, np.asarray(labels))


def test_a_one_cell_last_minibatch_is_dropped_not_trained_through_batchnorm():
    from scvi_ext.base import drop_small_last_batch
    from scvi_ext.data import simulate
    from scvi_ext.model import GMVAE

    assert drop_small_last_batch(129, 128, False) and drop_small_last_batch(130, 128, False)
    assert not drop_small_last_batch(131, 128, False)  # 3 cells train
    assert not drop_small_last_batch(1, 128, False)  # no full minibatch: keep every cell
    assert drop_small_last_batch(200, 128, True)

    adata = simulate(n_cells=143, n_genes=30, n_cell_types=3, n_batches=1, seed=0)
    GMVAE.setup_anndata(adata)
    model = GMVAE(adata, n_latent=4, n_hidden=16, n_components=3)
    # 143 cells, train_size 0.9: 129 training cells, a one-cell last minibatch of 128
    model.train(max_epochs=2, batch_size=128, train_size=0.9, enable_progress_bar=False)
    assert len(model.trainer.train_dataloader) == 1
    assert len(model.history["train_loss"]) == 2

    ScNym.setup_anndata(adata, labels_key="cell_type", unlabeled_category=None)
    scnym = ScNym(adata, n_hidden=16)
    scnym.train(max_epochs=1, batch_size=128, train_size=0.9, enable_progress_bar=False)
    assert len(scnym.trainer.train_dataloader) == 1


def test_class_weights_are_zero_not_nan_without_any_counted_code():
    """Every code is the unlabeled one (n_classes): no class has cells."""
    weights = class_weights(np.array([3, 3, 3]), 3)
    assert torch.equal(weights, torch.zeros(3))
    np.testing.assert_allclose(class_weights(np.array([0, 0, 1, 3]), 3), [1 / 3, 2 / 3, 0])
