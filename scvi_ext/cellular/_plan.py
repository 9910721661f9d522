"""CELLULAR training: Adam with a warm-up + cosine learning-rate schedule."""

from __future__ import annotations

from typing import Literal

import torch
from scvi import REGISTRY_KEYS

from scvi_ext.base import BaseTrainingPlan, WarmupCosineMixin

from ._module import CELLULARModule


class CELLULARTrainingPlan(WarmupCosineMixin, BaseTrainingPlan):
    """Contrastive + centroid training of :class:`CELLULARModule` (thesis 2.3).

    Parameters
    ----------
    module
        A :class:`CELLULARModule` with its reference statistics set.
    label_weights
        Per-cell-type loss weights (inverse frequency in the training cells).
    batch_weights
        Per-batch loss weights, or ``None`` without batches.
    optimizer, lr, weight_decay
        Reference code: Adam, 1e-3, 5e-5.
    warmup_epochs
        Epochs of linear warm-up (reference code: 4).
    cosine_epochs
        Length of the cosine decay in epochs (reference code: 50).
    **kwargs
        Passed to :class:`~scvi_ext.base.BaseTrainingPlan`.
    """

    def __init__(
        self,
        module: CELLULARModule,
        *,
        label_weights: torch.Tensor,
        batch_weights: torch.Tensor | None = None,
        optimizer: Literal["Adam", "AdamW", "Adadelta", "SGD", "Custom"] = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
        warmup_epochs: int = 4,
        cosine_epochs: int = 50,
        **kwargs,
    ):
        kwargs.setdefault("reduce_lr_on_plateau", False)
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        self.register_buffer("label_weights", torch.as_tensor(label_weights).float())
        if batch_weights is None:
            self.batch_weights = None
        else:
            self.register_buffer("batch_weights", torch.as_tensor(batch_weights).float())
        self.warmup_epochs = warmup_epochs
        self.cosine_epochs = cosine_epochs

    def _terms(self, batch: dict) -> dict[str, torch.Tensor]:
        z = self.module.embed(batch[REGISTRY_KEYS.X_KEY])
        labels = batch[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        batches = batch[REGISTRY_KEYS.BATCH_KEY].long().ravel()
        return self.module.loss_terms(z, labels, batches, self.label_weights, self.batch_weights)

    @staticmethod
    def _metrics(prefix: str, terms: dict) -> dict[str, torch.Tensor]:
        names = ("loss", "cell_type_loss", "batch_loss", "centroid_loss")
        return {f"{prefix}_{name}": terms[name] for name in names}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step of the CELLULAR loss."""
        self.module.clamp_temperature()
        terms = self._terms(batch)
        metrics = self._metrics("train", terms)
        metrics["temperature"] = self.module.current_temperature()
        self.log_step("train", metrics, n_cells=len(batch[REGISTRY_KEYS.X_KEY]))
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The same loss on held-out cells."""
        terms = self._terms(batch)
        self.log_step(
            "validation", self._metrics("validation", terms), len(batch[REGISTRY_KEYS.X_KEY])
        )
