"""scNym network: an MLP classifier with a domain adversary on its penultimate layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from scvi.nn import FCLayers
from torch import nn

from scvi_ext.base import NonGenerativeModule, log_scaled_counts
from scvi_ext.nn import grad_reverse

#: ``obs`` field of the domains the adversary tells apart (registered with ``domain_key``).
DOMAIN_KEY = "domain"
#: scNym models log1p(counts per million).
COUNTS_PER_CELL = 1e6
BATCHNORM_MOMENTUM = 0.1


class ScNymModule(NonGenerativeModule):
    """Classifier ``f(x)`` (Kimmel & Kelley 2021) and domain adversary ``g(z)``.

    ``x`` is normalised inside the module to log1p(counts per million). Hidden layers are
    Linear -> BatchNorm -> ReLU -> Dropout with separate weights; the last hidden layer is
    the latent ``z``. When batches are registered, their one-hot code is appended to the
    input of the first layer only, so scArches query mapping can learn new batch columns.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of cell types.
    n_batch
        Number of batches (1: no batch covariate).
    n_domains
        Number of domains the adversary tells apart (reference vs query by default).
    n_hidden
        Units per hidden layer (paper: 256).
    n_layers
        Number of hidden layers (paper and reference code: 2).
    dropout_rate
        Dropout after each hidden layer.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_batch: int = 1,
        n_domains: int = 2,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        self.n_labels = n_labels
        self.n_domains = n_domains
        self.encoder = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_cat_list=[n_batch],
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=True,
            use_layer_norm=False,
            inject_covariates=False,
        )
        # scvi's FCLayers use BatchNorm momentum 0.01, tuned for long VAE training; with
        # scNym's few steps per epoch the running statistics would lag far behind the
        # weights, so use PyTorch's default (0.1), as the reference implementation does.
        for layer in self.encoder.modules():
            if isinstance(layer, nn.BatchNorm1d):
                layer.momentum = BATCHNORM_MOMENTUM
        self.classifier = nn.Linear(n_hidden, n_labels)
        self.domain_adversary = nn.Sequential(
            nn.Linear(n_hidden, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_domains),
        )

    @staticmethod
    def normalize(counts: torch.Tensor) -> torch.Tensor:
        """log1p(counts per million) of each cell."""
        return log_scaled_counts(counts, COUNTS_PER_CELL)

    def classify_normalized(
        self, x_normalized: torch.Tensor, batch_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and latent of already normalised expression."""
        z = self.encoder(x_normalized, batch_index)
        return self.classifier(z), z

    def domain_logits(self, z: torch.Tensor, reversal_weight: float) -> torch.Tensor:
        """Adversary logits; the gradient reaching ``z`` is reversed and scaled."""
        return self.domain_adversary(grad_reverse(z, reversal_weight))

    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "batch_index": tensors[REGISTRY_KEYS.BATCH_KEY]}

    @auto_move_data
    def inference(self, x: torch.Tensor, batch_index: torch.Tensor) -> dict:
        """Logits and latent of count data."""
        logits, z = self.classify_normalized(self.normalize(x), batch_index)
        return {"logits": logits, "z": z}

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        mixed_input: torch.Tensor | None = None,
        mixed_targets: torch.Tensor | None = None,
        cell_weights: torch.Tensor | None = None,
        unsup_weight: float = 0.0,
        adversary_weight: float = 0.0,
    ) -> LossOutput:
        """The scNym loss: supervised + ``unsup_weight`` x MixMatch consistency + adversary.

        Cells whose label code is ``n_labels`` (the unlabeled category) are the query.

        - supervised: cross-entropy of labelled cells, against ``mixed_targets`` on the
          logits of ``mixed_input`` when given (MixUp, the training plan), else against
          their labels on the logits of ``inference_outputs``;
        - unsupervised (with ``mixed_input``): mean squared error between the predicted
          probabilities of query cells and their mixed pseudolabels, weighted by
          ``cell_weights`` (0 leaves a cell out: "new identity discovery");
        - adversarial (``adversary_weight > 0``): the domain adversary's cross-entropy on
          the latent of the clean input; its gradient reaches the encoder reversed and
          scaled by ``adversary_weight``. Domains are the registered ``domain`` codes, else
          labelled (0) vs query (1).

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            scvi's forward outputs of a minibatch (labelled and query cells together).
        mixed_input
            MixUp of the normalised expression of the minibatch (cells in the same order).
        mixed_targets
            The matching mixed one-hot labels / sharpened pseudolabels.
        cell_weights
            Per-cell weight of the unsupervised and adversarial terms (default: 1).
        unsup_weight
            Weight of the unsupervised term (ramped by the plan).
        adversary_weight
            Scale of the reversed adversary gradient (ramped by the plan); 0: no adversary.
        """
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        labelled = labels < self.n_labels
        n_labelled = labelled.sum().clamp_min(1)
        ones = torch.ones(len(labels), device=labels.device)
        cell_weights = ones if cell_weights is None else cell_weights
        if mixed_input is None:
            logits = inference_outputs["logits"]
            per_cell = F.cross_entropy(
                logits, labels.clamp(max=self.n_labels - 1), reduction="none"
            )
            unsupervised = logits.sum() * 0.0
            correct = (logits.argmax(dim=1) == labels) & labelled
            metrics = {"accuracy": correct.sum() / n_labelled}
        else:
            logits, _ = self.classify_normalized(mixed_input, tensors[REGISTRY_KEYS.BATCH_KEY])
            per_cell = -(mixed_targets * F.log_softmax(logits, dim=1)).sum(dim=1)
            query = (~labelled).float()
            squared_error = (torch.softmax(logits, dim=1) - mixed_targets).pow(2).mean(dim=1)
            unsupervised = (squared_error * query * cell_weights).sum() / query.sum().clamp_min(1)
            metrics = {}
        supervised = (per_cell * labelled).sum() / n_labelled
        adversarial = logits.sum() * 0.0
        if adversary_weight > 0:
            domains = tensors.get(DOMAIN_KEY)
            domains = (~labelled).long() if domains is None else domains.long().ravel()
            domain_logits = self.domain_logits(inference_outputs["z"], adversary_weight)
            domain_loss = F.cross_entropy(domain_logits, domains, reduction="none")
            adversarial = (domain_loss * cell_weights).mean()
        loss = supervised + unsup_weight * unsupervised + adversarial
        return LossOutput(
            loss=loss,
            n_obs_minibatch=len(labels),
            extra_metrics={
                "supervised_loss": supervised,
                "unsupervised_loss": unsupervised,
                "adversarial_loss": adversarial,
                **metrics,
            },
        )

    def predict_logits(self, tensors: dict) -> torch.Tensor:
        """Class logits of a minibatch of count data."""
        return self.inference(**self._get_inference_input(tensors))["logits"]

    def latent(self, tensors: dict) -> torch.Tensor:
        """Penultimate-layer embedding of a minibatch."""
        return self.inference(**self._get_inference_input(tensors))["z"]
