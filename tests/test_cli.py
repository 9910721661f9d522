"""Tests of the ``scvi-ext`` command line."""

import hashlib
import re

import anndata as ad
import numpy as np
import pytest

from scvi_ext.benchmark import METHODS
from scvi_ext.cli import main
from scvi_ext.data import simulate


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def h5ad_inputs(tmp_path):
    """Reference and query .h5ad files (query genes shuffled, one query-only gene)."""
    adata = simulate(n_cells=300, n_genes=100, n_cell_types=3, seed=2)
    is_query = (adata.obs["condition"] == "query").to_numpy()
    reference = adata[~is_query].copy()
    query = adata[is_query].copy()
    query = query[:, np.random.default_rng(0).permutation(query.n_vars)].copy()
    query.var_names = [*query.var_names[:-1], "query_only_gene"]
    reference_path, query_path = tmp_path / "reference.h5ad", tmp_path / "query.h5ad"
    reference.write_h5ad(reference_path)
    query.write_h5ad(query_path)
    return reference_path, query_path


def _annotate_args(reference_path, query_path, out_path, *extra):
    return [
        "annotate",
        "--reference",
        str(reference_path),
        "--query",
        str(query_path),
        "--labels-key",
        "cell_type",
        "--out",
        str(out_path),
        "--max-epochs",
        "2",
        *extra,
    ]


def test_annotate_writes_copy_and_keeps_inputs(tmp_path, h5ad_inputs, capsys):
    reference_path, query_path = h5ad_inputs
    hashes = {path: _sha256(path) for path in h5ad_inputs}
    out_path = tmp_path / "annotated.h5ad"

    assert main(_annotate_args(reference_path, query_path, out_path)) == 0
    annotated = ad.read_h5ad(out_path)
    query = ad.read_h5ad(query_path)
    assert annotated.obs_names.equals(query.obs_names)
    assert annotated.var_names.equals(query.var_names)
    # what ScNym.annotate writes, and nothing else
    added = {"scnym_prediction", "scnym_confidence", "scnym_novelty"}
    assert set(annotated.obs.columns) == set(query.obs.columns) | added
    assert set(annotated.obs["scnym_prediction"]) <= {"type_0", "type_1", "type_2"}
    assert annotated.obs["scnym_confidence"].between(0, 1).all()
    assert annotated.obs["scnym_novelty"].between(0, 1).all()
    assert annotated.obsm["X_scnym"].shape[0] == query.n_obs
    assert {path: _sha256(path) for path in h5ad_inputs} == hashes

    out_hash = _sha256(out_path)
    assert main(_annotate_args(reference_path, query_path, out_path)) == 2
    assert "already exists" in capsys.readouterr().err
    assert _sha256(out_path) == out_hash
    assert main(_annotate_args(reference_path, query_path, out_path, "--overwrite")) == 0
    assert {path: _sha256(path) for path in h5ad_inputs} == hashes
    rerun = ad.read_h5ad(out_path)  # the same default seed: the same model
    np.testing.assert_array_equal(rerun.obs["scnym_confidence"], annotated.obs["scnym_confidence"])


def test_annotate_trains_on_reference_hvgs(tmp_path, h5ad_inputs, capsys):
    reference_path, query_path = h5ad_inputs
    out_path = tmp_path / "annotated.h5ad"

    assert main(_annotate_args(reference_path, query_path, out_path)) == 0
    assert "ScNym on 99 genes" in capsys.readouterr().out  # default 2000: every shared gene
    args = _annotate_args(reference_path, query_path, out_path, "--overwrite")
    assert main([*args, "--n-top-genes", "20"]) == 0
    assert "ScNym on 20 genes" in capsys.readouterr().out
    assert ad.read_h5ad(out_path).n_vars == 100  # the copy keeps every query gene
    with pytest.raises(SystemExit):
        main([*args, "--n-top-genes", "-1"])
    assert "expected 0 or a positive integer, got -1" in capsys.readouterr().err


def test_annotate_with_cellular_and_model_options(tmp_path, h5ad_inputs, capsys):
    reference_path, query_path = h5ad_inputs
    out_path = tmp_path / "annotated.h5ad"
    args = _annotate_args(reference_path, query_path, out_path, "--model", "CELLULAR")

    assert main([*args, "--model-option", "n_latent=8", "--model-option", "n_hidden=(64,)"]) == 0
    assert "CELLULAR on 99 genes" in capsys.readouterr().out
    annotated = ad.read_h5ad(out_path)
    assert {"cellular_prediction", "cellular_confidence", "cellular_novelty"} <= set(
        annotated.obs.columns
    )
    assert set(annotated.obs["cellular_prediction"]) <= {"type_0", "type_1", "type_2"}
    assert annotated.obsm["X_cellular"].shape == (annotated.n_obs, 8)

    out_path.unlink()
    assert main([*args, "--model-option", "no_such_option=1"]) == 2
    error = capsys.readouterr().err
    assert "--model-option: no_such_option not accepted by CELLULAR.__init__" in error
    assert "n_latent" in error
    assert main([*args, "--model-option", "n_latent"]) == 2
    assert "--model-option takes KEY=VALUE, not 'n_latent'" in capsys.readouterr().err
    assert main([*args, "--train-option", "no_such_option=1"]) == 2
    assert "--train-option" in capsys.readouterr().err
    assert not out_path.exists()


def test_annotate_errors(tmp_path, h5ad_inputs, capsys):
    reference_path, query_path = h5ad_inputs
    hashes = {path: _sha256(path) for path in h5ad_inputs}
    out_path = tmp_path / "out.h5ad"

    assert main(_annotate_args(tmp_path / "missing.h5ad", query_path, out_path)) == 2
    assert "--reference file not found" in capsys.readouterr().err

    assert main(_annotate_args(reference_path, query_path, query_path, "--overwrite")) == 2
    assert "not one of the inputs" in capsys.readouterr().err

    args = _annotate_args(reference_path, query_path, out_path)
    args[args.index("cell_type")] = "no_such_column"
    assert main(args) == 2
    assert "'no_such_column' is not a column of the reference obs" in capsys.readouterr().err

    other = ad.read_h5ad(query_path)
    other.var_names = [f"other_{name}" for name in other.var_names]
    other_path = tmp_path / "other.h5ad"
    other.write_h5ad(other_path)
    assert main(_annotate_args(reference_path, other_path, out_path)) == 2
    assert "share no gene names" in capsys.readouterr().err

    assert not out_path.exists()
    assert {path: _sha256(path) for path in h5ad_inputs} == hashes


def test_demo_falls_back_to_simulated_data(tmp_path, monkeypatch, capsys):
    empty_data_dir = tmp_path / "no_data"
    empty_data_dir.mkdir()
    monkeypatch.setenv("SCVI_EXT_DATA", str(empty_data_dir))
    outdir = tmp_path / "demo"

    assert main(["demo", "--quick", "--outdir", str(outdir)]) == 0
    printed = capsys.readouterr().out
    assert "shared datasets were not found" in printed
    assert "SCVI_EXT_DATA" in printed
    assert "simulated" in printed
    assert (
        "| method | training | accuracy | balanced accuracy | macro F1 | ECE | train s |"
        in printed
    )
    for method in ["cellular", "scnym", "scanvi", "logistic_regression"]:
        assert f"| {method} |" in printed
    assert "CELLULAR 2 epochs, n_latent=100; classifier 2 epochs" in printed
    for name in ["summary.md", "results_per_seed.csv", "umap_query.png", "reliability.png"]:
        assert (outdir / name).is_file()


def test_benchmark_command(tmp_path, capsys):
    outdir = tmp_path / "bench"
    argv = ["benchmark", "--task", "simulated", "--seeds", "0", "1"]
    argv += ["--methods", "logistic_regression", "--outdir", str(outdir)]
    assert main(argv) == 0
    assert "| logistic_regression |" in capsys.readouterr().out
    summary = (outdir / "summary.md").read_text()
    assert "scvi-ext benchmark --task simulated --seeds 0 1" in summary
    assert (outdir / "accuracy.png").is_file()

    assert main(["benchmark", "--task", "no_such_task", "--outdir", str(outdir)]) == 2
    assert "Unknown task" in capsys.readouterr().err


def test_benchmark_task_options(tmp_path, capsys):
    argv = ["benchmark", "--task", "simulated", "--seeds", "0", "--methods", "logistic_regression"]
    argv += ["--outdir", str(tmp_path), "--task-option", "n_cells=300"]
    argv += ["--task-option", "n_genes=80", "--task-option", "query_fraction=0.4"]
    assert main(argv) == 0
    capsys.readouterr()
    summary = (tmp_path / "summary.md").read_text()
    assert "Reference: 180 cells, query: 120 cells, 80 genes" in summary
    assert main([*argv, "--task-option", "n_cells"]) == 2
    assert "--task-option takes KEY=VALUE, not 'n_cells'" in capsys.readouterr().err
    assert main([*argv, "--task-option", "no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err


def test_benchmark_method_options(tmp_path, capsys):
    argv = ["benchmark", "--task", "simulated", "--seeds", "0", "--methods", "logistic_regression"]
    argv += ["--outdir", str(tmp_path), "--task-option", "n_cells=200"]
    assert main([*argv, "--method-option", "logistic_regression.max_iter=7"]) == 0
    assert "max_iter=7" in capsys.readouterr().out
    assert main([*argv, "--method-option", "no_such_method.max_iter=7"]) == 2
    assert "--method-option takes METHOD.KEY=VALUE" in capsys.readouterr().err
    assert main([*argv, "--method-option", "logistic_regression.no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err


def test_benchmark_help_lists_the_registered_methods(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for method in METHODS:
        assert method in text
    assert "Methods (default: scnym, " in text
    assert re.search(r"also: [^)]*\bcgran\b", text)  # methods not run unasked
