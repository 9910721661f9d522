import os
import re
import subprocess
import sys
import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_ext.data import (
    DATASETS,
    _paths,
    _simulate,
    _validation,
    datasets_available,
    get_data_dir,
    load_dataset,
    load_kang_ifnb,
    load_snareseq,
    load_snareseq_gene_region_map,
    log_normalised_anndata,
    select_genes,
    simulate,
    validate_counts,
    validate_gene_overlap,
    validate_labels,
    validate_obs_key,
    write_simulated,
)

needs_datasets = pytest.mark.skipif(
    not datasets_available(),
    reason="shared datasets not found (set SCVI_EXT_DATA to the datasets folder)",
)


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    return simulate(n_cells=400, n_genes=200, n_cell_types=4, n_markers=15, seed=3)


def _is_integer(matrix) -> bool:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    return bool(np.all(values == np.round(values)))


# --- data directory and loaders -------------------------------------------------------


def test_get_data_dir_honours_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("SCVI_EXT_DATA", str(tmp_path))
    assert get_data_dir() == tmp_path


def test_get_data_dir_env_var_pointing_nowhere(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("SCVI_EXT_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="SCVI_EXT_DATA") as error:
        get_data_dir()
    assert str(missing) in str(error.value)


def test_get_data_dir_default_and_missing_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SCVI_EXT_DATA", raising=False)
    monkeypatch.setattr(_paths, "_default_data_dir", lambda: tmp_path)
    assert get_data_dir() == tmp_path
    monkeypatch.setattr(_paths, "_default_data_dir", lambda: tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="set the environment variable SCVI_EXT_DATA"):
        get_data_dir()
    assert not datasets_available()


def test_default_data_dir_is_shared_datasets_next_to_project():
    project_root = _paths.Path(_paths.__file__).resolve().parents[2]
    assert _paths._default_data_dir() == project_root.parent / "shared" / "datasets"


def test_load_dataset_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown dataset 'pbmc3k'.*kang_ifnb.*snareseq"):
        load_dataset("pbmc3k")


def test_load_dataset_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SCVI_EXT_DATA", str(tmp_path))
    assert not datasets_available()
    with pytest.raises(FileNotFoundError, match="kang_ctrl_pbmc_5donors_8684.h5ad.*SCVI_EXT_DATA"):
        load_dataset("kang_donors")


def test_load_dataset_tidies_counts_and_obs(monkeypatch, tmp_path):
    raw = ad.AnnData(
        X=np.array([[1, 0, 2], [0, 3, 0]], dtype=np.int64),
        obs=pd.DataFrame({"cell_type": ["B", "T"], "n": [1.0, 2.0]}, index=["c0", "c1"]),
    )
    raw.write_h5ad(tmp_path / DATASETS["kang_ifnb"])
    monkeypatch.setenv("SCVI_EXT_DATA", str(tmp_path))
    assert datasets_available()
    adata = load_kang_ifnb()
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), [[1, 0, 2], [0, 3, 0]])
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert adata.obs["n"].dtype == np.float64


@needs_datasets
def test_load_kang_ifnb():
    adata = load_kang_ifnb()
    assert adata.shape == (1975, 6998)
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    assert _is_integer(adata.X)
    assert adata.obs["cell_type"].nunique() == 7
    assert set(adata.obs["condition"].cat.categories) == {"control", "stimulated"}
    assert all(isinstance(adata.obs[c].dtype, pd.CategoricalDtype) for c in ["barcode"])
    validate_counts(adata)


@needs_datasets
def test_load_snareseq_and_gene_region_map():
    mdata = load_snareseq()
    assert set(mdata.mod) == {"rna", "atac"}
    assert mdata["rna"].shape == (10309, 1677) and mdata["atac"].shape == (10309, 25734)
    assert mdata["atac"].X.dtype == np.float32 and mdata["atac"].X.format == "csr"
    gene_region_map = load_snareseq_gene_region_map()
    assert sp.issparse(gene_region_map) and gene_region_map.shape == (1677, 25734)


# --- simulator ------------------------------------------------------------------------


def test_simulate_shape_obs_and_counts(sim):
    assert sim.shape == (400, 200)
    assert list(sim.var_names[:2]) == ["gene_0", "gene_1"]
    assert list(sim.obs.columns) == ["cell_type", "batch", "condition"]
    assert list(sim.obs["cell_type"].cat.categories) == [f"type_{i}" for i in range(4)]
    assert list(sim.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert list(sim.obs["condition"].cat.categories) == ["reference", "query"]
    assert sp.issparse(sim.X) and sim.X.format == "csr" and sim.X.dtype == np.float32
    assert _is_integer(sim.X) and sim.X.data.min() > 0
    # the last 30% of cells are the query
    assert (sim.obs["condition"] == "query").sum() == 120
    assert (sim.obs["condition"].iloc[-120:] == "query").all()
    validate_counts(sim)


def test_simulate_library_size_matches_request():
    adata = simulate(n_cells=1000, n_genes=100, mean_library_size=500.0, seed=1)
    assert np.asarray(adata.X.sum(axis=1)).mean() == pytest.approx(500.0, rel=0.05)


def test_simulate_is_deterministic_per_seed_and_independent_of_chunks():
    first = simulate(n_cells=300, n_genes=50, seed=7)
    again = simulate(n_cells=300, n_genes=50, seed=7, chunk_size=37)
    other = simulate(n_cells=300, n_genes=50, seed=8)
    assert (first.X != again.X).nnz == 0
    pd.testing.assert_frame_equal(first.obs, again.obs)
    assert (first.X != other.X).nnz > 0


def test_simulate_generates_in_chunks(monkeypatch):
    chunk_rows = []
    sample_chunk = _simulate._sample_chunk

    def spy(means, *args):
        chunk_rows.append(means.shape[0])
        return sample_chunk(means, *args)

    monkeypatch.setattr(_simulate, "_sample_chunk", spy)
    adata = simulate(n_cells=250, n_genes=30, chunk_size=100)
    assert chunk_rows == [100, 100, 50]
    assert adata.n_obs == 250


def test_negative_binomial_mean_and_variance():
    # both samplers: inverse CDF for small means, gamma-Poisson for large ones
    theta = 2.0
    means = np.repeat(np.array([[0.2, 1.0, 2.5, 6.0, 40.0]], dtype=np.float32), 40_000, axis=0)
    rngs = [np.random.default_rng(i) for i in range(3)]
    counts = _simulate._sample_chunk(means.copy(), theta, *rngs).toarray()
    mu = means[0].astype(np.float64)
    np.testing.assert_allclose(counts.mean(axis=0), mu, rtol=0.03)
    np.testing.assert_allclose(counts.var(axis=0), mu + mu**2 / theta, rtol=0.08)


def _program_fraction(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    program = np.asarray(adata[:, genes].X.sum(axis=1)).ravel()
    return program / totals


def test_simulate_markers_and_query_shift(sim):
    truth = sim.uns["simulation"]
    for cell_type, markers in truth["marker_genes"].items():
        fraction = _program_fraction(sim, markers)
        in_type = (sim.obs["cell_type"] == cell_type).to_numpy()
        assert fraction[in_type].mean() > 2 * fraction[~in_type].mean()
    assert sim.var["condition_program"].sum() == 15
    program = truth["condition_program_genes"]
    fraction = _program_fraction(sim, program)
    is_query = (sim.obs["condition"] == "query").to_numpy()
    assert fraction[is_query].mean() > 2 * fraction[~is_query].mean()


def test_simulate_without_condition_shift_leaves_program_unchanged():
    adata = simulate(n_cells=2000, n_genes=200, condition_shift=0.0, seed=3)
    fraction = _program_fraction(adata, adata.uns["simulation"]["condition_program_genes"])
    is_query = (adata.obs["condition"] == "query").to_numpy()
    assert fraction[is_query].mean() == pytest.approx(fraction[~is_query].mean(), rel=0.15)


def test_simulate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="query_fraction"):
        simulate(n_cells=10, n_genes=10, query_fraction=1.5)
    with pytest.raises(ValueError, match="n_markers"):
        simulate(n_cells=10, n_genes=10, n_markers=11)


def test_simulate_200k_cells_in_bounded_memory():
    n_cells, n_genes = 200_000, 2000
    dense_bytes = n_cells * n_genes * 4  # float32
    tracemalloc.start()
    try:
        adata = simulate(
            n_cells=n_cells,
            n_genes=n_genes,
            mean_library_size=100.0,
            chunk_size=10_000,
            seed=0,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert adata.shape == (n_cells, n_genes)
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    assert 0 < adata.X.nnz < 0.1 * n_cells * n_genes
    assert peak < 0.35 * dense_bytes


def test_write_simulated_writes_the_simulated_cells_chunk_by_chunk(tmp_path):
    expected = simulate(n_cells=250, n_genes=40, seed=5)
    path = write_simulated(tmp_path / "sim.h5ad", n_cells=250, n_genes=40, seed=5, chunk_size=60)
    backed = ad.read_h5ad(path, backed="r")
    assert backed.shape == (250, 40)
    assert (backed.X[:].tocsr() != expected.X).nnz == 0
    pd.testing.assert_frame_equal(backed.obs, expected.obs)
    assert list(backed.var_names) == list(expected.var_names)
    backed.file.close()
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace it"):
        write_simulated(path, n_cells=10, n_genes=10)
    with pytest.raises(TypeError, match="n_cels"):
        write_simulated(tmp_path / "other.h5ad", n_cels=10)


def test_write_simulated_memory_does_not_grow_with_the_number_of_cells(tmp_path):
    def peak_bytes(n_cells: int) -> int:
        tracemalloc.start()
        try:
            write_simulated(
                tmp_path / f"{n_cells}.h5ad", n_cells=n_cells, n_genes=500, chunk_size=4000
            )
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_bytes(8_000), peak_bytes(80_000)
    counts = ad.read_h5ad(tmp_path / "80000.h5ad", backed="r")
    counts_bytes = counts.X.group["data"].nbytes + counts.X.group["indices"].nbytes
    counts.file.close()
    # ten times the cells: only the per-cell obs grows (a few hundred bytes a cell)
    assert large < small + 400 * 72_000 < counts_bytes


# --- validation -----------------------------------------------------------------------


def _counts_adata(matrix: np.ndarray, sparse: bool) -> ad.AnnData:
    matrix = np.asarray(matrix, dtype=np.float32)
    return ad.AnnData(X=sp.csr_matrix(matrix) if sparse else matrix)


GOOD_COUNTS = np.array([[1, 0, 2], [0, 3, 0], [4, 1, 1]])


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(
    ("bad_value", "message"),
    [
        (np.nan, r"adata\.X contains NaN values; "),
        (np.inf, r"adata\.X contains infinite values; "),
        (-1.0, r"adata\.X contains negative values; .*raw counts"),
        (0.5, r"adata\.X contains non-integer values; .*layer="),
    ],
)
def test_validate_counts_rejects_bad_values(sparse, bad_value, message):
    matrix = GOOD_COUNTS.astype(np.float32)
    matrix[1, 1] = bad_value
    with pytest.raises(ValueError, match=message):
        validate_counts(_counts_adata(matrix, sparse))


@pytest.mark.parametrize("sparse", [False, True])
def test_validate_counts_rejects_empty_cells(sparse):
    matrix = GOOD_COUNTS.astype(np.float32)
    matrix[[0, 2]] = 0
    with pytest.raises(
        ValueError, match=r"adata\.X has 2 cells with zero total counts; .*filter_cells"
    ):
        validate_counts(_counts_adata(matrix, sparse))


def test_validate_counts_reports_nan_before_non_integer():
    matrix = GOOD_COUNTS.astype(np.float32)
    matrix[0, 0] = 0.5
    matrix[2, 2] = np.nan
    with pytest.raises(ValueError, match="contains NaN values"):
        validate_counts(_counts_adata(matrix, sparse=True))


def test_validate_counts_accepts_integer_dtypes_and_checks_layers():
    adata = ad.AnnData(X=np.log1p(GOOD_COUNTS.astype(np.float32)))
    adata.layers["counts"] = GOOD_COUNTS.astype(np.int64)
    validate_counts(adata, layer="counts")
    with pytest.raises(ValueError, match=r"adata\.X contains non-integer values"):
        validate_counts(adata)
    with pytest.raises(
        ValueError, match=r"layer 'raw' is not in adata\.layers; available layers: 'counts'"
    ):
        validate_counts(adata, layer="raw")
    adata.layers["counts"][0, 0] = -2
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] contains negative values"):
        validate_counts(adata, layer="counts")


@pytest.mark.parametrize("sparse", [False, True])
def test_validate_counts_works_in_chunks(monkeypatch, sparse):
    monkeypatch.setattr(_validation, "_ROW_CHUNK", 7)
    monkeypatch.setattr(_validation, "_VALUE_CHUNK", 5)
    matrix = np.ones((50, 4), dtype=np.float32)
    matrix[[3, 20, 49]] = 0
    with pytest.raises(ValueError, match="has 3 cells with zero total counts"):
        validate_counts(_counts_adata(matrix, sparse))
    matrix[[3, 20, 49]] = 1
    matrix[49, 3] = np.nan
    with pytest.raises(ValueError, match="contains NaN values"):
        validate_counts(_counts_adata(matrix, sparse))


def _labelled_adata(labels: list) -> ad.AnnData:
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels), "batch": ["b0"] * len(labels)},
        index=[f"c{i}" for i in range(len(labels))],
    )
    return ad.AnnData(X=np.ones((len(labels), 2), dtype=np.float32), obs=obs)


def test_validate_labels_accepts_two_classes_with_unlabeled_cells():
    validate_labels(_labelled_adata(["B", "T", "Unknown"]), "cell_type", "Unknown")
    validate_labels(_labelled_adata(["B", "T"]), "cell_type", None)


def test_validate_labels_refuses_categories_no_cell_carries():
    adata = _labelled_adata(["B", "T", "Unknown"])
    adata.obs["cell_type"] = pd.Categorical(
        adata.obs["cell_type"], categories=["B", "T", "NK", "Unknown"]
    )
    with pytest.raises(ValueError, match=r"categories that no cell carries \(\['NK'\]\)"):
        validate_labels(adata, "cell_type", "Unknown")
    # an unused unlabeled category is no cell type: accepted
    adata.obs["cell_type"] = pd.Categorical(["B", "T", "T"], categories=["B", "T", "Unknown"])
    validate_labels(adata, "cell_type", "Unknown")


def test_validate_labels_errors():
    adata = _labelled_adata(["B", "B", "Unknown"])
    with pytest.raises(
        ValueError, match=r"labels_key 'label' is not a column of adata\.obs; available columns"
    ):
        validate_labels(adata, "label", "Unknown")
    with pytest.raises(ValueError, match=r"labels_key 'cell_type' has only one cell type"):
        validate_labels(adata, "cell_type", "Unknown")
    with pytest.raises(
        ValueError, match=r"No cell in adata\.obs\['cell_type'\] is labelled.*Unknown"
    ):
        validate_labels(_labelled_adata(["Unknown", "Unknown"]), "cell_type", "Unknown")
    with pytest.raises(ValueError, match=r"missing \(NaN\) labels; fill them with.*'Unknown'"):
        validate_labels(_labelled_adata(["B", "T", None]), "cell_type", "Unknown")


def test_validate_obs_key():
    adata = _labelled_adata(["B", "T"])
    validate_obs_key(adata, "batch", "batch_key")
    with pytest.raises(
        ValueError,
        match=r"domain_key 'donor' is not a column of adata\.obs; available columns: "
        r"'cell_type', 'batch'",
    ):
        validate_obs_key(adata, "donor", "domain_key")
    adata.obs["batch"] = [np.nan, "b1"]
    with pytest.raises(ValueError, match=r"batch_key 'batch' has 1 missing \(NaN\) values"):
        validate_obs_key(adata, "batch", "batch_key")


def test_validators_do_not_modify_adata(sim):
    adata = sim.copy()
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[:10], "labels"] = "Unknown"
    before_obs = adata.obs.copy()
    before_x = adata.X.copy()
    validate_counts(adata)
    validate_labels(adata, "labels", "Unknown")
    validate_obs_key(adata, "batch", "batch_key")
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert adata.X.dtype == before_x.dtype and (adata.X != before_x).nnz == 0


def test_validate_gene_overlap_report_and_error():
    reference = [f"g{i}" for i in range(100)]
    report = validate_gene_overlap(reference, reference[:60] + ["x1", "x2"])
    assert report == {
        "n_reference_genes": 100,
        "n_query_genes": 62,
        "n_shared": 60,
        "fraction_shared": 0.6,
        "missing_genes": [f"g{i}" for i in range(60, 80)],
    }
    with pytest.raises(
        ValueError,
        match=r"shares only 30 of 100 reference genes .*minimum fraction 0\.5.*Ensembl",
    ):
        validate_gene_overlap(reference, reference[:30])
    assert validate_gene_overlap(reference, reference[:30], min_fraction=0.2)["n_shared"] == 30


# --- gene selection -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_genes() -> ad.AnnData:
    return simulate(n_cells=300, n_genes=400, n_cell_types=4, n_markers=20, seed=5)


def _program_genes(adata: ad.AnnData) -> set[str]:
    truth = adata.uns["simulation"]
    genes = set(truth["condition_program_genes"])
    for markers in truth["marker_genes"].values():
        genes.update(markers)
    return genes


@pytest.mark.parametrize("method", ["cellular", "can", "cgran"])
def test_select_genes_returns_new_restricted_counts(sim_genes, method):
    original = sim_genes.copy()
    selected = select_genes(sim_genes, method, n_top_genes=100)
    assert selected is not sim_genes
    assert sim_genes.shape == original.shape and (sim_genes.X != original.X).nnz == 0
    assert 100 <= selected.n_vars <= 105
    # genes keep their original order and X still holds the same counts
    positions = sim_genes.var_names.get_indexer(selected.var_names)
    assert np.all(np.diff(positions) > 0)
    assert (selected.X != sim_genes[:, selected.var_names].X).nnz == 0
    if method == "cellular":
        # dispersion-based HVGs find the simulated marker / condition programs
        assert len(set(selected.var_names) & _program_genes(sim_genes)) >= 70


THREADS_SCRIPT = """
import torch
torch.set_num_threads(1)
from scvi_ext.data import select_genes, simulate
assert torch.get_num_threads() == 1  # torch's OpenMP is in use before scanpy runs
select_genes(simulate(n_cells=300, n_genes=200, seed=0), "cellular", n_top_genes=50)
print("THREADS", torch.get_num_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to see a change")
def test_select_genes_keeps_torch_thread_count():
    # scanpy's numba code raised torch's thread count to the number of cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "THREADS 1" in result.stdout


def test_select_genes_can_is_top_variance_of_lognormalised(sim_genes):
    import scanpy as sc

    lognorm = sim_genes.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e5)
    sc.pp.log1p(lognorm)
    variance = np.asarray(lognorm.X.toarray().var(axis=0))
    expected = set(lognorm.var_names[np.argsort(-variance)[:50]])
    assert set(select_genes(sim_genes, "can", n_top_genes=50).var_names) == expected


def test_select_genes_defaults_and_layer(sim_genes):
    assert select_genes(sim_genes, "CAN").n_vars == 400  # 1000 > 400 genes: keep all
    adata = sim_genes.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X)
    from_layer = select_genes(adata, "cgran", n_top_genes=40, layer="counts")
    from_x = select_genes(sim_genes, "cgran", n_top_genes=40)
    assert list(from_layer.var_names) == list(from_x.var_names)
    assert "counts" in from_layer.layers


def test_select_genes_scnym_keeps_all_genes(sim_genes):
    selected = select_genes(sim_genes, "scnym")
    assert selected is not sim_genes
    assert list(selected.var_names) == list(sim_genes.var_names)
    with pytest.raises(ValueError, match="uses all genes"):
        select_genes(sim_genes, "scnym", n_top_genes=10)
    with pytest.raises(ValueError, match="Unknown gene selection method 'pca'"):
        select_genes(sim_genes, "pca")


NOT_HDF5 = (
    "exists and is not an HDF5 (.h5ad) file; overwrite=True replaces only an HDF5 (.h5ad) "
    "file. Write to another path, or move or delete this one yourself."
)


def test_write_simulated_overwrites_only_an_h5ad_and_keeps_it_when_writing_fails(
    tmp_path, monkeypatch
):
    folder = tmp_path / "mine.h5ad"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    text = tmp_path / "notes.h5ad"
    text.write_text("keep me too")
    for path in (folder, text):
        with pytest.raises(FileExistsError) as error:
            write_simulated(path, overwrite=True, n_cells=10, n_genes=5, n_markers=1)
        assert str(error.value) == f"{path} {NOT_HDF5}"
    assert (folder / "notes.txt").read_text() == "keep me"
    assert text.read_text() == "keep me too"
    path = write_simulated(tmp_path / "sim.h5ad", n_cells=20, n_genes=5, n_markers=1)
    write_simulated(path, overwrite=True, n_cells=7, n_genes=5, n_markers=1, chunk_size=3)
    assert ad.read_h5ad(path).shape == (7, 5)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(_simulate, "_sample_chunk", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_simulated(path, overwrite=True, n_cells=30, n_genes=5, n_markers=1)
    assert ad.read_h5ad(path).shape == (7, 5)  # the old file is kept, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.h5ad", "notes.h5ad", "sim.h5ad"]


def test_a_partial_write_left_by_a_killed_run_is_named_in_a_warning_and_kept(tmp_path):
    leftover = tmp_path / ".partial-0123abcd.sim.h5ad"  # what a SIGKILL mid-write leaves
    leftover.write_text("half a file")
    other = tmp_path / ".partial-0123abcd.other.h5ad"
    other.write_text("another file's")
    message = (
        f".partial-0123abcd.sim.h5ad in {tmp_path} is a partial write of sim.h5ad left by an "
        "interrupted run (or one still running); delete it to free the disk space."
    )
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        path = write_simulated(tmp_path / "sim.h5ad", n_cells=6, n_genes=5, n_markers=1)
    assert ad.read_h5ad(path).shape == (6, 5)
    assert leftover.read_text() == "half a file" and other.exists()


@pytest.mark.parametrize("format", ["csr", "csc", "dense"])
def test_log_normalised_anndata_reads_a_backed_file_whole(tmp_path, format):
    adata = simulate(n_cells=40, n_genes=15, n_markers=2, seed=2)
    expected = log_normalised_anndata(adata)
    stored = adata.X.toarray() if format == "dense" else adata.X.asformat(format)
    ad.AnnData(X=stored, obs=adata.obs, var=adata.var).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    result = log_normalised_anndata(backed)
    assert result.X.format == "csr" and result.X.dtype == np.float32
    np.testing.assert_array_equal(result.X.toarray(), expected.X.toarray())
    pd.testing.assert_index_equal(result.obs_names, adata.obs_names)
    backed.file.close()
    with pytest.raises(ValueError, match=r"^target must be a positive finite number, got 0\.$"):
        log_normalised_anndata(adata, target=0)
    with pytest.raises(TypeError, match=r"^adata must be an AnnData, not csr_matrix\.$"):
        log_normalised_anndata(adata.X)
    message = "adata.X is None; put the raw counts in X (adata.X = adata.layers[...])."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        log_normalised_anndata(ad.AnnData(obs=adata.obs))
