"""Training throughput of CELLULAR: cells/s per epoch, side by side with its peers."""

from __future__ import annotations

import logging
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from scvi_ext.data import log_normalise

from ._cellular_tasks import QUIET
from ._methods import MethodUnavailableError, n_training_cells
from .cellular_reference import reference_package_throughput, reference_style_throughput

logger = logging.getLogger(__name__)


class _EpochTimer(Callback):
    """Seconds spent inside training epochs (validation included, trainer set-up not)."""

    def __init__(self):
        self.seconds = 0.0
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._start


def training_throughput(
    adata: ad.AnnData,
    labels_key: str = "cell_type",
    batch_key: str = "donor",
    n_epochs: int = 2,
    batch_size: int = 256,
    seed: int = 0,
) -> pd.DataFrame:
    """Cells/s per training epoch: CELLULAR vs an MLP and vs the reference code.

    All rows train the same encoder (2000 HVGs -> 1000 -> 500 -> 100) with Adam in one
    process (ours fused, as the models train: :func:`~scvi_ext.base.create_optimizer`).
    ``cellular_api`` is ``CELLULAR.train`` timed inside its epochs (scvi data loading and
    validation included, trainer set-up not); ``cellular_loss_loop`` and
    ``cross_entropy_mlp`` are plain torch loops over the same dense minibatches with the
    CELLULAR loss and with a linear head + cross-entropy; ``reference_style_epoch`` is one
    epoch run the way the reference code runs it (per-cell ``DataLoader``, the loss in
    Python loops, a validation pass: :func:`.cellular_reference.reference_style_throughput`);
    ``reference_package`` is the published package's own epochs (CELLULAR-CL, when
    installed: :func:`.cellular_reference.reference_package_throughput`).
    """
    import scvi
    from scvi import REGISTRY_KEYS

    from scvi_ext.base import create_optimizer
    from scvi_ext.cellular import CELLULARModule, FeedForwardEncoder, class_weights
    from scvi_ext.data import select_genes
    from scvi_ext.model import CELLULAR

    adata = select_genes(adata, method="cellular")
    labels = adata.obs[labels_key].astype("category").cat.codes.to_numpy()
    batches = adata.obs[batch_key].astype("category").cat.codes.to_numpy()
    n_labels, n_batches = int(labels.max()) + 1, int(batches.max()) + 1
    # CELLULAR's normalisation: scaled to the mean library size, then log1p
    mean_library_size = float(np.asarray(adata.X.sum(axis=1)).mean())
    x = torch.as_tensor(log_normalise(adata.X, mean_library_size).toarray(), dtype=torch.float32)
    y, b = torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(batches.astype(np.int64))
    rows = []

    def timed_loop(name: str, step) -> None:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x), generator=generator)
        chunks = order.split(batch_size)
        start = time.perf_counter()
        for _ in range(n_epochs):
            for chunk in chunks:
                step(chunk)
        seconds = time.perf_counter() - start
        rows.append({"method": name, "cells_per_second": len(x) * n_epochs / seconds})

    def new_module() -> CELLULARModule:
        """A module with the class weights and a stand-in for the one-off PCA distances."""
        torch.manual_seed(seed)
        module = CELLULARModule(x.shape[1], n_labels, n_batch=n_batches)
        module.label_weights.copy_(class_weights(labels, n_labels))
        module.batch_weights.copy_(class_weights(batches, n_batches))
        distances = torch.rand(n_labels, n_labels) + 0.1
        module.reference_distances.copy_((distances + distances.T).fill_diagonal_(0.0) / 2)
        return module

    module = new_module()
    optimizer = create_optimizer(torch.optim.Adam, module.parameters(), lr=1e-3)

    def cellular_step(chunk):
        z = module.encoder(x[chunk])
        tensors = {
            REGISTRY_KEYS.X_KEY: x[chunk],
            REGISTRY_KEYS.LABELS_KEY: y[chunk, None],
            REGISTRY_KEYS.BATCH_KEY: b[chunk, None],
        }
        loss = module.loss(tensors, {"z": z}, {}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    encoder = FeedForwardEncoder(x.shape[1], 100)
    head = torch.nn.Linear(100, n_labels)
    ce_parameters = [*encoder.parameters(), *head.parameters()]
    ce_optimizer = create_optimizer(torch.optim.Adam, ce_parameters, lr=1e-3)

    def cross_entropy_step(chunk):
        loss = F.cross_entropy(head(encoder(x[chunk])), y[chunk])
        ce_optimizer.zero_grad()
        loss.backward()
        ce_optimizer.step()

    timed_loop("cross_entropy_mlp", cross_entropy_step)
    timed_loop("cellular_loss_loop", cellular_step)
    reference_module = new_module()
    cells_per_second = reference_style_throughput(
        reference_module,
        x,
        y,
        b,
        reference_module.label_weights,
        reference_module.batch_weights,
        batch_size=batch_size,
        seed=seed,
    )
    rows.append({"method": "reference_style_epoch", "cells_per_second": cells_per_second})
    try:
        cells_per_second = reference_package_throughput(
            x.numpy(), labels, batches, n_epochs=n_epochs, batch_size=batch_size, seed=seed
        )
        rows.append({"method": "reference_package", "cells_per_second": cells_per_second})
    except MethodUnavailableError as error:
        logger.warning("Leaving out the reference_package row: %s", error)

    scvi.settings.seed = seed
    data = adata.copy()
    CELLULAR.setup_anndata(data, labels_key=labels_key, batch_key=batch_key)
    model = CELLULAR(data)
    model.fit_statistics()  # the one-off statistics (PCA) are computed outside the epochs
    timer, train_size = _EpochTimer(), 0.8
    model.train(
        max_epochs=n_epochs,
        train_size=train_size,
        early_stopping=False,
        callbacks=[timer],
        **QUIET,
    )
    n_trained = n_training_cells(model) * n_epochs
    rows.append({"method": "cellular_api", "cells_per_second": n_trained / timer.seconds})
    table = pd.DataFrame(rows).set_index("method")
    reference = table.loc["cross_entropy_mlp", "cells_per_second"]
    table["slowdown_vs_cross_entropy"] = reference / table["cells_per_second"]
    for row, column in (
        ("reference_style_epoch", "speedup_vs_reference_style"),
        ("reference_package", "speedup_vs_reference_package"),
    ):
        if row in table.index:
            table[column] = table["cells_per_second"] / table.loc[row, "cells_per_second"]
    return table
