"""Training and prediction from a TileDB-SOMA experiment (SomaDataModule), every model."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tiledbsoma")
pytest.importorskip("tiledbsoma_ml")

import tiledbsoma  # noqa: E402
import tiledbsoma.io  # noqa: E402
from conftest import ddp_rank_results  # noqa: E402

from scvi_ext.base import SomaDataModule  # noqa: E402
from scvi_ext.base._soma import _read_ahead  # noqa: E402
from scvi_ext.data import simulate, write_simulated, write_soma  # noqa: E402
from scvi_ext.model import CAN, CELLULAR, CGRAN, GMVAE, LatentClassifier, ScNym  # noqa: E402

TRAIN = {"max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False}
#: CAN's capsules need more epochs than the others on these cells (0.47 accuracy after 3).
EPOCHS = {"can": 8}
SIMULATION = {"n_cells": 600, "n_genes": 60, "n_cell_types": 3, "n_batches": 2, "n_markers": 10}
LABELS = {"labels_key": "cell_type", "unlabeled_category": "Unknown"}

#: model class, setup arguments, model arguments, plan arguments (tiny widths, as in
#: tests/test_model_contract_safety.py).
MODELS = {
    "scnym": (ScNym, LABELS, {"n_hidden": 32}, None),
    "cellular": (
        CELLULAR,
        {**LABELS, "batch_key": "batch"},
        {"n_latent": 8, "n_hidden": (32, 16)},
        None,
    ),
    "can": (
        CAN,
        LABELS,
        {"n_capsules": 6, "capsule_dim": 16, "attention_dim": 8, "kernel_size": 3},
        {"lr": 1e-2},
    ),
    "cgran": (
        CGRAN,
        LABELS,
        {"n_embedding": 16, "n_heads": 4, "head_dims": (8, 4), "group_size": 25},
        {"lr": 1e-2},
    ),
    "gmvae": (
        GMVAE,
        {"batch_key": "batch"},
        {"n_latent": 4, "n_hidden": 32, "n_components": 3},
        {"lr": 1e-2},
    ),
}


def _cells() -> tuple[ad.AnnData, np.ndarray]:
    """Simulated cells whose query cells are unlabeled ("Unknown"), and the true types."""
    adata = simulate(**SIMULATION, seed=3)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    labels = adata.obs["cell_type"].astype(str)
    labels[adata.obs["condition"] == "query"] = "Unknown"
    adata.obs["cell_type"] = labels
    return adata, truth


def _digest(folder: Path) -> dict[str, str]:
    """Hash of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    adata, truth = _cells()
    uri = write_soma(adata, tmp_path_factory.mktemp("soma") / "cells")
    return uri, adata, truth


# --- writing --------------------------------------------------------------------------


def _read_back(uri: str) -> ad.AnnData:
    with tiledbsoma.Experiment.open(uri) as exp:
        return tiledbsoma.io.to_anndata(exp, "RNA", X_layer_name="counts")


def _assert_same_cells(read: ad.AnnData, expected: ad.AnnData) -> None:
    assert read.shape == expected.shape
    assert (read.X != expected.X).nnz == 0
    pd.testing.assert_frame_equal(read.obs, expected.obs)
    pd.testing.assert_index_equal(read.var_names, expected.var_names)


def test_write_soma_round_trip_from_memory_and_backed(tmp_path):
    adata, _ = _cells()
    uri = write_soma(adata, tmp_path / "memory", chunk_size=70)
    _assert_same_cells(_read_back(uri), adata)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    layered = ad.AnnData(obs=adata.obs, var=adata.var, layers={"raw": adata.X})
    _assert_same_cells(_read_back(write_soma(backed, tmp_path / "backed", chunk_size=70)), adata)
    _assert_same_cells(_read_back(write_soma(layered, tmp_path / "layer", layer="raw")), adata)
    backed.file.close()
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace it"):
        write_soma(adata, uri)
    write_soma(adata[:10], uri, overwrite=True)
    assert _read_back(uri).n_obs == 10
    with pytest.raises(ValueError, match="layer 'raw' is not in adata.layers"):
        write_soma(adata, tmp_path / "other", layer="raw")


def test_write_simulated_soma_holds_the_cells_of_the_h5ad(tmp_path):
    settings = {"n_cells": 250, "n_genes": 40, "seed": 5, "chunk_size": 60}
    h5ad = ad.read_h5ad(write_simulated(tmp_path / "sim.h5ad", **settings))
    uri = write_simulated(tmp_path / "sim", format="soma", **settings)
    _assert_same_cells(_read_back(str(uri)), h5ad)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        write_simulated(uri, format="soma", n_cells=10, n_genes=10)
    with pytest.raises(ValueError, match="format must be 'h5ad' or 'soma'"):
        write_simulated(tmp_path / "x", format="zarr")


_PEAK_RSS_OF_WRITE = """
import resource, sys
from scvi_ext.data import write_simulated
write_simulated(sys.argv[1], format="soma", n_cells=int(sys.argv[2]), n_genes=200, chunk_size=2500)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_write_simulated_soma_memory_does_not_grow_with_the_number_of_cells(tmp_path):
    """Peak RSS of a fresh process (TileDB's own buffers included)."""

    def peak_bytes(n_cells: int) -> int:
        command = [sys.executable, "-c", _PEAK_RSS_OF_WRITE, str(tmp_path / f"{n_cells}")]
        done = subprocess.run([*command, str(n_cells)], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    small, large = peak_bytes(4_000), peak_bytes(40_000)
    with tiledbsoma.Experiment.open(str(tmp_path / "40000")) as exp:
        counts_bytes = 8 * exp.ms["RNA"].X["counts"].nnz  # a float32 value and a column index
    # ten times the cells: only per-cell arrays grow (obs, the per-cell draws: about
    # 650 bytes a cell measured), far less than the counts
    assert large - small < 1000 * 36_000 < counts_bytes


# --- training and prediction, every model ----------------------------------------------


def _train(name: str, uri: str):
    model_cls, setup, model_kwargs, plan_kwargs = MODELS[name]
    dm = SomaDataModule(uri, model_cls, batch_size=64, **setup)
    model = model_cls(registry=dm.registry, **model_kwargs)
    epochs = EPOCHS.get(name, TRAIN["max_epochs"])
    model.train(datamodule=dm, plan_kwargs=plan_kwargs, **{**TRAIN, "max_epochs": epochs})
    return dm, model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_trains_and_predicts_from_soma_as_from_memory(name, experiment, tmp_path):
    uri, adata, truth = experiment
    before = _digest(Path(uri))
    dm, model = _train(name, uri)
    assert model.is_trained_ and model.adata is None
    latent = model.get_latent_representation(dm)
    np.testing.assert_allclose(latent, model.get_latent_representation(adata), atol=1e-5)
    # scattered cells in any order: read in row order, returned in the caller's
    scattered = np.random.default_rng(0).permutation(adata.n_obs)[:100]
    read, loader = [], dm.loader
    dm.loader = lambda indices=None, **kwargs: read.append(indices) or loader(indices, **kwargs)
    np.testing.assert_allclose(
        model.get_latent_representation(dm, indices=scattered), latent[scattered], atol=1e-5
    )
    del dm.loader
    assert (np.diff(read[-1]) > 0).all() and set(read[-1]) == set(scattered)
    if name == "gmvae":
        clusters = model.predict_cluster(dm, soft=True)
        np.testing.assert_allclose(clusters, model.predict_cluster(adata, soft=True), atol=1e-5)
        assert list(clusters.index) == list(adata.obs_names)
    else:
        proba = model.predict_proba(dm)
        np.testing.assert_allclose(proba, model.predict_proba(adata), atol=1e-5)
        dm._joinids_are_rows = False  # cells found by searching their joinids
        np.testing.assert_allclose(model.predict_proba(dm), proba, atol=1e-6)
        assert (model.predict(dm) == truth).mean() > 0.6  # chance: 1/3
        soft = model.predict(dm, soft=True, indices=[5, 1])
        assert list(soft.index) == ["cell_5", "cell_1"]
        np.testing.assert_allclose(soft.to_numpy(), proba[[5, 1]], atol=1e-6)
    model.save(tmp_path / "model")
    loaded = type(model).load(tmp_path / "model", adata=adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), latent, atol=1e-5)
    assert _digest(Path(uri)) == before  # the experiment is read, never written


def test_scanvi_the_peer_trains_and_predicts_from_the_datamodule(experiment):
    import scvi

    uri, adata, truth = experiment
    dm = SomaDataModule(uri, scvi.model.SCANVI, batch_size=64, batch_key="batch", **LABELS)
    assert list(dm.labels) == list(adata.obs["cell_type"])  # "Unknown" on query cells
    model = scvi.model.SCANVI(registry=dm.registry, datamodule=dm, n_latent=4, n_hidden=32)
    model.train(datamodule=dm, **{**TRAIN, "max_epochs": 20})
    predictions = model.predict(dataloader=dm.loader(np.arange(dm.n_obs)))
    assert len(predictions) == adata.n_obs
    assert (np.asarray(predictions) == truth).mean() > 0.6  # chance: 1/3
    unlabelled = SomaDataModule(uri, GMVAE, batch_key="batch")
    with pytest.raises(AttributeError, match="set up without labels; pass labels_key"):
        _ = unlabelled.labels


def test_cells_read_in_order_take_io_batches_spanning_the_rows_of_a_full_read(experiment):
    uri, adata, _ = experiment
    dm = SomaDataModule(uri, ScNym, io_batch_size=128, **LABELS)

    def io_batch_size(indices) -> int:
        return dm.loader(np.asarray(indices)).dataset.dataset.io_batch_size

    assert io_batch_size(np.arange(adata.n_obs)) == 128  # every cell
    assert io_batch_size(np.arange(100, 300)) == 128  # a run of cells
    assert io_batch_size(np.arange(0, adata.n_obs, 10)) == 13  # a tenth: 128 rows' worth
    assert io_batch_size([0, adata.n_obs - 1]) == 1
    assert io_batch_size([7]) == 128
    # training streams keep their IO batches (their cells come in chunks of rows)
    assert (
        dm.loader(np.arange(0, adata.n_obs, 10), shuffle=True).dataset.dataset.io_batch_size == 128
    )


def _stream_io_batch_sizes(dm: SomaDataModule) -> dict:
    dm.setup()
    return {
        side: loader.dataset.dataset.io_batch_size
        for side, loader in dm.train_dataloader().loaders.items()
        if loader is not None
    }


def test_two_streams_of_a_training_step_share_the_io_batch(experiment):
    import scvi

    uri, adata, _ = experiment
    paired = SomaDataModule(uri, ScNym, io_batch_size=256, shuffle_chunk_size=32, **LABELS)
    assert _stream_io_batch_sizes(paired) == {"labelled": 128, "unlabeled": 128}
    full_and_labelled = SomaDataModule(
        uri, scvi.model.SCANVI, io_batch_size=256, shuffle_chunk_size=32, **LABELS
    )
    assert _stream_io_batch_sizes(full_and_labelled) == {"full": 128, "labelled": 128}
    # one stream (every cell labelled) keeps the whole IO batch; an IO batch of one chunk
    # cannot be shared below a chunk
    all_labelled = SomaDataModule(
        uri, ScNym, io_batch_size=256, labels_key="cell_type", unlabeled_category=None
    )
    assert _stream_io_batch_sizes(all_labelled) == {"labelled": 256}
    one_chunk = SomaDataModule(uri, ScNym, io_batch_size=64, shuffle_chunk_size=64, **LABELS)
    assert _stream_io_batch_sizes(one_chunk) == {"labelled": 64, "unlabeled": 64}


def test_latent_classifier_on_a_cellular_trained_from_soma(experiment):
    uri, adata, truth = experiment
    dm, cellular = _train("cellular", uri)
    classifier = LatentClassifier.from_model(
        cellular, dm, unlabeled_category="Unknown", n_hidden1=16, n_hidden2=16
    )
    classifier.train(batch_size=32, plan_kwargs={"lr": 1e-2}, **TRAIN)  # an in-memory model
    proba = classifier.predict_proba(dm)
    np.testing.assert_allclose(proba, classifier.predict_proba(adata), atol=1e-5)
    assert (classifier.predict(dm) == truth).mean() > 0.6


def test_statistics_read_from_soma_equal_those_from_memory(experiment):
    """CELLULAR's fit_statistics reads all cells and the labelled ones (indices)."""
    uri, adata, _ = experiment
    dm = SomaDataModule(uri, CELLULAR, **MODELS["cellular"][1])
    from_soma = CELLULAR(registry=dm.registry, n_latent=8, n_hidden=(32, 16))
    with from_soma._reading(dm):
        from_soma.fit_statistics()
    memory = adata.copy()
    CELLULAR.setup_anndata(memory, **MODELS["cellular"][1])
    in_memory = CELLULAR(memory, n_latent=8, n_hidden=(32, 16))
    in_memory.fit_statistics()
    for name in ("library_size", "label_weights", "batch_weights", "reference_distances"):
        np.testing.assert_allclose(
            getattr(from_soma.module, name), getattr(in_memory.module, name), rtol=1e-5
        )


# --- bad inputs ---------------------------------------------------------------------------


def test_a_missing_layer_or_obs_column_is_a_clear_error(experiment):
    uri, *_ = experiment
    with pytest.raises(ValueError, match=r"no X layer 'raw' .*\(X layers: \['counts'\]\)"):
        SomaDataModule(uri, ScNym, layer="raw", **LABELS)
    with pytest.raises(
        ValueError, match="batch_key 'donor' is not a column of adata.obs; available columns: "
    ):
        SomaDataModule(uri, ScNym, batch_key="donor", **LABELS)
    with pytest.raises(ValueError, match="labels_key 'type' is not a column of adata.obs"):
        SomaDataModule(uri, ScNym, labels_key="type")


def test_bad_inputs_to_write_soma_and_the_datamodule_are_clear_errors(experiment, tmp_path):
    uri, adata, _ = experiment
    with pytest.raises(
        ValueError, match=r"layer 'raw' is not in adata.layers \(available: \[\]\)"
    ):
        write_soma(adata, tmp_path / "raw", layer="raw")
    without_x = ad.AnnData(obs=adata.obs, var=adata.var)
    with pytest.raises(ValueError, match="adata.X is None; pass the layer holding the counts"):
        write_soma(without_x, tmp_path / "no_x")
    with pytest.raises(ValueError, match=r"has no measurement 'ATAC' \(measurements: \['RNA'\]\)"):
        SomaDataModule(uri, ScNym, measurement="ATAC", **LABELS)
    dm = SomaDataModule(uri, ScNym, **LABELS)
    with_batches = SomaDataModule(uri, ScNym, batch_key="batch", **LABELS)
    model = ScNym(registry=with_batches.registry, n_hidden=8)
    with pytest.raises(ValueError, match="The datamodule registers 'batch' differently"):
        model.train(datamodule=dm, **TRAIN)
    with pytest.raises(ValueError, match="datamodule must be a scvi_ext.base.SomaDataModule"):
        model.train(datamodule=object(), **TRAIN)


def test_io_sizes_are_checked_before_any_training(experiment):
    uri, _, _ = experiment
    with pytest.raises(
        ValueError,
        match=r"io_batch_size \(1000\) must be a multiple of shuffle_chunk_size \(64\).*"
        r"for example io_batch_size=1024",
    ):
        SomaDataModule(uri, ScNym, io_batch_size=1000, **LABELS)
    with pytest.raises(ValueError, match="shuffle_chunk_size must be a positive integer, not 0"):
        SomaDataModule(uri, ScNym, shuffle_chunk_size=0, **LABELS)
    with pytest.raises(ValueError, match="io_batch_size must be a positive integer, not 2.5"):
        SomaDataModule(uri, ScNym, io_batch_size=2.5, **LABELS)


def _runs_of_consecutive_cells(dm: SomaDataModule) -> float:
    """Mean length of the runs of consecutive cells in the first shuffled IO batch (one
    minibatch of ``io_batch_size`` cells, as streamed by ``tiledbsoma_ml``)."""
    loader = dm.loader(shuffle=True, batch_size=dm.io_batch_size)
    _, obs = next(iter(loader.dataset.dataset))  # the engine's (counts, obs) minibatches
    rows = np.sort(obs["soma_joinid"].to_numpy())
    return len(rows) / (1 + np.count_nonzero(np.diff(rows) != 1))


def test_shuffle_chunk_size_sets_the_runs_of_consecutive_cells_read_together(experiment):
    uri, _, _ = experiment
    fine = SomaDataModule(uri, ScNym, io_batch_size=60, shuffle_chunk_size=2, **LABELS)
    coarse = SomaDataModule(uri, ScNym, io_batch_size=60, shuffle_chunk_size=30, **LABELS)
    assert fine.io_batch_size == coarse.io_batch_size == 60
    assert _runs_of_consecutive_cells(coarse) > 5 * _runs_of_consecutive_cells(fine)


def test_a_datamodule_with_other_genes_is_refused(experiment, tmp_path):
    uri, adata, _ = experiment
    dm, model = _train("scnym", uri)
    message = "has {} of the 60 genes of this ScNym{}. Genes are matched by name"
    reversed_uri = write_soma(adata[:, ::-1], tmp_path / "reversed")
    reversed_dm = SomaDataModule(reversed_uri, ScNym, **LABELS)
    with pytest.raises(ValueError, match=message.format(60, r" \(in another order\)")):
        model.predict(reversed_dm)
    with pytest.raises(ValueError, match=r"write the cells on those genes to a new experiment"):
        model.train(datamodule=reversed_dm, **TRAIN)
    subset_dm = SomaDataModule(write_soma(adata[:, :40], tmp_path / "subset"), ScNym, **LABELS)
    with pytest.raises(ValueError, match=message.format(40, "")):
        model.get_latent_representation(subset_dm)
    with pytest.raises(ValueError, match=r"\['batch_size'\] are the datamodule's"):
        model.train(datamodule=dm, batch_size=32, **TRAIN)


def test_counts_are_checked_as_they_stream(tmp_path):
    adata, _ = _cells()
    adata.X = adata.X * 0.5
    uri = write_soma(adata, tmp_path / "halves")
    dm = SomaDataModule(uri, ScNym, **LABELS)
    model = ScNym(registry=dm.registry, n_hidden=16)
    with pytest.raises(ValueError, match="the X layer 'counts' of .* contains non-integer values"):
        model.train(datamodule=dm, **TRAIN)


DDP_SCRIPT = """
import numpy as np
import scvi
from scvi_ext.base import SomaDataModule
from scvi_ext.model import ScNym

scvi.settings.seed = 0
dm = SomaDataModule({uri!r}, ScNym, batch_size=32, labels_key="cell_type",
                    unlabeled_category="Unknown")
model = ScNym(registry=dm.registry, n_hidden=16)
model.train(datamodule=dm, max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
            enable_progress_bar=False)
proba = model.predict_proba(dm)
result = (proba.shape, np.round(proba[:3], 4).tolist())
"""


def test_two_ddp_processes_train_from_soma_and_predict_every_cell(experiment, tmp_path):
    uri, adata, _ = experiment
    first, second = ddp_rank_results(DDP_SCRIPT.format(uri=uri), tmp_path)
    assert first == second  # the same weights on both ranks, every cell read by each
    assert first.startswith(f"(({adata.n_obs}, 3),")


# --- reading ahead ----------------------------------------------------------------------


def _counted(n: int, produced: list, closed: list, fail_at: int | None = None):
    """Items 0..n-1, counting how many were made and whether the generator was closed."""
    try:
        for item in range(n):
            if item == fail_at:
                raise RuntimeError(f"read failed at {item}")
            produced.append(item)
            yield item
    finally:
        closed.append(True)


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_read_ahead_keeps_the_order_and_prepares_at_most_depth_items_ahead():
    produced, closed = [], []
    stream = _read_ahead(_counted(50, produced, closed), depth=3)
    assert next(stream) == 0
    # while the consumer holds item 0, the thread prepares the next ones, up to the depth
    # (3 queued, one more made and waiting for room)
    assert _wait_for(lambda: len(produced) == 5)
    time.sleep(0.2)
    assert len(produced) == 5
    assert [0, *stream] == list(range(50))
    assert closed == [True]


def test_read_ahead_raises_the_producer_error_in_the_consumer():
    produced, closed = [], []
    stream = _read_ahead(_counted(10, produced, closed, fail_at=4), depth=2)
    received = []
    with pytest.raises(RuntimeError, match="read failed at 4"):
        for item in stream:
            received.append(item)
    assert received == [0, 1, 2, 3]  # the items made before the error, in order
    assert closed == [True]


def test_a_consumer_that_stops_early_stops_the_read_ahead_thread():
    produced, closed = [], []
    before = threading.active_count()
    stream = _read_ahead(_counted(1000, produced, closed), depth=2)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()
    assert closed == [True]  # the source was closed, not left half-read
    assert len(produced) <= 5
    assert _wait_for(lambda: threading.active_count() == before)


def test_streams_hand_freed_memory_back_once_per_io_batch_and_at_their_end(
    experiment, monkeypatch
):
    import scvi_ext.base._soma as soma

    uri, adata, _ = experiment
    dm = SomaDataModule(uri, ScNym, batch_size=32, io_batch_size=128, **LABELS)
    calls = []
    monkeypatch.setattr(soma, "release_free_memory", lambda: calls.append(True))
    minibatches = list(dm.loader(np.arange(adata.n_obs)))
    # 600 cells: 19 minibatches of 32 in 5 IO batches of 128, then once at the end
    assert len(minibatches) == 19 and len(calls) == 5 + 1


def test_releasing_free_memory_needs_no_glibc(monkeypatch):
    import scvi_ext.base._soma as soma

    monkeypatch.setattr(soma, "_malloc_trim", lambda: None)  # macOS, musl
    soma.release_free_memory()


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


NOT_AN_EXPERIMENT = (
    "exists and is not a TileDB-SOMA experiment; overwrite=True replaces only a TileDB-SOMA "
    "experiment. Write to another path, or move or delete this one yourself."
)


def test_overwrite_replaces_an_experiment_and_never_another_folder(tmp_path):
    adata = simulate(n_cells=30, n_genes=12, n_markers=2, seed=1)
    folder = _user_folder(tmp_path)
    with pytest.raises(FileExistsError) as error:
        write_soma(adata, folder, overwrite=True)
    assert str(error.value) == f"{folder} {NOT_AN_EXPERIMENT}"
    with pytest.raises(FileExistsError) as error:
        write_simulated(folder, overwrite=True, format="soma", n_cells=10, n_genes=5)
    assert str(error.value) == f"{folder} {NOT_AN_EXPERIMENT}"
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"
    uri = write_soma(adata, tmp_path / "cells")
    assert write_soma(adata[:10], uri, overwrite=True) == uri
    replaced = _read_back(uri)
    assert list(replaced.obs_names) == list(adata.obs_names[:10])
    assert (replaced.X != adata.X[:10]).nnz == 0
    write_simulated(uri, overwrite=True, format="soma", n_cells=7, n_genes=5, n_markers=1)
    assert _read_back(uri).shape == (7, 5)
    with pytest.raises(ValueError, match=r"^s3://bucket/cells is a URI; pass a local path"):
        write_soma(adata, "s3://bucket/cells")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "mine"]


@pytest.mark.parametrize(
    "chunk_size", [0, -5, 2.5, True], ids=["zero", "negative", "float", "bool"]
)
def test_a_bad_chunk_size_is_refused_before_anything_is_written(chunk_size, tmp_path):
    adata = simulate(n_cells=30, n_genes=12, n_markers=2, seed=1)
    uri = write_soma(adata, tmp_path / "cells")
    before = _digest(tmp_path)
    message = f"chunk_size must be a positive integer (cells per chunk), not {chunk_size!r}."
    with pytest.raises(ValueError) as raised:
        write_soma(adata[:5], uri, overwrite=True, chunk_size=chunk_size)
    assert str(raised.value) == message
    with pytest.raises(ValueError, match=re.escape(message)):
        write_soma(adata, tmp_path / "new", chunk_size=chunk_size)
    assert _digest(tmp_path) == before  # the experiment is intact, nothing else written
    _assert_same_cells(_read_back(uri), adata)


def test_writers_refuse_arguments_of_the_wrong_type_before_writing(tmp_path):
    from scvi_ext.data._soma import write_soma_chunks

    adata = simulate(n_cells=10, n_genes=5, n_markers=1, seed=1)
    cases = [
        (lambda: write_soma(adata.X, tmp_path / "a"), "adata must be an AnnData, not csr_matrix."),
        (lambda: write_soma(adata, 3), "the path must be a str or os.PathLike, not int."),
        (
            lambda: write_soma(adata, tmp_path / "a", overwrite="yes"),
            "overwrite must be True or False, not 'yes'.",
        ),
        (
            lambda: write_soma_chunks(tmp_path / "a", adata.obs.index, adata.var, []),
            "obs must be a pandas DataFrame, not Index.",
        ),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_keeps_the_old_experiment(tmp_path):
    from scvi_ext.data._soma import write_soma_chunks

    adata = simulate(n_cells=30, n_genes=12, n_markers=2, seed=1)
    uri = write_soma(adata, tmp_path / "cells")
    before = _digest(tmp_path)
    wrong = [adata.X[:10], adata.X[10:, :3]]
    with pytest.raises(ValueError, match=r"^A chunk has 3 genes, var 12\.$"):
        write_soma_chunks(uri, adata.obs, adata.var, iter(wrong), overwrite=True)
    with pytest.raises(ValueError, match=r"^The chunks hold 10 cells, obs 30\.$"):
        write_soma_chunks(tmp_path / "new", adata.obs, adata.var, iter(wrong[:1]))
    assert _digest(tmp_path) == before
    _assert_same_cells(_read_back(uri), adata)
    _assert_same_cells(_read_back(write_soma(adata, tmp_path / "new")), adata)  # a retry
