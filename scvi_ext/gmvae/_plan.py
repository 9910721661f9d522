"""Training plan of the GMVAE: optional KL warm-up on the training loss only."""

from __future__ import annotations

from scvi.train._trainingplans import _compute_kl_weight

from scvi_ext.base import BaseTrainingPlan


class GMVAETrainingPlan(BaseTrainingPlan):
    """:class:`~scvi_ext.base.BaseTrainingPlan` with scvi's KL warm-up (``n_epochs_kl_warmup``,
    ``n_steps_kl_warmup``; off by default) applied to training steps; the validation loss
    is always the full negative ELBO, so early stopping and the kept epoch compare like
    with like."""

    def __init__(self, module, *, n_epochs_kl_warmup: int | None = None, **kwargs):
        super().__init__(module, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs)

    def step_loss_kwargs(self, stage: str) -> dict:
        """``kl_weight``: the warm-up's in training, 1 in validation.

        A float computed on the host: scvi's ``kl_weight`` property is a tensor copied to
        the device, and reading it back would make every step wait for the device.
        """
        if stage != "train":
            return {"kl_weight": 1.0}
        weight = _compute_kl_weight(
            self.current_epoch,
            self.global_step,
            self.n_epochs_kl_warmup,
            self.n_steps_kl_warmup,
            self.max_kl_weight,
            self.min_kl_weight,
        )
        return {"kl_weight": float(weight)}
