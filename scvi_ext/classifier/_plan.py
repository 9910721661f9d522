"""Training plan of the latent classifier: cross-entropy, Adam, warm-up + cosine."""

from __future__ import annotations

from typing import Literal

import torch
from scvi import REGISTRY_KEYS

from scvi_ext.base import BaseTrainingPlan, WarmupCosineMixin

from ._module import LatentClassifierModule, labelled_cross_entropy


class LatentClassifierTrainingPlan(WarmupCosineMixin, BaseTrainingPlan):
    """Cross-entropy training (reference code: Adam 1e-3, weight decay 5e-5, warm-up 4).

    Parameters
    ----------
    module
        A :class:`LatentClassifierModule`.
    optimizer, lr, weight_decay
        Optimizer settings.
    warmup_epochs, cosine_epochs
        The warm-up + cosine learning-rate schedule, per epoch.
    **kwargs
        Passed to :class:`~scvi_ext.base.BaseTrainingPlan`.
    """

    def __init__(
        self,
        module: LatentClassifierModule,
        *,
        optimizer: Literal["Adam", "AdamW", "Adadelta", "SGD", "Custom"] = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
        warmup_epochs: int = 4,
        cosine_epochs: int = 50,
        **kwargs,
    ):
        kwargs.setdefault("reduce_lr_on_plateau", False)
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        self.warmup_epochs = warmup_epochs
        self.cosine_epochs = cosine_epochs

    def _step(self, batch: dict, prefix: str) -> torch.Tensor:
        logits = self.module.predict_logits(batch)
        labels = batch[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        loss = labelled_cross_entropy(logits, labels, self.module.n_labels)
        self.log_step(prefix, {f"{prefix}_loss": loss}, n_cells=len(labels))
        labelled = labels < self.module.n_labels
        n_labelled = labelled.sum()  # tensors and masks only: no host sync in the step
        correct = ((logits.argmax(dim=1) == labels) & labelled).float().sum()
        accuracy = correct / n_labelled.clamp_min(1)
        self.log_step(prefix, {f"{prefix}_accuracy": accuracy}, n_cells=n_labelled)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Cross-entropy on a minibatch."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Cross-entropy and accuracy on held-out cells."""
        self._step(batch, "validation")
