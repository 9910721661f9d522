"""Issue 13 benchmark: the linear SVM / LinearSVC / random forest peers, the CAN method,
the classification, markers and transfer studies, and ``scvi-ext annotate --model CAN``."""

import functools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import requires_shared_data

from scvi_ext.benchmark import METHODS, MethodResult, reference_hvgs, run_benchmark, run_study
from scvi_ext.benchmark._attention_tasks import (
    CLASSIFICATION_DATASETS,
    CLASSIFICATION_METHODS,
    classification,
    pbmc68k_reduced_counts,
    precision_at,
    stratified_split,
    top_variance_genes,
)
from scvi_ext.cli import main
from scvi_ext.data import log_normalised_anndata, select_genes, simulate

SMALL_CAN = {"n_capsules": 6, "capsule_dim": 16, "attention_dim": 8, "kernel_size": 3}


def _simulated(n_cells: int = 400) -> ad.AnnData:
    adata = simulate(n_cells=n_cells, n_genes=80, n_cell_types=4, n_markers=12, seed=4)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return adata


def test_new_peers_are_registered_and_well_above_chance(tmp_path):
    results = run_benchmark(
        "simulated",
        seeds=[0],
        methods=["svm_linear", "linear_svc", "random_forest"],
        outdir=tmp_path,
        method_kwargs={"random_forest": {"n_estimators": 50}},
        task_kwargs={"n_cells": 400, "n_genes": 100, "n_cell_types": 4},
        plots=False,
        ceiling=False,
    )
    assert list(results["method"]) == ["svm_linear", "linear_svc", "random_forest"]
    assert (results["accuracy"] > 0.7).all(), results  # chance: 0.25
    assert results["ece"].notna().all()


def test_svm_linear_is_the_papers_svc_and_its_confidence_is_of_the_predicted_class():
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    adata = _simulated()
    reference, query = stratified_split(adata, "cell_type", seed=0)
    result = METHODS["svm_linear"](reference, query, "cell_type", 0, n_top_genes=None)
    x_reference, x_query = log_normalised_anndata(reference).X, log_normalised_anndata(query).X
    labels = reference.obs["cell_type"]
    paper = SVC(kernel="linear", max_iter=1000).fit(x_reference, labels)
    expected = paper.predict(x_query)
    np.testing.assert_array_equal(result.predictions, expected)
    # Platt scaling on 5-fold cross-validated decision values; the predicted class's column
    platt = CalibratedClassifierCV(
        SVC(kernel="linear", max_iter=1000), method="sigmoid", cv=5, ensemble=False
    ).fit(x_reference, labels)
    proba = platt.predict_proba(x_query)
    column = np.searchsorted(platt.classes_, expected)
    np.testing.assert_allclose(result.confidence, proba[np.arange(len(expected)), column])


def test_svm_calibration_uses_fewer_folds_when_a_cell_type_is_rare():
    adata = _simulated()
    rare = adata.obs["cell_type"] == "type_3"
    adata = adata[~rare.to_numpy() | (np.cumsum(rare.to_numpy()) <= 3)].copy()  # 3 cells
    result = METHODS["svm_linear"](adata, adata[:20].copy(), "cell_type", 0)
    assert "Platt confidence (3-fold)" in result.settings


def test_can_method_trains_on_the_top_variance_genes_and_predicts_every_query_cell(monkeypatch):
    from scvi_ext.benchmark._methods import n_training_cells
    from scvi_ext.model import CAN

    learning_rates, models = [], []
    train = CAN.train

    def spy(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        learning_rates.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        models.append(self)
        return output

    monkeypatch.setattr(CAN, "train", spy)
    adata = _simulated()
    reference, query = stratified_split(adata, "cell_type", seed=0)
    result = METHODS["can"](
        reference,
        query,
        "cell_type",
        0,
        max_epochs=2,
        n_top_genes=50,
        model_kwargs=SMALL_CAN,
        plan_kwargs={"lr": 1e-3},
    )
    assert len(result.predictions) == query.n_obs
    assert set(result.predictions) <= set(reference.obs["cell_type"])
    sizes = "".join(f", {key} {value}" for key, value in SMALL_CAN.items())
    assert result.settings == "50 genes, 2 epochs, lr 0.001" + sizes
    assert learning_rates == [1e-3]  # the study's can_lr1e-3 row reaches the optimizer
    # throughput: training cells (validation cells excluded) x epochs per second
    n_trained = n_training_cells(models[0])
    assert n_trained == reference.n_obs - len(models[0].validation_indices) < reference.n_obs
    assert result.cells_per_second * result.train_seconds == pytest.approx(n_trained * 2)
    assert CLASSIFICATION_METHODS["can_lr1e-3"] == ("can", {"plan_kwargs": {"lr": 1e-3}})
    assert "_scvi_uuid" not in reference.uns  # the benchmark's AnnData untouched


def test_stratified_split_keeps_each_type_four_to_one_and_is_seeded():
    adata = _simulated()
    train, test = stratified_split(adata, "cell_type", seed=3)
    assert train.n_obs == 320 and test.n_obs == 80
    assert not set(train.obs_names) & set(test.obs_names)
    fractions = test.obs["cell_type"].value_counts() / adata.obs["cell_type"].value_counts()
    np.testing.assert_allclose(fractions.to_numpy(dtype=float), 0.2, atol=0.02)
    again, _ = stratified_split(adata, "cell_type", seed=3)
    assert list(again.obs_names) == list(train.obs_names)


def test_precision_at_k_counts_the_papers_markers_and_skips_unscored_types():
    ranked = {
        "B": ["CD79A", "MS4A1", "LYZ", "X1"],
        "CD14+Mono": ["LYZ", "CST3", "CD79A", "X2"],
        "Dendritic": ["HLA-DRA"],
    }
    table = precision_at(ranked, k=4)
    assert list(table["cell_type"]) == ["B", "CD14+Mono"]
    assert list(table["precision_at_k"]) == [0.5, 0.5]
    assert list(table["hits"]) == ["CD79A,MS4A1", "LYZ,CST3"]


def test_pbmc68k_counts_are_integers_that_give_back_scanpys_log_values():
    import scanpy as sc

    counts = pbmc68k_reduced_counts()
    original = sc.datasets.pbmc68k_reduced()
    assert counts.shape == (700, 765) and counts.obs["bulk_labels"].nunique() == 10
    values = counts.X.toarray()
    np.testing.assert_array_equal(values, np.rint(values))
    library = original.obs["n_counts"].to_numpy()[:, None]
    rebuilt = np.log1p(values / library * 1e4)
    np.testing.assert_allclose(rebuilt, original.raw.X.toarray(), atol=0.05)


def test_classification_study_writes_one_table_per_dataset(tmp_path, monkeypatch):
    monkeypatch.setitem(CLASSIFICATION_DATASETS, "simulated", (_simulated, "cell_type"))
    tables = run_study(
        "attention_classification",
        seeds=[0],
        outdir=tmp_path,
        options={
            "datasets": ["simulated"],
            "methods": ["svm_linear", "logistic_regression"],
            "n_top_genes": 40,
        },
    )
    table = tables["classification_simulated"]
    assert list(table["method"]) == ["svm_linear", "logistic_regression"]
    assert (table["accuracy"] > 0.7).all()
    assert table["settings"].str.startswith("40 HVGs").all()  # the study's 40 genes for all
    assert (tmp_path / "classification_simulated_per_seed.csv").exists()
    assert "classification_simulated" in (tmp_path / "summary.md").read_text()


def test_classification_study_gives_every_method_the_studys_genes(monkeypatch):
    monkeypatch.setitem(CLASSIFICATION_DATASETS, "simulated", (_simulated, "cell_type"))
    calls = {}

    def record(name, reference, query, labels_key, seed=0, **options):
        calls.setdefault(name, []).append((reference.var_names, query.var_names, options))
        return MethodResult(name, np.full(query.n_obs, "type_0"), np.ones(query.n_obs), 1.0)

    methods = {method for method, _ in CLASSIFICATION_METHODS.values()}
    for name in methods:  # the real signatures (functools.wraps), recording the calls
        fake = functools.wraps(METHODS[name])(functools.partial(record, name))
        monkeypatch.setitem(METHODS, name, fake)
    classification(0, datasets=["simulated"], n_top_genes=30, max_epochs=3)
    genes = top_variance_genes(*stratified_split(_simulated(), "cell_type", 0), 30)[0].var_names
    assert set(calls) == methods
    for name, runs in calls.items():
        for reference_genes, query_genes, options in runs:
            assert list(reference_genes) == list(query_genes) == list(genes)
            assert options["n_top_genes"] == 30, name  # each method keeps the study's genes
            if name not in ("svm_linear", "linear_svc", "logistic_regression", "random_forest"):
                assert options["max_epochs"] == 3, name
    assert calls["cellular"][0][2]["classifier_epochs"] == 3
    # given the study's n_top_genes, each method's own selection keeps every gene
    train = _simulated()[:, genes].copy()
    assert reference_hvgs(train, 30).all()
    for method in ("can", "cellular"):
        assert list(select_genes(train, method, n_top_genes=30).var_names) == list(genes)


def test_classification_study_refuses_unknown_datasets_and_methods():
    with pytest.raises(ValueError, match=r"Unknown datasets \['pbmc3k'\]; choose among"):
        classification(0, datasets=["pbmc3k"])
    with pytest.raises(ValueError, match=r"Unknown methods \['svm'\]; choose among"):
        classification(0, datasets=["pbmc68k_reduced"], methods=["svm"])


def test_transfer_study_refuses_unknown_models_and_settings_before_reading_data(monkeypatch):
    from scvi_ext.benchmark._attention_tasks import transfer

    monkeypatch.setattr(
        "scvi_ext.data.load_dataset", lambda *args: pytest.fail("read the data first")
    )
    with pytest.raises(ValueError, match=r"Unknown settings \['D'\]; choose among \['A', "):
        transfer(0, settings=["D"])
    with pytest.raises(ValueError, match=r"Unknown settings \['AB'\]"):  # not 'A' and 'B'
        transfer(0, settings="AB")
    with pytest.raises(ValueError, match=r"Unknown models \['scnym'\]"):
        transfer(0, models=["scnym"])


def test_annotate_command_trains_can_and_refuses_a_batch_key(tmp_path, capsys):
    adata = _simulated(300)
    is_query = (adata.obs["condition"] == "query").to_numpy()
    reference_path, query_path = tmp_path / "reference.h5ad", tmp_path / "query.h5ad"
    adata[~is_query].copy().write_h5ad(reference_path)
    adata[is_query].copy().write_h5ad(query_path)
    out_path = tmp_path / "out.h5ad"
    args = ["annotate", "--reference", str(reference_path), "--query", str(query_path)]
    args += ["--labels-key", "cell_type", "--out", str(out_path), "--model", "CAN"]
    args += [
        "--max-epochs",
        "1",
        "--model-option",
        "n_capsules=4",
        "--model-option",
        "kernel_size=3",
    ]
    assert main([*args, "--batch-key", "batch"]) == 2
    assert "--batch-key: CAN takes no batch covariate" in capsys.readouterr().err
    assert main(args) == 0
    annotated = ad.read_h5ad(out_path)
    assert {"can_prediction", "can_confidence"} <= set(annotated.obs)


# ---------------------------------------------------------------- real data
@requires_shared_data
def test_transfer_study_fine_tunes_only_cans_last_layer_on_kang(monkeypatch):
    """A tiny run: 100 genes, 1 epoch; CGRAN's settings left out to keep it fast. Only the
    classifier's weights of the query model change in its fine-tuning."""
    import torch

    from scvi_ext.benchmark._attention_tasks import transfer
    from scvi_ext.model import CAN

    queries = []
    load_query_data = CAN.load_query_data

    def spy(adata, reference_model, **kwargs):
        model = load_query_data(adata, reference_model, **kwargs)
        before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        queries.append((model, before))
        return model

    monkeypatch.setattr(CAN, "load_query_data", spy)
    table = transfer(0, n_top_genes=100, max_epochs=1, models=["can"])["transfer"]
    assert list(table["method"]) == ["can_no_fine_tuning", "can_last_layer"]
    assert table["accuracy"].between(0, 1).all()
    assert table.loc[1, "trains"] == "classifier"
    [(model, before)] = queries
    after = model.module.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    classifier = {k for k in after if k.startswith("classifier.")}
    assert classifier and changed == classifier, sorted(changed ^ classifier)


@requires_shared_data
def test_markers_study_scores_every_ranking_per_pbmc_type(tmp_path):
    from scvi_ext.benchmark._attention_tasks import markers

    tables = markers(
        0,
        methods=["wilcoxon", "can_saliency"],
        n_top_genes=300,
        max_epochs=1,
        saliency_steps=2,
        saliency_cells=10,
        outdir=tmp_path,
    )
    summary = tables["markers_summary"]
    assert list(summary["method"]) == ["wilcoxon", "can_saliency"]
    per_type = tables["markers_per_type"]
    assert set(per_type["paper_type"]) == {"B", "T", "NK", "monocytes"}
    wilcoxon = per_type[per_type["method"] == "wilcoxon"]
    assert wilcoxon["precision_at_k"].mean() >= 0.1  # Wilcoxon finds some named markers
    assert (tmp_path / "can_capsule_attention.png").exists()
    assert isinstance(summary.loc[0, "paper_markers_not_in_genes"], str)
    assert pd.api.types.is_float_dtype(summary["mean_precision_at_k"])


def test_cgran_is_registered_but_runs_only_when_asked():
    from scvi_ext.benchmark import DEFAULT_METHODS, METHODS

    assert {"can", "svm_linear", "linear_svc", "random_forest"} <= set(DEFAULT_METHODS)
    assert "cgran" in METHODS and "cgran" not in DEFAULT_METHODS
