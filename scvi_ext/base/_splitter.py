"""Paired labelled / unlabeled data loading for semi-supervised training."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import lightning.pytorch as pl
import numpy as np
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.dataloaders import AnnDataLoader, DataSplitter
from scvi.dataloaders._data_splitting import validate_data_split
from torch.utils.data import DataLoader

from ._sampler import BlockAnnDataLoader, is_on_disk, read_rows_as_slices, resolve_block_size

LABELLED = "labelled"
UNLABELED = "unlabeled"


def labelled_mask(adata_manager: AnnDataManager) -> np.ndarray:
    """Boolean mask of the cells whose label is not the unlabeled category."""
    state = adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
    codes = adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY).ravel()
    mapping = list(state.categorical_mapping)
    unlabeled = state.get("unlabeled_category", None)
    if unlabeled is None or unlabeled not in mapping:
        return np.ones(len(codes), dtype=bool)
    return codes != mapping.index(unlabeled)


#: A last training minibatch smaller than this is dropped (its cells train in the next epochs,
#: which shuffle): BatchNorm cannot train on one cell, and scvi-tools warns below 3.
MIN_LAST_BATCH = 3


def drop_small_last_batch(n_cells: int, batch_size: int, drop_last: bool) -> bool:
    """``drop_last``, or ``True`` when ``n_cells`` would end an epoch with a minibatch of
    fewer than :data:`MIN_LAST_BATCH` cells (and there is at least one full minibatch)."""
    return bool(drop_last) or (n_cells >= batch_size and 0 < n_cells % batch_size < MIN_LAST_BATCH)


def paired_minibatches(loaders: dict[str, Iterable | None], n_steps: int) -> Iterator[dict]:
    """``n_steps`` steps of ``{side: minibatch}``: each side's loader restarts (and reshuffles)
    whenever it runs out; a side without a loader yields ``None``."""

    def cycle(loader: Iterable) -> Iterator[dict]:
        while True:
            yield from loader

    iterators = {
        side: None if loader is None else cycle(loader) for side, loader in loaders.items()
    }
    for _ in range(n_steps):
        yield {side: None if it is None else next(it) for side, it in iterators.items()}


class PairedDataLoader(DataLoader):
    """Yield ``{"labelled": batch, "unlabeled": batch}`` in every step.

    One epoch runs over the longer side; the shorter side is cycled (restarted, and
    reshuffled, whenever it runs out). An empty side yields ``None``. Under DDP each
    side is sharded (scvi's ``BatchDistributedSampler``, or :class:`BlockBatchSampler`
    with blocks), which pads every rank to the same number of batches, so all ranks take
    the same number of steps.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    labelled_indices, unlabeled_indices
        Cell indices of each side.
    batch_size
        Minibatch size of each side.
    shuffle
        Shuffle each side.
    drop_last
        Drop the last incomplete batch of each side.
    distributed_sampler
        Shard both sides across DDP processes.
    block_size
        With ``shuffle``, draw minibatches of shuffled blocks of ``block_size`` consecutive
        rows (:class:`BlockBatchSampler`); ``None``: 32 for cells on disk, else scvi's
        shuffle of single rows.
    **kwargs
        Passed to :class:`~scvi.dataloaders.AnnDataLoader`.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        labelled_indices: np.ndarray,
        unlabeled_indices: np.ndarray,
        batch_size: int = 128,
        shuffle: bool = True,
        drop_last: bool = False,
        distributed_sampler: bool = False,
        block_size: int | None = None,
        **kwargs,
    ):
        kwargs.pop("sampler", None)
        self._epoch = 0
        block_size = resolve_block_size(block_size, adata_manager.adata)
        self.loaders: dict[str, AnnDataLoader | None] = {}
        sides = ((LABELLED, labelled_indices), (UNLABELED, unlabeled_indices))
        for seed_offset, (side, indices) in enumerate(sides):
            if len(indices) == 0:
                self.loaders[side] = None
                continue
            if shuffle and block_size > 1:
                self.loaders[side] = BlockAnnDataLoader(
                    adata_manager,
                    indices=np.asarray(indices),
                    batch_size=batch_size,
                    block_size=block_size,
                    drop_last=drop_small_last_batch(len(indices), batch_size, drop_last),
                    distributed_sampler=distributed_sampler,
                    seed=(settings.seed or 0) + seed_offset,  # the sides shuffle differently
                    **kwargs,
                )
                continue
            self.loaders[side] = AnnDataLoader(
                adata_manager,
                indices=np.asarray(indices),
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=drop_small_last_batch(len(indices), batch_size, drop_last)
                if shuffle
                else drop_last,
                distributed_sampler=distributed_sampler,
                **kwargs,
            )
        present = [loader for loader in self.loaders.values() if loader is not None]
        if is_on_disk(adata_manager.adata):
            for loader in present:
                read_rows_as_slices(loader)
        if not present:
            raise ValueError("PairedDataLoader needs at least one labelled or unlabeled cell.")
        self._longest = max(present, key=len)
        super().__init__(self._longest.dataset, batch_size=None, sampler=self._longest.sampler)

    def __len__(self) -> int:
        return len(self._longest)

    def _set_epoch(self) -> None:
        for loader in self.loaders.values():
            set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self._epoch)
        self._epoch += 1

    def __iter__(self) -> Iterator[dict]:
        self._set_epoch()
        yield from paired_minibatches(self.loaders, len(self))


class PairedDataSplitter(pl.LightningDataModule):
    """Split labelled cells into train/validation; every unlabeled cell trains.

    Training batches pair a labelled and an unlabeled minibatch (see
    :class:`PairedDataLoader`); validation runs on held-out labelled cells only, so the
    validation loss is a supervised loss on the reference.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData (labels registered with an unlabeled category).
    train_size
        Fraction of labelled cells used for training (default 0.9).
    validation_size
        Fraction of labelled cells for validation (default ``1 - train_size``).
    shuffle_set_split
        Shuffle labelled cells before splitting (seeded by ``scvi.settings.seed``).
    batch_size
        Minibatch size of each side.
    distributed_sampler
        Shard data across DDP processes.
    block_size
        Training minibatches are shuffled blocks of ``block_size`` consecutive rows (see
        :class:`BlockDataSplitter`); ``None``: 32 for cells on disk, 1 in memory.
    **kwargs
        Passed to the data loaders.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        distributed_sampler: bool = False,
        block_size: int | None = None,
        **kwargs,
    ):
        super().__init__()
        self.block_size = resolve_block_size(block_size, adata_manager.adata)
        self.adata_manager = adata_manager
        self.train_size = 0.9 if train_size is None else float(train_size)
        self.validation_size = validation_size
        self.shuffle_set_split = shuffle_set_split
        self.batch_size = batch_size
        self.distributed_sampler = distributed_sampler
        self.drop_last = kwargs.pop("drop_last", False)
        kwargs.pop("load_sparse_tensor", None)
        kwargs.pop("pin_memory", None)
        self.data_loader_kwargs = kwargs

        is_labelled = labelled_mask(adata_manager)
        self._labelled = np.flatnonzero(is_labelled)
        self._unlabeled = np.flatnonzero(~is_labelled)
        if len(self._labelled) > 0:
            self.n_labelled_train, self.n_val = validate_data_split(
                len(self._labelled), self.train_size, self.validation_size
            )
        else:
            self.n_labelled_train, self.n_val = 0, 0
        self.n_train = self.n_labelled_train + len(self._unlabeled)

    def setup(self, stage: str | None = None) -> None:
        """Draw the labelled train/validation split."""
        labelled = self._labelled
        if self.shuffle_set_split:
            labelled = np.random.RandomState(seed=settings.seed).permutation(labelled)
        self.val_labelled_idx = np.sort(labelled[: self.n_val])
        self.train_labelled_idx = np.sort(
            labelled[self.n_val : self.n_val + self.n_labelled_train]
        )
        self.test_idx = np.sort(labelled[self.n_val + self.n_labelled_train :])
        self.unlabeled_idx = self._unlabeled
        self.train_idx = np.concatenate([self.train_labelled_idx, self.unlabeled_idx])
        self.val_idx = self.val_labelled_idx

    def train_dataloader(self) -> PairedDataLoader:
        """Paired labelled / unlabeled training batches."""
        return PairedDataLoader(
            self.adata_manager,
            self.train_labelled_idx,
            self.unlabeled_idx,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last,
            distributed_sampler=self.distributed_sampler,
            block_size=self.block_size,
            **self.data_loader_kwargs,
        )

    def val_dataloader(self) -> AnnDataLoader | list:
        """Held-out labelled cells, or nothing when there are none."""
        if len(self.val_labelled_idx) == 0:
            return []
        loader = AnnDataLoader(
            self.adata_manager,
            indices=self.val_labelled_idx,
            batch_size=self.batch_size,
            shuffle=False,
            distributed_sampler=self.distributed_sampler,
            **self.data_loader_kwargs,
        )
        if is_on_disk(self.adata_manager.adata):
            read_rows_as_slices(loader)
        return loader


class BlockDataSplitter(DataSplitter):
    """scvi's :class:`~scvi.dataloaders.DataSplitter`, with block-shuffled training
    minibatches for cells on disk.

    Reading a shuffled minibatch from a backed h5ad costs one read per row; here the
    training rows (sorted) are cut into blocks of ``block_size`` consecutive rows, the
    blocks are shuffled every epoch, and a minibatch is ``batch_size / block_size`` blocks,
    each read with one slice (:class:`BlockBatchSampler`, :class:`SliceReadCSR`). Cells
    stored in order (of type, batch, sample) then share minibatches with their neighbours
    in the file more often than under a shuffle of single rows (docs/scale.md). Validation
    minibatches are scvi's (in the split's random order), read by slices.

    A last training minibatch of fewer than 3 cells is dropped each epoch (a different one
    every epoch, the cells being shuffled), where scvi-tools only warns: BatchNorm cannot
    train on one cell.

    Parameters
    ----------
    adata_manager
        Manager of the registered data.
    block_size
        Consecutive rows per block (``train(..., datasplitter_kwargs={"block_size": 8})``);
        ``None``: 32 for cells on disk (backed AnnData, collection), 1 in memory; 1 is
        scvi's shuffle of single rows, unchanged.
    **kwargs
        Passed to :class:`~scvi.dataloaders.DataSplitter`.
    """

    def __init__(self, adata_manager: AnnDataManager, block_size: int | None = None, **kwargs):
        with warnings.catch_warnings():  # scvi's advice on a small last minibatch: see below
            warnings.filterwarnings("ignore", message="Last batch will have a small size")
            super().__init__(adata_manager, **kwargs)
        batch_size = self.data_loader_kwargs.get("batch_size") or settings.batch_size
        self.drop_last = drop_small_last_batch(self.n_train, batch_size, self.drop_last)
        self.block_size = resolve_block_size(block_size, adata_manager.adata)
        self.on_disk = is_on_disk(adata_manager.adata)

    def train_dataloader(self) -> AnnDataLoader:
        """Shuffled training minibatches (in blocks when ``block_size`` > 1)."""
        if self.block_size == 1:
            loader = super().train_dataloader()
        else:
            loader = BlockAnnDataLoader(
                self.adata_manager,
                indices=self.train_idx,
                block_size=self.block_size,
                drop_last=self.drop_last,
                load_sparse_tensor=self.load_sparse_tensor,
                pin_memory=self.pin_memory,
                **self.data_loader_kwargs,
            )
        if self.on_disk:
            read_rows_as_slices(loader)
        return loader

    def val_dataloader(self) -> AnnDataLoader | None:
        """scvi's validation minibatches (read by slices on disk)."""
        loader = super().val_dataloader()
        if loader is not None and self.on_disk:
            read_rows_as_slices(loader)
        return loader
