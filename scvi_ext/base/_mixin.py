"""Classifier model mixin: predictions, confidence, novelty, query mapping."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.model.base import BaseModelClass

from scvi_ext.data import validate_gene_overlap

from ._anndata import detached_anndata, label_names, registry_label_names
from ._novelty import query_neighbour_score, registered_counts
from ._splitter import labelled_mask

logger = logging.getLogger(__name__)

#: Default minimum fraction of reference genes a query must have.
MIN_GENE_FRACTION = 0.5

BaseNoveltyMethod = Literal["max_proba", "entropy", "query_neighbours"]
#: Novelty scores every classifier model offers (:meth:`ClassifierMixin.novelty_score`).
BASE_NOVELTY_METHODS: tuple[str, ...] = get_args(BaseNoveltyMethod)


class ClassifierMixin:
    """Predict, confidence, novelty and scArches query mapping for classifier models.

    The module must implement ``predict_logits(tensors) -> Tensor`` (one row of logits
    per cell, one column per cell type) and ``latent(tensors) -> Tensor``.
    """

    # ------------------------------------------------------------------ data access
    @property
    def setup_args(self) -> dict:
        """The arguments ``setup_anndata`` was called with."""
        return dict(self.registry_["setup_args"])

    @property
    def label_names(self) -> np.ndarray:
        """Cell type names, in the column order of soft predictions."""
        names, _ = registry_label_names(self.registry_)
        return np.asarray(names)

    @property
    def unlabeled_category(self) -> str | None:
        """The unlabeled category given to ``setup_anndata``."""
        return registry_label_names(self.registry_)[1]

    def _inference_adata(self, adata: AnnData | None) -> AnnData:
        """The registered AnnData for ``adata`` (a light copy for data the model never saw)."""
        if adata is None:
            if self.adata is None:
                raise ValueError(
                    "This model was loaded without data (adata=False); pass adata=... ."
                )
            return self.adata
        if adata is self.adata:
            return adata
        light = detached_anndata(adata, self.setup_args, known_labels=list(self.label_names))
        return self._validate_anndata(light)

    @torch.inference_mode()
    def _map_minibatches(
        self,
        fn: Callable[[dict], torch.Tensor],
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Apply ``fn`` to every minibatch in eval mode and stack the results."""
        adata = self._inference_adata(adata)
        was_training = self.module.training
        self.module.eval()
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        outputs = [fn(tensors).detach().cpu() for tensors in loader]
        if was_training:
            self.module.train()
        return torch.cat(outputs).numpy()

    def _obs_names(self, adata: AnnData | None, indices: Sequence[int] | None) -> pd.Index:
        names = (self.adata if adata is None else adata).obs_names
        return names if indices is None else names[np.asarray(indices)]

    # ------------------------------------------------------------------ predictions
    def predict_proba(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Class probabilities, one row per cell and one column per cell type."""
        logits = self._map_minibatches(self.module.predict_logits, adata, indices, batch_size)
        return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        novelty_threshold: float | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predict cell types.

        Parameters
        ----------
        adata
            AnnData with counts laid out as at setup (default: the model's AnnData).
        indices
            Cells to predict (default: all).
        soft
            Return class probabilities as a DataFrame whose columns are the cell type names
            (the layout of scANVI's ``predict(soft=True)``).
        batch_size
            Minibatch size.
        novelty_threshold
            With hard predictions, cells whose :meth:`novelty_score` exceeds this value get
            the unlabeled category instead of a cell type.

        Returns
        -------
        Cell type names (``soft=False``) or a cells x cell types DataFrame of probabilities.
        """
        proba = self.predict_proba(adata, indices, batch_size)
        names = self.label_names
        if soft:
            return pd.DataFrame(proba, columns=names, index=self._obs_names(adata, indices))
        predictions = names[proba.argmax(axis=1)].astype(object)
        if novelty_threshold is not None:
            novel = self.novelty_score(adata, indices, batch_size) > novelty_threshold
            predictions[novel] = self.unlabeled_category
        return predictions

    def predict_confidence(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Confidence of each prediction: the maximum class probability."""
        return self.predict_proba(adata, indices, batch_size).max(axis=1)

    @staticmethod
    def _novelty_from_proba(proba: np.ndarray, method: str = "max_proba") -> np.ndarray:
        """``"max_proba"``: 1 - the min-max normalised maximum probability; ``"entropy"``:
        the entropy divided by ``log(n_classes)``. Both in [0, 1]."""
        n_classes = proba.shape[1]
        if n_classes < 2:
            return np.zeros(len(proba))
        if method == "entropy":
            entropy = -(proba * np.log(np.clip(proba, 1e-12, 1.0))).sum(axis=1)
            return entropy / np.log(n_classes)
        scaled = (proba.max(axis=1) - 1.0 / n_classes) / (1.0 - 1.0 / n_classes)
        return 1.0 - np.clip(scaled, 0.0, 1.0)

    def _neighbour_score_on_counts(
        self,
        registry: dict,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        reference: AnnData,
    ) -> np.ndarray:
        """:func:`query_neighbour_score` of the counts of ``adata`` against ``reference``,
        on the genes (and layer) of the model that ``registry`` describes."""
        if adata is None:
            raise ValueError(
                "method='query_neighbours' scores new cells against the training cells; "
                "pass them as adata=<AnnData with counts>."
            )
        cells = adata if indices is None else adata[np.asarray(indices)]
        return query_neighbour_score(
            registered_counts(reference, registry, "reference"),
            registered_counts(cells, registry, "adata"),
        )

    def novelty_score(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        method: BaseNoveltyMethod = "max_proba",
        reference: AnnData | None = None,
    ) -> np.ndarray:
        """Per-cell score, higher when a cell more likely belongs to a type absent from training.

        Parameters
        ----------
        adata, indices, batch_size
            Cells to score (default: the model's AnnData).
        method
            ``"max_proba"`` (default): ``1 - p_max`` after min-max normalising the maximum
            class probability between ``1 / n_classes`` and 1, in [0, 1]. ``"entropy"``:
            entropy of the class probabilities divided by ``log(n_classes)``.
            ``"query_neighbours"``: the cells of ``adata`` (at least 50, with counts) are
            scored together against the reference counts by
            :func:`scvi_ext.base.query_neighbour_score`, which does not use the model: 0.5
            or less for reference-like cells, near 1 for a type the reference lacks. It
            separated left-out types far better than the probability scores in our
            benchmarks, but a query from another condition scores high everywhere.
        reference
            ``"query_neighbours"``: AnnData with the reference counts (default: the
            labelled cells of the model's AnnData).
        """
        if method not in BASE_NOVELTY_METHODS:
            raise ValueError(f"method must be one of {BASE_NOVELTY_METHODS}, not '{method}'.")
        if method != "query_neighbours":
            return self._novelty_from_proba(self.predict_proba(adata, indices, batch_size), method)
        if reference is None:
            reference = self._labelled_cells()
        return self._neighbour_score_on_counts(self.registry_, adata, indices, reference)

    def _labelled_cells(self) -> AnnData:
        """The labelled cells of the model's AnnData (the reference of its training)."""
        if self.adata is not None:
            labelled = labelled_mask(self.adata_manager)
            if labelled.any():
                return self.adata[labelled]
        raise ValueError(
            "The model has no AnnData with labelled cells to compare with (loaded with "
            "adata=False, or a query model); pass reference=<AnnData with the reference counts>."
        )

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """The model's cell embedding (its penultimate layer)."""
        return self._map_minibatches(self.module.latent, adata, indices, batch_size)

    def annotate(
        self,
        adata: AnnData | None = None,
        key_added: str | None = None,
        novelty_threshold: float | None = None,
        batch_size: int | None = None,
    ) -> AnnData:
        """Write predictions into ``adata`` under documented keys and return it.

        Writes ``obs[f"{key}_prediction"]``, ``obs[f"{key}_confidence"]`` (maximum class
        probability), ``obs[f"{key}_novelty"]`` (:meth:`novelty_score`) and
        ``obsm[f"X_{key}"]`` (the latent), with ``key`` defaulting to the lower-case class
        name. Nothing else is changed.
        """
        key = key_added or type(self).__name__.lower()
        target = self.adata if adata is None else adata
        proba = self.predict_proba(adata, batch_size=batch_size)
        predictions = self.label_names[proba.argmax(axis=1)].astype(object)
        novelty = self.novelty_score(adata, batch_size=batch_size)
        if novelty_threshold is not None:
            predictions[novelty > novelty_threshold] = self.unlabeled_category
        target.obs[f"{key}_prediction"] = pd.Categorical(predictions)
        target.obs[f"{key}_confidence"] = proba.max(axis=1)
        target.obs[f"{key}_novelty"] = novelty
        target.obsm[f"X_{key}"] = self.get_latent_representation(adata, batch_size=batch_size)
        return target

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

        Unlike scvi-tools, the default returns a new AnnData (``inplace=False``). The gene
        alignment report (reference genes found in the query) is logged and stored in the
        returned AnnData's ``uns["gene_alignment"]``.

        Raises
        ------
        ValueError
            When the query has fewer than ``min_gene_fraction`` of the reference genes.
        """
        reference_model = cls._as_reference(reference_model)
        reference_genes = super().prepare_query_anndata(
            adata, reference_model, return_reference_var_names=True
        )
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
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: str | BaseModelClass,
        **kwargs,
    ):
        """scArches-style query model: reference weights, new batch/domain categories.

        The query AnnData is not modified: the model works on a light copy that shares its
        count matrix. Query cell types the reference never saw are treated as unlabeled
        (with a warning). Genes must match the reference: call
        :meth:`prepare_query_anndata` first when they do not.

        Parameters
        ----------
        adata
            Query AnnData (raw counts, genes aligned to the reference).
        reference_model
            A trained model or the folder it was saved to.
        **kwargs
            Passed to scvi's ``load_query_data`` (``unfrozen``, ``freeze_classifier``, ...).
        """
        reference_model = cls._as_reference(reference_model)
        registry = cls._reference_registry(reference_model)
        reference_genes = cls.prepare_query_anndata(
            adata, reference_model, return_reference_var_names=True
        )
        validate_gene_overlap(reference_genes, adata.var_names, MIN_GENE_FRACTION)
        if not adata.var_names.equals(pd.Index(reference_genes)):
            raise ValueError(
                "The query's genes are not those of the reference in the same order; run "
                f"`query = {cls.__name__}.prepare_query_anndata(query, reference_model)` first."
            )
        known_labels, _ = registry_label_names(registry)
        light = detached_anndata(adata, registry["setup_args"], known_labels=known_labels)
        model = super().load_query_data(light, reference_model, **kwargs)
        model.is_query_model = True
        return model


__all__ = ["ClassifierMixin", "MIN_GENE_FRACTION", "label_names"]
