"""Base of modules without a generative part (classifiers, embedders), and the pieces
several modules share: per-cell log normalisation and the labelled cross-entropy."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput


def log_scaled_counts(counts: torch.Tensor, scale: float) -> torch.Tensor:
    """``log1p(counts / total * scale)`` of each cell (row); empty cells stay zero."""
    library = counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.log1p(counts / library * scale)


def labelled_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_labels: int,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over cells whose label code is below ``n_labels`` (0 if none).

    With ``class_weights`` (one per cell type) the mean is weighted by the weight of each
    cell's type. Masked rather than indexed, so that a training step never waits for the
    device.
    """
    labelled = labels < n_labels
    codes = labels.clamp(max=n_labels - 1)
    per_cell = F.cross_entropy(logits, codes, reduction="none")
    weights = labelled.to(per_cell)
    if class_weights is not None:
        weights = weights * class_weights.to(per_cell)[codes]
    return (per_cell * weights).sum() / weights.sum().clamp_min(torch.finfo(per_cell.dtype).tiny)


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_labels: int,
    class_weights: torch.Tensor | None = None,
) -> LossOutput:
    """:func:`labelled_cross_entropy` as a ``LossOutput``, with the labelled cells' accuracy
    as an extra metric (the unlabeled category is code ``n_labels``)."""
    labels = labels.long().ravel()
    labelled = labels < n_labels
    correct = ((logits.argmax(dim=1) == labels) & labelled).sum()
    return LossOutput(
        loss=labelled_cross_entropy(logits, labels, n_labels, class_weights),
        n_obs_minibatch=len(labels),
        extra_metrics={"accuracy": correct / labelled.sum().clamp_min(1)},
    )


#: A :class:`CrossEntropyModule`'s ``balance_classes``: off, inverse frequency, or its
#: square root.
ClassBalance = bool | Literal["sqrt"]
#: ``balance_classes`` -> the power p of the class weights ``N_i^-p``
#: (:func:`~scvi_ext.base.class_weights`).
CLASS_WEIGHT_POWERS: dict[ClassBalance, float] = {False: 0.0, True: 1.0, "sqrt": 0.5}


class NonGenerativeModule(BaseModuleClass):
    """A :class:`~scvi.module.base.BaseModuleClass` whose ``generative`` step is empty.

    ``inference`` receives the registered ``X`` as ``x`` (override
    ``_get_inference_input`` to pass more, e.g. the batch); subclasses implement
    ``inference`` and ``loss``.
    """

    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {}

    def generative(self) -> dict:
        """No generative model."""
        return {}


class CrossEntropyModule(NonGenerativeModule):
    """A :class:`NonGenerativeModule` classifier trained by the cross-entropy of the
    ``logits`` its ``inference`` returns, over the labelled cells.

    Parameters
    ----------
    n_labels
        Number of cell types (the unlabeled category is code ``n_labels``).
    balance_classes
        ``True``: weight each cell's cross-entropy by the inverse frequency of its type;
        ``"sqrt"``: by the inverse square root of that frequency (rare types gain less);
        ``False``: no weights (``label_weights``: filled by
        :func:`~scvi_ext.base.fit_label_weights` before each training, not saved). The loss
        is the weighted mean.
    """

    def __init__(self, n_labels: int, balance_classes: ClassBalance = False):
        super().__init__()
        if isinstance(balance_classes, bool | np.bool_):
            balance_classes = bool(balance_classes)
        elif not (isinstance(balance_classes, str) and balance_classes == "sqrt"):
            raise ValueError(
                f"balance_classes must be True, False or 'sqrt', not {balance_classes!r}."
            )
        self.n_labels = n_labels
        self.balance_classes: ClassBalance = balance_classes
        # a training statistic of the labels, fitted at every train call: not saved
        self.register_buffer("label_weights", torch.ones(n_labels), persistent=False)

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict) -> LossOutput:
        """Cross-entropy of the labelled cells (weighted by ``label_weights`` with
        ``balance_classes``); their accuracy as an extra metric."""
        return classification_loss(
            inference_outputs["logits"],
            tensors[REGISTRY_KEYS.LABELS_KEY],
            self.n_labels,
            self.label_weights if self.balance_classes else None,
        )

    def predict_logits(self, tensors: dict) -> torch.Tensor:
        """Class logits of a minibatch."""
        return self.inference(**self._get_inference_input(tensors))["logits"]
