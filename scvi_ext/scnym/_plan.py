"""scNym training: MixMatch semi-supervision and a domain adversary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS

from scvi_ext.base import LABELLED, UNLABELED, BaseTrainingPlan, OptimizerName, sigmoid_ramp

from ._module import ScNymModule


def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature sharpening ``p^(1/T) / sum p^(1/T)`` of pseudolabels."""
    powered = probabilities.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def drop_genes(counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Set each gene's count to zero with probability ``rate`` (augmentation)."""
    if rate <= 0:
        return counts
    keep = torch.rand_like(counts) >= rate
    return counts * keep


class ScNymTrainingPlan(BaseTrainingPlan):
    """MixMatch + domain-adversarial training plan (Kimmel & Kelley 2021).

    Each step takes a labelled (reference) and an unlabeled (query) minibatch:

    1. pseudolabels of the query from the current model in eval mode, without gradients,
       sharpened with temperature ``sharpen_temperature``;
    2. labelled counts augmented by random gene dropout (``gene_dropout_rate``);
    3. MixUp over the concatenated labelled + pseudolabelled batch with
       ``lambda ~ Beta(mixup_alpha, mixup_alpha)``, ``lambda = max(lambda, 1 - lambda)``
       so that each mixed cell stays dominated by (and keeps the batch of) its own cell;
    4. loss = soft cross-entropy on mixed labelled cells
       + ``unsup_weight(t)`` x MSE between predictions and mixed pseudolabels of query cells
       + domain cross-entropy of the adversary on the latent, reached through a
       gradient-reversal layer whose weight ramps to ``adversary_max_weight``.

    Parameters
    ----------
    module
        A :class:`ScNymModule`.
    optimizer, lr, weight_decay
        The paper's: Adadelta, learning rate 1.0, weight decay 1e-5 (the reference code's
        default weight decay is 1e-4).
    mixup_alpha
        Beta distribution parameter of MixUp (paper: 0.3).
    sharpen_temperature
        Pseudolabel sharpening temperature (paper: 0.5).
    unsup_max_weight
        Final weight of the unsupervised MSE (paper: 1.0).
    unsup_ramp_epochs
        Epochs of the sigmoid ramp of the unsupervised weight (reference code: 100).
    adversary_max_weight
        Final weight of the reversed adversary gradient (paper: 0.1).
    adversary_ramp_epochs
        Epochs of its sigmoid ramp (paper: 20).
    pseudolabel_min_confidence
        "New identity discovery" (paper: 0.9): query cells whose pseudolabel confidence
        is below this are left out of the unsupervised and adversarial terms. ``None``
        (default) uses every query cell.
    gene_dropout_rate
        Probability of zeroing a gene's count in labelled cells (augmentation).
    **kwargs
        Passed to :class:`~scvi_ext.base.BaseTrainingPlan`.
    """

    def __init__(
        self,
        module: ScNymModule,
        *,
        optimizer: OptimizerName = "Adadelta",
        lr: float = 1.0,
        weight_decay: float = 1e-5,
        mixup_alpha: float = 0.3,
        sharpen_temperature: float = 0.5,
        unsup_max_weight: float = 1.0,
        unsup_ramp_epochs: int = 100,
        adversary_max_weight: float = 0.1,
        adversary_ramp_epochs: int = 20,
        pseudolabel_min_confidence: float | None = None,
        gene_dropout_rate: float = 0.1,
        **kwargs,
    ):
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        if not 0 < sharpen_temperature <= 1:
            raise ValueError("sharpen_temperature must be in (0, 1].")
        if pseudolabel_min_confidence is not None and not 0 <= pseudolabel_min_confidence < 1:
            raise ValueError("pseudolabel_min_confidence must be in [0, 1) or None.")
        self.mixup_alpha = mixup_alpha
        self.sharpen_temperature = sharpen_temperature
        self.unsup_max_weight = unsup_max_weight
        self.unsup_ramp_epochs = unsup_ramp_epochs
        self.adversary_max_weight = adversary_max_weight
        self.adversary_ramp_epochs = adversary_ramp_epochs
        self.pseudolabel_min_confidence = pseudolabel_min_confidence
        self.gene_dropout_rate = gene_dropout_rate

    @property
    def unsup_weight(self) -> float:
        """Current weight of the unsupervised MixMatch term."""
        return self.unsup_max_weight * sigmoid_ramp(self.current_epoch, self.unsup_ramp_epochs)

    @property
    def adversary_weight(self) -> float:
        """Current weight of the reversed adversary gradient."""
        return self.adversary_max_weight * sigmoid_ramp(
            self.current_epoch, self.adversary_ramp_epochs
        )

    def _mixup_lambda(self) -> float:
        if self.mixup_alpha <= 0:
            return 1.0
        alpha = torch.tensor(float(self.mixup_alpha))
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        return max(lam, 1.0 - lam)

    @torch.no_grad()
    def _pseudolabels(self, x_normalized: torch.Tensor, batch_index: torch.Tensor):
        """Sharpened pseudolabels and confidence from the model in eval mode."""
        self.module.eval()
        logits, _ = self.module.classify_normalized(x_normalized, batch_index)
        self.module.train()
        probabilities = torch.softmax(logits, dim=1)
        confidence = probabilities.max(dim=1).values
        return sharpen(probabilities, self.sharpen_temperature), confidence

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One MixMatch + adversary step on a labelled and an unlabeled minibatch.

        The plan prepares what changes from step to step (gene dropout, pseudolabels,
        MixUp, the ramped weights); :meth:`ScNymModule.loss` computes the loss.
        """
        labelled_side, unlabeled_side = batch[LABELLED], batch[UNLABELED]
        sides = [side for side in (labelled_side, unlabeled_side) if side is not None]
        tensors = {
            key: torch.cat([side[key] for side in sides])
            for key in sides[0]
            if all(key in side for side in sides)
        }
        module = self.module
        n_labelled = 0 if labelled_side is None else len(labelled_side[REGISTRY_KEYS.X_KEY])
        counts, batch_index = tensors[REGISTRY_KEYS.X_KEY], tensors[REGISTRY_KEYS.BATCH_KEY]
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        augmented = module.normalize(drop_genes(counts[:n_labelled], self.gene_dropout_rate))
        query = module.normalize(counts[n_labelled:])
        pseudolabels, confidence = self._pseudolabels(query, batch_index[n_labelled:])
        one_hot = F.one_hot(labels[:n_labelled], module.n_labels).float()
        x = torch.cat([augmented, query])
        targets = torch.cat([one_hot, pseudolabels])
        cell_weights = None
        if self.pseudolabel_min_confidence is not None:
            keep = (confidence >= self.pseudolabel_min_confidence).float()
            cell_weights = torch.cat([torch.ones(n_labelled, device=x.device), keep])
        lam = self._mixup_lambda()
        partner = torch.randperm(len(x), device=x.device)
        loss_kwargs = {
            "mixed_input": lam * x + (1.0 - lam) * x[partner],
            "mixed_targets": lam * targets + (1.0 - lam) * targets[partner],
            "cell_weights": cell_weights,
            "unsup_weight": self.unsup_weight,
            "adversary_weight": self.adversary_weight,
        }
        output = self.module_loss_step("train", tensors, loss_kwargs)
        ramps = {
            "unsupervised_weight": self.unsup_weight,
            "adversary_weight": self.adversary_weight,
        }
        self.log_step("train", ramps, n_cells=len(labels))
        return output.loss
