"""Training plan base class shared by the scvi_ext models."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scvi.module.base import BaseModuleClass, LossOutput
from scvi.train import TrainingPlan
from torch.optim.lr_scheduler import LambdaLR

from scvi_ext.data._validation import check_minibatch_counts

#: Optimizers a plan takes by name ("Custom" with ``optimizer_creator``).
OptimizerName = Literal["Adam", "AdamW", "Adadelta", "SGD", "Custom"]

OPTIMIZERS = {
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "Adadelta": torch.optim.Adadelta,
    "SGD": torch.optim.SGD,
}

#: The plan of a paper that trains with plain "Adam" for a fixed number of epochs: Adam's
#: own ``eps`` (scvi's plans default to 0.01, larger than most gradient entries of models
#: with normalised features: docs/adding_a_model.md), no weight decay, and the last epoch's
#: weights kept. Models add their learning rate.
PLAIN_ADAM_PLAN = {
    "optimizer": "Adam",
    "eps": 1e-8,
    "weight_decay": 0.0,
    "restore_best_weights": False,
}


#: What to do when a minibatch of the model's own data is not raw counts.
CHANGED_AFTER_SETUP = (
    "It held raw counts when setup checked it: keep them there (normalise a copy, or into "
    "another layer), or set up the edited data again and build a new model."
)


def check_count_tensors(
    batch: object, locations: dict[str, str], hint: str = CHANGED_AFTER_SETUP
) -> None:
    """Check the counts of a minibatch of registered tensors, on the CPU.

    ``locations`` maps the registry keys of counts (``"X"``) to where they come from
    (``"adata.X"``). ``batch`` is a dict of registered tensors, or a dict or list of them
    (as paired loaders yield); each of its counts is checked by
    :func:`~scvi_ext.data._validation.check_minibatch_counts`, whose error names the
    location, then ``hint``.
    """
    if isinstance(batch, dict) and not locations.keys().isdisjoint(batch):
        for key, where in locations.items():
            if key in batch:
                check_minibatch_counts(_as_array(batch[key]), where, hint)
    elif isinstance(batch, dict | list | tuple):
        for part in batch.values() if isinstance(batch, dict) else batch:
            check_count_tensors(part, locations, hint)


def _as_array(tensor: torch.Tensor) -> np.ndarray | sp.csr_matrix:
    tensor = tensor.detach().cpu()
    if tensor.layout == torch.sparse_csr:
        parts = (tensor.values(), tensor.col_indices(), tensor.crow_indices())
        return sp.csr_matrix(tuple(t.numpy() for t in parts), shape=tuple(tensor.shape))
    return tensor.numpy()


class CountCheckedBatches:
    """Lightning module mixin: every minibatch's counts are checked before they move to the
    device (:func:`check_count_tensors`), those ``count_locations`` names (registry key ->
    where they come from; ``None``: no check), so that data edited after setup (e.g.
    normalised in place) stops training with an error instead of training on it."""

    count_locations: dict[str, str] | None = None

    def on_before_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        """Check the minibatch's counts, then transfer it as Lightning would."""
        if self.count_locations:
            check_count_tensors(batch, self.count_locations)
        return super().on_before_batch_transfer(batch, dataloader_idx)


#: Devices with a fused Adam kernel in every torch version we support.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def create_optimizer(
    optimizer_cls: type[torch.optim.Optimizer], params, **kwargs
) -> torch.optim.Optimizer:
    """``optimizer_cls(params, **kwargs)``, with a fused Adam/AdamW where there is one.

    A fused Adam updates all parameters in one kernel per step: on a CPU its step takes a
    third to a fifth of the time of the default per-tensor loop. It is used when every
    parameter (an iterable of tensors) is floating point on a CPU or CUDA device.
    """
    params = list(params)
    fusable = all(p.is_floating_point() and p.device.type in FUSED_ADAM_DEVICES for p in params)
    if optimizer_cls in (torch.optim.Adam, torch.optim.AdamW) and params and fusable:
        return optimizer_cls(params, fused=True, **kwargs)
    return optimizer_cls(params, **kwargs)


def sigmoid_ramp(epoch: float, ramp_epochs: float) -> float:
    """Sigmoid-shaped ramp from 0 to 1 over ``ramp_epochs`` (Laine & Aila, 2017).

    ``exp(-5 (1 - t)^2)`` with ``t = min(epoch / ramp_epochs, 1)``; 1 when ``ramp_epochs``
    is 0.
    """
    if ramp_epochs <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), ramp_epochs) / ramp_epochs
    return float(math.exp(-5.0 * phase * phase))


def validation_early_stopping(
    early_stopping: bool,
    patience: int,
    train_size: float,
    validation_size: float | None,
    trainer_kwargs: dict,
) -> bool:
    """Set up early stopping on ``validation_loss`` in ``trainer_kwargs`` when possible.

    Returns whether early stopping is on: it needs a validation set.
    """
    if not early_stopping or validation_size == 0 or train_size >= 1:
        return False
    trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
    trainer_kwargs.setdefault("early_stopping_patience", patience)
    trainer_kwargs.setdefault("early_stopping_mode", "min")
    return True


class BaseTrainingPlan(CountCheckedBatches, TrainingPlan):
    """A scvi :class:`~scvi.train.TrainingPlan` that fixes the pitfalls all our models share.

    - puts the module back in train mode at the start of every epoch (scvi leaves it in
      eval mode after ``train()``, ``load()`` or ``load_query_data()``);
    - accepts any optimizer of :data:`OPTIMIZERS` by name;
    - keeps, in memory, the weights of the epoch with the lowest ``validation_loss`` and
      restores them when training ends (``restore_best_weights``);
    - checks each minibatch's counts before it moves to the device (``count_locations``:
      :class:`CountCheckedBatches`);
    - logs epoch means of step metrics once per epoch (:meth:`log_step`): Lightning's
      ``self.log`` costs about 2 ms a call on a CPU, a tenth of a CELLULAR epoch when each
      step logged each metric.

    Its ``training_step`` and ``validation_step`` minimise and report ``module.loss``
    (:meth:`module_loss_step`): ``{stage}_loss`` and each of the loss's ``extra_metrics``.
    Plans whose loss takes values that change over training override
    :meth:`step_loss_kwargs`; plans that prepare inputs (pseudolabels, MixUp) override
    ``training_step`` and still call :meth:`module_loss_step`.

    Parameters
    ----------
    module
        The module to train.
    optimizer
        ``"Adam"``, ``"AdamW"``, ``"Adadelta"``, ``"SGD"`` or ``"Custom"`` (with
        ``optimizer_creator``).
    lr
        Learning rate.
    weight_decay
        Weight decay. Use 0 for query training: decay moves weights that
        ``load_query_data`` froze with gradient hooks.
    restore_best_weights
        Restore the weights of the best validation epoch at the end of training.
    count_locations
        The registry keys of the minibatches' counts and where they come from (``{"X":
        "adata.X"}``), named when a minibatch is not raw counts; ``None`` checks nothing.
        Set by the model's ``train`` (models that read counts).
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        restore_best_weights: bool = True,
        count_locations: dict[str, str] | None = None,
        **kwargs,
    ):
        if optimizer not in OPTIMIZERS and optimizer != "Custom":
            raise ValueError(
                f"optimizer '{optimizer}' is not supported; use one of "
                f"{sorted(OPTIMIZERS)} or 'Custom' with optimizer_creator."
            )
        creator = kwargs.pop("optimizer_creator", None)
        if optimizer != "Custom":
            creator = self._create_optimizer
        super().__init__(
            module,
            optimizer="Custom",
            optimizer_creator=creator,
            lr=lr,
            weight_decay=weight_decay,
            **kwargs,
        )
        self._optimizer_cls = OPTIMIZERS.get(optimizer)
        self.restore_best_weights = restore_best_weights
        self.count_locations = count_locations
        self.best_validation_loss = math.inf
        self.best_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._metric_sums: dict[
            str, dict[str, tuple[torch.Tensor | float, int | torch.Tensor]]
        ] = {}

    def _create_optimizer(self, params) -> torch.optim.Optimizer:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self._optimizer_cls in (torch.optim.Adam, torch.optim.AdamW):
            kwargs["eps"] = self.eps
        return create_optimizer(self._optimizer_cls, params, **kwargs)

    def step_loss_kwargs(self, stage: str) -> dict:
        """Keyword arguments of ``module.loss`` for a ``stage`` step (default: none)."""
        return {}

    def module_loss_step(
        self, stage: str, tensors: dict, loss_kwargs: dict | None = None
    ) -> LossOutput:
        """Run the module's forward and ``loss`` on ``tensors``, log its metrics, return it."""
        loss_kwargs = {**self.loss_kwargs, **self.step_loss_kwargs(stage), **(loss_kwargs or {})}
        _, _, output = self.module(tensors, loss_kwargs=loss_kwargs)
        metrics = {f"{stage}_loss": output.loss}
        for name, value in output.extra_metrics.items():
            metrics[f"{stage}_{name}"] = value
        self.log_step(stage, metrics, n_cells=output.n_obs_minibatch)
        return output

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step of ``module.loss``."""
        return self.module_loss_step("train", batch).loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """``module.loss`` on held-out cells, reported as ``validation_loss``."""
        self.module_loss_step("validation", batch)

    def on_train_epoch_start(self) -> None:
        """Train mode at every epoch (dropout on, BatchNorm statistics updated)."""
        self.module.train()

    def log_step(
        self, stage: str, metrics: dict[str, torch.Tensor | float], n_cells: int | torch.Tensor
    ) -> None:
        """Add one step's metrics, weighted by its ``n_cells``, to the epoch means of ``stage``.

        ``stage`` is ``"train"`` or ``"validation"``; the means are logged under the metric
        names when the epoch ends, with ``{stage}_loss`` on the progress bar (NaN for a
        metric whose cells summed to 0). ``n_cells`` may be a tensor (a count computed on
        the device), so that the step does not wait for the device. Under DDP every process
        must pass the same metric names, since their means are averaged over processes.
        """
        sums = self._metric_sums.setdefault(stage, {})
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + value * n_cells, count + n_cells)

    def _log_epoch_means(self, stage: str) -> dict[str, float]:
        """Log (and return) the epoch means of ``stage``: totals and cell counts summed over
        processes, then divided (ranks may hold different numbers of cells)."""
        sums = self._metric_sums.pop(stage, {})
        if self.trainer.sanity_checking:
            return {}
        means = {}
        for name, (total, count) in sums.items():  # cell-weighted over every process
            total, count = (
                self.trainer.strategy.reduce(
                    torch.as_tensor(value, dtype=torch.float32, device=self.device),
                    reduce_op="sum",
                )
                for value in (total, count)
            )
            mean = total / count if count > 0 else torch.full_like(total, math.nan)
            self.log(name, mean, on_step=False, on_epoch=True, prog_bar=name == f"{stage}_loss")
            means[name] = float(mean)
        return means

    def on_train_epoch_end(self) -> None:
        """Log the epoch means of the training metrics."""
        self._log_epoch_means("train")

    def on_validation_epoch_end(self) -> None:
        """Log the validation means and remember the weights of the best validation epoch."""
        value = self._log_epoch_means("validation").get("validation_loss")
        if value is None or not self.restore_best_weights:
            return
        if value < self.best_validation_loss:
            self.best_validation_loss = value
            self.best_epoch = self.current_epoch
            self._best_state = {
                key: tensor.detach().clone() for key, tensor in self.module.state_dict().items()
            }

    def on_train_end(self) -> None:
        """Restore the best validation epoch's weights."""
        if self.restore_best_weights and self._best_state is not None:
            self.module.load_state_dict(self._best_state)
            self._best_state = None


def warmup_cosine_factor(epoch: int, warmup_epochs: int, cosine_epochs: int) -> float:
    """Learning-rate factor ``0.5 (1 + cos(pi e / E)) * min(1, (e + 1) / W)``.

    The reference code's schedule (warm-up over ``W`` epochs, cosine over ``E``), except
    that the first epoch starts at ``1 / W`` of the learning rate instead of 0.
    """
    factor = 0.5 * (1.0 + math.cos(math.pi * min(epoch, cosine_epochs) / max(cosine_epochs, 1)))
    if warmup_epochs > 0:
        factor *= min(1.0, (epoch + 1) / warmup_epochs)
    return factor


class WarmupCosineTrainingPlan(BaseTrainingPlan):
    """:class:`BaseTrainingPlan` with a per-epoch warm-up + cosine learning-rate schedule.

    The defaults are the CELLULAR reference code's (Adam, learning rate 1e-3, weight decay
    5e-5, warm-up 4 epochs, cosine over the training's epochs), which its classifier
    shares.

    Parameters
    ----------
    module
        The module to train.
    weight_decay
        Weight decay (the optimizer and learning rate are :class:`BaseTrainingPlan`'s).
    warmup_epochs
        Epochs of linear warm-up.
    cosine_epochs
        Length of the cosine decay in epochs (default: the trainer's ``max_epochs``).
    **kwargs
        Passed to :class:`BaseTrainingPlan`.
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        weight_decay: float = 5e-5,
        warmup_epochs: int = 4,
        cosine_epochs: int | None = None,
        **kwargs,
    ):
        super().__init__(module, weight_decay=weight_decay, **kwargs)
        self.warmup_epochs = warmup_epochs
        self.cosine_epochs = cosine_epochs

    def configure_optimizers(self):
        """The plan's optimizer with the warm-up + cosine schedule, stepped every epoch."""
        config = super().configure_optimizers()
        optimizer = config["optimizer"]
        warmup, cosine = self.warmup_epochs, self.cosine_epochs or self.trainer.max_epochs
        scheduler = LambdaLR(optimizer, lambda epoch: warmup_cosine_factor(epoch, warmup, cosine))
        config["lr_scheduler"] = {"scheduler": scheduler, "interval": "epoch"}
        return config
