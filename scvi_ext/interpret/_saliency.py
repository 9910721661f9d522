"""Gradient saliency: which genes drive a classifier's decision for each cell type."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from scvi_ext.base import DifferentiableClassifierModule
from scvi_ext.data._validation import check_positive_ints


def _attributions(
    module,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    target: int,
    baselines: torch.Tensor,
    n_steps: int,
    generator: torch.Generator,
    method: str,
) -> torch.Tensor:
    """Integrated or expected gradients of ``target``'s log-probability, per cell and gene.

    ``generator`` is a CPU generator (the same draws on every device); its draws are moved
    to ``x``'s device.
    """
    total = torch.zeros_like(x)
    for step in range(n_steps):
        if method == "integrated":
            alpha = torch.full((len(x), 1), (step + 0.5) / n_steps, device=x.device)
            baseline = baselines[:1].expand_as(x)
        else:
            alpha = torch.rand((len(x), 1), generator=generator).to(x.device)
            picks = torch.randint(len(baselines), (len(x),), generator=generator)
            baseline = baselines[picks.to(baselines.device)]
        point = (baseline + alpha * (x - baseline)).requires_grad_(True)
        logits, _ = module.classify_normalized(point, batch_index)
        log_prob = torch.log_softmax(logits, dim=1)[:, target].sum()
        (gradient,) = torch.autograd.grad(log_prob, point)
        total += gradient * (x - baseline)
    return total / n_steps


def saliency(
    model,
    adata: AnnData | None = None,
    cell_types: Sequence[str] | None = None,
    method: Literal["integrated", "expected"] = "integrated",
    n_steps: int = 32,
    n_cells: int = 200,
    n_top: int = 50,
    by: Literal["prediction", "label"] = "prediction",
    seed: int = 0,
) -> pd.DataFrame:
    """Rank genes by their gradient attribution to each cell type.

    For each cell type, up to ``n_cells`` cells predicted as (or labelled, ``by="label"``)
    that type are attributed with integrated gradients (zero-expression baseline) or
    expected gradients (baselines drawn from the data, Erion et al. 2021) of the type's
    log-probability with respect to the model's normalised input; genes are ranked by the
    mean attribution. Integrated gradients (the default) rank a type's own markers first;
    expected gradients also credit the absence of other types' markers, since the baseline
    cells express them.

    Parameters
    ----------
    model
        A trained classifier whose module satisfies
        :class:`~scvi_ext.base.DifferentiableClassifierModule` (e.g.
        :class:`~scvi_ext.model.ScNym`).
    adata
        Cells to explain (default: the model's AnnData).
    cell_types
        Cell types to explain (default: all).
    method
        ``"integrated"`` or ``"expected"`` gradients.
    n_steps
        Interpolation points (integrated) or baseline samples (expected) per cell.
    n_cells
        Cells per type to average over.
    n_top
        Genes kept per type.
    by
        Select a type's cells by the model's prediction or by their label.
    seed
        Seed of cell and baseline sampling.

    Returns
    -------
    Long table with columns ``cell_type``, ``rank`` (1 = most salient), ``gene`` (the
    model's genes, matched to ``adata``'s by name), ``score``. A cell type without cells
    (predicted or labelled as it) is left out, with a warning.

    Raises
    ------
    ValueError
        When no cell of ``adata`` is predicted as (or labelled, ``by="label"``) any of
        ``cell_types``.
    """
    if method not in ("integrated", "expected"):
        raise ValueError(f"method must be 'integrated' or 'expected', not '{method}'.")
    if by not in ("prediction", "label"):
        raise ValueError(f"by must be 'prediction' or 'label', not '{by}'.")
    check_positive_ints(n_steps=n_steps, n_cells=n_cells, n_top=n_top)
    names = list(model.label_names)
    cell_types = names if cell_types is None else list(cell_types)
    unknown = sorted(set(cell_types) - set(names))
    if unknown:
        raise ValueError(f"Unknown cell types {unknown}; the model knows {names}.")

    module = model.module
    if not isinstance(module, DifferentiableClassifierModule):
        raise ValueError(
            f"saliency needs a classifier whose module satisfies "
            f"scvi_ext.base.DifferentiableClassifierModule (normalize, classify_normalized), "
            f"e.g. ScNym; {type(model).__name__} does not."
        )
    if not model.is_trained:
        raise RuntimeError(
            f"This {type(model).__name__} is not trained; call model.train() first."
        )
    with model.registered_anndata(adata) as registered:
        return _saliency_table(
            model, registered, names, cell_types, method, n_steps, n_cells, n_top, by, seed
        )


def _saliency_table(
    model, registered, names, cell_types, method, n_steps, n_cells, n_top, by, seed
) -> pd.DataFrame:
    if by == "prediction":
        groups = model.predict(registered)
    else:
        manager = model.get_anndata_manager(registered, required=True)
        codes = manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY).ravel()
        mapping = np.asarray(
            manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        )
        groups = mapping[codes]
    selected = "labelled" if by == "label" else "predicted as"
    missing = [cell_type for cell_type in cell_types if not (groups == cell_type).any()]
    if len(missing) == len(cell_types):
        raise ValueError(
            f"No cell of adata is {selected} any of {cell_types}: nothing to explain. "
            + (
                "Pass cells with these labels, or by='prediction'."
                if by == "label"
                else "Pass cells the model predicts as these types, or by='label'."
            )
        )
    if missing:
        warnings.warn(
            f"No cell is {selected} {missing}; saliency leaves them out.",
            UserWarning,
            stacklevel=3,
        )

    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    module = model.module
    was_training = module.training
    module.eval()
    try:
        device = next(module.parameters()).device

        def load(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            tensors = next(model.iter_minibatches(registered, indices, batch_size=len(indices)))
            x = module.normalize(tensors[REGISTRY_KEYS.X_KEY].to(device))
            return x, tensors[REGISTRY_KEYS.BATCH_KEY].to(device)

        baseline_idx = rng.choice(registered.n_obs, size=min(registered.n_obs, 500), replace=False)
        baselines, _ = load(np.sort(baseline_idx))
        if method == "integrated":
            baselines = torch.zeros_like(baselines[:1])
        genes = np.asarray(registered.var_names)
        tables = []
        for cell_type in cell_types:
            members = np.flatnonzero(groups == cell_type)
            if len(members) == 0:
                continue
            chosen = np.sort(rng.choice(members, size=min(n_cells, len(members)), replace=False))
            x, batch_index = load(chosen)
            scores = _attributions(
                module,
                x,
                batch_index,
                names.index(cell_type),
                baselines,
                n_steps,
                generator,
                method,
            ).mean(dim=0)
            order = torch.argsort(scores, descending=True)[:n_top].cpu().numpy()
            tables.append(
                pd.DataFrame(
                    {
                        "cell_type": cell_type,
                        "rank": np.arange(1, len(order) + 1),
                        "gene": genes[order],
                        "score": scores.detach().cpu().numpy()[order],
                    }
                )
            )
    finally:
        module.train(was_training)
    return pd.concat(tables, ignore_index=True)
