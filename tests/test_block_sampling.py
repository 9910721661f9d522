"""Block-shuffled training minibatches and slice reads for cells on disk (issue 16)."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pytest
import scvi
from scvi.dataloaders import DataSplitter

from scvi_ext.base import BlockBatchSampler, SliceReadCSR, check_block_size
from scvi_ext.base._sampler import BlockAnnDataLoader
from scvi_ext.data import simulate
from scvi_ext.data._slice_read import row_runs
from scvi_ext.model import CELLULAR, ScNym

BAD_BLOCK_SIZE = (
    "block_size must be a positive integer (rows read together; 1 shuffles single rows, as "
    "scvi-tools does), not {}."
)


def _runs(positions: list[int], rows: np.ndarray) -> int:
    """Runs of consecutive rows in a minibatch."""
    sorted_rows = np.sort(rows[positions])
    return 1 + int(np.sum(np.diff(sorted_rows) != 1))


def test_every_row_once_per_epoch_in_whole_blocks_reshuffled_and_seeded():
    rows = np.random.default_rng(0).permutation(1000)[:896]  # a split: unsorted, with gaps
    sampler = BlockBatchSampler(rows, batch_size=64, block_size=16, seed=1)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 14  # 896 / 64
        positions = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(positions), np.arange(896))  # each once
        block_of = {int(p): i // 16 for i, p in enumerate(np.argsort(rows, kind="stable"))}
        for batch in batches[:-1]:
            assert len({block_of[p] for p in batch}) == 4  # 64 / 16 whole blocks
            assert len(batch) == 64
        epochs.append(positions)
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch its own order
    again = BlockBatchSampler(rows, batch_size=64, block_size=16, seed=1)
    again.set_epoch(1)
    np.testing.assert_array_equal(np.concatenate(list(again)), epochs[1])  # seeded
    first, second = list(again), list(again)  # a restart within an epoch reshuffles
    assert first != second


def test_block_size_one_and_drop_last():
    sampler = BlockBatchSampler(np.arange(100), batch_size=32, block_size=1, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    assert all(len(batch) == 32 for batch in batches)
    assert len(set(np.concatenate(batches))) == 96


def test_ddp_shards_are_disjoint_whole_blocks_and_take_equal_steps():
    rows = np.arange(1000)
    shards = [
        BlockBatchSampler(rows, batch_size=50, block_size=10, seed=0, num_replicas=2, rank=r)
        for r in range(2)
    ]
    for shard in shards:
        shard.set_epoch(3)
    batches = [list(shard) for shard in shards]
    assert len(batches[0]) == len(batches[1]) == len(shards[0]) == 10
    seen = [set(np.concatenate(b).tolist()) for b in batches]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(1000))
    for shard_batches in batches:
        assert all(_runs(batch, rows) <= 5 for batch in shard_batches)
    odd = [  # 1001 rows: one shard is padded with a repeated row, steps still equal
        list(BlockBatchSampler(np.arange(1001), 50, 10, seed=0, num_replicas=2, rank=r))
        for r in range(2)
    ]
    assert len(odd[0]) == len(odd[1]) == 11


@pytest.mark.parametrize("value", [0, -4, 2.5, "8", True, None])
def test_bad_block_sizes_are_refused(value):
    with pytest.raises(ValueError) as error:
        check_block_size(value)
    assert str(error.value) == BAD_BLOCK_SIZE.format(repr(value))


def test_the_loader_deals_the_cells_of_several_minibatches_of_blocks_among_them():
    """Each minibatch mixes cells of 4 x 16 / 8 blocks; every cell once per epoch."""
    n_cells = 200
    adata = ad.AnnData(
        X=np.repeat(np.arange(1, n_cells + 1, dtype=np.float32)[:, None], 3, axis=1),
        obs={"cell_type": ["a", "b"] * (n_cells // 2)},
    )
    ScNym.setup_anndata(adata, labels_key="cell_type", unlabeled_category=None)
    manager = ScNym._get_most_recent_anndata_manager(adata, required=True)
    loader = BlockAnnDataLoader(manager, np.arange(n_cells), batch_size=16, block_size=8)
    loader.sampler.set_epoch(0)
    batches = [batch["X"][:, 0].numpy().astype(int) - 1 for batch in loader]
    assert len(batches) == len(loader) == 13  # ceil(200 / 16)
    assert [len(b) for b in batches] == [16] * 12 + [8]
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n_cells))
    blocks_per_batch = [len(set(b // 8)) for b in batches[:12]]
    assert np.mean(blocks_per_batch) > 6  # 2 without mixing


def test_row_runs_merge_small_gaps():
    assert row_runs(np.arange(10, 266)) == [(10, 266)]
    assert row_runs(np.array([0, 1, 5, 30, 31]), max_gap=8) == [(0, 6), (30, 32)]
    assert row_runs(np.array([0, 10]), max_gap=8) == [(0, 1), (10, 11)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A reference ordered by cell type and a query, written to h5ad."""
    adata = simulate(n_cells=600, n_genes=60, n_cell_types=3, n_batches=2, n_markers=10, seed=3)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    is_query = (adata.obs["condition"] == "query").to_numpy()
    reference = adata[~is_query].copy()
    reference = reference[np.argsort(reference.obs["cell_type"].to_numpy(), kind="stable")].copy()
    folder = tmp_path_factory.mktemp("block")
    reference.write_h5ad(folder / "reference.h5ad")
    adata[is_query].write_h5ad(folder / "query.h5ad")
    return folder / "reference.h5ad", folder / "query.h5ad"


def test_slice_reads_equal_anndata_reads(files):
    backed = ad.read_h5ad(files[0], backed="r")
    reader = SliceReadCSR(backed.X)
    rng = np.random.default_rng(0)
    for rows in (
        np.arange(3, 120),
        np.sort(rng.choice(backed.n_obs, 50, replace=False)),
        rng.choice(backed.n_obs, 50, replace=False),  # unsorted
        np.array([], dtype=int),
    ):
        expected = backed.X[np.sort(rows)][np.argsort(np.argsort(rows))] if len(rows) else None
        got = reader[rows]
        assert got.shape == (len(rows), backed.n_vars)
        if len(rows):
            assert (got != expected).nnz == 0
    in_memory = backed.X[np.arange(backed.n_obs)]
    repeated = np.array([7, 3, 7, 7, 4, 3])  # e.g. predict(indices=...) with repeats
    assert (reader[repeated] != in_memory[repeated]).nnz == 0


def _scnym(adata, **kwargs):
    ScNym.setup_anndata(adata, labels_key="cell_type", unlabeled_category=None)
    return ScNym(adata, n_hidden=32, **kwargs)


TRAIN = {"max_epochs": 3, "batch_size": 32, "enable_progress_bar": False, "early_stopping": False}


def test_backed_training_uses_blocks_and_predicts_as_in_memory(files):
    reference_path, query_path = files
    backed = ad.read_h5ad(reference_path, backed="r")
    model = _scnym(backed)
    model.train(**{**TRAIN, "max_epochs": 10, "batch_size": 128})  # 4 blocks of 32 rows
    loaders = model.trainer.train_dataloader.loaders
    assert all(isinstance(loader, BlockAnnDataLoader) for loader in loaders.values() if loader)
    assert loaders["labelled"].sampler.block_size == 32
    query = ad.read_h5ad(query_path)
    backed_query = ad.read_h5ad(query_path, backed="r")
    np.testing.assert_allclose(
        model.predict_proba(backed_query), model.predict_proba(query), atol=1e-6
    )
    assert (model.predict(query) == query.obs["cell_type"].to_numpy()).mean() > 0.6

    cellular_data = ad.read_h5ad(reference_path, backed="r")
    CELLULAR.setup_anndata(cellular_data, labels_key="cell_type", batch_key="batch")
    cellular = CELLULAR(cellular_data, n_latent=8, n_hidden=(32, 16))
    cellular.train(**TRAIN, datasplitter_kwargs={"block_size": 8})
    assert cellular.trainer.train_dataloader.sampler.block_size == 8
    np.testing.assert_allclose(
        cellular.get_latent_representation(backed_query),
        cellular.get_latent_representation(query),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        cellular.train(**TRAIN, datasplitter_kwargs={"block_size": 0})


def test_cells_stored_in_type_order_are_warned_about_and_shuffled_ones_are_not(files, tmp_path):
    sorted_cells = ad.read_h5ad(files[0], backed="r")
    CELLULAR.setup_anndata(sorted_cells, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(sorted_cells, n_latent=8, n_hidden=(32, 16))
    with pytest.warns(UserWarning, match=r"stored in order of obs\['cell_type'\]: 99% of"):
        model.train(**{**TRAIN, "max_epochs": 1})

    in_memory = ad.read_h5ad(files[0])
    shuffled = in_memory[np.random.default_rng(0).permutation(in_memory.n_obs)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    shuffled_cells = ad.read_h5ad(tmp_path / "shuffled.h5ad", backed="r")
    CELLULAR.setup_anndata(shuffled_cells, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(shuffled_cells, n_latent=8, n_hidden=(32, 16))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stored in order.*")
        model.train(**{**TRAIN, "max_epochs": 1})


def test_in_memory_training_is_unchanged(files, monkeypatch):
    """In memory, the default splitter trains exactly as scvi's DataSplitter (same losses)."""
    histories = []
    for splitter in (None, DataSplitter):
        if splitter is not None:
            monkeypatch.setattr(CELLULAR, "_data_splitter_cls", splitter)
        scvi.settings.seed = 0
        adata = ad.read_h5ad(files[0])
        CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
        model = CELLULAR(adata, n_latent=8, n_hidden=(32, 16))
        model.train(**TRAIN)
        histories.append(model.history["train_loss"].to_numpy().ravel())
    assert len(histories[0]) == TRAIN["max_epochs"]
    np.testing.assert_array_equal(histories[0], histories[1])


def test_prediction_reads_one_slice_per_minibatch(files, monkeypatch):
    reference_path, _ = files
    model = _scnym(ad.read_h5ad(reference_path))
    model.train(max_epochs=1, enable_progress_bar=False)
    backed = ad.read_h5ad(reference_path, backed="r")
    reads = []
    original = h5py.Dataset.__getitem__

    def counting(dataset, key):
        reads.append(dataset.name)
        return original(dataset, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    counts = {}
    for batch_size in (50, 100):
        reads.clear()
        model.predict(backed, batch_size=batch_size)
        counts[batch_size] = sum(name.endswith(("/data", "/indices")) for name in reads)
    monkeypatch.undo()
    n_batches = {size: -(-backed.n_obs // size) for size in counts}
    # two reads (values, gene indices) per minibatch, not per cell (was 2 x 420 per pass)
    assert counts[50] - counts[100] == 2 * (n_batches[50] - n_batches[100])
    assert counts[100] < 3 * n_batches[100]


DDP_SCRIPT = """
import anndata as ad
import numpy as np
import scvi

from scvi_ext.model import CELLULAR, ScNym

scvi.settings.seed = 0
ddp = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "enable_progress_bar": False}
adata = ad.read_h5ad(PATH, backed="r")
CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
cellular = CELLULAR(adata, n_latent=8, n_hidden=(32, 16))
cellular.train(max_epochs=1, batch_size=32, **ddp)
loader = cellular.trainer.train_dataloader
sampler = loader.sampler
sampler.set_epoch(0)
drawn = sorted(int(p) for batch in sampler for p in batch)
scnym_data = ad.read_h5ad(PATH, backed="r")
ScNym.setup_anndata(scnym_data, labels_key="cell_type", unlabeled_category=None)
scnym = ScNym(scnym_data, n_hidden=32)
scnym.train(max_epochs=1, batch_size=32, **ddp)
labelled = scnym.trainer.train_dataloader.loaders["labelled"].sampler
result = (
    type(sampler).__name__,
    sampler.num_replicas,
    len(loader),
    drawn,
    labelled.num_replicas,
    len(scnym.trainer.train_dataloader.loaders["labelled"]),
    len(sampler.dataset),
)
"""


def test_ddp_processes_train_on_disjoint_blocks_in_equal_steps(files, tmp_path):
    from conftest import ddp_rank_results

    script = DDP_SCRIPT.replace("PATH", repr(str(files[0])))
    rank0, rank1 = (eval(text) for text in ddp_rank_results(script, tmp_path))  # noqa: S307
    assert rank0[0] == "BlockBatchSampler"
    assert rank0[1] == rank1[1] == rank0[4] == 2
    assert rank0[2] == rank1[2] and rank0[5] == rank1[5]  # equal steps on both processes
    assert set(rank0[3]).isdisjoint(rank1[3])  # n_train is even here: no padding
    assert sorted(rank0[3] + rank1[3]) == list(range(rank0[6]))
