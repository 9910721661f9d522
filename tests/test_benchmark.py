"""Tests of scvi_ext.benchmark: methods, tasks, runner and report."""

import importlib.util
import re
import typing

import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from scvi_ext.benchmark import (
    DEFAULT_METHODS,
    METHODS,
    STUDIES,
    TASKS,
    MethodResult,
    MethodUnavailableError,
    OptionError,
    Study,
    concat_reference_query,
    query_label_ceiling,
    reference_hvgs,
    register_method,
    run_benchmark,
    run_study,
    score_predictions,
    summary_table,
)
from scvi_ext.benchmark._methods import n_training_cells
from scvi_ext.benchmark._runner import (
    allows_none,
    check_option_type,
    check_options,
    check_outdir,
    report_task,
)
from scvi_ext.data import datasets_available, log_normalised_anndata

TINY_TASK = {"n_cells": 400, "n_genes": 200, "n_cell_types": 4}
TINY_SCANVI = {"max_epochs": 2, "scanvi_max_epochs": 1}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_split():
    return TASKS["simulated"](**TINY_TASK)


def test_runner_writes_report_and_logistic_regression_beats_chance(tmp_path, tiny_split):
    results = run_benchmark(
        "simulated",
        seeds=[0, 1],
        methods=["logistic_regression", "scanvi"],
        outdir=tmp_path,
        method_kwargs={"scanvi": TINY_SCANVI},
        task_kwargs=TINY_TASK,
    )
    assert len(results) == 6
    assert set(results["method"]) == {"logistic_regression", "scanvi", "query_label_ceiling"}
    for column in ["accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "ece"]:
        assert results[column].between(0, 1).all()
    assert results["train_seconds"].gt(0).all()
    scanvi_rows = results[results["method"] == "scanvi"]
    assert scanvi_rows["cells_per_second"].gt(0).all()
    assert results.loc[results["method"] == "logistic_regression", "cells_per_second"].isna().all()

    chance = 1 / TINY_TASK["n_cell_types"]
    lr_accuracy = results.loc[results["method"] == "logistic_regression", "accuracy"]
    assert lr_accuracy.min() > chance + 0.4

    ceiling = results.loc[results["method"] == "query_label_ceiling", "accuracy"]
    assert ceiling.min() > chance + 0.4

    csv = pd.read_csv(tmp_path / "results_per_seed.csv")
    assert list(csv["seed"]) == [0, 0, 0, 1, 1, 1]
    summary = (tmp_path / "summary.md").read_text()
    assert "| logistic_regression |" in summary and "| scanvi |" in summary
    assert "| query_label_ceiling | logistic regression, 5-fold CV on the query's labels |" in (
        summary
    )
    assert "is not a transfer method" in summary
    assert " ± " in summary
    assert "cpu count" in summary and "torch" in summary and "run_benchmark(" in summary
    assert "200 genes, scVI 2 + scANVI 1 epochs" in summary
    for name in ["reliability.png", "umap_query.png", "accuracy.png"]:
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_unavailable_method_is_skipped_and_reported(tmp_path, monkeypatch):
    def unavailable(reference, query, labels_key, seed):
        raise MethodUnavailableError("not installed here")

    monkeypatch.setitem(METHODS, "celltypist", unavailable)
    results = run_benchmark(
        "simulated",
        seeds=[0],
        methods=["logistic_regression", "celltypist"],
        outdir=tmp_path,
        task_kwargs=TINY_TASK,
        plots=False,
        ceiling=False,
    )
    assert list(results["method"]) == ["logistic_regression"]
    summary = (tmp_path / "summary.md").read_text()
    assert "celltypist: not installed here" in summary
    assert "is not a transfer method" not in summary
    assert not (tmp_path / "umap_query.png").exists()
    # The ceiling alone is no benchmark.
    with pytest.raises(RuntimeError, match="No method could run"):
        run_benchmark("simulated", seeds=[0], methods=["celltypist"], outdir=tmp_path, plots=False)


def test_query_label_ceiling_predicts_each_cell_from_other_folds(tiny_split):
    _, query, key = tiny_split
    result = query_label_ceiling(query, key, seed=0)
    truth = query.obs[key].astype(str).to_numpy()
    assert result.name == "query_label_ceiling" and len(result.predictions) == query.n_obs
    assert (result.predictions == truth).mean() > 1 / TINY_TASK["n_cell_types"] + 0.4
    assert np.all((result.confidence > 0) & (result.confidence <= 1))
    # Labels unrelated to the counts: a model that had seen a cell's label would still
    # recall it; out-of-fold predictions stay near chance.
    shuffled = query.copy()
    shuffled.obs[key] = np.random.default_rng(0).permutation(truth)
    noise = query_label_ceiling(shuffled, key, seed=0)
    assert (noise.predictions == shuffled.obs[key].to_numpy()).mean() < 0.4


def test_query_label_ceiling_needs_two_labels(tmp_path, tiny_split):
    _, query, key = tiny_split
    one_type = query[query.obs[key] == query.obs[key].iloc[0]]
    message = (
        f"The query has {one_type.n_obs} cells of 1 label(s); cross-validating on its "
        "labels needs at least 2 labels and 10 cells."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        query_label_ceiling(one_type, key)


def test_runner_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="Unknown task"):
        run_benchmark("no_such_task", seeds=[0], outdir=tmp_path)
    with pytest.raises(ValueError, match="Unknown methods"):
        run_benchmark("simulated", seeds=[0], methods=["no_such_method"], outdir=tmp_path)
    with pytest.raises(ValueError, match="Give at least one seed."):
        run_benchmark("simulated", seeds=[], outdir=tmp_path)


def test_summary_table_mean_and_sd():
    results = pd.DataFrame(
        {
            "method": ["a", "a", "b"],
            "settings": ["x", "x", ""],
            "accuracy": [0.8, 0.9, 0.5],
            "train_seconds": [1.0, 3.0, 2.0],
            "cells_per_second": [np.nan, np.nan, 100.0],
        }
    )
    table = summary_table(results, columns=["accuracy", "train_seconds", "cells_per_second"])
    lines = table.splitlines()
    assert lines[0] == "| method | training | accuracy | train s | cells/s |"
    assert lines[2] == "| a | x | 0.850 ± 0.071 | 2.0 ± 1.4 | – |"
    assert lines[3] == "| b | – | 0.500 | 2.0 | 100 |"


def _check_result(result: MethodResult, reference, query, labels_key) -> None:
    assert result.predictions.shape == (query.n_obs,)
    assert result.confidence.shape == (query.n_obs,)
    assert np.all((result.confidence >= 0) & (result.confidence <= 1 + 1e-6))
    assert set(result.predictions) <= set(reference.obs[labels_key].astype(str))
    assert result.train_seconds > 0


@pytest.mark.parametrize("name", ["logistic_regression", "celltypist"])
def test_linear_methods(name, tiny_split):
    if name == "celltypist" and importlib.util.find_spec("celltypist") is None:
        pytest.skip("celltypist is not installed")
    reference, query, labels_key = tiny_split
    result = METHODS[name](reference, query, labels_key, 0)
    _check_result(result, reference, query, labels_key)
    accuracy = np.mean(result.predictions == query.obs[labels_key].astype(str).to_numpy())
    assert accuracy > 1 / TINY_TASK["n_cell_types"] + 0.4
    if name == "celltypist":  # CellTypist's own iterations for fewer than 50,000 cells
        assert result.settings.startswith("max_iter=1000")


def test_scnym_method(tiny_split, monkeypatch):
    from scvi_ext.model import ScNym

    models = []
    train = ScNym.train

    def spy(self, *args, **kwargs):
        models.append(self)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(ScNym, "train", spy)
    reference, query, labels_key = tiny_split
    result = METHODS["scnym"](reference, query, labels_key, 0, max_epochs=2, n_top_genes=50)
    _check_result(result, reference, query, labels_key)
    assert result.settings == "50 genes, 2 epochs"
    # throughput counts the cells trained on: the query, not the validation cells
    (model,) = models
    n_trained = n_training_cells(model)
    assert (
        n_trained
        == len(model.train_indices)
        == reference.n_obs + query.n_obs - len(model.validation_indices)
    )
    assert 0 < len(model.validation_indices) < reference.n_obs
    assert result.cells_per_second * result.train_seconds == pytest.approx(n_trained * 2)


def test_n_training_cells_needs_a_trained_model():
    class Untrained:
        pass

    message = "This Untrained has no train_indices: train it on its AnnData first."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        n_training_cells(Untrained())


def test_methods_refuse_settings_they_would_otherwise_clamp(tiny_split):
    reference, query, labels_key = tiny_split
    cases = [
        (
            "logistic_regression",
            {"n_top_genes": 0},
            "n_top_genes must be at least 1 (None: all genes), not 0.",
        ),
        (
            "scnym",
            {"n_top_genes": -5},
            "n_top_genes must be at least 1 (None: all genes), not -5.",
        ),
        ("svm_linear", {"calibration_folds": 1}, "calibration_folds must be at least 2, not 1."),
        ("linear_svc", {"calibration_folds": 0}, "calibration_folds must be at least 2, not 0."),
        ("scanvi", {"epochs_scale": 0}, "epochs_scale must be positive, not 0."),
        (
            "scnym",
            {"max_epochs": 2, "epochs_scale": -1.0},
            "epochs_scale must be positive, not -1.0.",
        ),
        (
            "scnym",
            {"epochs_scale": 0.5},
            "epochs_scale=0.5 needs max_epochs: scnym scales only a given max_epochs (the "
            "model's default is 100).",
        ),
    ]
    for name, options, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            METHODS[name](reference, query, labels_key, 0, **options)


def test_methods_are_registered_by_decorator(tmp_path, monkeypatch):
    assert {"scnym", "cellular", "scanvi", "celltypist", "logistic_regression"} <= set(METHODS)
    for name in list(METHODS):  # both restored by monkeypatch after the test
        monkeypatch.delitem(METHODS, name)
    saved_defaults = list(DEFAULT_METHODS)
    DEFAULT_METHODS.clear()

    def constant(reference, query, labels_key, seed=0):
        n = query.n_obs
        return MethodResult("constant", np.full(n, "type_0"), np.ones(n), 1.0)

    try:
        assert register_method("constant")(constant) is constant
        assert register_method("slow", default=False)(constant) is constant
        assert list(METHODS) == ["constant", "slow"] and DEFAULT_METHODS == ["constant"]
        with pytest.raises(ValueError, match="'constant' is already registered"):
            register_method("constant")(lambda *args: None)
        # without methods=..., the runner runs the default methods
        results = run_benchmark(
            "simulated",
            seeds=[0],
            outdir=tmp_path,
            task_kwargs={"n_cells": 100, "n_genes": 50, "n_cell_types": 2},
            plots=False,
            ceiling=False,
        )
    finally:
        METHODS.pop("constant", None)
        METHODS.pop("slow", None)
        DEFAULT_METHODS[:] = saved_defaults
    assert list(results["method"]) == ["constant"]


def test_benchmark_normaliser_is_log1p_of_counts_per_10k(tiny_split):
    reference, _, _ = tiny_split
    expected = reference.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    normalised = log_normalised_anndata(reference)
    assert normalised.obs_names.equals(reference.obs_names)
    assert normalised.var_names.equals(reference.var_names)
    np.testing.assert_allclose(normalised.X.toarray(), expected.X.toarray(), rtol=1e-5)
    assert reference.X.max() > 20  # the input still holds counts


def test_reference_hvgs(tiny_split):
    reference, _, _ = tiny_split
    genes = reference_hvgs(reference, 40)
    assert genes.dtype == bool and genes.sum() == 40
    np.testing.assert_array_equal(genes, reference_hvgs(reference, 40))
    assert reference_hvgs(reference, None).all()
    assert reference_hvgs(reference, 10_000).all()


def test_simulated_task_split(tiny_split):
    reference, query, labels_key = tiny_split
    assert reference.var_names.equals(query.var_names)
    assert reference.obs_names.intersection(query.obs_names).empty
    assert set(reference.obs["condition"]) == {"reference"}
    assert set(query.obs["condition"]) == {"query"}
    assert labels_key == "cell_type"


@pytest.mark.skipif(not datasets_available(), reason="shared datasets not found")
def test_kang_ifnb_task_split():
    reference, query, labels_key = TASKS["kang_ifnb"]()
    assert (reference.n_obs, query.n_obs) == (936, 1039)
    assert set(reference.obs["condition"]) == {"control"}
    assert set(query.obs["condition"]) == {"stimulated"}
    assert reference.obs[labels_key].nunique() == 7


@pytest.mark.skipif(not datasets_available(), reason="shared datasets not found")
def test_real_data_tasks_split():
    reference, query, labels_key = TASKS["kang_donors_lodo"](held_out_donor=1244)
    assert set(query.obs["donor"].astype(str)) == {"1244"}
    assert "1244" not in set(reference.obs["donor"].astype(str))
    assert reference.n_obs + query.n_obs == 8684 and query.n_obs == 1704
    with pytest.raises(ValueError, match="held_out_donor '42' is not a donor; donors: "):
        TASKS["kang_donors_lodo"](held_out_donor=42)
    reference, query, labels_key = TASKS["cellbench_celseq2_dropseq"]()
    assert (reference.n_obs, query.n_obs) == (274, 225)
    assert set(reference.obs[labels_key]) == set(query.obs[labels_key])


def test_concat_reference_query(tiny_split):
    reference, query, labels_key = tiny_split
    reference = reference.copy()
    reference.obs[labels_key] = reference.obs[labels_key].astype(object)
    reference.obs.iloc[0, reference.obs.columns.get_loc(labels_key)] = np.nan
    adata = concat_reference_query(reference, query[:, ::-1], labels_key, batch_key="batch")
    assert adata.n_obs == reference.n_obs + query.n_obs
    assert adata.obs_names.is_unique
    assert adata.var_names.equals(reference.var_names)
    labels = adata.obs["_bench_labels"].astype(str).to_numpy()
    assert labels[0] == "Unknown"
    assert (labels[reference.n_obs :] == "Unknown").all()
    assert (labels[1 : reference.n_obs] == reference.obs[labels_key][1:].astype(str)).all()
    assert list(adata.obs["_bench_domain"].cat.categories) == ["query", "reference"]
    np.testing.assert_array_equal(adata.X[reference.n_obs :].toarray(), query.X.toarray())
    with pytest.raises(ValueError, match="absent from the query"):
        concat_reference_query(reference, query[:, :10], labels_key)
    with pytest.raises(KeyError, match="no_such_key"):
        concat_reference_query(reference, query, "no_such_key")


def test_score_predictions_reports_the_ece_before_calibration():
    from scvi_ext.metrics import expected_calibration_error

    truth = np.array(["a", "a", "b", "b"])
    predictions = np.array(["a", "b", "b", "b"])
    calibrated, raw = np.array([0.9, 0.6, 0.8, 0.7]), np.array([0.6, 0.5, 0.6, 0.5])
    result = MethodResult("m", predictions, calibrated, 1.0, uncalibrated_confidence=raw)
    scores = score_predictions(truth, result)
    assert scores["ece"] == pytest.approx(
        expected_calibration_error(truth, predictions, calibrated)
    )
    assert scores["ece_uncalibrated"] == pytest.approx(
        expected_calibration_error(truth, predictions, raw)
    )
    plain = score_predictions(truth, MethodResult("m", predictions, calibrated, 1.0))
    assert "ece_uncalibrated" not in plain


def test_runner_checks_every_option_before_writing(tmp_path):
    outdir = tmp_path / "bench"
    tiny = {"n_cells": 100, "n_genes": 50, "n_cell_types": 2}
    cases = [
        ({"seeds": [0, 1, 0]}, "Seed(s) [0] given twice"),
        ({"seeds": [-1]}, "Seeds must be integers from 0 to 2**32 - 1, not [-1]."),
        ({"methods": ["scnym", "scnym"]}, "Method(s) ['scnym'] given twice"),
        ({"methods": []}, "Give at least one method."),
        (
            {"method_kwargs": {"scanvi": {"max_epochs": 2}}},
            "Options for scanvi, which is not among the methods run (logistic_regression)",
        ),
        (
            {"method_kwargs": {"logistic_regression": {"seed": 3}}},
            "options of method 'logistic_regression': seed not accepted; options: "
            "n_top_genes, max_iter.",
        ),
        (
            {"method_kwargs": {"logistic_regression": {"max_iter": True}}},
            "max_iter must be an integer (default: 1000), not True.",
        ),
        (
            {"task_kwargs": {**tiny, "query_fraction": "half"}},
            "options of task 'simulated': query_fraction must be a number (default: 0.5), "
            "not 'half'.",
        ),
        (
            {"task_kwargs": {**tiny, "no_such_option": 1}},
            "Task 'simulated' with options",  # simulated passes **kwargs on to simulate
        ),
    ]
    for options, message in cases:
        kwargs = {"seeds": [0], "methods": ["logistic_regression"], "task_kwargs": tiny}
        with pytest.raises(OptionError, match=re.escape(message)):
            run_benchmark("simulated", outdir=outdir, **{**kwargs, **options})
        assert not outdir.exists()
    assert issubclass(OptionError, ValueError)


def test_option_types_follow_the_defaults():
    check_option_type("o", "ks", 10, (10, 25))  # one item for a tuple
    check_option_type("o", "ks", [10, 25, 50], (10, 25))
    check_option_type("o", "lr", 1, 0.5)  # an integer where a float is expected
    check_option_type("o", "path", 3, None)  # nothing checked without a default
    check_option_type("o", "names", ("a", 1), ())
    for name, value, default, kind in [
        ("ks", (10, "x"), (10,), "an integer"),
        ("flag", 1, True, "True or False"),
        ("n", True, 3, "an integer"),
        ("lr", "fast", 0.5, "a number"),
        ("name", 3, "cpu", "a string"),
    ]:
        message = f"o: {name} must be {kind} (default: {default!r}), not {value!r}."
        with pytest.raises(OptionError, match=re.escape(message)):
            check_option_type("o", name, value, default)


def test_options_annotated_optional_accept_none():
    assert allows_none(int | None) and allows_none(typing.Optional[int])  # noqa: UP045
    assert allows_none("int | None") and allows_none("dict[str, Any] | None")
    assert not allows_none(int) and not allows_none("int") and not allows_none("Nonempty")
    for name in ("scnym", "scanvi", "svm_linear", "linear_svc", "random_forest", "can"):
        check_options(METHODS[name], {"n_top_genes": None}, "o")  # None: all genes
    message = "o: n_top_genes must be an integer or None (default: 2000), not 'all'."
    with pytest.raises(OptionError, match=f"^{re.escape(message)}$"):
        check_options(METHODS["scnym"], {"n_top_genes": "all"}, "o")
    message = "o: max_iter must be an integer (default: 1000), not None."
    with pytest.raises(OptionError, match=f"^{re.escape(message)}$"):
        check_options(METHODS["logistic_regression"], {"max_iter": None}, "o")


def test_run_study_checks_seeds_and_option_types(tmp_path, monkeypatch):
    def run(seed, epochs=2, sizes=(10, 20)):
        return {"scores": pd.DataFrame({"method": ["a"], "accuracy": [0.5]})}

    monkeypatch.setitem(STUDIES, "toy", Study(run, "A toy study.", {}))
    outdir = tmp_path / "study"
    with pytest.raises(OptionError, match=re.escape("Seed(s) [1] given twice")):
        run_study("toy", seeds=[1, 1], outdir=outdir)
    message = "--task-option: epochs must be an integer (default: 2), not '2'."
    with pytest.raises(OptionError, match=re.escape(message)):
        run_study("toy", seeds=[0], outdir=outdir, options={"epochs": "2"})
    assert not outdir.exists()
    tables = run_study("toy", seeds=[0], outdir=outdir, options={"sizes": 30, "epochs": 1})
    assert list(tables["scores"]["seed"]) == [0]


def test_run_study_keeps_files_that_are_not_of_its_report(tmp_path, monkeypatch):
    def run(seed):
        return {"scores": pd.DataFrame({"method": ["a"], "accuracy": [0.5]})}

    monkeypatch.setitem(STUDIES, "toy", Study(run, "A toy study.", {"scores": ("accuracy",)}))
    (tmp_path / "scores_per_seed.csv").write_text("my,scores\n")
    message = (
        f"outdir {tmp_path} holds scores_per_seed.csv, not from a report of 'toy'; writing "
        "that report would replace it. Choose another outdir, or pass overwrite=True."
    )
    with pytest.raises(OptionError, match=f"^{re.escape(message)}$"):
        run_study("toy", seeds=[0], outdir=tmp_path)
    assert (tmp_path / "scores_per_seed.csv").read_text() == "my,scores\n"
    run_study("toy", seeds=[0], outdir=tmp_path, overwrite=True)
    run_study("toy", seeds=[1], outdir=tmp_path)  # its own report now: replaced in place
    assert "Seeds: 1;" in (tmp_path / "summary.md").read_text()


def test_runner_keeps_files_that_are_not_of_the_tasks_report(tmp_path):
    (tmp_path / "results_per_seed.csv").write_text("my,results\n")
    message = (
        f"outdir {tmp_path} holds results_per_seed.csv, not from a report of 'simulated'; "
        "writing that report would replace it. Choose another outdir, or pass overwrite=True."
    )
    with pytest.raises(OptionError, match=f"^{re.escape(message)}$"):
        run_benchmark("simulated", seeds=[0], methods=["logistic_regression"], outdir=tmp_path)
    assert (tmp_path / "results_per_seed.csv").read_text() == "my,results\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results_per_seed.csv"]


def test_check_outdir_replaces_only_the_same_tasks_report(tmp_path):
    assert check_outdir(tmp_path / "new", "simulated") == []
    (tmp_path / "accuracy.png").write_bytes(b"figure")
    assert check_outdir(tmp_path, "simulated", overwrite=True) == ["accuracy.png"]
    assert check_outdir(tmp_path, "simulated", ("summary.md",)) == []  # no PNGs written
    (tmp_path / "summary.md").write_text("# Benchmark: simulated\n\nearlier run\n")
    assert report_task(tmp_path) == "simulated"
    assert check_outdir(tmp_path, "simulated") == ["summary.md", "accuracy.png"]
    message = (
        f"outdir {tmp_path} holds the report of 'simulated'; its files would be replaced or "
        "mixed with those of 'kang_ifnb'. Choose another outdir, or pass overwrite=True."
    )
    with pytest.raises(OptionError, match=f"^{re.escape(message)}$"):
        check_outdir(tmp_path, "kang_ifnb")
    message = f"outdir {tmp_path / 'summary.md'} is a file, not a folder; choose another outdir."
    with pytest.raises(OptionError, match=f"^{re.escape(message)}$"):
        check_outdir(tmp_path / "summary.md", "simulated", overwrite=True)


def test_check_outdir_for_a_study_with_its_own_figures_counts_every_file(tmp_path):
    assert check_outdir(tmp_path / "new", "scale", None) == []
    assert check_outdir(tmp_path, "scale", None) == []  # empty
    for i in range(7):
        (tmp_path / f"f{i}.txt").write_text("mine")
    message = (
        f"outdir {tmp_path} holds f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 2 more, not from "
        "a report of 'scale'; 'scale' writes files named as it runs there (figures), which "
        "could replace them. Choose a new or empty outdir, or pass overwrite=True."
    )
    with pytest.raises(OptionError, match=f"^{re.escape(message)}$"):
        check_outdir(tmp_path, "scale", None)
    assert len(check_outdir(tmp_path, "scale", None, overwrite=True)) == 7
