"""The model contract, executable: a toy model to copy (see docs/adding_a_model.md).

The toy (module, model, benchmark adapter; under 100 lines) runs from ``class ToyModule``
to ``# ---- tests``. A new method copies it into ``scvi_ext/<method>/_module.py`` and
``_model.py``, its adapter into ``scvi_ext/benchmark/_methods.py`` decorated with
``@register_method("<name>")`` (here it is registered inside its test only, so that the
registry other tests see is unchanged), then copies the tests below.
"""

import time
import warnings

import numpy as np
import pytest
import scvi
import torch
import torch.nn.functional as F
from anndata import AnnData
from conftest import ddp_rank_results
from lightning.pytorch import Callback
from scvi import REGISTRY_KEYS
from scvi.data.fields import CategoricalObsField
from scvi.model.base import ArchesMixin, BaseModelClass, UnsupervisedTrainingMixin
from scvi.module.base import LossOutput, auto_move_data
from scvi.nn import FCLayers
from torch import nn

from scvi_ext.base import (
    BaseTrainingPlan,
    ClassifierMixin,
    ClassifierModule,
    EmbeddingMixin,
    EmbeddingModule,
    InferenceModule,
    NonGenerativeModule,
    register_labelled_anndata,
    setup_anndata_method,
)
from scvi_ext.benchmark import METHODS, MethodResult, register_method, run_benchmark
from scvi_ext.data import simulate


class ToyModule(NonGenerativeModule):
    """log1p(counts per 10k) + batch one-hot -> hidden layer (the latent) -> cell type logits."""

    def __init__(self, n_input: int, n_labels: int, n_batch: int = 1, n_hidden: int = 32):
        super().__init__()
        self.n_labels = n_labels
        # scvi's FCLayers named "encoder": query mapping trains the new batch columns only
        self.encoder = FCLayers(n_input, n_hidden, [n_batch], n_layers=1, use_batch_norm=False)
        self.classifier = nn.Linear(n_hidden, n_labels)  # frozen by query mapping

    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "batch_index": tensors[REGISTRY_KEYS.BATCH_KEY]}

    @auto_move_data
    def inference(self, x: torch.Tensor, batch_index: torch.Tensor) -> dict:
        z = self.encoder(torch.log1p(x / x.sum(1, keepdim=True).clamp_min(1) * 1e4), batch_index)
        return {"z": z, "logits": self.classifier(z)}

    def loss(self, tensors, inference_outputs, generative_outputs, label_smoothing: float = 0.0):
        """Cross-entropy of labelled cells (the unlabeled category is code ``n_labels``)."""
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        labelled, logits = (labels < self.n_labels).float(), inference_outputs["logits"]
        targets = labels.clamp(max=self.n_labels - 1)
        ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
        n_labelled = labelled.sum().clamp_min(1)
        metrics = {"accuracy": ((logits.argmax(1) == labels) * labelled).sum() / n_labelled}
        loss = (ce * labelled).sum() / n_labelled
        return LossOutput(loss=loss, n_obs_minibatch=len(labels), extra_metrics=metrics)

    def predict_logits(self, tensors: dict) -> torch.Tensor:
        return self.inference(**self._get_inference_input(tensors))["logits"]

    def latent(self, tensors: dict) -> torch.Tensor:
        return self.inference(**self._get_inference_input(tensors))["z"]


class Toy(ClassifierMixin, EmbeddingMixin, ArchesMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Toy classifier: the contract's smallest model."""

    _module_cls = ToyModule
    _training_plan_cls = BaseTrainingPlan
    _batch_at_inference = True  # the encoder reads each cell's batch: new ones are refused
    train_defaults = {"max_epochs": 20, "train_size": 0.9, "batch_size": 128}

    def __init__(self, adata: AnnData | None = None, registry: dict | None = None, n_hidden=32):
        super().__init__(adata, registry=registry)
        stats, n_labels = self.summary_stats, len(self.label_names)
        self.module = self._module_cls(stats.n_vars, n_labels, stats.n_batch, n_hidden)
        self.init_params_ = self._get_init_params(locals())

    @setup_anndata_method
    def setup_anndata(
        cls, adata, labels_key, unlabeled_category=None, layer=None, batch_key=None, **kwargs
    ):
        """Register raw counts, cell type labels and (for query mapping) batches.

        Parameters
        ----------
        %(param_adata)s
        labels_key, unlabeled_category, layer, batch_key
            Cell type column, label of unlabeled cells (``None``: every cell is
            labelled), layer of raw counts (``None``: ``X``), ``obs`` column of batches.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        batch_field = CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key)
        register_labelled_anndata(cls, adata, setup_method_args, [batch_field], **kwargs)


def toy_method(reference, query, labels_key, seed=0, *, max_epochs=20) -> MethodResult:
    """Benchmark adapter: train on the reference counts, predict the query (genes by name)."""
    adata = reference.copy()  # setup_anndata writes into the AnnData it registers
    Toy.setup_anndata(adata, labels_key=labels_key)
    model, start = Toy(adata), time.perf_counter()
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    seconds, proba = time.perf_counter() - start, model.predict(query, soft=True)
    predictions = proba.idxmax(axis=1).astype(str).to_numpy()
    confidence = proba.max(axis=1).to_numpy()
    return MethodResult("toy", predictions, confidence, seconds, settings=f"{max_epochs} epochs")


# ---- tests
FAST = {"max_epochs": 20, "batch_size": 64, "enable_progress_bar": False}


def _simulated() -> tuple[AnnData, AnnData]:
    adata = simulate(n_cells=480, n_genes=100, n_cell_types=4, n_batches=2, n_markers=15, seed=1)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    query = (adata.obs["condition"] == "query").to_numpy()
    return adata[~query].copy(), adata[query].copy()


@pytest.fixture(scope="module")
def reference_model():
    """(model trained on the reference condition with a batch covariate, reference, query)."""
    scvi.settings.seed = 0
    reference, query = _simulated()
    Toy.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = Toy(reference)
    model.train(**FAST)
    return model, reference, query


def test_toy_module_satisfies_inference_embedding_and_classifier_protocols(reference_model):
    model, _, _ = reference_model
    assert isinstance(model.module, InferenceModule)
    assert isinstance(model.module, EmbeddingModule)
    assert isinstance(model.module, ClassifierModule)


def test_training_logs_the_loss_and_its_extra_metric_per_stage(reference_model):
    model, _, _ = reference_model
    for name in ("train_loss", "train_accuracy", "validation_loss", "validation_accuracy"):
        assert name in model.history, sorted(model.history)


def test_query_accuracy_well_above_chance_and_latent_has_one_row_per_cell(reference_model):
    model, _, query = reference_model
    predictions = model.predict(query)
    assert (predictions == query.obs["cell_type"].to_numpy()).mean() > 0.7  # chance: 0.25
    assert model.get_latent_representation(query).shape == (query.n_obs, 32)
    assert "_scvi_uuid" not in query.uns  # the user's AnnData is untouched


def test_indices_selecting_no_cell_are_refused(reference_model):
    model, _, _ = reference_model
    with pytest.raises(ValueError, match="indices selects no cell; pass at least one index"):
        model.predict(indices=[])
    with pytest.raises(ValueError, match="indices selects no cell"):
        model.get_latent_representation(indices=np.array([], dtype=int))


def test_query_with_genes_reversed_gets_the_same_probabilities(reference_model):
    model, _, query = reference_model
    reversed_genes = query[:, ::-1].copy()
    np.testing.assert_allclose(model.predict_proba(reversed_genes), model.predict_proba(query))


def test_loss_keyword_arguments_are_plan_kwargs_and_unknown_keys_are_errors(reference_model):
    _, reference, _ = reference_model
    model = Toy(reference)
    received, loss = [], model.module.loss
    model.module.loss = lambda *args, **kwargs: received.append(kwargs) or loss(*args, **kwargs)
    model.train(max_epochs=1, plan_kwargs={"label_smoothing": 0.1}, enable_progress_bar=False)
    assert received and all(kwargs == {"label_smoothing": 0.1} for kwargs in received)
    with pytest.raises(ValueError, match="Unknown plan_kwargs"):
        model.train(max_epochs=1, plan_kwargs={"label_smothing": 0.1})
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(max_epochs=0)


def test_save_load_gives_identical_predictions_and_second_save_needs_overwrite(
    reference_model, tmp_path
):
    model, reference, query = reference_model
    folder = str(tmp_path / "toy")
    model.save(folder)
    loaded = Toy.load(folder, adata=reference)
    np.testing.assert_array_equal(loaded.predict_proba(), model.predict_proba())
    without_data = Toy.load(folder, adata=False)
    assert without_data.adata is None
    np.testing.assert_array_equal(without_data.predict_proba(query), model.predict_proba(query))
    assert without_data.calibration_temperature == model.calibration_temperature
    with pytest.raises(ValueError, match="already exists"):
        model.save(folder)
    model.save(folder, overwrite=True)


def test_overwriting_a_save_removes_the_data_saved_with_it_before(reference_model, tmp_path):
    """Otherwise load() would attach the old data to the new model without a word."""
    model, _, _ = reference_model
    folder = tmp_path / "toy"
    model.save(folder, save_anndata=True)
    assert (folder / "adata.h5ad").exists()
    model.save(folder, overwrite=True)
    assert not (folder / "adata.h5ad").exists()
    model.save(folder, overwrite=True, save_anndata=True)
    assert (folder / "adata.h5ad").exists()


def test_loading_with_cells_without_labels_or_of_new_types_predicts_them(
    reference_model, tmp_path
):
    model, _, query = reference_model
    folder = str(tmp_path / "toy")
    model.save(folder)
    unlabelled = query.copy()
    del unlabelled.obs["cell_type"]
    loaded = Toy.load(folder, adata=unlabelled)
    np.testing.assert_array_equal(loaded.predict_proba(), model.predict_proba(query))
    assert list(unlabelled.obs.columns) == [c for c in query.obs.columns if c != "cell_type"]
    assert "_scvi_uuid" not in unlabelled.uns  # the user's AnnData is untouched
    new_type = query.copy()
    new_type.obs.iloc[:5, new_type.obs.columns.get_loc("cell_type")] = "a new type"
    with pytest.warns(UserWarning, match="never saw \\(\\['a new type'\\]\\)"):
        loaded = Toy.load(folder, adata=new_type)
    np.testing.assert_array_equal(loaded.predict_proba(), model.predict_proba(query))


def test_cells_of_batches_the_model_never_saw_are_refused_at_predict_and_load(
    reference_model, tmp_path
):
    model, _, query = reference_model
    folder = str(tmp_path / "toy")
    model.save(folder)
    new_batch = query.copy()
    new_batch.obs["batch"] = "donor_9"
    message = r"batches this Toy was not trained on \(\['donor_9'\].*Toy.load_query_data"
    with pytest.raises(ValueError, match=message):
        model.predict(new_batch)
    with pytest.raises(ValueError, match=message):
        Toy.load(folder, adata=new_batch)
    no_batch = query.copy()
    del no_batch.obs["batch"]
    with pytest.raises(ValueError, match="adata.obs has no column 'batch' \\(the batch_key of"):
        model.get_latent_representation(no_batch)
    missing = query.copy()
    missing.obs["batch"] = missing.obs["batch"].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ValueError, match="has 1 missing \\(NaN\\) values"):
        model.predict(missing)


def test_query_mapping_to_new_batches_trains_only_their_first_layer_columns(reference_model):
    model, reference, query = reference_model
    query = query.copy()
    query.obs["batch"] = "new_" + query.obs["batch"].astype(str)
    query_model = Toy.load_query_data(query, model)
    before = {key: value.clone() for key, value in query_model.module.state_dict().items()}
    query_model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
    after = query_model.module.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    first = "encoder.fc_layers.Layer 0.0.weight"
    assert changed == {first}
    n_reference_columns = reference.n_vars + reference.obs["batch"].nunique()
    old, new = slice(0, n_reference_columns), slice(n_reference_columns, None)
    assert after[first].shape[1] == n_reference_columns + 2
    assert torch.equal(before[first][:, old], after[first][:, old])
    assert not torch.equal(before[first][:, new], after[first][:, new])
    assert query_model.predict().shape == (query.n_obs,)


def test_benchmark_adapter_runs_through_run_benchmark_above_chance(tmp_path):
    register_method("toy", default=False)(toy_method)  # not left in the defaults
    try:
        results = run_benchmark(
            "simulated",
            seeds=[0],
            methods=["toy"],
            outdir=tmp_path,
            task_kwargs={"n_cells": 400, "n_genes": 100, "n_cell_types": 4},
            plots=False,
            ceiling=False,
        )
    finally:
        METHODS.pop("toy")
    assert list(results["method"]) == ["toy"]
    assert results["accuracy"].iloc[0] > 0.5  # chance: 0.25


def test_training_on_every_cell_without_a_validation_set(caplog):
    reference, _ = _simulated()
    Toy.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = Toy(reference)
    model.train(**{**FAST, "max_epochs": 2}, train_size=1.0)
    assert model.predict().shape == (reference.n_obs,)
    assert "validation_loss" not in model.history
    assert "No labelled validation cells to calibrate on (train_size=1?)" in caplog.text
    assert model.calibration_temperature == 1.0


class _EpochRecorder(Callback):
    """Records the epochs that run, and raises at the end of ``kill_after`` as a kill would."""

    def __init__(self, kill_after: int | None = None):
        self.epochs, self.kill_after = [], kill_after

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == self.kill_after and not trainer.sanity_checking:
            raise RuntimeError("killed")


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    reference, _ = _simulated()
    Toy.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    settings = {**FAST, "max_epochs": 4, "checkpoint_dir": tmp_path / "checkpoints"}
    killed = _EpochRecorder(kill_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        Toy(reference).train(**settings, callbacks=[killed])
    assert killed.epochs == [0, 1, 2]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch=1.ckpt"]
    resumed = _EpochRecorder()
    model = Toy(reference)
    model.train(**settings, resume=True, callbacks=[resumed])
    assert resumed.epochs == [2, 3]
    assert model.is_trained and model.predict().shape == (reference.n_obs,)
    with pytest.raises(ValueError, match="No checkpoint to resume from in"):
        Toy(reference).train(**{**settings, "checkpoint_dir": tmp_path / "none"}, resume=True)
    with pytest.raises(ValueError, match="resume=True needs the checkpoint_dir"):
        Toy(reference).train(**FAST, resume=True)


DDP_SCRIPT = """
import scvi

from test_contract import FAST, Toy, _simulated

scvi.settings.seed = 0
reference, query = _simulated()
Toy.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
model = Toy(reference)
model.train(**{**FAST, "max_epochs": 2}, accelerator="cpu", devices=2, strategy="ddp")
result = model.predict(query).shape[0]
"""


def test_cpu_ddp_with_two_processes_trains_and_both_ranks_predict(tmp_path):
    assert ddp_rank_results(DDP_SCRIPT, tmp_path) == [str(_simulated()[1].n_obs)] * 2


def test_a_saved_query_model_loads_with_the_same_weights_frozen(reference_model, tmp_path):
    """A query model saved and loaded trains the weights the query mapping left trainable
    (the new batch columns of the first layer), no others; one saved by an earlier version,
    which did not record its freezing, warns that every weight moves."""
    model, reference, query = reference_model
    query = query.copy()
    query.obs["batch"] = "new_" + query.obs["batch"].astype(str)
    Toy.load_query_data(query, model).save(tmp_path / "frozen")
    loaded = Toy.load(tmp_path / "frozen", adata=query)
    assert loaded.is_query_model
    before = {key: value.clone() for key, value in loaded.module.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    assert not [w for w in caught if "query model" in str(w.message)]
    after = loaded.module.state_dict()
    first = "encoder.fc_layers.Layer 0.0.weight"
    assert {key for key in before if not torch.equal(before[key], after[key])} == {first}
    n_reference_columns = reference.n_vars + reference.obs["batch"].nunique()
    old = slice(0, n_reference_columns)
    assert torch.equal(before[first][:, old], after[first][:, old])

    Toy.load_query_data(query, model, unfrozen=True).save(tmp_path / "unfrozen")
    loaded = Toy.load(tmp_path / "unfrozen", adata=query)
    assert loaded.is_query_model
    assert all(parameter.requires_grad for parameter in loaded.module.parameters())

    earlier = Toy.load_query_data(query, model)
    earlier.query_mapping_ = "frozen"  # what the earlier version saved
    earlier.save(tmp_path / "earlier")
    loaded = Toy.load(tmp_path / "earlier", adata=query)
    with pytest.warns(UserWarning, match=r"by an earlier version.*Toy.load_query_data\(adata"):
        loaded.train(max_epochs=1, batch_size=64, enable_progress_bar=False)


def test_query_mapping_needs_the_batch_column_filled(reference_model):
    model, _, query = reference_model
    no_batch = query.copy()
    del no_batch.obs["batch"]
    with pytest.raises(ValueError, match="no column 'batch', the reference's batch_key; add"):
        Toy.load_query_data(no_batch, model)
    missing = query.copy()
    missing.obs["batch"] = missing.obs["batch"].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ValueError, match=r"batch_key 'batch' has 1 missing \(NaN\) values"):
        Toy.load_query_data(missing, model)
