"""LatentClassifier: a feed-forward cell type classifier on any fixed representation."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings
from scvi.data.fields import LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scvi_ext.base import (
    BASE_NOVELTY_METHODS,
    ClassBalance,
    ClassifierMixin,
    EmbeddingMixin,
    class_means,
    class_sums,
    detached_anndata,
    fit_label_weights,
    labelled_mask,
    on_main_process,
    probability_novelty,
    query_neighbour_score,
    register_labelled_anndata,
    registered_obs,
    registry_gene_names,
    registry_known_labels,
    setup_anndata_method,
)

from ._module import LatentClassifierModule
from ._plan import LatentClassifierTrainingPlan

logger = logging.getLogger(__name__)

UPSTREAM_FOLDER = "upstream"
UPSTREAM_FILE = "upstream.json"
UPSTREAM_STUB_CELLS = 20
#: Novelty scores of the representation, added to those of every classifier.
RepresentationNoveltyMethod = Literal["centroid_distance", "neighbour_distance"]
NOVELTY_METHODS: tuple[str, ...] = BASE_NOVELTY_METHODS + get_args(RepresentationNoveltyMethod)


@dataclass
class NovelTypeReport:
    """Result of :meth:`LatentClassifier.detect_novel` (thesis 2.7).

    Attributes
    ----------
    novel_detected
        Dataset-level flag: the smallest normalised likelihood is below the threshold.
    min_likelihood
        Smallest normalised likelihood over the cells.
    threshold
        The threshold used.
    likelihood
        Per-cell normalised likelihood: the maximum class probability min-max scaled
        between ``1 / n_classes`` (0) and 1 (1).
    cell_flags
        Per-cell flags (normalised likelihood below the threshold).
    """

    novel_detected: bool
    min_likelihood: float
    threshold: float
    likelihood: pd.Series
    cell_flags: pd.Series


def _feature_matrix(adata: AnnData, obsm_key: str | None, layer: str | None):
    if obsm_key is not None:
        if obsm_key not in adata.obsm:
            raise ValueError(
                f"obsm_key '{obsm_key}' is not in adata.obsm (available: {list(adata.obsm)}); "
                "compute the representation first, or use LatentClassifier.from_model."
            )
        return adata.obsm[obsm_key], f"adata.obsm['{obsm_key}']"
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"layer '{layer}' is not in adata.layers ({list(adata.layers)}).")
        return adata.layers[layer], f"adata.layers['{layer}']"
    if adata.X is None:
        raise ValueError("adata.X is None; pass obsm_key=... or layer=... .")
    return adata.X, "adata.X"


def _check_finite(matrix, where: str) -> None:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{where} has dtype {values.dtype}; a numeric representation is needed.")
    if not np.isfinite(values).all():
        raise ValueError(f"{where} has NaN or infinite values; fix or remove those cells.")


def _representation_columns(matrix, where: str, columns: pd.Index):
    """The representation of new cells as the classifier reads it: ``len(columns)`` columns,
    those of a DataFrame matched by name when the classifier was set up with named ones."""
    if isinstance(matrix, pd.DataFrame):
        names = matrix.columns.astype(str)
        if names.is_unique and set(names) == set(columns):
            return matrix.set_axis(names, axis=1)[list(columns)].to_numpy()
        positional = list(columns) == [str(i) for i in range(len(columns))]
        if not positional:
            raise ValueError(
                f"{where} has columns {list(names[:5])}..., the classifier was trained on "
                f"{list(columns[:5])}...; pass the same representation, with the same columns."
            )
        matrix = matrix.to_numpy()
    if matrix.ndim != 2 or matrix.shape[1] != len(columns):
        width = matrix.shape[1] if matrix.ndim == 2 else matrix.ndim
        raise ValueError(
            f"{where} has {width} columns, the classifier was trained on {len(columns)}; "
            "pass the same representation (e.g. the same embedding model or PCA loadings)."
        )
    return matrix


def embed_with(model: BaseModelClass, adata: AnnData, batch_size: int | None = None) -> np.ndarray:
    """Embedding of ``adata`` by a trained scvi-tools model, without modifying ``adata``.

    Models of this package match genes by name themselves. For other scvi-tools models, a
    light copy of ``adata`` on the model's genes (matched by name) takes the registration
    instead of the user's object; cell types the model never saw become its unlabeled
    category (scANVI).
    """
    if adata is model.adata or isinstance(model, EmbeddingMixin):
        source = None if adata is model.adata else adata
        return np.asarray(model.get_latent_representation(source, batch_size=batch_size))
    light = detached_anndata(
        adata,
        dict(model.registry_["setup_args"]),
        registry_known_labels(model.registry_),
        genes=registry_gene_names(model.registry_),
    )
    return np.asarray(model.get_latent_representation(light, batch_size=batch_size))


class LatentClassifier(ClassifierMixin, EmbeddingMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Feed-forward cell type classifier on a fixed representation (thesis 2.6).

    It reads a representation registered with :meth:`setup_anndata` (``obsm`` key,
    layer or ``X``: an embedding, PCA, log counts...) or, built with :meth:`from_model`,
    the embedding of a frozen upstream model (:class:`~scvi_ext.model.CELLULAR`, SCVI,
    SCANVI, ...). With an upstream model, ``predict(query)`` takes counts and embeds them
    through the upstream model; ``save``/``load`` keep the upstream model with the
    classifier.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by ``load``).
    n_hidden1, n_hidden2
        Widths of the two hidden layers (reference code: 512, 512).
    dropout_rate
        Dropout after each hidden layer (reference code: 0.2).
    balance_classes
        ``True``: weight each labelled cell's cross-entropy by the inverse frequency of its
        type among the labelled cells; ``"sqrt"``: by the inverse square root of that
        frequency (rare types gain less). Refitted at every :meth:`train`; kept by
        :meth:`tune`. The reference code's loss is the plain cross-entropy (the default,
        ``False``); weighting raises the recall of rare types.

    Notes
    -----
    :meth:`novelty_score` defaults to ``"query_neighbours"``: with an upstream model it
    compares log-normalised counts with the training counts (``reference=``, default the
    AnnData given to :meth:`from_model`, which is not saved), not the embedding, which
    pulls cells of an unseen type onto the trained ones; without one it compares the
    representation with up to 2000 training cells kept with the model. Two more methods
    read the representation: ``"centroid_distance"``, the cosine distance to the nearest
    training centroid of a cell type (in [0, 2]), and ``"neighbour_distance"``, the cosine
    distance to the 10th nearest kept training cell (in [0, 2]).

    Examples
    --------
    >>> clf = LatentClassifier.from_model(cellular_model, adata)
    >>> clf.train()
    >>> clf.predict(query_adata)
    """

    _module_cls = LatentClassifierModule
    _training_plan_cls = LatentClassifierTrainingPlan
    _counts_input = False
    #: The reference code's: 50 epochs, minibatch 256, 80:20 split, early stopping
    #: patience 10; the learning rate found by :meth:`tune`, if it ran.
    train_defaults = {
        "max_epochs": 50,
        "train_size": 0.8,
        "batch_size": 256,
        "early_stopping": True,
        "early_stopping_patience": 10,
    }
    #: Default of :meth:`novelty_score`: the best in the leave-one-type-out benchmark
    #: (README, "Novel cell types").
    default_novelty_method: str = "query_neighbours"
    novelty_methods = NOVELTY_METHODS

    # ------------------------------------------------------------------ setup
    @setup_anndata_method
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        obsm_key: str | None = None,
        layer: str | None = None,
        unlabeled_category: str | None = None,
        **kwargs,
    ) -> None:
        """Register the representation and labels of an AnnData.

        Parameters
        ----------
        %(param_adata)s
        %(param_cell_types)s
        obsm_key
            ``obsm`` key of the representation (e.g. ``"X_cellular"``, ``"X_pca"``).
        layer
            Layer holding the representation when it is not in ``obsm`` (default ``X``).
            Used as given: pass log-normalised values, not raw counts.
        %(param_unlabeled_or_none)s
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if obsm_key is not None and layer is not None:
            raise ValueError("Pass either obsm_key or layer, not both.")
        matrix, where = _feature_matrix(adata, obsm_key, layer)
        _check_finite(matrix, where)
        x_field = (
            ObsmField(REGISTRY_KEYS.X_KEY, obsm_key)
            if obsm_key is not None
            else LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False)
        )
        register_labelled_anndata(cls, adata, setup_method_args, x_field=x_field, **kwargs)

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_hidden1: int = 512,
        n_hidden2: int = 512,
        dropout_rate: float = 0.2,
        balance_classes: ClassBalance = False,
    ):
        super().__init__(adata, registry=registry)
        self.upstream_model: BaseModelClass | None = None
        #: Counts the upstream model embedded for training (``from_model``; not saved).
        self.reference_adata: AnnData | None = None
        n_input = len(self.gene_names)
        n_labels = len(self.label_names)
        self.module = self._module_cls(
            n_input=n_input,
            n_labels=n_labels,
            n_hidden1=n_hidden1,
            n_hidden2=n_hidden2,
            dropout_rate=dropout_rate,
            balance_classes=balance_classes,
        )
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def from_model(
        cls,
        model: BaseModelClass,
        adata: AnnData | None = None,
        labels_key: str | None = None,
        unlabeled_category: str | None = None,
        batch_size: int | None = None,
        **model_kwargs,
    ) -> LatentClassifier:
        """A classifier on the embedding of a trained, frozen model.

        Parameters
        ----------
        model
            A trained model with ``get_latent_representation`` (CELLULAR, SCVI, SCANVI,
            GMVAE...). It is never trained further.
        adata
            Labelled cells (default: the model's AnnData). Not modified.
        labels_key
            ``obs`` column of cell types (default: the model's ``labels_key``).
        unlabeled_category
            Label of cells without a cell type (``None``: every cell is labelled).
        batch_size
            Minibatch size for embedding.
        **model_kwargs
            Classifier arguments (``n_hidden1``, ``n_hidden2``, ``dropout_rate``).
        """
        if not getattr(model, "is_trained_", False):
            raise ValueError("The upstream model is not trained; train it first.")
        adata = model.adata if adata is None else adata
        if adata is None:
            raise ValueError("The upstream model has no AnnData; pass adata=... .")
        labels_key = labels_key or model.registry_["setup_args"].get("labels_key")
        if labels_key is None or labels_key not in adata.obs:
            raise ValueError(
                f"labels_key '{labels_key}' is not a column of adata.obs; pass the cell type "
                "column as labels_key=... ."
            )
        obsm_key = f"X_{type(model).__name__.lower()}"
        light = AnnData(
            obs=adata.obs[[labels_key]].copy(),
            obsm={obsm_key: embed_with(model, adata, batch_size)},
        )
        cls.setup_anndata(
            light, labels_key=labels_key, obsm_key=obsm_key, unlabeled_category=unlabeled_category
        )
        classifier = cls(light, **model_kwargs)
        classifier.upstream_model = model
        classifier.reference_adata = adata
        return classifier

    # ------------------------------------------------------------------ data
    def _light_copy(self, adata: AnnData) -> AnnData:
        """The registered representation of new cells; counts go through the upstream model."""
        setup_args = self.setup_args
        obsm_key = setup_args.get("obsm_key")
        if obsm_key is None:
            light = detached_anndata(adata, setup_args, list(self.label_names), self.gene_names)
            matrix = (
                light.X if setup_args.get("layer") is None else light.layers[setup_args["layer"]]
            )
            _check_finite(matrix, "the representation of adata")
            return light
        without_obsm = {key: value for key, value in setup_args.items() if key != "obsm_key"}
        light = AnnData(obs=registered_obs(adata, without_obsm, list(self.label_names)))
        if self.upstream_model is not None:
            light.obsm[obsm_key] = embed_with(self.upstream_model, adata)
        else:
            matrix, where = _feature_matrix(adata, obsm_key, None)
            matrix = _representation_columns(matrix, where, self.gene_names)
            _check_finite(matrix, where)
            light.obsm[obsm_key] = matrix
        return light

    # ------------------------------------------------------------------ training
    def _smallest_batch_size(self) -> int:
        return 2  # BatchNorm layers

    def _default_plan_kwargs(self) -> dict:
        tuned = getattr(self, "tuned_params_", None) or {}
        return {"lr": tuned["lr"]} if "lr" in tuned else {}

    def fit_statistics(self) -> None:
        """Cell type centroids of the representation and up to 2000 labelled cells (a
        seeded subsample) kept for the distance novelty scores, read minibatch by minibatch;
        with ``balance_classes``, the inverse-frequency weight of each cell type."""
        fit_label_weights(self)
        module = self.module
        labelled = np.flatnonzero(labelled_mask(self.adata_manager))
        sums = torch.zeros(module.n_labels, module.centroids.shape[1], dtype=torch.float64)
        counts = torch.zeros(module.n_labels, dtype=torch.float64)
        for tensors in self.iter_minibatches(indices=labelled):
            batch_sums, batch_counts = class_sums(
                tensors[REGISTRY_KEYS.X_KEY].float(),
                tensors[REGISTRY_KEYS.LABELS_KEY],
                module.n_labels,
            )
            sums, counts = sums + batch_sums, counts + batch_counts
        module.centroids.copy_(class_means(sums, counts).float())
        n_kept = min(len(labelled), len(module.reference_cells))
        kept = np.sort(np.random.default_rng(0).choice(labelled, n_kept, replace=False))
        rows = [
            tensors[REGISTRY_KEYS.X_KEY].float() for tensors in self.iter_minibatches(indices=kept)
        ]
        if rows:
            module.reference_cells[:n_kept] = torch.cat(rows).to(module.reference_cells)
        module.n_reference_cells.fill_(n_kept)

    def tune(
        self,
        n_trials: int = 100,
        max_epochs: int = 30,
        train_size: float = 0.8,
        seed: int = 0,
        timeout: float | None = None,
        hidden_choices: Sequence[int] = (64, 128, 256, 512, 1024),
        **train_kwargs,
    ):
        """Search widths, learning rate and dropout with optuna, then train the best (thesis 2.6).

        Each trial trains a fresh classifier on ``train_size`` of the cells and scores its
        best validation loss on the rest (the thesis: an 80:20 split, 100 trials). The
        model is then rebuilt with the best settings and trained the same way.

        Parameters
        ----------
        n_trials
            Optuna trials.
        max_epochs
            Epochs per trial and for the final fit.
        train_size
            Training fraction of each trial.
        seed
            Seed of the sampler and of each trial.
        timeout
            Optional time limit of the search, in seconds.
        hidden_choices
            Candidate widths of each hidden layer.
        **train_kwargs
            Passed to :meth:`train`.

        Returns
        -------
        The :class:`optuna.study.Study`; the best settings are also in ``tuned_params_``.
        """
        import optuna

        if self.adata is None:
            raise ValueError("tune needs the training AnnData; load the model with adata.")
        train_kwargs.setdefault("enable_progress_bar", False)
        train_kwargs.setdefault("enable_model_summary", False)

        def objective(trial: optuna.Trial) -> float:
            params = {
                "n_hidden1": trial.suggest_categorical("n_hidden1", list(hidden_choices)),
                "n_hidden2": trial.suggest_categorical("n_hidden2", list(hidden_choices)),
                "dropout_rate": trial.suggest_float("dropout_rate", 0.0, 0.5),
            }
            lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
            settings.seed = seed
            candidate = type(self)(
                self.adata, **params, balance_classes=self.module.balance_classes
            )
            candidate.train(
                max_epochs=max_epochs,
                train_size=train_size,
                plan_kwargs={"lr": lr},
                **train_kwargs,
            )
            return float(candidate.history["validation_loss"].min().iloc[0])

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        study.optimize(objective, n_trials=n_trials, timeout=timeout)
        best = dict(study.best_params)
        self._rebuild(best)
        settings.seed = seed
        self.train(max_epochs=max_epochs, train_size=train_size, **train_kwargs)
        return study

    def _rebuild(self, params: dict) -> None:
        """New module with tuned widths and dropout; ``tuned_params_`` keeps them (saved)."""
        module_params = {key: params[key] for key in ("n_hidden1", "n_hidden2", "dropout_rate")}
        self.module = self._module_cls(
            n_input=self.module.network[0].num_features,
            n_labels=self.module.n_labels,
            balance_classes=self.module.balance_classes,
            **module_params,
        )
        self.init_params_["non_kwargs"].update(module_params)
        self.tuned_params_ = dict(params)
        self.is_trained_ = False

    # ------------------------------------------------------------------ novelty
    def _model_novelty_score(self, adata, indices, batch_size, method: str) -> np.ndarray:
        score = getattr(self.module, method)  # centroid_distance, neighbour_distance
        return self.map_minibatches(score, adata, indices, batch_size)

    def _query_neighbour_score(self, adata, indices, reference, batch_size=None) -> np.ndarray:
        """Counts against the training counts (upstream model), else the representation
        against the training cells kept with the model."""
        if self.upstream_model is None:
            if reference is not None:
                raise ValueError(
                    "reference= is for a classifier with an upstream model; this one "
                    "compares with the training cells kept with it."
                )
            representation = self.map_minibatches(
                lambda tensors: tensors[REGISTRY_KEYS.X_KEY], adata, indices, batch_size
            )
            kept = self.module.reference_cells[: int(self.module.n_reference_cells)]
            if len(kept) == 0:
                raise RuntimeError("No training cells are stored; train the classifier first.")
            return query_neighbour_score(kept.cpu().numpy(), representation, counts=False)
        reference = self.reference_adata if reference is None else reference
        if reference is None:
            raise ValueError(
                "method='query_neighbours' compares the cells with the training counts, "
                "which are not saved with the classifier; pass reference=<the training "
                "AnnData>, or choose another method, e.g. method='entropy'."
            )
        return self._neighbour_score_on_counts(
            self.upstream_model.registry_, adata, indices, reference
        )

    def detect_novel(
        self,
        adata: AnnData | None = None,
        threshold: float = 0.25,
        batch_size: int | None = None,
    ) -> NovelTypeReport:
        """Does ``adata`` hold a cell type absent from training? (thesis 2.7).

        Each cell's likelihood is its maximum class probability min-max normalised
        between ``1 / n_classes`` and 1; the dataset is flagged when the smallest
        likelihood is below ``threshold`` (thesis: 0.25, precision 0.81 and coverage 0.33
        over its datasets). Cells below the threshold are flagged individually.

        Parameters
        ----------
        adata
            Cells to check (default: the model's AnnData).
        threshold
            Likelihood threshold.
        batch_size
            Minibatch size.
        """
        proba = self.predict_proba(adata, batch_size=batch_size)
        likelihood = 1.0 - probability_novelty(proba)
        names = self.cell_names(adata)
        minimum = float(likelihood.min()) if len(likelihood) else 1.0
        return NovelTypeReport(
            novel_detected=minimum < threshold,
            min_likelihood=minimum,
            threshold=threshold,
            likelihood=pd.Series(likelihood, index=names, name="likelihood"),
            cell_flags=pd.Series(likelihood < threshold, index=names, name="novel"),
        )

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        dir_path: str,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the classifier and, in ``dir_path/upstream``, its upstream model.

        Parameters
        ----------
        dir_path
            Folder to create.
        overwrite
            Overwrite an existing folder.
        save_anndata
            Also save the classifier's registered AnnData (the representation).
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.save`.

        Under DDP, every process runs ``save`` but only rank 0 writes; the others wait for it.
        """
        on_main_process(self._save_with_upstream, str(dir_path), overwrite, save_anndata, **kwargs)

    def _save_with_upstream(
        self, dir_path: str, overwrite: bool, save_anndata: bool, **kwargs
    ) -> None:
        super().save(dir_path, overwrite=overwrite, save_anndata=save_anndata, **kwargs)
        upstream_path = os.path.join(dir_path, UPSTREAM_FOLDER)
        # an overwritten folder may hold the upstream model of another classifier, which
        # load would attach to this one
        shutil.rmtree(upstream_path, ignore_errors=True)
        if os.path.exists(os.path.join(dir_path, UPSTREAM_FILE)):
            os.remove(os.path.join(dir_path, UPSTREAM_FILE))
        if self.upstream_model is None:
            return
        upstream_cls = type(self.upstream_model)
        self.upstream_model.save(upstream_path, overwrite=True, save_anndata=False)
        upstream_adata = self.upstream_model.adata
        if upstream_adata is not None:
            # A few registered cells let models that cannot load without data (scANVI)
            # rebuild their registry; the classifier never reads them.
            stub = detached_anndata(
                upstream_adata[:UPSTREAM_STUB_CELLS].copy(),
                dict(self.upstream_model.registry_["setup_args"]),
            )
            stub.write_h5ad(os.path.join(upstream_path, "adata.h5ad"))
        with open(os.path.join(dir_path, UPSTREAM_FILE), "w") as handle:
            json.dump(
                {"module": upstream_cls.__module__, "class": upstream_cls.__qualname__}, handle
            )

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, **kwargs) -> LatentClassifier:
        """Load a saved classifier with its upstream model.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Optional AnnData that becomes the model's data: counts when the classifier
            has an upstream model (they are embedded), else the registered representation.
            Without it, pass data to ``predict``.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` (``accelerator``...).
        """
        dir_path = str(dir_path)
        upstream = cls._load_upstream(dir_path)
        saved_adata = os.path.exists(os.path.join(dir_path, "adata.h5ad"))
        model = super().load(dir_path, adata=None if saved_adata else False, **kwargs)
        model.upstream_model = upstream
        if adata is not None and adata is not False:
            light = model._light_copy(adata)
            model._register_light_copy(light)
            model._adata = light
            model._adata_manager = model.get_anndata_manager(light, required=True)
        return model

    @staticmethod
    def _load_upstream(dir_path: str) -> BaseModelClass | None:
        info_path = os.path.join(dir_path, UPSTREAM_FILE)
        if not os.path.exists(info_path):
            return None
        with open(info_path) as handle:
            info = json.load(handle)
        upstream_cls = getattr(importlib.import_module(info["module"]), info["class"])
        upstream_path = os.path.join(dir_path, UPSTREAM_FOLDER)
        has_stub = os.path.exists(os.path.join(upstream_path, "adata.h5ad"))
        return upstream_cls.load(upstream_path, adata=None if has_stub else False)
