"""Tests of the ``scvi-ext`` command line."""

import hashlib
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scvi_ext.benchmark import METHODS, STUDIES, MethodUnavailableError, Study
from scvi_ext.cli import _parse_value, main
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
    for method in METHODS:  # a whole name ("can" inside "scanvi" does not count)
        assert re.search(rf"(?<![\w-]){re.escape(method)}(?![\w-])", text), method
    assert "Methods (default: scnym, " in text
    assert re.search(r"also: [^)]*\bcgran\b", text)  # methods not run unasked


@pytest.fixture
def annotate_paths(tmp_path, h5ad_inputs):
    """The fixture's inputs, their hashes and an output path."""
    hashes = {path: _sha256(path) for path in h5ad_inputs}
    return (*h5ad_inputs, tmp_path / "out.h5ad", hashes)


def _log_normalised_copy(path, out_path, counts_layer: bool = False):
    adata = ad.read_h5ad(path)
    if counts_layer:
        adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X)
    adata.write_h5ad(out_path)
    return out_path


def test_annotate_refuses_unusable_inputs_before_training(tmp_path, annotate_paths, capsys):
    reference_path, query_path, out_path, hashes = annotate_paths
    log_query = _log_normalised_copy(query_path, tmp_path / "log_query.h5ad")
    one_label = ad.read_h5ad(reference_path)
    one_label.obs["cell_type"] = "T cell"
    one_label.write_h5ad(tmp_path / "one_label.h5ad")
    annotated = ad.read_h5ad(query_path)
    annotated.obs["scnym_prediction"] = "earlier"
    annotated.write_h5ad(tmp_path / "annotated_query.h5ad")
    (tmp_path / "notes.txt").write_text("not an h5ad")
    folder = tmp_path / "a_folder"
    folder.mkdir()

    cases = [
        (
            (reference_path, log_query, out_path),
            [],
            f"--query {log_query}, X on the training genes: adata.X contains non-integer values",
        ),
        (
            (tmp_path / "one_label.h5ad", query_path, out_path),
            [],
            "--labels-key 'cell_type' has 1 label(s) ['T cell'] besides --unlabeled-category "
            "'Unknown'; a classifier needs at least two.",
        ),
        (
            (reference_path, tmp_path / "annotated_query.h5ad", out_path),
            [],
            "The query already has obs['scnym_prediction'] (an earlier annotation?); pass "
            "--key-added NAME",
        ),
        (
            (reference_path, tmp_path / "notes.txt", out_path),
            [],
            f"--query {tmp_path / 'notes.txt'} could not be read as an .h5ad file",
        ),
        (
            (reference_path, query_path, folder),
            ["--overwrite"],
            f"--out {folder} is a folder; give the path of an .h5ad file.",
        ),
        (
            (reference_path, query_path, out_path),
            ["--layer", "counts"],
            f"--layer 'counts' is not a layer of --reference {reference_path} (layers: none).",
        ),
        (
            (reference_path, query_path, out_path),
            ["--train-option", "max_epochs=3"],
            "Give --max-epochs or --train-option max_epochs=..., not both.",
        ),
    ]
    for paths, extra, message in cases:
        assert main(_annotate_args(*paths, *extra)) == 2, message
        error = capsys.readouterr().err
        assert message in error
        assert "Traceback" not in error
    with pytest.raises(SystemExit) as exit_info:
        main(_annotate_args(reference_path, query_path, out_path, "--seed", "-1"))
    assert exit_info.value.code == 2
    assert "argument --seed: expected 0 or a positive integer, got -1" in capsys.readouterr().err
    assert not out_path.exists() and list(folder.iterdir()) == []
    assert {path: _sha256(path) for path in hashes} == hashes


def test_annotate_reads_counts_from_a_layer_and_keeps_earlier_annotations(
    tmp_path, annotate_paths, capsys
):
    reference_path, query_path, out_path, _ = annotate_paths
    log_reference = _log_normalised_copy(reference_path, tmp_path / "ref.h5ad", True)
    query = ad.read_h5ad(_log_normalised_copy(query_path, tmp_path / "query.h5ad", True))
    query.obs["scnym_prediction"] = "earlier"
    query.uns["note"] = "kept"
    query.write_h5ad(tmp_path / "query.h5ad")
    hashes = {path: _sha256(path) for path in (log_reference, tmp_path / "query.h5ad")}
    args = _annotate_args(log_reference, tmp_path / "query.h5ad", out_path, "--max-epochs", "1")
    assert main([*args, "--layer", "counts", "--key-added", "again"]) == 0
    assert "ScNym on 99 genes" in capsys.readouterr().out

    annotated = ad.read_h5ad(out_path)
    added = {"again_prediction", "again_confidence", "again_novelty"}
    assert set(annotated.obs.columns) == set(query.obs.columns) | added
    assert (annotated.obs["scnym_prediction"] == "earlier").all()
    assert set(annotated.obsm) == {"X_again"} and annotated.uns["note"] == "kept"
    np.testing.assert_array_equal(annotated.X, query.X)  # log values, as given
    assert (annotated.layers["counts"] != query.layers["counts"]).nnz == 0
    assert {path: _sha256(path) for path in hashes} == hashes


BENCH = ["benchmark", "--task", "simulated", "--seeds", "0", "--methods", "logistic_regression"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0", "0"], "Seed(s) [0] given twice"),
        (["--methods", "scnym", "scnym"], "Method(s) ['scnym'] given twice"),
        (
            ["--method-option", "scanvi.max_epochs=3"],
            "--method-option 'scanvi.max_epochs=3': scanvi is not among the methods run "
            "(logistic_regression); add it to --methods or drop the option.",
        ),
        (
            ["--max-epochs", "3"],
            "--max-epochs: none of the methods run (logistic_regression) trains for epochs",
        ),
        (
            ["--method-option", "logistic_regression.max_iter=abc"],
            "options of method 'logistic_regression': max_iter must be an integer "
            "(default: 1000), not 'abc'.",
        ),
        (
            ["--task-option", "n_cells=2e2"],
            "options of task 'simulated': n_cells must be an integer (default: 2000), not 200.0.",
        ),
        (
            ["--task-option", "n_genes=[1,2"],
            "--task-option 'n_genes=[1,2': '[1,2' is not a valid Python literal",
        ),
        (
            ["--task-option", "n_cells=200", "--task-option", "n_cells=300"],
            "--task-option n_cells given twice",
        ),
        (
            ["--task", "kang_ifnb", "--task-option", "n_cells=200"],
            "options of task 'kang_ifnb': n_cells not accepted; options: none.",
        ),
        (
            ["--task-option", "query_fraction=1.0"],
            "Task 'simulated' with options {'query_fraction': 1.0}: No cell has "
            "obs['condition'] == 'reference'",
        ),
        (
            ["--task", "scale", "--task-option", "epochs=abc"],
            "--task-option: epochs must be an integer (default: 1), not 'abc'.",
        ),
    ],
)
def test_benchmark_refuses_bad_options_before_running(tmp_path, capsys, extra, message):
    outdir = tmp_path / "bench"
    base = ["benchmark", "--seeds", "0"] if "--task" in extra else BENCH
    assert main([*base, "--outdir", str(outdir), *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not outdir.exists()


def test_benchmark_refuses_a_negative_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*BENCH, "--outdir", str(tmp_path / "bench"), "--seeds", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seeds: expected 0 or a positive integer, got -1" in capsys.readouterr().err


def test_benchmark_asks_before_mixing_reports(tmp_path, capsys):
    outdir = tmp_path / "bench"
    outdir.mkdir()
    other = "# Benchmark: kang_donors_embedding\n\nearlier results\n"
    (outdir / "summary.md").write_text(other)
    (outdir / "embedding_quality_per_seed.csv").write_text("method,seed\n")
    argv = [*BENCH, "--outdir", str(outdir), "--task-option", "n_cells=200"]

    assert main(argv) == 2
    assert (
        f"--outdir {outdir} holds the report of 'kang_donors_embedding'; its files would be "
        "replaced or mixed with those of 'simulated'. Choose another --outdir, or pass "
        "--overwrite." in capsys.readouterr().err
    )
    assert (outdir / "summary.md").read_text() == other
    assert not (outdir / "results_per_seed.csv").exists()
    (outdir / "summary.md").write_text("# My notes\n")
    (outdir / "accuracy.png").write_bytes(b"my figure")
    assert main(argv) == 2
    assert (
        f"--outdir {outdir} holds summary.md, accuracy.png, not from a report of 'simulated'; "
        "writing that report would replace them. Choose another --outdir, or pass "
        "--overwrite." in capsys.readouterr().err
    )
    assert (outdir / "summary.md").read_text() == "# My notes\n"

    assert main([*argv, "--overwrite"]) == 0
    assert (outdir / "summary.md").read_text().startswith("# Benchmark: simulated\n")
    assert (outdir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*argv, "--seeds", "1"]) == 0  # the same task again: replaced in place
    assert "Seeds: 1." in (outdir / "summary.md").read_text()
    file_path = tmp_path / "a_file"
    file_path.write_text("x")
    assert main([*BENCH, "--outdir", str(file_path)]) == 2
    assert f"--outdir {file_path} is a file, not a folder" in capsys.readouterr().err


def test_benchmark_reports_missing_data_and_keeps_tracebacks_of_failures(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SCVI_EXT_DATA", str(tmp_path))
    outdir = tmp_path / "bench"
    argv = ["benchmark", "--task", "kang_ifnb", "--seeds", "0", "--outdir", str(outdir)]
    assert main([*argv, "--methods", "logistic_regression"]) == 2
    error = capsys.readouterr().err
    assert f"Dataset file 'kang_ifnb_pbmc_1975.h5ad' not found in {tmp_path}" in error
    assert not outdir.exists()

    def broken(reference, query, labels_key, seed):
        raise ValueError("a bug in the method, not a user error")

    def unavailable(reference, query, labels_key, seed):
        raise MethodUnavailableError("its package is not installed")

    monkeypatch.setitem(METHODS, "broken", broken)
    monkeypatch.setitem(METHODS, "unavailable", unavailable)
    argv = ["benchmark", "--task", "simulated", "--seeds", "0", "--outdir", str(outdir)]
    argv += ["--task-option", "n_cells=100"]
    assert main([*argv, "--methods", "unavailable"]) == 2
    message = "No method could run: {'unavailable': 'its package is not installed'}."
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="a bug in the method"):
        main([*argv, "--methods", "broken"])


def test_benchmark_keeps_a_users_file_named_like_a_report_file(tmp_path, capsys):
    outdir = tmp_path / "figs"
    outdir.mkdir()
    (outdir / "accuracy.png").write_bytes(b"my figure")
    assert main([*BENCH, "--outdir", str(outdir), "--task-option", "n_cells=200"]) == 2
    assert capsys.readouterr().err == (
        f"scvi-ext benchmark: error: --outdir {outdir} holds accuracy.png, not from a report "
        "of 'simulated'; writing that report would replace it. Choose another --outdir, or "
        "pass --overwrite.\n"
    )
    assert (outdir / "accuracy.png").read_bytes() == b"my figure"
    assert sorted(path.name for path in outdir.iterdir()) == ["accuracy.png"]


def test_study_outdir_is_checked_and_a_rerun_of_the_study_writes_in_place(
    tmp_path, monkeypatch, capsys
):
    def run(seed):
        return {"scores": pd.DataFrame({"method": ["a"], "accuracy": [0.5 + seed / 10]})}

    monkeypatch.setitem(STUDIES, "toy", Study(run, "A toy study.", {"scores": ("accuracy",)}))
    outdir = tmp_path / "study"
    outdir.mkdir()
    (outdir / "scores.png").write_bytes(b"my figure")
    (outdir / "notes.txt").write_text("mine")
    argv = ["benchmark", "--task", "toy", "--seeds", "0", "--outdir", str(outdir)]
    assert main(argv) == 2
    assert (
        f"--outdir {outdir} holds scores.png, not from a report of 'toy'; writing that report "
        "would replace it. Choose another --outdir, or pass --overwrite."
    ) in capsys.readouterr().err
    assert sorted(path.name for path in outdir.iterdir()) == ["notes.txt", "scores.png"]

    (outdir / "scores.png").unlink()  # the study writes only its report's files
    assert main(argv) == 0
    assert main([*argv[:4], "1", *argv[5:]]) == 0  # the same study again: in place
    assert "Seeds: 1;" in (outdir / "summary.md").read_text()
    assert (outdir / "notes.txt").read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0


def test_a_study_writing_its_own_figures_needs_a_new_folder_or_its_own_report(
    tmp_path, monkeypatch, capsys
):
    stops = [True]

    def run(seed, outdir):
        (outdir / "measurements").mkdir(exist_ok=True)  # a cache kept between runs
        if stops and stops.pop():
            raise KeyboardInterrupt  # the run is stopped after its cache is written
        (outdir / f"figure_seed{seed}.png").write_bytes(b"figure")  # named as it runs
        return {"scores": pd.DataFrame({"method": ["a"], "accuracy": [0.5]})}

    monkeypatch.setitem(STUDIES, "toy", Study(run, "A toy study.", {"scores": ("accuracy",)}))
    outdir = tmp_path / "study"
    outdir.mkdir()
    (outdir / "figure_seed0.png").write_bytes(b"my figure")
    argv = ["benchmark", "--task", "toy", "--seeds", "0", "--outdir", str(outdir)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"scvi-ext benchmark: error: --outdir {outdir} holds figure_seed0.png, not from a "
        "report of 'toy'; 'toy' writes files named as it runs there (figures), which could "
        "replace them. Choose a new or empty --outdir, or pass --overwrite.\n"
    )
    assert (outdir / "figure_seed0.png").read_bytes() == b"my figure"

    (outdir / "figure_seed0.png").unlink()
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert (outdir / "summary.md").read_text().startswith("# Benchmark: toy\n\nNot finished")
    assert main(argv) == 0  # the stopped run's folder is the study's: its cache is kept
    assert (outdir / "measurements").is_dir() and (outdir / "figure_seed0.png").exists()
    assert "Seeds: 0;" in (outdir / "summary.md").read_text()


def test_quick_demo_trains_cellulars_classifier_for_max_epochs(tmp_path, monkeypatch, capsys):
    import scvi_ext.benchmark

    monkeypatch.setenv("SCVI_EXT_DATA", str(tmp_path))  # no data: the simulated task
    calls = []

    def run_benchmark(task, **kwargs):
        calls.append(kwargs)
        return pd.DataFrame({"method": ["cellular"], "settings": ["-"], "accuracy": [0.5]})

    monkeypatch.setattr(scvi_ext.benchmark, "run_benchmark", run_benchmark)
    assert main(["demo", "--quick", "--max-epochs", "10", "--outdir", str(tmp_path)]) == 0
    kwargs = calls[0]
    assert kwargs["method_kwargs"]["cellular"] == {"max_epochs": 10, "classifier_epochs": 10}
    assert kwargs["method_kwargs"]["scanvi"] == {"max_epochs": 10, "scanvi_max_epochs": 1}
    assert kwargs["caption"] == (
        "Quick demo: 10 epochs for each model (CELLULAR and its classifier, ScNym, scVI), "
        "1 scANVI epoch."
    )
    assert kwargs["overwrite"] is False
    assert kwargs["caption"] in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("A,B", ("A", "B")),
        ("kang_ifnb, pbmc68k_reduced", ("kang_ifnb", "pbmc68k_reduced")),
        ("A,", ("A",)),
        ("a,1,None", ("a", 1, None)),
        ("200,500", (200, 500)),
        ("A", "A"),
        ("'a,b'", "a,b"),
        ("('a', 'b')", ("a", "b")),
    ],
)
def test_comma_separated_text_is_a_tuple(text, value):
    assert _parse_value(text) == value


def test_a_comma_separated_task_option_reaches_the_study_as_a_tuple(tmp_path, monkeypatch, capsys):
    import scvi_ext.benchmark

    calls = []

    def run_study(name, seeds, outdir, command, options, overwrite):
        calls.append(options)
        (tmp_path / "summary.md").write_text("# Benchmark: attention_transfer\n")

    monkeypatch.setattr(scvi_ext.benchmark, "run_study", run_study)
    argv = ["benchmark", "--task", "attention_transfer", "--seeds", "0", "--outdir", str(tmp_path)]
    assert main([*argv, "--task-option", "settings=A,B"]) == 0
    assert calls == [{"settings": ("A", "B")}]
    capsys.readouterr()
    assert main([*argv, "--task-option", "settings=A,,B"]) == 2
    assert capsys.readouterr().err == (
        "scvi-ext benchmark: error: --task-option 'settings=A,,B': 'A,,B' has an empty item; "
        "give a tuple as KEY=a,b or KEY=\"('a', 'b')\" (quote strings inside brackets), text "
        "with a comma as KEY=\"'a,b'\".\n"
    )
    assert main([*argv, "--task-option", "settings=A,3"]) == 2
    assert (
        "--task-option: settings must be a string (default: ('A', 'B', 'C')), not ('A', 3)."
        in capsys.readouterr().err
    )
    assert len(calls) == 1
