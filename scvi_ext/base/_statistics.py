"""Statistics accumulated minibatch by minibatch (no model reads the whole matrix at once)."""

from __future__ import annotations

import torch


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
