"""CELLULAR training: Adam with a warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import torch
from scvi import REGISTRY_KEYS

from scvi_ext.base import WarmupCosineTrainingPlan


class CELLULARTrainingPlan(WarmupCosineTrainingPlan):
    """Contrastive + centroid training of :class:`CELLULARModule` (thesis 2.3).

    Each step minimises ``module.loss``; the learnable temperature is clamped to its
    bounds before the step, as the reference code does. Settings: those of
    :class:`~scvi_ext.base.WarmupCosineTrainingPlan` (the reference code's: Adam 1e-3,
    weight decay 5e-5, warm-up 4 epochs, cosine over 50).
    """

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step of the CELLULAR loss."""
        self.module.clamp_temperature()
        loss = super().training_step(batch, batch_idx)
        temperature = {"temperature": self.module.current_temperature()}
        self.log_step("train", temperature, n_cells=len(batch[REGISTRY_KEYS.X_KEY]))
        return loss
