"""Capability every model has: data at the door, minibatch inference, training, saving, queries."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi import settings as scvi_settings
from scvi.data._constants import _SCVI_UUID_KEY
from scvi.model.base import ArchesMixin, BaseModelClass
from scvi.model.base._archesmixin import _set_params_online_update
from scvi.model.base._constants import SAVE_KEYS
from scvi.train import TrainingPlan

from scvi_ext.data import (
    check_backed_open,
    validate_counts,
    validate_gene_overlap,
    validate_obs_key,
)

from ._anndata import (
    MIN_GENE_FRACTION,
    detached_anndata,
    holds_backed_csc,
    registry_gene_names,
    registry_known_labels,
)
from ._batches import check_known_batches
from ._checkpoint import EpochCheckpoint, latest_checkpoint
from ._distributed import on_main_process
from ._plan import check_count_tensors, validation_early_stopping
from ._sampler import read_rows_as_slices
from ._soma import SOMA_SOURCE_ATTRIBUTE, SomaDataModule, soma_source
from ._splitter import BlockDataSplitter, labelled_mask

logger = logging.getLogger(__name__)

#: Parameters of ``module.loss`` that are not loss keyword arguments.
_LOSS_POSITIONAL = ("self", "tensors", "inference_outputs", "generative_outputs")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    parameter = next(module.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def to_device(tensors: dict, device: torch.device) -> dict:
    """A minibatch (name -> tensor) on ``device``; entries that are not tensors kept."""
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in tensors.items()
    }


def valid_plan_kwargs(plan_cls: type, module: torch.nn.Module) -> set[str]:
    """Names ``plan_kwargs`` may hold: the plan's ``__init__`` arguments (up to scvi's
    :class:`~scvi.train.TrainingPlan`) and the keyword arguments of ``module.loss``."""
    names: set[str] = set()
    functions = []
    for klass in plan_cls.__mro__:
        if "__init__" in klass.__dict__:
            functions.append(klass.__init__)
        if klass is TrainingPlan:
            break
    for function in [*functions, type(module).loss]:
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            names.add(parameter.name)
    return names - {"module", *_LOSS_POSITIONAL}


class InferenceMixin:
    """Inference, training and query mapping for every scvi_ext model (capability a).

    The module satisfies :class:`~scvi_ext.base.InferenceModule`. What this mixin
    guarantees, for every model built on it:

    - new data is matched to the model's genes **by name** (reordered; missing genes read
      as zeros with a warning; fewer than :data:`MIN_GENE_FRACTION` shared is an error)
      and its counts are validated as at ``setup_anndata``; the user's AnnData is never
      modified (a light copy sharing the matrix is registered instead);
    - a model loaded with ``adata=False`` stays without data;
    - inference on an untrained model, ``train(max_epochs=0)`` and unknown ``plan_kwargs``
      keys are errors; an AnnData whose genes were edited after setup is an error;
    - fitted statistics are read minibatch by minibatch (:meth:`fit_statistics`), so no
      model densifies the whole matrix;
    - ``load`` names a damaged file and aligns the genes of the AnnData it is given.

    Subclasses set ``_counts_input = False`` when they read a representation, not counts.
    """

    _counts_input: bool = True
    #: The module reads each cell's batch when it predicts or embeds: new cells must carry
    #: batches the model knows (:func:`~scvi_ext.base.check_known_batches`).
    _batch_at_inference: bool = False
    #: Every term of the training loss reads cell types: training without a labelled cell
    #: is refused (it would learn nothing).
    _loss_needs_labels: bool = False
    #: Training minibatches of blocks of consecutive rows for cells on disk.
    _data_splitter_cls = BlockDataSplitter
    #: Set on models made by :meth:`load_query_data`.
    is_query_model: bool = False

    def __repr__(self) -> str:
        """scvi's summary; models without their own summary list their init parameters."""
        if not self._model_summary_string:
            params = getattr(self, "init_params_", {}).get("non_kwargs", {})
            shown = [f"{name}={value}" for name, value in params.items()]
            self._model_summary_string = f"{type(self).__name__} with {', '.join(shown)}"
        return super().__repr__()

    # ------------------------------------------------------------------ data access
    @property
    def setup_args(self) -> dict:
        """The arguments ``setup_anndata`` was called with."""
        return dict(self.registry_["setup_args"])

    @property
    def gene_names(self) -> pd.Index:
        """The features the model reads, in its order (genes for count models)."""
        return registry_gene_names(self.registry_)

    @property
    def _count_locations(self) -> dict[str, str]:
        """The registry keys of the counts the model reads, and where they are in an
        AnnData (none for models that read no counts)."""
        if not self._counts_input:
            return {}
        layer = self.setup_args.get("layer")
        return {REGISTRY_KEYS.X_KEY: "adata.X" if layer is None else f"adata.layers['{layer}']"}

    def _check_registered_genes(self, adata: AnnData) -> None:
        """The model's own AnnData must still have the genes it was set up with (and an open
        file, when backed)."""
        check_backed_open(adata)
        if not self._counts_input:
            return
        genes = self.gene_names
        if adata.n_vars != len(genes) or not adata.var_names.astype(str).equals(genes):
            raise ValueError(
                f"The AnnData registered with this {type(self).__name__} changed after setup: "
                f"it has {adata.n_vars} genes, the model {len(genes)} (e.g. "
                f"{list(genes[:3])}). Register the edited AnnData with setup_anndata and build "
                "a new model, or pass the cells to predict(adata=...), which matches genes "
                "by name."
            )

    def _light_copy(self, adata: AnnData) -> AnnData:
        """A light copy of new data on the model's genes (matched by name), counts checked.

        Models reading something other than the registered matrix override this.
        """
        if self._batch_at_inference:
            check_known_batches(adata, self.registry_, type(self).__name__)
        known_labels = registry_known_labels(self.registry_)
        light = detached_anndata(adata, self.setup_args, known_labels, genes=self.gene_names)
        if self._counts_input:
            validate_counts(light, self.setup_args.get("layer"))
        return light

    def _register_light_copy(self, light: AnnData) -> None:
        """Register ``light`` for this model without making it the model's data."""
        if self.adata_manager is not None:
            self._validate_anndata(light)
            return
        type(self).setup_anndata(light, source_registry=self.registry_, **self.setup_args)
        manager = self._get_most_recent_anndata_manager(light, required=True)
        self._register_manager_for_instance(manager)

    def _is_registered(self, adata: AnnData) -> bool:
        """``adata`` itself (not a copy of it) is registered with this model."""
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        manager = self._per_instance_manager_store.get(self.id, {}).get(uuid)
        return manager is not None and manager.adata is adata

    @contextmanager
    def registered_anndata(
        self, adata: AnnData | SomaDataModule | None = None
    ) -> Iterator[AnnData]:
        """The AnnData that inference reads for ``adata``, registered with this model.

        ``None`` is the model's AnnData; an AnnData already registered with this model is
        used as it is (its genes checked); anything else becomes a light copy on the
        model's genes, forgotten when the block ends. A
        :class:`~scvi_ext.base.SomaDataModule` gives a light copy of its stand-in AnnData
        whose counts :meth:`iter_minibatches` streams from the experiment (its genes must
        be the model's, in order).
        """
        if adata is None:
            adata = self.adata
            if adata is None:
                raise ValueError(
                    f"This {type(self).__name__} was loaded without data (adata=False) or "
                    "trained from a datamodule; pass the cells to use as adata=... ."
                )
        source = soma_source(adata)
        if source is not None:
            adata = source.adata
            if self._counts_input:
                source.check_genes(self.gene_names, type(self).__name__)
        if self._is_registered(adata):
            self._check_registered_genes(adata)
            yield adata
            return
        light = self._light_copy(adata)
        if source is not None and self._counts_input:  # counts read from the experiment
            setattr(light, SOMA_SOURCE_ATTRIBUTE, source)
        self._register_light_copy(light)
        try:
            yield light
        finally:  # forget the copy, so that repeated predictions hold no memory
            uuid = light.uns.get(_SCVI_UUID_KEY)
            self._per_instance_manager_store.get(self.id, {}).pop(uuid, None)
            self._setup_adata_manager_store.pop(uuid, None)

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError(
                f"This {type(self).__name__} is not trained; call model.train() first."
            )

    def iter_minibatches(
        self,
        adata: AnnData | SomaDataModule | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> Iterator[dict]:
        """Minibatches of the registered tensors of ``adata`` (default: the model's), in order.

        The data loader reads rows as they are needed (a backed AnnData stays on disk, each
        minibatch's runs of consecutive rows read with one slice read; a SOMA experiment's
        counts are streamed); the tensors are on the CPU, their counts checked (the data may
        have changed since it was set up).
        """
        if isinstance(adata, SomaDataModule):
            with self.registered_anndata(adata) as registered:
                yield from self.iter_minibatches(registered, indices, batch_size)
            return
        adata = self.adata if adata is None else adata
        source = soma_source(adata)
        if source is None:
            loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
            read_rows_as_slices(loader)  # rows of a backed matrix read by slices
            count_locations = self._count_locations  # the data may have changed since setup
            for tensors in loader:
                check_count_tensors(tensors, count_locations)
                yield tensors
            return
        yield from source.loader(
            indices,
            adata_manager=self.get_anndata_manager(adata, required=True),
            batch_size=batch_size or scvi_settings.batch_size,
            all_in_this_process=True,
        )

    @torch.inference_mode()
    def map_minibatches(
        self,
        fn: Callable[[dict], torch.Tensor],
        adata: AnnData | SomaDataModule | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        while_training: bool = False,
    ) -> np.ndarray:
        """``fn(tensors)`` of every minibatch of a trained model, in eval mode, stacked.

        ``adata`` goes through :meth:`registered_anndata` (genes matched by name, counts
        validated, the user's AnnData untouched); the minibatches are moved to the
        module's device (a model trained on a GPU stays there). From a SOMA experiment,
        unsorted ``indices`` are read in row order; outputs of one row per cell come back in
        the order of ``indices``, and ``fn`` that sums over a minibatch sees other groupings
        (sums are unchanged). ``while_training``: also
        before training has ended (from a training callback); the module's mode is
        restored afterwards.
        """
        if not while_training:
            self._check_trained()
        if indices is not None and len(indices) == 0:
            raise ValueError("indices selects no cell; pass at least one index (or None: all).")
        was_training = self.module.training
        self.module.eval()
        device = module_device(self.module)
        try:
            with self.registered_anndata(adata) as registered:
                order = _sorted_order(indices) if soma_source(registered) is not None else None
                if order is not None:  # SOMA reads cells in row order (see the function)
                    indices = np.asarray(indices)[order]
                loader = self.iter_minibatches(registered, indices, batch_size)
                outputs = [fn(to_device(tensors, device)).detach().cpu() for tensors in loader]
        finally:
            self.module.train(was_training)
        result = torch.cat(outputs).numpy()
        if order is not None and len(result) == len(order):  # per cell: the caller's order
            result[order] = result.copy()
        return result

    def cell_names(
        self, adata: AnnData | SomaDataModule | None, indices: Sequence[int] | None = None
    ) -> pd.Index:
        """``obs_names`` of the cells ``adata`` / ``indices`` select (default: the model's)."""
        names = (self.adata if adata is None else adata).obs_names
        return names if indices is None else names[np.asarray(indices)]

    # ------------------------------------------------------------------ training
    def fit_statistics(self) -> None:
        """Fit the data statistics the module needs (library size, centroids, class weights...).

        Called by :meth:`train` before the first epoch; reads the data minibatch by
        minibatch (:meth:`iter_minibatches`). The default fits nothing.
        """

    def _after_training(self) -> None:
        """Hook run after training (statistics of the trained model, calibration)."""

    def _default_plan_kwargs(self) -> dict:
        """Plan arguments this model sets unless the user gives them (default: none)."""
        return {}

    #: Defaults of :meth:`train` for this model (its paper's or reference code's values).
    train_defaults: dict = {
        "max_epochs": 50,
        "train_size": 0.8,
        "batch_size": 256,
        "early_stopping": True,
        "early_stopping_patience": 20,
    }

    def _smallest_batch_size(self) -> int:
        """The smallest ``batch_size`` the model trains with (2 for BatchNorm layers)."""
        return 1

    def _check_something_to_learn(self) -> None:
        """Refuse a training that would learn nothing: every weight frozen (a query model
        of ``load_query_data``), or no labelled cell for a loss that reads cell types only
        (:attr:`_loss_needs_labels`)."""
        name = type(self).__name__
        if not any(parameter.requires_grad for parameter in self.module.parameters()):
            raise ValueError(
                f"This {name} has no trainable weight (load_query_data froze them all); it "
                "predicts and embeds as it is, without train(). To fine-tune, map the query "
                "with load_query_data(..., unfrozen=True), or without freeze_classifier=True."
            )
        if self._loss_needs_labels and self.adata_manager is not None:
            if not labelled_mask(self.adata_manager).any():
                raise ValueError(
                    f"This {name} has no labelled cell to train on: every cell of adata.obs"
                    f"['{self.setup_args['labels_key']}'] is '{self.unlabeled_category}', "
                    "missing or a cell type the model never saw, and its loss reads cell "
                    "types only. Give some cells their types to fine-tune, or use the model "
                    "as it is to predict."
                )

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int | None = None,
        early_stopping: bool | None = None,
        early_stopping_patience: int | None = None,
        plan_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        datamodule: SomaDataModule | None = None,
        **trainer_kwargs,
    ):
        """Fit the data statistics, train, then fit what depends on the trained model.

        Arguments left at ``None`` take the model's :attr:`train_defaults`. The validation
        loss is computed every epoch, and the weights of its best epoch are kept.

        Parameters
        ----------
        max_epochs
            Epochs (at least 1).
        accelerator, devices
            Lightning device settings (``accelerator="gpu"``; several processes with
            ``strategy="ddp"``).
        train_size
            Fraction of (labelled) cells used for training; the rest validates.
        validation_size
            Fraction of cells for validation (default ``1 - train_size``).
        batch_size
            Minibatch size.
        early_stopping, early_stopping_patience
            Stop when the validation loss has not improved for that many epochs.
        plan_kwargs
            Arguments of the model's training plan (``_training_plan_cls``) and of its
            ``module.loss``; an unknown key is an error that lists the valid ones. Query
            models (``load_query_data``) default to ``weight_decay=0``, since decay would
            move the weights the query mapping froze.
        checkpoint_dir
            Folder for a Lightning checkpoint of the training state (weights, optimizer,
            schedule, epoch), replaced after every epoch, so that a run killed midway can
            resume (the checkpoint a run resumed from is kept).
        resume
            Resume from the latest checkpoint in ``checkpoint_dir``: training goes on at
            the epoch after it, up to ``max_epochs``, with the same other arguments.
        datamodule
            Train on the cells of a :class:`~scvi_ext.base.SomaDataModule` instead of the
            model's AnnData (build the model with ``registry=datamodule.registry``); its
            ``batch_size``, ``train_size`` and ``validation_size`` apply. The statistics,
            calibration and everything that reads training cells stream from it.
        **trainer_kwargs
            Passed to :class:`~scvi.train.Trainer`; classifiers also take
            ``calibrate=False`` (no temperature fitted after training).

        Raises
        ------
        ValueError
            ``max_epochs`` below 1, ``batch_size`` below the model's smallest, unknown
            ``plan_kwargs`` keys, nothing to learn (every weight frozen, or no labelled
            cell for a loss of cell types only), no data (``adata=False``), genes of the
            model's AnnData edited after setup, ``resume`` without a checkpoint in
            ``checkpoint_dir``, or a datamodule whose genes or registered fields are not
            the model's.
        """
        settings = {
            "max_epochs": max_epochs,
            "train_size": train_size,
            "batch_size": batch_size,
            "early_stopping": early_stopping,
            "early_stopping_patience": early_stopping_patience,
        }
        settings = {
            name: self.train_defaults.get(name) if value is None else value
            for name, value in settings.items()
        }
        max_epochs = settings["max_epochs"]
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, not {max_epochs}.")
        smallest = self._smallest_batch_size()
        if settings["batch_size"] is not None and settings["batch_size"] < smallest:
            raise ValueError(
                f"batch_size={settings['batch_size']} is too small for {type(self).__name__}: "
                f"its BatchNorm layers need minibatches of at least {smallest} cells; pass "
                f"batch_size={smallest} or more."
            )
        plan_kwargs = {**self._default_plan_kwargs(), **(plan_kwargs or {})}
        valid = valid_plan_kwargs(self._training_plan_cls, self.module)
        unknown = sorted(set(plan_kwargs) - valid)
        if unknown:
            raise ValueError(
                f"Unknown plan_kwargs {unknown} for {self._training_plan_cls.__name__}; valid "
                f"keys: {sorted(valid)}."
            )
        if self.is_query_model:
            plan_kwargs.setdefault("weight_decay", 0.0)
        # a datamodule's stream checks its counts itself, naming the experiment
        plan_kwargs["count_locations"] = None if datamodule is not None else self._count_locations
        if datamodule is not None:
            if soma_source(datamodule) is not datamodule:
                raise ValueError(
                    f"datamodule must be a scvi_ext.base.SomaDataModule, not "
                    f"{type(datamodule).__name__}; pass other data as the model's AnnData."
                )
            split = {"batch_size": batch_size, "train_size": train_size}
            given = sorted(
                name
                for name, value in {**split, "validation_size": validation_size}.items()
                if value is not None
            )
            if given:
                raise ValueError(
                    f"{given} are the datamodule's with datamodule=...; set them when "
                    "building it (SomaDataModule(..., batch_size=..., train_size=...))."
                )
            settings["train_size"] = datamodule.train_size
            validation_size = datamodule.validation_size
        elif self.adata is None:
            raise ValueError(f"This {type(self).__name__} has no data to train on (adata=False).")
        else:
            self._check_registered_genes(self.adata)
            self._check_something_to_learn()
        if getattr(self, "_query_freezing_lost", False):
            name = type(self).__name__
            warnings.warn(
                f"This {name} was saved as a query model (load_query_data) by an earlier "
                "version, which did not save which weights the query mapping froze, so this "
                "training moves every weight. To train only the query mapping's weights, map "
                f"again: {name}.load_query_data(adata, reference_model).",
                UserWarning,
                stacklevel=2,
            )
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the interrupted run.")
        if checkpoint_dir is not None:
            if resume:
                trainer_kwargs["ckpt_path"] = str(latest_checkpoint(checkpoint_dir))
            callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
            trainer_kwargs["callbacks"] = [*callbacks, EpochCheckpoint(checkpoint_dir)]
        train_size = settings["train_size"]
        if train_size is None or train_size < 1 or validation_size:  # a validation set exists
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        early_stopping = validation_early_stopping(
            bool(settings["early_stopping"]),
            settings["early_stopping_patience"],
            train_size,
            validation_size,
            trainer_kwargs,
        )
        if datamodule is not None:
            trainer_kwargs["datamodule"] = datamodule
        with self._reading(datamodule):
            self.fit_statistics()
            result = super().train(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                train_size=settings["train_size"],
                validation_size=validation_size,
                batch_size=settings["batch_size"],
                early_stopping=early_stopping,
                plan_kwargs=plan_kwargs,
                **trainer_kwargs,
            )
            self._after_training()
        return result

    @contextmanager
    def _reading(self, datamodule: SomaDataModule | None) -> Iterator[None]:
        """While training from ``datamodule``, its stand-in AnnData is the model's data, so
        that :meth:`fit_statistics` and :meth:`_after_training` read its cells (counts
        streamed by :meth:`iter_minibatches`); the model's own data comes back after."""
        if datamodule is None:
            yield
            return
        name = type(self).__name__
        if self._counts_input:
            datamodule.check_genes(self.gene_names, name)
        datamodule.check_registry(self.registry_, name)
        previous = self._adata, self._adata_manager
        manager = datamodule.adata_manager
        self._adata, self._adata_manager = manager.adata, manager
        self._register_manager_for_instance(manager)
        try:
            yield
        finally:
            self._per_instance_manager_store.get(self.id, {}).pop(manager.adata_uuid, None)
            self._adata, self._adata_manager = previous

    # ------------------------------------------------------------------ save / load
    def save(self, dir_path: str | os.PathLike, *args, **kwargs) -> None:
        """scvi's ``save``; under DDP rank 0 alone writes and the other processes wait for it.

        Every process of a DDP run executes the script's ``save``: rank 0 writes, the others
        return once the folder is complete, or raise rank 0's error (e.g. the folder exists
        and ``overwrite`` is False). Call it on every process, not under
        ``if model.trainer.is_global_zero``. With ``overwrite=True`` and no
        ``save_anndata``, data saved earlier in the folder is removed: ``load`` would attach
        it to this model.
        """
        on_main_process(self._save_replacing_stale_data, os.fspath(dir_path), *args, **kwargs)

    def _save_replacing_stale_data(self, dir_path: str, *args, **kwargs) -> None:
        super().save(dir_path, *args, **kwargs)
        arguments = inspect.signature(BaseModelClass.save).bind(self, dir_path, *args, **kwargs)
        arguments.apply_defaults()
        if arguments.arguments["save_anndata"]:
            return
        prefix = arguments.arguments["prefix"] or ""
        for name in (SAVE_KEYS.ADATA_FNAME, SAVE_KEYS.MDATA_FNAME):
            stale = os.path.join(dir_path, f"{prefix}{name}")
            if os.path.exists(stale):
                os.remove(stale)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None, **kwargs):
        """Load a saved model; genes of ``adata`` are matched to the model's by name.

        Parameters
        ----------
        dir_path
            Folder written by ``save``.
        adata
            AnnData to attach (``None``: the one saved with the model, ``False``: none).
            With other genes, the same in another order, without the labels column or
            with cell types the model never saw (e.g. a query), the model holds a light
            copy matched to its genes (``model.adata``; those cells read as unlabeled) and
            the user's AnnData is untouched.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.

        Raises
        ------
        ValueError
            When the saved file cannot be read (it is named) or was written by an
            incompatible version of the model, or when ``adata`` lacks the model's batch
            column or holds NaN or batches the model was not trained on
            (:func:`~scvi_ext.base.check_known_batches`).
        """
        dir_path = os.fspath(dir_path)
        model_file = os.path.join(dir_path, f"{kwargs.get('prefix') or ''}model.pt")
        try:
            registry = cls.load_registry(dir_path, prefix=kwargs.get("prefix"))
        except Exception as error:
            raise ValueError(
                f"Could not read the saved {cls.__name__} in {model_file} ({error}). The file "
                "is missing, damaged or not a scvi-tools model; save the model again."
            ) from error
        if adata is not None and adata is not False:
            setup_args = registry["setup_args"]
            if isinstance(adata, AnnData):  # the cells become the model's, in its batches
                check_known_batches(adata, registry, cls.__name__, cls._batch_at_inference)
            if cls._counts_input:
                genes = registry_gene_names(registry)
                known_labels = registry_known_labels(registry)
                labels_to_map = _labels_to_map(adata, setup_args, known_labels)
                other_genes = not adata.var_names.astype(str).equals(genes)
                # a CSC file cannot be read by cells: the light copy reads it once
                if (
                    labels_to_map
                    or other_genes
                    or holds_backed_csc(adata, setup_args.get("layer"))
                ):
                    adata = detached_anndata(adata, setup_args, known_labels, genes=genes)
                validate_counts(adata, setup_args.get("layer"))
        try:
            model = super().load(dir_path, adata=adata, **kwargs)
        except RuntimeError as error:
            if "state_dict" not in str(error):
                raise
            raise ValueError(
                f"The model saved in {model_file} does not fit this version of "
                f"{cls.__name__} (its weights differ: {str(error)[:300]}). Train and save "
                "it again with this version."
            ) from error
        mapping = getattr(model, "query_mapping_", None)
        if mapping is not None:  # a saved query model (load_query_data)
            model.is_query_model = True
            if isinstance(mapping, dict):  # its freezing, as load_query_data set it
                _set_params_online_update(model.module, **mapping)
            else:  # saved before the freezing was: "frozen" or "unfrozen"
                model._query_freezing_lost = mapping == "frozen"
            model._freeze_for_query()
        return model

    # ------------------------------------------------------------------ query mapping
    @staticmethod
    def _as_reference(reference_model: str | os.PathLike | BaseModelClass):
        """A model, or its folder as ``str`` (scvi's query code recognises only ``str``)."""
        if isinstance(reference_model, os.PathLike):
            return os.fspath(reference_model)
        return reference_model

    @classmethod
    def _reference_registry(cls, reference_model: str | BaseModelClass) -> dict:
        if isinstance(reference_model, BaseModelClass):
            return reference_model.registry_
        return cls.load_registry(reference_model)

    @classmethod
    def prepare_query_anndata(
        cls,
        adata: AnnData,
        reference_model: str | BaseModelClass,
        return_reference_var_names: bool = False,
        inplace: bool = False,
        min_gene_fraction: float = MIN_GENE_FRACTION,
    ) -> AnnData | pd.Index | None:
        """Align a query's genes to the reference: reorder, and pad missing genes with zeros.

        Optional before :meth:`load_query_data`, which matches genes by name itself. Unlike
        scvi-tools, the default returns a new AnnData (``inplace=False``). The gene
        alignment report (reference genes found in the query) is logged and stored in the
        returned AnnData's ``uns["gene_alignment"]``.

        Raises
        ------
        ValueError
            When the query has fewer than ``min_gene_fraction`` of the reference genes.
        """
        reference_model = cls._as_reference(reference_model)
        reference_genes = registry_gene_names(cls._reference_registry(reference_model))
        if return_reference_var_names:
            return reference_genes
        report = validate_gene_overlap(reference_genes, adata.var_names, min_gene_fraction)
        logger.info(
            "Query has %d of %d reference genes (%.1f%%).",
            report["n_shared"],
            report["n_reference_genes"],
            100 * report["fraction_shared"],
        )
        aligned = super().prepare_query_anndata(adata, reference_model, inplace=inplace)
        result = adata if inplace else aligned
        result.uns["gene_alignment"] = report
        return None if inplace else result

    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model: str | BaseModelClass, **kwargs):
        """scArches-style query model: reference weights, new batch/domain categories.

        The query AnnData is not modified: the model works on a light copy on the
        reference's genes, matched by name (missing genes read as zeros, with a warning),
        with its counts validated. Query cell types the reference never saw are treated as
        unlabeled (with a warning).

        Parameters
        ----------
        adata
            Query AnnData with raw counts.
        reference_model
            A trained model or the folder it was saved to.
        **kwargs
            Passed to scvi's ``load_query_data`` (``unfrozen``, ``freeze_classifier``, ...).
        """
        reference_model = cls._as_reference(reference_model)
        registry = cls._reference_registry(reference_model)
        batch_key = registry["setup_args"].get("batch_key")
        if batch_key is not None and isinstance(adata, AnnData):
            if batch_key not in adata.obs:
                raise ValueError(
                    f"adata.obs has no column '{batch_key}', the reference's batch_key; add "
                    "the query cells' batches (new batch names are mapped as new batches)."
                )
            validate_obs_key(adata, batch_key, "batch_key")  # no missing values
        known_labels = registry_known_labels(registry)
        light = detached_anndata(
            adata, registry["setup_args"], known_labels, genes=registry_gene_names(registry)
        )
        validate_counts(light, registry["setup_args"].get("layer"))
        model = super().load_query_data(light, reference_model, **kwargs)
        model.is_query_model = True
        # saved with the model, so that load freezes the same weights again
        model.query_mapping_ = {
            name: kwargs.get(name, default) for name, default in _QUERY_FREEZING.items()
        }
        model._freeze_for_query()
        return model

    def _freeze_for_query(self) -> None:
        """The model's own freezing of a query model, after scvi's ``load_query_data`` froze
        weights as its arguments say; run again by :meth:`load`. Default: none."""


#: scvi's ``load_query_data`` arguments that decide which weights a query model trains
#: (its ``_set_params_online_update``), with their defaults.
_QUERY_FREEZING: dict[str, bool] = {
    name: parameter.default
    for name, parameter in inspect.signature(ArchesMixin.load_query_data).parameters.items()
    if name == "unfrozen" or name.startswith("freeze_")
}

__all__ = ["InferenceMixin", "valid_plan_kwargs"]


def _labels_to_map(adata: AnnData, setup_args: dict, known_labels: list[str] | None) -> bool:
    """``adata`` lacks the labels column or holds cell types the model never saw: both
    become the unlabeled category on a light copy (:func:`detached_anndata`)."""
    labels_key = setup_args.get("labels_key")
    if labels_key is None or known_labels is None:
        return False
    if labels_key not in adata.obs:
        return True
    known = {*known_labels, str(setup_args.get("unlabeled_category"))}
    return not set(adata.obs[labels_key].astype(str).unique()) <= known


def _sorted_order(indices: Sequence[int] | None) -> np.ndarray | None:
    """The order that sorts ``indices``, or ``None`` when they are sorted already (or all
    cells). A SOMA experiment read at scattered, unsorted rows touches a stored tile per
    cell: a validation set of 100,000 cells of 1e6 peaked at 7.6 GB of memory
    (docs/scale.md, "A million cells from SOMA")."""
    if indices is None:
        return None
    indices = np.asarray(indices)
    if len(indices) < 2 or (np.diff(indices) >= 0).all():
        return None
    return np.argsort(indices, kind="stable")
