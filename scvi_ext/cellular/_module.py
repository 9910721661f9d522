"""CELLULAR network: a feed-forward (or token/attention) encoder into a cell embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch import nn

from scvi_ext.base import NonGenerativeModule

from ._losses import batch_mixing_loss, cell_type_loss, centroid_loss, cosine_logits
from ._transformer import TransformerEncoder

#: Bounds of the learnable temperature of the cell type loss (reference code).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 1.0


class FeedForwardEncoder(nn.Module):
    """Model 1 encoder: LayerNorm, then Linear -> LayerNorm -> ReLU -> Dropout per hidden layer.

    Parameters
    ----------
    n_input
        Input features.
    n_latent
        Embedding size.
    n_hidden
        Widths of the hidden layers (thesis: half and a quarter of 2000 HVGs).
    dropout_rate
        Dropout after each hidden layer.
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int,
        n_hidden: tuple[int, ...] = (1000, 500),
        dropout_rate: float = 0.2,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(n_input)]
        width = n_input
        for n_out in n_hidden:
            layers += [
                nn.Linear(width, n_out),
                nn.LayerNorm(n_out),
                nn.ReLU(),
                nn.Dropout(dropout_rate),
            ]
            width = n_out
        layers.append(nn.Linear(width, n_latent))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed normalised expression."""
        return self.layers(x)


class CELLULARModule(NonGenerativeModule):
    """CELLULAR (thesis Model 1-3): an encoder trained with contrastive and centroid losses.

    Counts are normalised inside the module: each cell is scaled to ``library_size`` (the
    mean library size of the reference, a buffer set before training) and log1p'd (thesis
    2.2.1). :meth:`loss` is ``cell_type_weight`` x soft nearest-neighbour loss on cell
    types + ``batch_weight`` x batch-mixing loss + ``centroid_weight`` x centroid MSE; a
    weight of 0 switches its term off. Fitted statistics are buffers: ``library_size``,
    ``reference_distances``, ``centroids`` (saved) and the class weights ``label_weights``
    / ``batch_weights`` (refitted at every training).

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of cell types (the unlabeled category excluded).
    n_batch
        Number of batches of the batch-mixing loss (1: no batch-mixing loss).
    n_latent
        Embedding size (thesis: 100).
    n_hidden
        Hidden widths of the feed-forward encoder.
    dropout_rate
        Dropout of the encoder.
    cell_type_weight, batch_weight, centroid_weight
        Loss weights (thesis: 0.9, 0.1, 1.0).
    initial_temperature
        Start value of the learnable cell type temperature, clamped to [0.1, 1].
    batch_temperature
        Fixed temperature of the batch-mixing loss (reference code: 0.5).
    encoder
        Optional encoder module replacing the feed-forward one (e.g. the
        :class:`~scvi_ext.cellular._transformer.TransformerEncoder` of Models 2 and 3); it
        maps normalised expression to ``n_latent`` dimensions.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_batch: int = 1,
        n_latent: int = 100,
        n_hidden: tuple[int, ...] = (1000, 500),
        dropout_rate: float = 0.2,
        cell_type_weight: float = 0.9,
        batch_weight: float = 0.1,
        centroid_weight: float = 1.0,
        initial_temperature: float = 0.25,
        batch_temperature: float = 0.5,
        encoder: nn.Module | None = None,
    ):
        super().__init__()
        self.n_labels = n_labels
        self.n_batch = n_batch
        self.n_latent = n_latent
        self.cell_type_weight = cell_type_weight
        self.batch_weight = batch_weight
        self.centroid_weight = centroid_weight
        self.batch_temperature = batch_temperature
        if encoder is None:
            encoder = FeedForwardEncoder(n_input, n_latent, n_hidden, dropout_rate)
        self.encoder = encoder
        self.temperature = nn.Parameter(torch.tensor(float(initial_temperature)))
        self.register_buffer("library_size", torch.tensor(0.0))
        self.register_buffer("reference_distances", torch.zeros(n_labels, n_labels))
        self.register_buffer("centroids", torch.zeros(n_labels, n_latent))
        # Fitted on the training data at every train() (not saved): class weights.
        self.register_buffer("label_weights", torch.zeros(n_labels), persistent=False)
        self.register_buffer("batch_weights", torch.zeros(n_batch), persistent=False)

    # ------------------------------------------------------------------ embedding
    def normalize(self, counts: torch.Tensor) -> torch.Tensor:
        """``log1p(counts / total * library_size)`` of each cell (``library_size`` is set by
        :meth:`CELLULAR.fit_statistics`; checking it here would make every step wait for the
        device)."""
        total = counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
        return torch.log1p(counts / total * self.library_size)

    def embed(self, counts: torch.Tensor) -> torch.Tensor:
        """Embedding of raw counts."""
        return self.encoder(self.normalize(counts))

    @auto_move_data
    def inference(self, x: torch.Tensor) -> dict:
        """Embedding of count data."""
        return {"z": self.embed(x)}

    def latent(self, tensors: dict) -> torch.Tensor:
        """Embedding of a minibatch."""
        return self.inference(**self._get_inference_input(tensors))["z"]

    @property
    def token_names(self) -> dict[str, list[str]]:
        """Token names of each branch of a transformer encoder (empty otherwise)."""
        return getattr(self.encoder, "token_names", {})

    @property
    def n_heads(self) -> int:
        """Attention heads of the transformer encoder (0 otherwise)."""
        return getattr(self.encoder, "n_heads", 0)

    @auto_move_data
    def token_attentions(self, tensors: dict, branch: str) -> list[torch.Tensor]:
        """Per-layer attention weights (cells, heads, tokens, tokens) of a transformer branch."""
        if not isinstance(self.encoder, TransformerEncoder):
            raise ValueError(
                "Attention weights need a transformer encoder: CELLULAR(encoder='transformer', "
                "gene_embeddings=..., gene_sets=...)."
            )
        return self.encoder.attentions(self.normalize(tensors[REGISTRY_KEYS.X_KEY]), branch)

    def predict_logits(self, tensors: dict) -> torch.Tensor:
        """Nearest-centroid logits: cosine similarity to each type's centroid / temperature."""
        z = self.latent(tensors)
        normalized = F.normalize(z, dim=1, eps=1e-8)
        centroids = F.normalize(self.centroids, dim=1, eps=1e-8)
        return normalized @ centroids.T / self.current_temperature()

    # ------------------------------------------------------------------ losses
    def current_temperature(self) -> torch.Tensor:
        """The learnable temperature within its bounds."""
        return self.temperature.clamp(MIN_TEMPERATURE, MAX_TEMPERATURE)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp the temperature parameter in place (the reference code does this each step)."""
        self.temperature.clamp_(MIN_TEMPERATURE, MAX_TEMPERATURE)

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict) -> LossOutput:
        """``cell_type_weight`` x cell type loss + ``batch_weight`` x batch-mixing loss
        + ``centroid_weight`` x centroid loss, on the labelled cells of a minibatch.

        Cells whose label code is ``n_labels`` or more (the unlabeled category) are left
        out (masked, so that the step never waits for the device). The class and batch
        weights are the module's buffers ``label_weights`` and ``batch_weights``, set by
        :meth:`CELLULAR.fit_statistics`. The three terms go out as ``extra_metrics``.
        """
        z = inference_outputs["z"]
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        labelled = labels < self.n_labels
        zero = z.sum() * 0.0
        terms = {"cell_type_loss": zero, "batch_loss": zero, "centroid_loss": zero}
        if self.cell_type_weight:
            terms["cell_type_loss"] = cell_type_loss(
                z, labels, self.label_weights, self.current_temperature(), include=labelled
            )
        if self.batch_weight and self.n_batch > 1:
            batches = tensors[REGISTRY_KEYS.BATCH_KEY].long().ravel()
            terms["batch_loss"] = batch_mixing_loss(
                z, labels, batches, self.batch_weights, self.batch_temperature, include=labelled
            )
        if self.centroid_weight:
            terms["centroid_loss"] = centroid_loss(
                z, labels, self.reference_distances, include=labelled
            )
        loss = (
            self.cell_type_weight * terms["cell_type_loss"]
            + self.batch_weight * terms["batch_loss"]
            + self.centroid_weight * terms["centroid_loss"]
        )
        return LossOutput(loss=loss, n_obs_minibatch=len(labels), extra_metrics=terms)

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarity logits between cells at the current temperature."""
        return cosine_logits(z, self.current_temperature())
