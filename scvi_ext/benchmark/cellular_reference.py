"""CELLULAR's reference code: its training epoch rewritten by us, and the package itself.

The published CELLULAR code computes its loss with Python loops: one iteration per cell
(boolean masks over the minibatch, per-type losses grown with ``torch.cat``), one per
pair of cell types for the centroid term (looked up in a pandas table), and it feeds
cells through a per-cell ``Dataset`` and a ``DataLoader``, with a validation pass each
epoch. This module is our own rewrite of that structure, for two uses:

- the tests check that the vectorised losses of :mod:`scvi_ext.cellular` give the same
  values as these loops (``looped_*`` functions);
- :func:`reference_style_throughput` times a training epoch of this structure, the
  side-by-side stand-in for the reference code in the throughput benchmark.

:func:`reference_package_throughput` times the published package itself (``CELLULAR-CL``
on PyPI, installed with ``--no-deps`` because it pins old versions of everything).

Tests and the benchmark import it the same way::

    from scvi_ext.benchmark.cellular_reference import looped_cellular_loss
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ._methods import MethodUnavailableError

#: The published reference package and the version the benchmark was written against.
REFERENCE_PACKAGE = "CELLULAR-CL==0.0.4"


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
    """Class-weighted batch-mixing loss (``1 / -log p`` within a type), one cell at a time."""
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
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)  # unfused, as the reference

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


def reference_package_throughput(
    x: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    n_epochs: int = 2,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Training cells per second of the published CELLULAR package's epochs.

    Runs ``CELLULAR_CL.train`` (latent space only, its defaults: 80/20 split, validation
    each epoch) and times its epoch loop, not its data preparation (HVGs, PCA).

    Parameters
    ----------
    x
        Log-normalised expression, cells x genes (all genes are used as its HVGs).
    labels, batches
        Cell type and batch of each cell.
    n_epochs, batch_size, seed
        Training settings passed to the package.

    Raises
    ------
    MethodUnavailableError
        When the package is not installed.
    RuntimeError
        When its training fails (it reports errors by printing them and stopping).

    Notes
    -----
    CELLULAR-CL 0.0.4 builds its loss for ``device="cuda"`` whatever the training device,
    so every step fails on a machine without CUDA; the loss is given the training device
    for the duration of the call (the only change).
    """
    try:
        import CELLULAR_CL
        from CELLULAR_CL.functions import train as package_training
    except ImportError as error:
        raise MethodUnavailableError(
            f"The CELLULAR reference package is not installed (pip install --no-deps "
            f"'{REFERENCE_PACKAGE}')."
        ) from error
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loss_init = package_training.CustomSNNLoss.__init__
    train_model = package_training.train_module.train_model
    timing: dict[str, float] = {}

    def loss_on_device(self, *args, **kwargs):
        kwargs.setdefault("device", device)
        loss_init(self, *args, **kwargs)

    def timed_train_model(self, *args, **kwargs):
        start = time.perf_counter()
        best_loss = train_model(self, *args, **kwargs)
        timing["seconds"] = time.perf_counter() - start
        loader = kwargs["train_loader"]
        timing["cells"] = len(loader) * loader.batch_size * kwargs["num_epochs"]
        timing["best_loss"] = best_loss
        return best_loss

    obs = pd.DataFrame({"cell_type": np.asarray(labels).astype(str)})
    obs["batch"] = np.asarray(batches).astype(str)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=np.asarray(x, dtype=np.float32), obs=obs)
    with (
        tempfile.TemporaryDirectory() as model_path,
        mock.patch.object(package_training.CustomSNNLoss, "__init__", loss_on_device),
        mock.patch.object(package_training.train_module, "train_model", timed_train_model),
        contextlib.redirect_stdout(io.StringIO()) as printed,
        contextlib.redirect_stderr(printed),
    ):
        CELLULAR_CL.train(
            adata,
            target_key="cell_type",
            batch_key="batch",
            HVGs=adata.n_vars,
            model_path=f"{model_path}/",
            device=device,
            seed=seed,
            batch_size=batch_size,
            epochs=n_epochs,
        )
    if not np.isfinite(timing.get("best_loss", np.inf)):
        raise RuntimeError(f"CELLULAR-CL training failed:\n{printed.getvalue()[-2000:]}")
    return timing["cells"] / timing["seconds"]
