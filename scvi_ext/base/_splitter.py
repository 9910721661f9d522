"""Paired labelled / unlabeled data loading for semi-supervised training."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import lightning.pytorch as pl
import numpy as np
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.dataloaders import AnnDataLoader
from scvi.dataloaders._data_splitting import validate_data_split
from torch.utils.data import DataLoader

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
    side is sharded with scvi's ``BatchDistributedSampler``, which pads every rank to
    the same number of batches, so all ranks take the same number of steps.

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
        **kwargs,
    ):
        kwargs.pop("sampler", None)
        self._epoch = 0
        self.loaders: dict[str, AnnDataLoader | None] = {}
        for side, indices in ((LABELLED, labelled_indices), (UNLABELED, unlabeled_indices)):
            if len(indices) == 0:
                self.loaders[side] = None
                continue
            self.loaders[side] = AnnDataLoader(
                adata_manager,
                indices=np.asarray(indices),
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
                distributed_sampler=distributed_sampler,
                **kwargs,
            )
        present = [loader for loader in self.loaders.values() if loader is not None]
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
        **kwargs,
    ):
        super().__init__()
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
            **self.data_loader_kwargs,
        )

    def val_dataloader(self) -> AnnDataLoader | list:
        """Held-out labelled cells, or nothing when there are none."""
        if len(self.val_labelled_idx) == 0:
            return []
        return AnnDataLoader(
            self.adata_manager,
            indices=self.val_labelled_idx,
            batch_size=self.batch_size,
            shuffle=False,
            distributed_sampler=self.distributed_sampler,
            **self.data_loader_kwargs,
        )
