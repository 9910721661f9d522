"""Base of modules without a generative part (classifiers, embedders), and the pieces
several modules share: per-cell log normalisation and the labelled cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput


def log_scaled_counts(counts: torch.Tensor, scale: float) -> torch.Tensor:
    """``log1p(counts / total * scale)`` of each cell (row); empty cells stay zero."""
    library = counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.log1p(counts / library * scale)


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, n_labels: int):
    """Mean cross-entropy over cells whose label code is below ``n_labels`` (0 if none).

    Masked rather than indexed, so that a training step never waits for the device.
    """
    labelled = labels < n_labels
    per_cell = F.cross_entropy(logits, labels.clamp(max=n_labels - 1), reduction="none")
    return (per_cell * labelled).sum() / labelled.sum().clamp_min(1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, n_labels: int) -> LossOutput:
    """:func:`labelled_cross_entropy` as a ``LossOutput``, with the labelled cells' accuracy
    as an extra metric (the unlabeled category is code ``n_labels``)."""
    labels = labels.long().ravel()
    labelled = labels < n_labels
    correct = ((logits.argmax(dim=1) == labels) & labelled).sum()
    return LossOutput(
        loss=labelled_cross_entropy(logits, labels, n_labels),
        n_obs_minibatch=len(labels),
        extra_metrics={"accuracy": correct / labelled.sum().clamp_min(1)},
    )


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
