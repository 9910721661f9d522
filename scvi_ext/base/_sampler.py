"""Block-shuffled minibatches and slice reads for cells on disk (backed h5ad, collections).

A backed CSR matrix read through anndata with an index array costs one ``h5py`` read per
row (two: values and gene indices). Minibatches made of a few runs of consecutive rows, each
read with one slice, cost a few reads instead (docs/scale.md, "What limits throughput").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import h5py
import numpy as np
import torch
import torch.distributed as dist
from anndata.abc import CSCDataset, CSRDataset
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.dataloaders import AnnDataLoader
from torch.utils.data import DataLoader, DistributedSampler

from scvi_ext.data import CollectionCounts, is_collection
from scvi_ext.data._slice_read import SliceReadCSR
from scvi_ext.data._validation import is_positive_int

#: Consecutive rows per block when the cells are on disk (measured: docs/scale.md).
DEFAULT_BLOCK_SIZE = 32
#: Minibatches read at once and whose cells are then dealt at random among them, so that a
#: minibatch mixes ``4 x batch_size / block_size`` blocks (a dense buffer of 4 minibatches).
MINIBATCHES_PER_READ = 4


def check_block_size(block_size: object) -> int:
    """``block_size`` as an int; anything but a positive integer is a ``ValueError``."""
    if not is_positive_int(block_size):
        raise ValueError(
            f"block_size must be a positive integer (rows read together; 1 shuffles single "
            f"rows, as scvi-tools does), not {block_size!r}."
        )
    return int(block_size)


def is_on_disk(adata: object) -> bool:
    """The cells are read from files: a backed AnnData (or a light copy of one, whose
    matrices are the file's), or a collection of h5ad files."""
    if is_collection(adata) or getattr(adata, "isbacked", False):
        return True
    layers = getattr(adata, "layers", None)
    matrices = [getattr(adata, "X", None), *(layers.values() if layers is not None else [])]
    return any(isinstance(matrix, CSRDataset | CSCDataset | h5py.Dataset) for matrix in matrices)


def resolve_block_size(block_size: int | None, adata: object) -> int:
    """``block_size`` checked; ``None``: :data:`DEFAULT_BLOCK_SIZE` on disk, 1 in memory."""
    if block_size is None:
        return DEFAULT_BLOCK_SIZE if is_on_disk(adata) else 1
    return check_block_size(block_size)


#: Excess of neighbouring rows sharing a label or batch, over a random order, above which
#: the cells count as stored in order (0: random order, 1: sorted).
ORDERED_EXCESS = 0.5


def warn_if_stored_in_order(
    adata_manager: AnnDataManager, rows: np.ndarray, block_size: int
) -> None:
    """Warn when the cells ``rows`` are stored sorted by their registered labels or batch.

    Blocks of consecutive rows then hold few types or batches, and minibatches made of
    blocks mix them less than a shuffle of single rows: losses that compare the cells of a
    minibatch (CELLULAR's) lose accuracy (docs/scale.md). The excess of neighbouring rows
    with equal codes over what a random order gives is compared with
    :data:`ORDERED_EXCESS`.
    """
    if block_size == 1 or len(rows) < 2:
        return
    fields = adata_manager.data_registry
    for key in (REGISTRY_KEYS.LABELS_KEY, REGISTRY_KEYS.BATCH_KEY):
        if key not in fields:
            continue
        codes = np.asarray(adata_manager.get_from_registry(key)).ravel()[np.sort(rows)]
        frequencies = np.unique(codes, return_counts=True)[1] / len(codes)
        at_random = float((frequencies**2).sum())
        if at_random > 0.99:  # one category: nothing to mix
            continue
        neighbours = float((codes[1:] == codes[:-1]).mean())
        excess = (neighbours - at_random) / (1 - at_random)
        if excess > ORDERED_EXCESS:
            column = adata_manager.get_state_registry(key).original_key
            warnings.warn(
                f"The cells on disk are stored in order of obs[{column!r}]: "
                f"{neighbours:.0%} of neighbouring rows share it ({at_random:.0%} would in a "
                f"random order). Training minibatches are made of blocks of {block_size} "
                "consecutive rows, which then mix cell types or batches less than a shuffle "
                "of single rows and can cost accuracy. Write the file in shuffled order, or "
                "pass smaller blocks: train(..., datasplitter_kwargs={'block_size': "
                f"{max(1, block_size // 8)}}}) (1: single rows, the slowest from disk).",
                UserWarning,
                stacklevel=2,
            )
            return


class BlockBatchSampler(DistributedSampler):
    """Minibatches of whole blocks of consecutive rows, the blocks shuffled every pass.

    The rows are sorted and cut into blocks of ``block_size``; every pass over them (every
    epoch, and every restart within one) shuffles the blocks, and a minibatch is the next
    ``batch_size / block_size`` blocks. Yields positions into ``rows`` (as a loader over
    ``rows`` expects), ``minibatches_per_read`` minibatches at a time (one read; the
    loader deals its cells among them, :class:`BlockAnnDataLoader`). Under DDP every process takes its own contiguous share of the
    shuffled blocks, padded (as :class:`~torch.utils.data.DistributedSampler` does) so that
    every process takes the same number of steps.

    Parameters
    ----------
    rows
        Row indices of the cells, in the loader's order.
    batch_size
        Cells per minibatch (per process).
    block_size
        Consecutive rows per block; 1 shuffles single rows.
    drop_last
        Drop the last incomplete minibatch.
    minibatches_per_read
        Minibatches yielded together.
    seed
        Seed of the shuffles (default ``scvi.settings.seed``, or 0 when it is ``None``);
        equal on every process.
    num_replicas, rank
        DDP processes and this one's rank (default: from ``torch.distributed`` when it is
        initialised, else one process).
    """

    def __init__(
        self,
        rows: Sequence[int],
        batch_size: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        drop_last: bool = False,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        minibatches_per_read: int = 1,
    ):
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        rows = np.asarray(rows)
        if seed is None:  # the same on every process (torch's DistributedSampler: 0)
            seed = settings.seed or 0
        super().__init__(rows, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.block_size = check_block_size(block_size)
        self.batch_size = int(batch_size)
        self.drop_last_batch = drop_last
        self.minibatches_per_read = int(minibatches_per_read)
        order = np.argsort(rows, kind="stable")
        self._blocks = [order[i : i + self.block_size] for i in range(0, len(order), block_size)]
        self.num_samples = math.ceil(len(rows) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` (Lightning calls it before every epoch)."""
        super().set_epoch(epoch)
        self._passes = 0

    def _positions(self) -> np.ndarray:
        """This process's share of one pass: positions, block after shuffled block."""
        rng = np.random.default_rng([self.seed, self.epoch, self._passes])
        self._passes += 1
        shuffled = np.concatenate([self._blocks[i] for i in rng.permutation(len(self._blocks))])
        padding = self.total_size - len(shuffled)
        if padding:
            shuffled = np.concatenate([shuffled, np.resize(shuffled, padding)])
        return shuffled[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]

    @property
    def n_minibatches(self) -> int:
        """Minibatches per pass (per process)."""
        if self.drop_last_batch:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        positions = self._positions()[: self.n_minibatches * self.batch_size]
        size = self.batch_size * self.minibatches_per_read
        for start in range(0, len(positions), size):
            yield positions[start : start + size].tolist()

    def __len__(self) -> int:
        """Reads per pass (minibatches with ``minibatches_per_read=1``)."""
        return math.ceil(self.n_minibatches / self.minibatches_per_read)


def read_rows_as_slices(loader: AnnDataLoader) -> None:
    """Make ``loader`` read the backed CSR matrices it reads with :class:`SliceReadCSR`."""
    dataset = getattr(loader.dataset, "dataset", loader.dataset)  # a Subset or the dataset
    data = dataset.data  # scvi's cached dictionary of the registered arrays
    for key, matrix in data.items():
        if isinstance(matrix, CSRDataset) and not isinstance(
            matrix, SliceReadCSR | CollectionCounts
        ):
            data[key] = SliceReadCSR(matrix)


class BlockAnnDataLoader(AnnDataLoader):
    """scvi's :class:`~scvi.dataloaders.AnnDataLoader` drawing :class:`BlockBatchSampler`
    minibatches and reading backed CSR rows by slices.

    It reads ``minibatches_per_read`` minibatches of blocks at once and deals their cells
    at random among them, so that each minibatch mixes cells of that many times more
    blocks (files are often written in order of cell type or sample) at the same reads.

    Parameters
    ----------
    adata_manager
        Manager of the registered data.
    indices
        Row indices of the cells.
    batch_size
        Cells per minibatch (per process under DDP).
    block_size
        Consecutive rows per block.
    drop_last
        Drop the last incomplete minibatch.
    distributed_sampler
        Shard the blocks across DDP processes.
    seed
        Seed of the shuffles (default ``scvi.settings.seed``).
    minibatches_per_read
        Minibatches read, and mixed, together (1 with ``load_sparse_tensor``).
    **kwargs
        Passed to :class:`~scvi.dataloaders.AnnDataLoader`.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: Sequence[int],
        batch_size: int = 128,
        block_size: int = DEFAULT_BLOCK_SIZE,
        drop_last: bool = False,
        distributed_sampler: bool = False,
        seed: int | None = None,
        data_and_attributes: list[str] | dict | None = None,
        load_sparse_tensor: bool = False,
        minibatches_per_read: int = MINIBATCHES_PER_READ,
        **kwargs,
    ):
        for name in ("shuffle", "sampler", "drop_dataset_tail", "iter_ndarray"):
            kwargs.pop(name, None)
        kwargs.setdefault("num_workers", settings.dl_num_workers)
        kwargs.setdefault("persistent_workers", settings.dl_persistent_workers)
        replicas = {} if distributed_sampler else {"num_replicas": 1, "rank": 0}
        self.indices = np.asarray(indices)
        warn_if_stored_in_order(adata_manager, self.indices, check_block_size(block_size))
        self.minibatch_size = int(batch_size)
        sampler = BlockBatchSampler(
            self.indices,
            batch_size,
            block_size,
            drop_last=drop_last,
            seed=seed,
            minibatches_per_read=1 if load_sparse_tensor else minibatches_per_read,
            **replicas,
        )
        self.dataset = adata_manager.create_torch_dataset(
            indices=self.indices,
            data_and_attributes=data_and_attributes,
            load_sparse_tensor=load_sparse_tensor,
        )
        # scvi's AnnDataLoader batches in the sampler (batch_size=None), as here; its
        # __init__ builds its own sampler, so DataLoader's is called directly.
        DataLoader.__init__(self, self.dataset, batch_size=None, sampler=sampler, **kwargs)
        read_rows_as_slices(self)
        self._passes = 0

    def __len__(self) -> int:
        return self.sampler.n_minibatches

    def __iter__(self) -> Iterator[dict]:
        if self.sampler.minibatches_per_read == 1:
            yield from super().__iter__()
            return
        sampler = self.sampler
        rng = np.random.default_rng([sampler.seed, sampler.epoch, self._passes, 1])
        self._passes += 1
        for tensors in super().__iter__():
            n_cells = len(next(iter(tensors.values())))
            order = torch.from_numpy(rng.permutation(n_cells))
            for start in range(0, n_cells, self.minibatch_size):
                chosen = order[start : start + self.minibatch_size]
                yield {key: value[chosen] for key, value in tensors.items()}


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockAnnDataLoader",
    "BlockBatchSampler",
    "SliceReadCSR",
    "check_block_size",
    "read_rows_as_slices",
    "resolve_block_size",
]
