"""Feed-forward classifier head on a fixed cell representation (thesis 2.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import auto_move_data
from torch import nn

from scvi_ext.base import ClassBalance, CrossEntropyModule

#: Training cells kept (a seeded subsample) for the nearest-neighbour novelty score.
N_REFERENCE_CELLS = 2000


class LatentClassifierModule(CrossEntropyModule):
    """BatchNorm on the input, two hidden layers (Linear -> BatchNorm -> ReLU -> Dropout), logits.

    Softmax is applied once, inside the cross-entropy (the reference code applied a
    softmax before ``CrossEntropyLoss``, i.e. twice).

    Parameters
    ----------
    n_input
        Size of the representation.
    n_labels
        Number of cell types.
    n_hidden1, n_hidden2
        Widths of the hidden layers (reference code: 512, 512).
    dropout_rate
        Dropout after each hidden layer (reference code: 0.2).
    balance_classes
        Weight each cell's cross-entropy by the inverse frequency of its type (``True``)
        or its square root (``"sqrt"``) (:class:`~scvi_ext.base.CrossEntropyModule`; the reference code's loss is plain).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_hidden1: int = 512,
        n_hidden2: int = 512,
        dropout_rate: float = 0.2,
        balance_classes: ClassBalance = False,
    ):
        super().__init__(n_labels, balance_classes)
        self.network = nn.Sequential(
            nn.BatchNorm1d(n_input),
            nn.Linear(n_input, n_hidden1),
            nn.BatchNorm1d(n_hidden1),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(n_hidden1, n_hidden2),
            nn.BatchNorm1d(n_hidden2),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(n_hidden2, n_labels),
        )
        self.register_buffer("centroids", torch.zeros(n_labels, n_input))
        self.register_buffer("reference_cells", torch.zeros(N_REFERENCE_CELLS, n_input))
        self.register_buffer("n_reference_cells", torch.zeros((), dtype=torch.long))

    @auto_move_data
    def inference(self, x: torch.Tensor) -> dict:
        """Logits of a representation."""
        return {"logits": self.network(x.float())}

    def latent(self, tensors: dict) -> torch.Tensor:
        """The representation the classifier reads (e.g. the upstream embedding)."""
        return tensors[REGISTRY_KEYS.X_KEY].float()

    @auto_move_data
    def centroid_distance(self, tensors: dict) -> torch.Tensor:
        """Cosine distance ``1 - max_k cos(x, centroid_k)`` to the nearest training centroid."""
        x = F.normalize(tensors[REGISTRY_KEYS.X_KEY].float(), dim=1, eps=1e-8)
        centroids = F.normalize(self.centroids, dim=1, eps=1e-8)
        return 1.0 - (x @ centroids.T).max(dim=1).values

    @auto_move_data
    def neighbour_distance(self, tensors: dict, k: int = 10) -> torch.Tensor:
        """Cosine distance to the ``k``-th nearest kept training cell (Sun et al., ICML 2022)."""
        x = F.normalize(tensors[REGISTRY_KEYS.X_KEY].float(), dim=1, eps=1e-8)
        reference = F.normalize(
            self.reference_cells[: int(self.n_reference_cells)], dim=1, eps=1e-8
        )
        if len(reference) == 0:
            raise RuntimeError("No training cells are stored; train the classifier first.")
        k = min(k, len(reference))
        similarity = (x @ reference.T).topk(k, dim=1).values[:, -1]
        return 1.0 - similarity
