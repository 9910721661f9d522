"""CELLULAR's loss and training epoch written the way the reference code runs them.

The published CELLULAR code computes its loss with Python loops: one iteration per cell
(boolean masks over the minibatch, per-type losses grown with ``torch.cat``), one per
pair of cell types for the centroid term (looked up in a pandas table), and it feeds
cells through a per-cell ``Dataset`` and a ``DataLoader``, with a validation pass each
epoch. This module is our own rewrite of that structure, for two uses:

- the tests check that the vectorised losses of :mod:`scvi_ext.cellular` give the same
  values as these loops (``looped_*`` functions);
- :func:`reference_style_throughput` times a training epoch of this structure, the
  side-by-side stand-in for the reference code in the throughput benchmark.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


def _similarities(z: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    return torch.exp(F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=2) / temperature)


def _weighted_mean_of_groups(per_group: dict[int, torch.Tensor], weights) -> torch.Tensor:
    terms = [values.mean() * weights[group] for group, values in per_group.items() if len(values)]
    return torch.stack(terms).sum()


def looped_cell_type_loss(
    z: torch.Tensor, labels: torch.Tensor, weights, temperature: torch.Tensor | float
) -> torch.Tensor:
    """Class-weighted soft nearest-neighbour loss, one cell at a time."""
    sim = _similarities(z, temperature)
    per_type = {int(t): z.new_zeros(0) for t in labels.unique()}
    for i in range(len(z)):
        same = labels == labels[i]
        if same.sum() >= 2 and (~same).sum() >= 1:
            positive = sim[i][same].sum() - sim[i, i]
            loss = -torch.log(positive / (positive + sim[i][~same].sum()))
            key = int(labels[i])
            per_type[key] = torch.cat((per_type[key], loss.unsqueeze(0)))
    return _weighted_mean_of_groups(per_type, weights)


def looped_batch_mixing_loss(
    z: torch.Tensor, labels: torch.Tensor, batches: torch.Tensor, weights, temperature: float
) -> torch.Tensor:
    """Class-weighted batch-mixing loss (``1 / -log p`` among cells of a type), one cell at a time."""
    sim = _similarities(z, temperature)
    per_batch = {int(b): z.new_zeros(0) for b in batches.unique()}
    for i in range(len(z)):
        same_type = labels == labels[i]
        positive_mask = same_type & (batches == batches[i])
        negative_mask = same_type & (batches != batches[i])
        if positive_mask.sum() >= 2 and negative_mask.sum() >= 1:
            positive = sim[i][positive_mask].sum() - sim[i, i]
            ratio = positive / (positive + sim[i][negative_mask].sum())
            key = int(batches[i])
            per_batch[key] = torch.cat((per_batch[key], (-torch.log(ratio)).pow(-1).unsqueeze(0)))
    return _weighted_mean_of_groups(per_batch, weights)


def looped_centroid_loss(
    z: torch.Tensor, labels: torch.Tensor, reference: pd.DataFrame
) -> torch.Tensor:
    """Centroid-distance MSE, one pair of cell types at a time.

    ``reference`` is the reference distance matrix as a table indexed by type codes.
    """
    types = sorted(int(t) for t in labels.unique())
    centroids = {t: z[labels == t].mean(dim=0) for t in types}
    model = torch.zeros(len(types), len(types), dtype=z.dtype)
    for i, a in enumerate(types):
        for j, b in enumerate(types):
            model[i, j] = torch.norm(centroids[b] - centroids[a], p=2)
    known = torch.as_tensor(reference.loc[types, types].to_numpy(), dtype=z.dtype)
    keep = known != 0
    model = model * keep
    model = model / model.max()
    return F.mse_loss(model[keep], known[keep] / known[keep].max())


def looped_cellular_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    batches: torch.Tensor,
    label_weights,
    batch_weights,
    reference: pd.DataFrame,
    temperature: torch.Tensor | float,
    batch_temperature: float = 0.5,
) -> torch.Tensor:
    """``0.9 x cell type + 0.1 x batch mixing + centroid`` with the loops above."""
    return (
        0.9 * looped_cell_type_loss(z, labels, label_weights, temperature)
        + 0.1 * looped_batch_mixing_loss(z, labels, batches, batch_weights, batch_temperature)
        + looped_centroid_loss(z, labels, reference)
    )


class _CellByCell(Dataset):
    """Serves one cell at a time (expression, label, [batch]), as the reference's Dataset."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, batches: torch.Tensor):
        self.x, self.labels, self.batches = x, labels, batches

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.labels[index], [self.batches[index]]


def reference_style_throughput(
    module,
    x: torch.Tensor,
    labels: torch.Tensor,
    batches: torch.Tensor,
    label_weights,
    batch_weights,
    train_size: float = 0.8,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Training cells per second of one reference-style epoch (validation pass included).

    Parameters
    ----------
    module
        A ``CELLULARModule`` whose encoder, temperature and ``reference_distances`` are used
        (its weights are updated).
    x
        Normalised expression, cells x genes.
    labels, batches
        Cell type and batch codes.
    label_weights, batch_weights
        Class weights of the two loss terms.
    train_size
        Fraction of cells trained on; the rest are the validation pass.
    batch_size
        Minibatch size (the reference's default: 256, last incomplete batch dropped).
    seed
        Seed of the split and the shuffling.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_train = int(round(train_size * len(x)))
    train, validation = order[:n_train], order[n_train:]

    def loader(cells: torch.Tensor, shuffle: bool) -> DataLoader:
        data = _CellByCell(x[cells], labels[cells], batches[cells])
        return DataLoader(
            data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=generator
        )

    n_labels = module.reference_distances.shape[0]
    reference = pd.DataFrame(
        module.reference_distances.numpy(), index=range(n_labels), columns=range(n_labels)
    )
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def loss_of(x_batch, y_batch, b_batch):
        module.clamp_temperature()
        z = module.encoder(x_batch)
        return looped_cellular_loss(
            z, y_batch, b_batch[0], label_weights, batch_weights, reference, module.temperature
        )

    start = time.perf_counter()
    module.train()
    n_trained = 0
    for x_batch, y_batch, b_batch in loader(train, shuffle=True):
        loss = loss_of(x_batch, y_batch, b_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n_trained += len(x_batch)
    module.eval()
    with torch.no_grad():
        for batch in loader(validation, shuffle=False):
            loss_of(*batch).item()
    return n_trained / (time.perf_counter() - start)
