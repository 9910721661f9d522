"""CAN network: batched capsule extractors, capsule self-attention, convolution, classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import auto_move_data
from torch import nn

from scvi_ext.base import ClassBalance, CrossEntropyModule, log_scaled_counts

#: CAN models log1p(counts / total * 1e5) (paper A.2).
COUNTS_PER_CELL = 1e5
L2_EPS = 1e-8


class CapsuleExtractors(nn.Module):
    """``n_capsules`` fully connected extractors as one batched layer (paper eq. 1).

    Capsule ``n`` of a cell is ``L2Norm(ReLU(W_n x + b_n))``; the weights of every capsule
    are one tensor of shape ``(n_capsules, n_input, capsule_dim)``, applied with one
    ``einsum`` (initialised like :class:`torch.nn.Linear`).
    """

    def __init__(self, n_input: int, n_capsules: int, capsule_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(n_input)
        self.weight = nn.Parameter(
            torch.empty(n_capsules, n_input, capsule_dim).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(n_capsules, capsule_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cells x genes -> cells x capsules x capsule_dim, each capsule of unit norm."""
        capsules = torch.einsum("bg,ugd->bud", x, self.weight) + self.bias
        return F.normalize(F.relu(capsules), dim=-1, eps=L2_EPS)


class CANModule(CrossEntropyModule):
    """Capsule attention network (paper 4.1, 5.3).

    ``x`` (counts) is normalised inside the module to ``log1p(counts / total * 1e5)``.
    Capsules (batched extractors) -> single-head self-attention among the capsules
    (queries, keys and values of size ``attention_dim``) -> L2 normalisation -> a
    convolution over the capsules x ``attention_dim`` map (one input channel,
    ``conv_channels`` output channels, ``kernel_size``) -> ReLU -> the classifier (a
    linear layer, named ``classifier``: the only layer query mapping trains). Dropout
    ``dropout_rate`` follows every layer but the classifier. The latent is the attended
    capsule representation, flattened (``n_capsules * attention_dim``).

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of cell types.
    n_capsules
        Capsules per cell (paper: 16).
    capsule_dim
        Size of each capsule (paper: 128).
    attention_dim
        Size of the attention's queries, keys and values (paper: 16).
    conv_channels
        Output channels of the convolution (paper: 8).
    kernel_size
        Convolution kernel size (paper: 5); at most ``n_capsules`` and ``attention_dim``.
    dropout_rate
        Dropout after each layer (paper: 0.2).
    balance_classes
        Weight each cell's cross-entropy by the inverse frequency of its type (``True``)
        or its square root (``"sqrt"``) (:class:`~scvi_ext.base.CrossEntropyModule`; not in the paper).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_capsules: int = 16,
        capsule_dim: int = 128,
        attention_dim: int = 16,
        conv_channels: int = 8,
        kernel_size: int = 5,
        dropout_rate: float = 0.2,
        balance_classes: ClassBalance = False,
    ):
        super().__init__(n_labels, balance_classes)
        self.attention_dim = attention_dim
        self.capsules = CapsuleExtractors(n_input, n_capsules, capsule_dim)
        self.attention = nn.Linear(capsule_dim, 3 * attention_dim)  # queries, keys, values
        self.conv = nn.Conv2d(1, conv_channels, kernel_size)
        self.dropout = nn.Dropout(dropout_rate)
        conv_size = (n_capsules - kernel_size + 1) * (attention_dim - kernel_size + 1)
        self.classifier = nn.Linear(conv_channels * conv_size, n_labels)

    @staticmethod
    def normalize(counts: torch.Tensor) -> torch.Tensor:
        """log1p(counts / total * 1e5) of each cell (paper A.2)."""
        return log_scaled_counts(counts, COUNTS_PER_CELL)

    def attend(self, x_normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attended capsules (cells x capsules x attention_dim, L2-normalised) and the
        attention weights (cells x capsules x capsules; each row sums to 1)."""
        capsules = self.dropout(self.capsules(x_normalized))
        queries, keys, values = self.attention(capsules).chunk(3, dim=-1)
        scores = queries @ keys.transpose(1, 2) / math.sqrt(self.attention_dim)
        weights = torch.softmax(scores, dim=-1)
        attended = F.normalize(weights @ values, dim=-1, eps=L2_EPS)
        return attended, weights

    def classify_normalized(
        self, x_normalized: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and latent (flattened attended capsules) of normalised expression.

        ``batch_index`` is accepted for :func:`scvi_ext.interpret.saliency` and unused.
        """
        attended, _ = self.attend(x_normalized)
        features = self.dropout(attended)
        convolved = self.dropout(F.relu(self.conv(features.unsqueeze(1))))
        return self.classifier(convolved.flatten(1)), attended.flatten(1)

    @auto_move_data
    def inference(self, x: torch.Tensor) -> dict:
        """Logits and latent of count data."""
        logits, z = self.classify_normalized(self.normalize(x))
        return {"logits": logits, "z": z}

    def latent(self, tensors: dict) -> torch.Tensor:
        """Attended capsule representation of a minibatch, flattened."""
        return self.inference(**self._get_inference_input(tensors))["z"]

    @auto_move_data
    def capsule_attention(self, tensors: dict) -> torch.Tensor:
        """Capsule-to-capsule attention weights of a minibatch (cells x capsules x capsules)."""
        return self.attend(self.normalize(tensors[REGISTRY_KEYS.X_KEY]))[1]
