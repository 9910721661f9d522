"""Tests of the CELLULAR benchmarks and of the study runner behind ``scvi-ext benchmark``."""

import sys

import numpy as np
import pandas as pd
import pytest
from conftest import record_trained_adam_eps

from scvi_ext.benchmark import (
    AUROC_COLUMNS,
    METHODS,
    STUDIES,
    TASK_METHOD_KWARGS,
    TASKS,
    MethodResult,
    Study,
    embedding_quality,
    novel_type_detection,
    run_benchmark,
    run_study,
    training_throughput,
)
from scvi_ext.classifier import NOVELTY_METHODS
from scvi_ext.cli import main
from scvi_ext.data import simulate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_TYPES = 3
REFERENCE_PACKAGE_MISSING = (
    "the CELLULAR reference package is not installed (pip install --no-deps "
    "'CELLULAR-CL==0.0.4', as the Makefile does)"
)


def _require_reference_package() -> None:
    pytest.importorskip("CELLULAR_CL", reason=REFERENCE_PACKAGE_MISSING)


@pytest.fixture(scope="module")
def cells():
    return simulate(n_cells=360, n_genes=120, n_cell_types=N_TYPES, n_markers=15, seed=3)


def test_cellular_method_annotates_above_chance(cells):
    reference, query, labels_key = TASKS["simulated"](
        n_cells=400, n_genes=120, n_cell_types=N_TYPES, seed=2
    )
    result = METHODS["cellular"](
        reference, query, labels_key, 0, batch_key="batch", max_epochs=8, classifier_epochs=15
    )
    truth = query.obs[labels_key].astype(str).to_numpy()
    assert result.predictions.shape == result.confidence.shape == (query.n_obs,)
    assert np.mean(result.predictions == truth) > 1 / N_TYPES + 0.4
    assert np.all((result.confidence > 0) & (result.confidence <= 1 + 1e-6))
    assert result.cells_per_second > 0


@pytest.mark.parametrize(("name", "eps"), [("cellular", 1e-2), ("cellular_eps1e-8", 1e-8)])
def test_cellular_rows_train_with_their_adam_eps(name, eps, monkeypatch):
    from scvi_ext.model import CELLULAR

    reference, query, labels_key = TASKS["simulated"](
        n_cells=200, n_genes=60, n_cell_types=N_TYPES, seed=2
    )
    used_eps = record_trained_adam_eps(monkeypatch, CELLULAR)
    result = METHODS[name](
        reference, query, labels_key, 0, max_epochs=2, classifier_epochs=2, n_top_genes=40
    )
    assert used_eps == [eps]
    assert result.name == name
    assert result.settings.startswith("40 genes, CELLULAR 2 epochs, n_latent=100")
    assert ("'eps': 1e-08" in result.settings) == (eps == 1e-8)
    # the variant gets the options tasks give "cellular" (kang_donors_lodo's batch column)
    assert TASK_METHOD_KWARGS["kang_donors_lodo"][name] == {"batch_key": "donor"}


@pytest.mark.parametrize(
    ("row", "balance"), [("cellular_balanced", True), ("cellular_sqrt_balanced", "sqrt")]
)
def test_cellular_balanced_rows_train_a_class_balanced_classifier(monkeypatch, row, balance):
    from scvi_ext.benchmark._attention_tasks import CLASSIFICATION_METHODS
    from scvi_ext.model import LatentClassifier

    balanced = []
    train = LatentClassifier.train

    def spy(self, *args, **kwargs):
        balanced.append(self.module.balance_classes)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(LatentClassifier, "train", spy)
    reference, query, labels_key = TASKS["simulated"](
        n_cells=200, n_genes=60, n_cell_types=N_TYPES, seed=2
    )
    method, options = CLASSIFICATION_METHODS[row]
    result = METHODS[method](
        reference, query, labels_key, 0, max_epochs=2, classifier_epochs=2, **options
    )
    assert balanced == [balance]
    assert result.settings.endswith(f"classifier 2 epochs, balance_classes {balance}")


def test_novel_type_detection_protocol(cells):
    per_type, summary = novel_type_detection(
        cells, batch_key="batch", n_folds=3, max_epochs=6, classifier_epochs=10, n_latent=16
    )
    assert sorted(per_type["left_out"]) == sorted(cells.obs["cell_type"].unique())
    counts = cells.obs["cell_type"].value_counts()
    for row in per_type.itertuples():
        assert row.n_novel == counts[row.left_out]
    for method in NOVELTY_METHODS:
        assert per_type[f"auroc_{method}"].between(0, 1).all()
    # simulated types differ by their own markers: a left-out type is easy to tell apart
    assert per_type["auroc_centroid_distance"].mean() > 0.7
    assert (per_type["min_likelihood_novel"] <= per_type["min_likelihood_known"]).all()
    assert {"precision", "coverage", "threshold"} <= set(summary.columns)


def test_novel_type_detection_in_a_shifted_query(cells):
    per_type, _ = novel_type_detection(
        cells,
        batch_key="batch",
        max_epochs=6,
        classifier_epochs=10,
        n_latent=16,
        condition_key="condition",
        reference_condition="reference",
    )
    in_query = cells.obs["condition"] == "query"
    for row in per_type.itertuples():
        is_left_out = cells.obs["cell_type"] == row.left_out
        assert row.n_novel == (in_query & is_left_out).sum()
        assert row.n_known == (in_query & ~is_left_out).sum()
    assert per_type["auroc_query_neighbours"].mean() > 0.7
    with pytest.raises(ValueError, match="reference_condition 'ctrl' is not a value of"):
        novel_type_detection(cells, condition_key="condition", reference_condition="ctrl")
    with pytest.raises(ValueError, match="condition_key 'stim' is not a column of adata.obs"):
        novel_type_detection(cells, condition_key="stim", reference_condition="ctrl")


def test_training_throughput_rows(cells):
    _require_reference_package()
    table = training_throughput(cells, batch_key="batch", n_epochs=1, batch_size=64)
    assert set(table.index) == {
        "cross_entropy_mlp",
        "cellular_loss_loop",
        "reference_style_epoch",
        "reference_package",
        "cellular_api",
    }
    # finite: the API row is timed inside its epochs (a timer that never ran divides by 0)
    assert np.isfinite(table["cells_per_second"]).all()
    assert (table["cells_per_second"] > 0).all()
    assert table.loc["cross_entropy_mlp", "slowdown_vs_cross_entropy"] == pytest.approx(1.0)
    assert table.loc["reference_package", "speedup_vs_reference_package"] == pytest.approx(1.0)


def test_training_throughput_without_the_reference_package(cells, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "CELLULAR_CL", None)  # import fails as if not installed
    table = training_throughput(cells, batch_key="batch", n_epochs=1, batch_size=64)
    assert "reference_package" not in table.index
    assert "speedup_vs_reference_package" not in table.columns
    assert "pip install --no-deps 'CELLULAR-CL==0.0.4'" in caplog.text


def test_embedding_quality_scores_cellular_and_pca(cells):
    table = embedding_quality(cells, batch_key="batch", max_epochs=4, methods=("cellular", "pca"))
    assert set(table.index) == {"CELLULAR", "PCA"}
    values = table.to_numpy()
    assert not np.isnan(values).any(), table
    # min-max scaled across methods (to rounding: scib-metrics gives 1.0000000000000002)
    assert ((values > -1e-9) & (values < 1 + 1e-9)).all(), table
    # each metric is 0 or 1 (the worse or better of two methods); on the well-separated
    # simulation CELLULAR measured bio 0.6 (3 of 5), batch 1.0 and overall 0.76 (PCA: 0)
    cellular = table.loc["CELLULAR"]
    assert cellular["bio_conservation"] >= 0.4 and cellular["overall"] > 0.5, table
    assert table.index[0] == "CELLULAR"  # ranked first


def test_run_study_writes_tables_plots_and_summary(tmp_path, monkeypatch):
    def run(seed):
        scores = {"method": ["a", "b"], "auroc": [0.5 + seed / 10, 0.9], "n_cells": [10, 20]}
        return {"scores": pd.DataFrame(scores)}

    monkeypatch.setitem(
        STUDIES, "toy", Study(run, "A toy study.", {"scores": ("auroc", "n_cells")})
    )
    tables = run_study(
        "toy", seeds=[0, 2], outdir=tmp_path, command="scvi-ext benchmark --task toy"
    )
    assert list(tables["scores"]["seed"]) == [0, 0, 2, 2]
    csv = pd.read_csv(tmp_path / "scores_per_seed.csv")
    assert list(csv["auroc"]) == [0.5, 0.9, 0.7, 0.9]
    summary = (tmp_path / "summary.md").read_text()
    assert "A toy study." in summary
    assert "| a | 0.600 ± 0.141 | 10 ± 0 |" in summary
    assert "| b | 0.900 ± 0.000 | 20 ± 0 |" in summary
    assert "scvi-ext benchmark --task toy" in summary and "cpu count" in summary
    assert (tmp_path / "scores.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="Unknown study 'nope'"):
        run_study("nope", seeds=[0], outdir=tmp_path)
    with pytest.raises(ValueError, match="Give at least one seed."):
        run_study("toy", seeds=[], outdir=tmp_path)


def test_cli_runs_a_study_with_its_options_and_rejects_method_options(
    tmp_path, monkeypatch, capsys
):
    def run(seed, outdir, score=0.8):
        (outdir / f"figure_{seed}.png").write_bytes(b"")
        return {"scores": pd.DataFrame({"method": ["a"], "auroc": [score]})}

    monkeypatch.setitem(STUDIES, "toy", Study(run, "A toy study.", {}))
    assert main(["benchmark", "--task", "toy", "--seeds", "0", "--outdir", str(tmp_path)]) == 0
    assert "| a | 0.800 |" in capsys.readouterr().out
    assert (tmp_path / "figure_0.png").is_file()
    argv = ["benchmark", "--task", "toy", "--seeds", "0", "--outdir", str(tmp_path)]
    assert main([*argv, "--task-option", "score=0.5"]) == 0
    out = capsys.readouterr().out
    assert "| a | 0.500 |" in out and "Options: score=0.5" in out
    assert main([*argv, "--task-option", "sccore=0.5"]) == 2
    assert "sccore not accepted by this study; options: score." in capsys.readouterr().err
    code = main(["benchmark", "--task", "toy", "--methods", "scnym", "--outdir", str(tmp_path)])
    assert code == 2
    assert "'toy' is a study: set its options with --task-option" in capsys.readouterr().err


def test_cli_checks_a_studys_own_options_before_running_and_keeps_run_errors(
    tmp_path, monkeypatch, capsys
):
    """A study taking ``**options`` has them checked before it runs or writes anything;
    an error inside the run itself is not turned into a one-line user error."""
    ran = []

    def check(options):
        if options.get("size", 1) < 1:
            raise ValueError(f"toy size must be at least 1, not {options['size']}.")

    def run(seed, **options):
        ran.append(options)
        if options.get("size") == 7:
            raise TypeError("a bug inside the study")
        return {"scores": pd.DataFrame({"method": ["a"], "auroc": [0.5]})}

    monkeypatch.setitem(STUDIES, "toy", Study(run, "A toy study.", {}, check))
    outdir = tmp_path / "report"
    argv = ["benchmark", "--task", "toy", "--seeds", "0", "--outdir", str(outdir)]
    assert main([*argv, "--task-option", "size=0"]) == 2
    assert "toy size must be at least 1, not 0." in capsys.readouterr().err
    assert ran == [] and not outdir.exists()
    assert main([*argv, "--task-option", "size=2"]) == 0
    with pytest.raises(TypeError, match="a bug inside the study"):
        main([*argv, "--task-option", "size=7"])


def test_latent_inputs_and_gmvae_components_refuse_bad_options_before_loading_data():
    from scvi_ext.benchmark import check_study_options

    with pytest.raises(ValueError, match=r"latent_inputs datasets: unknown \['pbmc'\]"):
        check_study_options("latent_inputs", [0], {"datasets": ("pbmc",)})
    with pytest.raises(ValueError, match=r"Unknown gmvae_components option\(s\) \['kk'\]"):
        check_study_options("gmvae_components", [0], {"kk": 1})


def test_task_method_options_are_merged_under_the_users(tmp_path, monkeypatch):
    seen = {}

    def recorder(reference, query, labels_key, seed, **options):
        seen.update(options)
        n = query.n_obs
        return MethodResult("recorder", np.full(n, "type_0"), np.ones(n), 1.0)

    monkeypatch.setitem(METHODS, "recorder", recorder)
    monkeypatch.setitem(TASK_METHOD_KWARGS, "simulated", {"recorder": {"a": 1, "b": 2}})
    run_benchmark(
        "simulated",
        seeds=[0],
        methods=["recorder"],
        outdir=tmp_path,
        method_kwargs={"recorder": {"b": 3}},
        task_kwargs={"n_cells": 100, "n_genes": 50, "n_cell_types": 2},
        plots=False,
    )
    assert seen == {"a": 1, "b": 3}


def test_novel_type_plots_cover_every_novelty_score():
    assert AUROC_COLUMNS == tuple(f"auroc_{method}" for method in NOVELTY_METHODS)


def test_reference_package_failure_is_an_error_not_a_timing(monkeypatch):
    _require_reference_package()
    from CELLULAR_CL.functions import train as package_training

    from scvi_ext.benchmark.cellular_reference import reference_package_throughput

    def failed_training(self, *args, **kwargs):  # the package prints errors and returns inf
        print("**Training forced to finish early due to error during training**")
        return np.inf

    monkeypatch.setattr(package_training.train_module, "train_model", failed_training)
    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(1.0, (200, 120))).astype(np.float32)
    with pytest.raises(
        RuntimeError, match=r"(?s)CELLULAR-CL training failed:\n.*forced to finish early"
    ):
        reference_package_throughput(x, rng.integers(0, 3, 200), rng.integers(0, 2, 200))
