"""Capability of classifier models: calibrated predictions, confidence, novelty, annotate."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from ._anndata import registry_label_names
from ._calibration import fit_temperature
from ._inference import InferenceMixin
from ._novelty import query_neighbour_score, registered_counts
from ._splitter import labelled_mask

logger = logging.getLogger(__name__)

BaseNoveltyMethod = Literal["max_proba", "entropy", "query_neighbours"]
#: Novelty scores every classifier model offers (:meth:`ClassifierMixin.novelty_score`).
BASE_NOVELTY_METHODS: tuple[str, ...] = get_args(BaseNoveltyMethod)
#: Novelty scores computed from the class probabilities alone.
PROBABILITY_NOVELTY_METHODS = ("max_proba", "entropy")


def probability_novelty(proba: np.ndarray, method: str = "max_proba") -> np.ndarray:
    """Novelty from class probabilities, in [0, 1].

    ``"max_proba"``: 1 - the maximum probability min-max normalised between
    ``1 / n_classes`` and 1; ``"entropy"``: the entropy divided by ``log(n_classes)``.
    """
    n_classes = proba.shape[1]
    if n_classes < 2:
        return np.zeros(len(proba))
    if method == "entropy":
        entropy = -(proba * np.log(np.clip(proba, 1e-12, 1.0))).sum(axis=1)
        return entropy / np.log(n_classes)
    scaled = (proba.max(axis=1) - 1.0 / n_classes) / (1.0 - 1.0 / n_classes)
    return 1.0 - np.clip(scaled, 0.0, 1.0)


class ClassifierMixin(InferenceMixin):
    """Predictions, calibrated confidence, novelty and ``annotate`` (capability c).

    The module satisfies :class:`~scvi_ext.base.ClassifierModule`. After training, a
    softmax temperature is fitted on the labelled validation cells (Guo et al. 2017) and
    divides every logit, so soft predictions and confidence are calibrated; the predicted
    class never changes. ``train(..., calibrate=False)`` keeps the temperature as it is
    (1 for a new model). It is saved with the model (``calibration_temperature_``).
    """

    #: Default method of :meth:`novelty_score`.
    default_novelty_method: str = "max_proba"
    novelty_methods: tuple[str, ...] = BASE_NOVELTY_METHODS

    # ------------------------------------------------------------------ labels
    @property
    def label_names(self) -> np.ndarray:
        """Cell type names, in the column order of soft predictions."""
        return np.asarray(registry_label_names(self.registry_)[0])

    @property
    def unlabeled_category(self) -> str | None:
        """The unlabeled category given to ``setup_anndata``."""
        return registry_label_names(self.registry_)[1]

    # ------------------------------------------------------------------ calibration
    @property
    def calibration_temperature(self) -> float:
        """The temperature dividing the logits (1: uncalibrated)."""
        return float(getattr(self, "calibration_temperature_", 1.0))

    def train(self, *args, calibrate: bool = True, **kwargs):
        """Train (see the model's ``train``), then calibrate unless ``calibrate=False``."""
        self._calibrate_after_training = calibrate
        return super().train(*args, **kwargs)

    def _after_training(self) -> None:
        super()._after_training()
        if getattr(self, "_calibrate_after_training", True):
            self.calibrate()

    def calibrate(self, indices: Sequence[int] | None = None) -> float:
        """Fit the temperature on labelled cells of the model's AnnData and return it.

        Parameters
        ----------
        indices
            Cells to fit on (default: the labelled cells of the last training's validation
            set). Without labelled cells, or when all of them are classified correctly
            (the likelihood then has no optimum), the temperature is left as it is (with a
            warning).
        """
        if self.adata is None:
            raise ValueError(
                "calibrate reads labelled cells of the model's AnnData; load it with adata=..."
            )
        if indices is None:
            indices = getattr(self, "validation_indices", None)
            indices = np.asarray([] if indices is None else indices, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        indices = indices[labelled_mask(self.adata_manager)[indices]]
        if len(indices) == 0:
            logger.warning(
                "No labelled validation cells to calibrate on (train_size=1?); the class "
                "probabilities keep temperature %.3g.",
                self.calibration_temperature,
            )
            return self.calibration_temperature
        codes = self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY).ravel()[indices]
        logits = self.map_minibatches(self.module.predict_logits, indices=indices)
        if (logits.argmax(axis=1) == codes).all():
            # Without a single error the likelihood grows as the temperature falls: any
            # fitted value would only reflect the bound, and make every prediction sharper.
            logger.warning(
                "All %d labelled validation cells are classified correctly, so no temperature "
                "can be fitted; the class probabilities keep temperature %.3g.",
                len(indices),
                self.calibration_temperature,
            )
            return self.calibration_temperature
        self.calibration_temperature_ = fit_temperature(logits, codes)
        return self.calibration_temperature_

    # ------------------------------------------------------------------ predictions
    def predict_proba(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        calibrated: bool = True,
    ) -> np.ndarray:
        """Class probabilities, one row per cell and one column per cell type.

        ``calibrated=False`` gives the softmax of the raw logits (temperature 1).
        """
        logits = self.map_minibatches(self.module.predict_logits, adata, indices, batch_size)
        temperature = self.calibration_temperature if calibrated else 1.0
        scaled = torch.from_numpy(logits).double() / temperature
        return torch.softmax(scaled, dim=-1).numpy()

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
            AnnData with counts (default: the model's AnnData); genes are matched to the
            model's by name and counts are validated.
        indices
            Cells to predict (default: all).
        soft
            Return calibrated class probabilities as a DataFrame whose columns are the cell
            type names (the layout of scANVI's ``predict(soft=True)``).
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
            return pd.DataFrame(proba, columns=names, index=self.cell_names(adata, indices))
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
        """Confidence of each prediction: the maximum calibrated class probability."""
        return self.predict_proba(adata, indices, batch_size).max(axis=1)

    # ------------------------------------------------------------------ novelty
    def novelty_score(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        method: str | None = None,
        reference: AnnData | None = None,
    ) -> np.ndarray:
        """Per-cell score, higher when a cell more likely belongs to a type absent from training.

        Parameters
        ----------
        adata, indices, batch_size
            Cells to score (default: the model's AnnData).
        method
            ``"max_proba"``: ``1 - p_max`` after min-max normalising the maximum class
            probability between ``1 / n_classes`` and 1, in [0, 1]. ``"entropy"``:
            entropy of the class probabilities divided by ``log(n_classes)``.
            ``"query_neighbours"``: the cells of ``adata`` (at least 50, with counts) are
            scored together against the reference counts by
            :func:`scvi_ext.base.query_neighbour_score`, which does not use the model: 0.5
            or less for reference-like cells, near 1 for a type the reference lacks; a
            query from another condition scores high everywhere. Default:
            :attr:`default_novelty_method`.
        reference
            ``"query_neighbours"``: AnnData with the reference counts (default: the
            labelled cells of the model's AnnData).
        """
        method = method or self.default_novelty_method
        if method not in self.novelty_methods:
            raise ValueError(f"method must be one of {self.novelty_methods}, not '{method}'.")
        if method in PROBABILITY_NOVELTY_METHODS:
            return probability_novelty(self.predict_proba(adata, indices, batch_size), method)
        if method == "query_neighbours":
            return self._query_neighbour_score(adata, indices, reference, batch_size)
        return self._model_novelty_score(adata, indices, batch_size, method)

    def _model_novelty_score(self, adata, indices, batch_size, method: str) -> np.ndarray:
        """Scores of methods a model adds to :data:`BASE_NOVELTY_METHODS`."""
        raise NotImplementedError(method)

    def _query_neighbour_score(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        reference: AnnData | None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        if reference is None:
            reference = self._labelled_cells()
        return self._neighbour_score_on_counts(self.registry_, adata, indices, reference)

    @staticmethod
    def _neighbour_score_on_counts(
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

    # ------------------------------------------------------------------ annotate
    def annotate(
        self,
        adata: AnnData | None = None,
        key_added: str | None = None,
        novelty_threshold: float | None = None,
        batch_size: int | None = None,
    ) -> AnnData:
        """Write predictions into ``adata`` under documented keys and return it.

        Writes ``obs[f"{key}_prediction"]``, ``obs[f"{key}_confidence"]`` (maximum
        calibrated class probability), ``obs[f"{key}_novelty"]`` (:meth:`novelty_score`,
        default method) and, for models with an embedding, ``obsm[f"X_{key}"]``, with
        ``key`` defaulting to the lower-case class name. Nothing else is changed.
        """
        key = key_added or type(self).__name__.lower()
        target = self.adata if adata is None else adata
        with self.registered_anndata(adata) as registered:
            proba = self.predict_proba(registered, batch_size=batch_size)
            latent = None
            if hasattr(self, "get_latent_representation"):
                latent = self.get_latent_representation(registered, batch_size=batch_size)
        predictions = self.label_names[proba.argmax(axis=1)].astype(object)
        method = self.default_novelty_method
        if method in PROBABILITY_NOVELTY_METHODS:
            novelty = probability_novelty(proba, method)
        else:
            novelty = self.novelty_score(adata, batch_size=batch_size)
        if novelty_threshold is not None:
            predictions[novelty > novelty_threshold] = self.unlabeled_category
        target.obs[f"{key}_prediction"] = pd.Categorical(predictions)
        target.obs[f"{key}_confidence"] = proba.max(axis=1)
        target.obs[f"{key}_novelty"] = novelty
        if latent is not None:
            target.obsm[f"X_{key}"] = latent
        return target
