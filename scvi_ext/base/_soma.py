"""Training and inference from a TileDB-SOMA experiment, streamed by ``tiledbsoma_ml``."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager, AnnTorchDataset
from scvi.dataloaders import SemiSupervisedDataSplitter
from torch.utils.data import IterableDataset

from scvi_ext.data import validate_obs_key
from scvi_ext.data._validation import check_minibatch_counts, check_positive_ints

from ._splitter import LABELLED, UNLABELED, PairedDataSplitter, paired_minibatches

#: Attribute naming, on the stand-in AnnData of a datamodule (and its light copies), the
#: :class:`SomaDataModule` whose experiment holds the counts.
SOMA_SOURCE_ATTRIBUTE = "_scvi_ext_soma_source"
#: Setup arguments ending in ``_key`` that do not name ``obs`` columns.
_NOT_OBS_KEYS = ("obsm_key",)
#: Dense minibatches a stream prepares ahead of its consumer: one IO batch's worth, within
#: this many bytes (at least two minibatches).
READ_AHEAD_BYTES = 64 * 2**20


def soma_source(data: object) -> SomaDataModule | None:
    """The :class:`SomaDataModule` behind ``data`` (the datamodule itself, its stand-in
    AnnData or a light copy of it), else ``None``."""
    if isinstance(data, SomaDataModule):
        return data
    return getattr(data, SOMA_SOURCE_ATTRIBUTE, None)


def _import_soma():
    try:
        import tiledbsoma
        import tiledbsoma_ml
    except ImportError as error:  # an optional dependency
        raise ImportError(
            "Reading a TileDB-SOMA experiment needs tiledbsoma and tiledbsoma-ml: "
            "pip install 'scvi-ext[soma]'."
        ) from error
    return tiledbsoma, tiledbsoma_ml


class SomaDataModule(pl.LightningDataModule):
    """Cells of a TileDB-SOMA experiment for ``model.train(datamodule=...)`` and inference.

    The experiment is opened read-only. Its genes (``var`` column ``var_id``) and the
    ``obs`` columns named by the ``*_key`` setup arguments are read into a stand-in AnnData
    (``obs_id`` as ``obs_names``; ``X`` a placeholder holding one stored value per cell),
    registered with ``model_cls.setup_anndata(stand_in, **setup_kwargs)``: :attr:`registry`
    is the registry the model would have on an AnnData with those ``obs`` and genes. The
    counts never enter memory: minibatches stream them from the ``X`` layer through
    ``tiledbsoma_ml.ExperimentDataset`` (shuffled in chunks of rows during training,
    partitioned across DDP processes), and every other registered tensor (labels, batch,
    domain...) is looked up per cell. Counts are checked minibatch by minibatch as
    ``setup_anndata`` checks an AnnData's.

    The train/validation split is drawn by the model's own splitter (as from an AnnData,
    seeded by ``scvi.settings.seed``); models with
    :class:`~scvi_ext.base.PairedDataSplitter` (ScNym) get paired labelled/unlabeled
    minibatches.

    Parameters
    ----------
    uri
        The experiment (a folder written by :func:`scvi_ext.data.write_soma` or
        ``tiledbsoma.io.from_anndata``).
    model_cls
        The model class to register for (``ScNym``, ``CELLULAR``, ...).
    layer
        ``X`` layer of raw counts.
    measurement
        Measurement holding that layer.
    batch_size
        Minibatch size.
    train_size, validation_size
        As in ``model.train`` (default: the model's ``train_defaults``).
    seed
        Seed of the streaming shuffle (the same on every DDP process).
    io_batch_size
        Cells read from disk at once (``tiledbsoma_ml``): larger reads faster, and memory
        grows with it (docs/scale.md, "TileDB-SOMA"). A multiple of ``shuffle_chunk_size``.
        Training steps that draw from two streams (ScNym's labelled and unlabeled cells,
        scANVI's all and labelled cells) share it: each stream reads half.
    shuffle_chunk_size
        Consecutive cells shuffled as one unit while training (``tiledbsoma_ml``; its
        default, 64): larger reads faster, and a minibatch then mixes fewer runs of cells
        (``io_batch_size / shuffle_chunk_size`` runs per IO batch).
    **setup_kwargs
        Arguments of ``model_cls.setup_anndata`` (``labels_key``, ``batch_key``...).

    Examples
    --------
    >>> dm = SomaDataModule(uri, ScNym, labels_key="cell_type", unlabeled_category="Unknown")
    >>> model = ScNym(registry=dm.registry)
    >>> model.train(datamodule=dm)
    >>> predictions = model.predict(dm)
    """

    def __init__(
        self,
        uri: str | os.PathLike,
        model_cls: type,
        *,
        layer: str = "counts",
        measurement: str = "RNA",
        batch_size: int = 256,
        train_size: float | None = None,
        validation_size: float | None = None,
        seed: int = 0,
        io_batch_size: int = 4096,
        shuffle_chunk_size: int = 64,
        **setup_kwargs,
    ):
        super().__init__()
        _check_io_sizes(io_batch_size, shuffle_chunk_size)
        tiledbsoma, tiledbsoma_ml = _import_soma()
        self.uri = os.fspath(uri)
        self.layer, self.measurement = layer, measurement
        self.batch_size, self.seed, self.io_batch_size = batch_size, seed, io_batch_size
        with tiledbsoma.Experiment.open(self.uri, "r") as experiment:
            obs, genes = self._read_axes(experiment, setup_kwargs)
            with experiment.axis_query(measurement) as query:
                self._dataset = tiledbsoma_ml.ExperimentDataset(
                    query,
                    layer_name=layer,
                    obs_column_names=["soma_joinid"],
                    batch_size=batch_size,
                    io_batch_size=io_batch_size,
                    shuffle_chunk_size=shuffle_chunk_size,
                    shuffle=False,
                    seed=seed,
                )
        self._joinids = obs.pop("soma_joinid").to_numpy()
        # joinids written by tiledbsoma.io are the row numbers: no look-up needed
        self._joinids_are_rows = np.array_equal(self._joinids, np.arange(len(obs)))
        n_cells = len(obs)
        placeholder = sp.csr_matrix(
            (np.ones(n_cells, np.float32), np.zeros(n_cells, np.int32), np.arange(n_cells + 1)),
            shape=(n_cells, len(genes)),
        )
        self.adata = AnnData(X=placeholder, obs=obs, var=pd.DataFrame(index=genes))
        release_free_memory()  # the columns' reading buffers (0.1 GB at 1e6 cells)
        setattr(self.adata, SOMA_SOURCE_ATTRIBUTE, self)
        model_cls.setup_anndata(self.adata, **setup_kwargs)
        self.adata_manager: AnnDataManager = model_cls._get_most_recent_anndata_manager(
            self.adata, required=True
        )
        defaults = getattr(model_cls, "train_defaults", {})
        self._splitter = model_cls._data_splitter_cls(
            self.adata_manager,
            train_size=defaults.get("train_size") if train_size is None else train_size,
            validation_size=validation_size,
            batch_size=batch_size,
        )
        self.train_size = self._splitter.train_size
        self.validation_size = self._splitter.validation_size
        self.n_train, self.n_val = self._splitter.n_train, self._splitter.n_val

    def _read_axes(self, experiment, setup_kwargs: dict) -> tuple[pd.DataFrame, pd.Index]:
        """``obs`` (``soma_joinid`` and the columns the setup names; ``obs_id`` as index) and
        the gene names in the order of the ``X`` columns."""
        if self.measurement not in experiment.ms:
            raise ValueError(
                f"The SOMA experiment {self.uri} has no measurement '{self.measurement}' "
                f"(measurements: {sorted(experiment.ms)}); pass measurement=... ."
            )
        measurement = experiment.ms[self.measurement]
        layers = sorted(measurement.X) if "X" in measurement else []
        if self.layer not in layers:
            raise ValueError(
                f"The SOMA experiment {self.uri} has no X layer '{self.layer}' in measurement "
                f"'{self.measurement}' (X layers: {layers}); pass layer=<the layer of raw "
                "counts>."
            )
        if "var_id" not in measurement.var.schema.names:
            raise ValueError(
                f"The var of measurement '{self.measurement}' in {self.uri} has no 'var_id' "
                "column of gene names (write the experiment with scvi_ext.data.write_soma or "
                "tiledbsoma.io.from_anndata)."
            )
        var = measurement.var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        var = var.sort_values("soma_joinid")
        available = [name for name in experiment.obs.schema.names if name != "soma_joinid"]
        columns_only = AnnData(obs=pd.DataFrame(columns=available))
        keys = []
        for role, key in setup_kwargs.items():
            if role.endswith("_key") and role not in _NOT_OBS_KEYS and isinstance(key, str):
                validate_obs_key(columns_only, key, role)  # setup_anndata's message
                keys.append(key)
        names = ["obs_id"] if "obs_id" in available else []
        columns = list(dict.fromkeys(["soma_joinid", *names, *keys]))
        obs = experiment.obs.read(column_names=columns).concat().to_pandas()
        obs = obs.sort_values("soma_joinid")
        names = obs["obs_id"] if names else obs["soma_joinid"]
        obs.index = pd.Index(names.astype(str).to_numpy(), name=None)
        obs = obs.drop(columns=[name for name in ["obs_id"] if name in obs and name not in keys])
        return obs, pd.Index(var["var_id"].astype(str))

    # ------------------------------------------------------------------ what it holds
    @property
    def registry(self) -> dict:
        """The registry of ``model_cls`` on these cells: build the model with it."""
        return self.adata_manager.registry

    @property
    def obs(self) -> pd.DataFrame:
        """The ``obs`` columns the setup reads (one row per cell)."""
        return self.adata.obs

    @property
    def obs_names(self) -> pd.Index:
        """Cell names (``obs_id``)."""
        return self.adata.obs_names

    @property
    def var_names(self) -> pd.Index:
        """Gene names (``var_id``), in the order of the ``X`` layer's columns."""
        return self.adata.var_names

    @property
    def labels(self) -> np.ndarray:
        """Each cell's label as registered (the unlabeled category where it is unlabeled).

        scvi-tools' semi-supervised models read it from a datamodule:
        ``SCANVI(registry=dm.registry, datamodule=dm)``, then ``train(datamodule=dm)`` and
        ``predict(dataloader=dm.loader(indices))``.
        """
        if REGISTRY_KEYS.LABELS_KEY not in self.adata_manager.data_registry:
            raise AttributeError(
                "This SomaDataModule was set up without labels; pass labels_key=... ."
            )
        registry = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        return self.adata.obs[registry.original_key].astype(str).to_numpy()

    @property
    def n_obs(self) -> int:
        return self.adata.n_obs

    @property
    def n_vars(self) -> int:
        return self.adata.n_vars

    def __str__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        return (
            f"SomaDataModule of {self.n_obs} cells x {self.n_vars} genes from {self.uri} "
            f"(X layer '{self.layer}' of measurement '{self.measurement}')"
        )

    # ------------------------------------------------------------------ checks
    def check_genes(self, genes: pd.Index, model_name: str) -> None:
        """Refuse a model whose genes (by name, in order) are not the experiment's."""
        if self.var_names.equals(genes):
            return
        n_shared = int(genes.isin(self.var_names).sum())
        order = " (in another order)" if n_shared == len(genes) == self.n_vars else ""
        raise ValueError(
            f"The SOMA experiment {self.uri} has {n_shared} of the {len(genes)} genes of this "
            f"{model_name}{order}. Genes are matched by name, and a SOMA experiment cannot be "
            "reordered or padded cheaply, so it must hold exactly the model's genes in the "
            "model's order: write the cells on those genes to a new experiment "
            "(scvi_ext.data.write_soma(adata[:, model.gene_names], uri)), or pass them as an "
            "AnnData, whose genes are matched by name."
        )

    def check_registry(self, registry: dict, model_name: str) -> None:
        """Refuse training a model whose registered fields differ from this datamodule's."""
        own = self.registry["field_registries"]
        for key, field in registry["field_registries"].items():
            if key == REGISTRY_KEYS.X_KEY:
                continue
            ours = own.get(key, {}).get("state_registry")
            theirs = field.get("state_registry")
            if ours is None or not _same_state(ours, theirs):
                raise ValueError(
                    f"The datamodule registers '{key}' differently from this {model_name} "
                    f"(model: {theirs}, datamodule: {ours}); build the model from the "
                    f"datamodule: {model_name}(registry=datamodule.registry)."
                )

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        """Draw the train/validation split (the model's splitter, as from an AnnData)."""
        self._splitter.setup(stage)
        self.train_idx = self._splitter.train_idx
        self.val_idx = self._splitter.val_idx
        self.test_idx = self._splitter.test_idx

    def train_dataloader(self):
        """Shuffled minibatches of training cells (paired labelled/unlabeled for ScNym;
        ``[all, labelled]`` for scvi-tools' semi-supervised models, as their own loader)."""
        if isinstance(self._splitter, SemiSupervisedDataSplitter):
            train = np.sort(self.train_idx)
            state = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
            labelled = train[self.labels[train] != str(state.unlabeled_category)]
            io_batch_size = self._io_batch_size_per_stream(2 if len(labelled) else 1)
            return _FullAndLabelledStream(
                {
                    "full": self.loader(train, shuffle=True, io_batch_size=io_batch_size),
                    "labelled": self.loader(labelled, shuffle=True, io_batch_size=io_batch_size)
                    if len(labelled)
                    else None,
                }
            )
        if isinstance(self._splitter, PairedDataSplitter):
            sides = {
                LABELLED: self._splitter.train_labelled_idx,
                UNLABELED: self._splitter.unlabeled_idx,
            }
            io_batch_size = self._io_batch_size_per_stream(
                sum(len(indices) > 0 for indices in sides.values())
            )
            return _PairedStream(
                {
                    side: self.loader(np.sort(indices), shuffle=True, io_batch_size=io_batch_size)
                    if len(indices)
                    else None
                    for side, indices in sides.items()
                }
            )
        return self.loader(np.sort(self.train_idx), shuffle=True)

    def _io_batch_size_per_stream(self, n_streams: int) -> int:
        """``io_batch_size`` shared by ``n_streams`` streams read in the same steps (a
        multiple of the shuffle chunk, at least one chunk), so that the cells in memory do
        not grow with the number of streams."""
        chunk = self._dataset.shuffle_chunk_size
        return max(chunk, self.io_batch_size // max(n_streams, 1) // chunk * chunk)

    def val_dataloader(self):
        """Validation cells, in order (none: an empty list)."""
        if len(self.val_idx) == 0:
            return []
        return self.loader(np.sort(self.val_idx), shuffle=False)

    # ------------------------------------------------------------------ streaming
    def loader(
        self,
        indices: np.ndarray | None = None,
        shuffle: bool = False,
        adata_manager: AnnDataManager | None = None,
        batch_size: int | None = None,
        all_in_this_process: bool = False,
        io_batch_size: int | None = None,
    ) -> torch.utils.data.DataLoader:
        """Minibatches of registered tensors of cells ``indices`` (rows of :attr:`adata`).

        ``X`` streams from the experiment; the other tensors come from ``adata_manager``
        (default: this datamodule's registration; a model's light copy for inference).
        Without ``shuffle``, cells come in the order of ``indices``; pass them sorted (as
        every reader of this library does): unsorted ones make each IO batch read scattered
        rows, which costs time and memory. Training loaders are
        partitioned across DDP processes by ``tiledbsoma_ml``; ``all_in_this_process``
        reads every cell here (inference). ``io_batch_size``: default, the datamodule's.
        """
        import attrs

        _, tiledbsoma_ml = _import_soma()
        indices = np.arange(self.n_obs) if indices is None else np.asarray(indices)
        joinids = self._joinids[indices]
        io_batch_size = io_batch_size or self.io_batch_size
        if not shuffle:
            io_batch_size = _io_batch_size_in_order(joinids, io_batch_size)
        query_ids = attrs.evolve(self._dataset.query_ids, obs_joinids=joinids)
        dataset = attrs.evolve(
            self._dataset,
            query_ids=query_ids,
            batch_size=batch_size or self.batch_size,
            io_batch_size=io_batch_size,
            shuffle=shuffle,
        )
        if all_in_this_process:  # the engine reads rank and world size when it is built
            object.__setattr__(dataset, "rank", 0)
            object.__setattr__(dataset, "world_size", 1)
        manager = self.adata_manager if adata_manager is None else adata_manager
        return tiledbsoma_ml.experiment_dataloader(_RegisteredTensors(dataset, manager, self))

    def tensors(self, counts: np.ndarray, joinids: np.ndarray, lookup: AnnTorchDataset) -> dict:
        """The registered tensors of a streamed minibatch (counts checked)."""
        rows = joinids if self._joinids_are_rows else np.searchsorted(self._joinids, joinids)
        tensors = {key: torch.from_numpy(value) for key, value in lookup[rows].items()}
        counts = np.asarray(counts, dtype=np.float32)
        check_minibatch_counts(counts, f"the X layer '{self.layer}' of {self.uri}")
        tensors[REGISTRY_KEYS.X_KEY] = torch.from_numpy(counts)
        return tensors


def _io_batch_size_in_order(joinids: np.ndarray, io_batch_size: int) -> int:
    """Cells per IO batch when ``joinids`` are read in order: so many that an IO batch spans
    about ``io_batch_size`` rows of the experiment, as when every cell is read.

    TileDB decompresses every stored tile an IO batch touches (about 145 cells' counts
    each as ``tiledbsoma.io`` writes them), so scattered cells (a validation set, a
    query) read ``io_batch_size`` at a time touch one tile per cell: reading 20,000 sorted
    cells out of 1e6 peaked at 4.1 GB with 4,096 per IO batch (docs/scale.md).
    """
    if len(joinids) < 2:
        return io_batch_size
    span = int(joinids.max() - joinids.min()) + 1
    return max(1, min(io_batch_size, round(io_batch_size * len(joinids) / span)))


def _check_io_sizes(io_batch_size: object, shuffle_chunk_size: object) -> None:
    """Both sizes positive integers, ``io_batch_size`` a multiple of the chunk (``tiledbsoma_ml``
    needs it to shuffle; checked here so that a bad value fails before training)."""
    check_positive_ints(io_batch_size=io_batch_size, shuffle_chunk_size=shuffle_chunk_size)
    if io_batch_size % shuffle_chunk_size:
        raise ValueError(
            f"io_batch_size ({io_batch_size}) must be a multiple of shuffle_chunk_size "
            f"({shuffle_chunk_size}), the cells shuffled as one unit; for example "
            f"io_batch_size={max(1, round(io_batch_size / shuffle_chunk_size)) * shuffle_chunk_size}."
        )


def _same_state(first: dict, second: dict) -> bool:
    """Two state registries hold the same values (arrays compared by value)."""
    if set(first) != set(second):
        return False
    for name, value in first.items():
        other = second[name]
        if isinstance(value, np.ndarray | list | tuple | pd.Index):
            if not np.array_equal(
                np.asarray(value, dtype=object), np.asarray(other, dtype=object)
            ):
                return False
        elif value != other:
            return False
    return True


class _RegisteredTensors(IterableDataset):
    """A ``tiledbsoma_ml.ExperimentDataset`` whose minibatches become registered tensors."""

    def __init__(self, dataset, adata_manager: AnnDataManager, source: SomaDataModule):
        super().__init__()
        self.dataset, self.source = dataset, source
        keys = [key for key in adata_manager.data_registry if key != REGISTRY_KEYS.X_KEY]
        self.lookup = AnnTorchDataset(adata_manager, getitem_tensors=keys)
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        self.dataset.set_epoch(self._epoch)  # a new shuffle each epoch, the same on every rank
        self._epoch += 1
        with _collections_skip_older_objects():
            yield from _read_ahead(self._minibatches(), self._read_ahead_depth())

    @property
    def _minibatches_per_io_batch(self) -> int:
        return -(-self.dataset.io_batch_size // self.dataset.batch_size)

    def _minibatches(self) -> Iterator[dict]:
        for step, (counts, obs) in enumerate(self.dataset):
            if step % self._minibatches_per_io_batch == 0:
                release_free_memory()
            yield self.source.tensors(counts, obs["soma_joinid"].to_numpy(), self.lookup)
        release_free_memory()

    def _read_ahead_depth(self) -> int:
        """Minibatches prepared ahead: one IO batch, within :data:`READ_AHEAD_BYTES`."""
        minibatch_bytes = (
            self.dataset.batch_size * self.source.n_vars * np.dtype(np.float32).itemsize
        )
        return max(
            2, min(self._minibatches_per_io_batch, READ_AHEAD_BYTES // max(minibatch_bytes, 1))
        )


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap memory freed by earlier reads back to the operating system.

    Streaming reads allocate and free an IO batch's buffers from two threads (the reader
    and the training loop); glibc keeps what they free in per-thread arenas, and a
    process's resident memory then grows over an epoch: from 1.59 to 1.90 GB over 1,500
    steps of CAN from a SOMA experiment of 1e6 cells, against 1.30-1.32 GB with this
    called once per IO batch, at no measurable cost in time (docs/scale.md). Also
    releases what pyarrow's memory pool keeps. A no-op without glibc.
    """
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_ITEM, _ERROR, _END = "item", "error", "end"


def _read_ahead(items: Iterator, depth: int) -> Iterator:
    """``items``, produced by a background thread up to ``depth`` ahead of the consumer.

    ``tiledbsoma_ml`` reads an IO batch only when the previous one is used up, so without
    this, training stops for every read; from a thread the next read overlaps the model's
    steps (torch releases the GIL while it computes). The order is kept; an error is raised
    in the consumer; a consumer that stops early stops the thread after its current item.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((_ITEM, item)):
                    return
        except BaseException as error:  # noqa: BLE001 (raised again in the consumer)
            offer((_ERROR, error))
            return
        finally:
            items.close()
        offer((_END, None))

    producer = threading.Thread(target=produce, name="scvi-ext-soma-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
        producer.join()  # the stream is not read by two threads at once


_streams_open = 0


@contextmanager
def _collections_skip_older_objects() -> Iterator[None]:
    """While a stream runs, garbage collections leave out the objects that existed before.

    ``tiledbsoma_ml`` runs a full ``gc.collect()`` after every IO batch, which traverses
    every object of the process: 0.5 s once scvi-tools and Lightning are imported (a pass
    over 600 cells took 0.7 s, 0.02 s with older objects frozen). ``gc.freeze()`` moves
    them out of the collector's reach until the last open stream ends (``gc.unfreeze()``);
    garbage they become meanwhile is collected after it. A process that froze objects
    itself keeps its own setting.
    """
    global _streams_open
    if _streams_open == 0 and gc.get_freeze_count():
        yield
        return
    if _streams_open == 0:
        gc.freeze()
    _streams_open += 1
    try:
        yield
    finally:
        _streams_open -= 1
        if _streams_open == 0:
            gc.unfreeze()


class _PairedStream:
    """``{"labelled": batch, "unlabeled": batch}`` per step, over the longer side (the shorter
    one restarts), as :class:`~scvi_ext.base.PairedDataLoader`; an empty side is ``None``."""

    def __init__(self, loaders: dict):
        self.loaders = loaders
        self._longest = max((loader for loader in loaders.values() if loader), key=len)

    def __len__(self) -> int:
        return len(self._longest)

    def __iter__(self) -> Iterator[dict]:
        yield from paired_minibatches(self.loaders, len(self))


class _FullAndLabelledStream(_PairedStream):
    """``[all cells' batch, labelled cells' batch]`` per step over all training cells (the
    labelled side restarts), as scvi-tools' ``SemiSupervisedDataLoader`` gives scANVI."""

    def __iter__(self) -> Iterator[list]:
        for step in paired_minibatches(self.loaders, len(self)):
            yield [step["full"], step["labelled"]]


__all__ = ["SOMA_SOURCE_ATTRIBUTE", "SomaDataModule", "soma_source"]
