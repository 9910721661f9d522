"""Statistics accumulated minibatch by minibatch (no model reads the whole matrix at once)."""

from __future__ import annotations

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.model.base import BaseModelClass

from ._module import CLASS_WEIGHT_POWERS
from ._splitter import labelled_mask


def class_sums(
    values: torch.Tensor, codes: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the rows of ``values`` and the number of rows of each class.

    Rows whose code is ``n_classes`` or more (e.g. the unlabeled category) are left out.
    Add the results over minibatches, then divide: :func:`class_means`.
    """
    codes = codes.long().ravel()
    keep = codes < n_classes
    values, codes = values[keep].double(), codes[keep]
    sums = torch.zeros(n_classes, values.shape[1], dtype=torch.float64, device=values.device)
    sums.index_add_(0, codes, values)
    counts = torch.bincount(codes, minlength=n_classes).double()
    return sums, counts


def class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Class means from :func:`class_sums` totals (zero for a class without rows)."""
    return sums / counts.clamp_min(1.0)[:, None]


def class_weights(codes: np.ndarray, n_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights ``N_i^-p / sum_j N_j^-p`` of the classes in ``codes``.

    ``power`` p = 1 weighs each class equally in total (the thesis' eq. 2.12), 0.5 by the
    inverse square root of its frequency. Codes of ``n_classes`` or more (e.g. the
    unlabeled category) are not counted; classes absent from ``codes`` get weight 0 (all
    classes, when no code is below ``n_classes``).
    """
    codes = np.asarray(codes, dtype=np.int64)
    counts = np.bincount(codes[codes < n_classes], minlength=n_classes)
    inverse = np.where(counts > 0, np.maximum(counts, 1) ** -float(power), 0.0)
    total = inverse.sum()
    return torch.as_tensor(inverse / total if total > 0 else inverse, dtype=torch.float32)


def labelled_class_weights(
    adata_manager: AnnDataManager, registry_key: str, n_classes: int, power: float = 1.0
) -> torch.Tensor:
    """:func:`class_weights` of the registered codes ``registry_key`` (labels or batches)
    of the labelled cells."""
    codes = adata_manager.get_from_registry(registry_key).ravel()
    return class_weights(codes[labelled_mask(adata_manager)], n_classes, power)


def fit_label_weights(model: BaseModelClass) -> None:
    """Refit a :class:`~scvi_ext.base.CrossEntropyModule`'s ``label_weights`` from the
    model's labelled cells when it balances classes (a model's ``fit_statistics``)."""
    module = model.module
    if module.balance_classes:
        weights = labelled_class_weights(
            model.adata_manager,
            REGISTRY_KEYS.LABELS_KEY,
            module.n_labels,
            CLASS_WEIGHT_POWERS[module.balance_classes],
        )
        module.label_weights.copy_(weights.to(module.label_weights))
