"""Training plan of the GMVAE: optional KL warm-up on the training loss only, and an
optional larger learning rate for the mixture's own parameters."""

from __future__ import annotations

import torch
from scvi.train import PyroTrainingPlan
from scvi.train._trainingplans import _compute_kl_weight

from scvi_ext.base import BaseTrainingPlan, CountCheckedBatches
from scvi_ext.base._plan import FUSED_ADAM_DEVICES


class GMVAETrainingPlan(BaseTrainingPlan):
    """:class:`~scvi_ext.base.BaseTrainingPlan` with scvi's KL warm-up (``n_epochs_kl_warmup``,
    ``n_steps_kl_warmup``; off by default) applied to training steps; the validation loss
    is always the full negative ELBO, so early stopping and the kept epoch compare like
    with like.

    Parameters
    ----------
    module
        The GMVAE module.
    n_epochs_kl_warmup
        Epochs of linear KL warm-up (``None``: none).
    mixture_lr_factor
        Learning rate of the module's ``mixture_parameters()`` (the per-component ones)
        relative to the others' (1: the same). Adam moves a parameter by at most about
        ``lr`` per step, so at the seed's 1e-4 and a few hundred steps the prior means stay
        where they were drawn (docs/gmvae.md).
    **kwargs
        Passed to :class:`~scvi_ext.base.BaseTrainingPlan`.
    """

    def __init__(
        self,
        module,
        *,
        n_epochs_kl_warmup: int | None = None,
        mixture_lr_factor: float = 1.0,
        **kwargs,
    ):
        if not isinstance(mixture_lr_factor, int | float) or not mixture_lr_factor > 0:
            raise ValueError(
                f"mixture_lr_factor must be a number > 0 (1: the plan's lr), "
                f"not {mixture_lr_factor!r}."
            )
        super().__init__(module, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs)
        self.mixture_lr_factor = float(mixture_lr_factor)

    def _create_optimizer(self, params) -> torch.optim.Optimizer:
        """The base's optimizer; with ``mixture_lr_factor != 1``, a second parameter group
        holds the mixture parameters at ``lr * mixture_lr_factor``."""
        params = list(params)
        if self.mixture_lr_factor == 1:
            return super()._create_optimizer(params)
        mixture_ids = {id(p) for p in self.module.mixture_parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in mixture_ids]},
            {
                "params": [p for p in params if id(p) in mixture_ids],
                "lr": self.lr * self.mixture_lr_factor,
            },
        ]
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self._optimizer_cls in (torch.optim.Adam, torch.optim.AdamW):
            kwargs["eps"] = self.eps
            kwargs["fused"] = all(p.device.type in FUSED_ADAM_DEVICES for p in params)
        return self._optimizer_cls([g for g in groups if g["params"]], **kwargs)

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


class GMVAEPyroTrainingPlan(CountCheckedBatches, PyroTrainingPlan):
    """scvi-tools' :class:`~scvi.train.PyroTrainingPlan`, with the networks in train mode at
    every epoch and each minibatch's counts checked (``count_locations``, set by the model:
    :class:`~scvi_ext.base.CountCheckedBatches`).

    scvi leaves the module in eval mode after ``train()``, ``load()`` and
    ``load_query_data()``, and Lightning does not switch it back: without this, a Pyro
    training after any of them runs with dropout off and BatchNorm statistics frozen.
    """

    def on_train_epoch_start(self) -> None:
        """Train mode at every epoch (dropout on, BatchNorm statistics updated)."""
        super().on_train_epoch_start()
        self.module.train()
