"""AnnData helpers shared by the models: registration checks and safe copies."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager

logger = logging.getLogger(__name__)


def label_names(adata_manager: AnnDataManager) -> np.ndarray:
    """Cell type names in code order, without the unlabeled category.

    The unlabeled category, when registered, has the last code (scvi moves it there), so
    column ``k`` of a soft prediction is ``label_names(...)[k]``, as in scANVI.
    """
    state = adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
    mapping = np.asarray(state.categorical_mapping)
    unlabeled = state.get("unlabeled_category", None)
    return mapping[mapping != unlabeled] if unlabeled is not None else mapping


def registry_label_names(registry: dict) -> tuple[list[str], str | None]:
    """Label names and unlabeled category from a saved registry dictionary."""
    state = registry["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"]
    unlabeled = state.get("unlabeled_category")
    names = [name for name in state["categorical_mapping"] if name != unlabeled]
    return names, unlabeled


def detached_anndata(
    adata: AnnData,
    setup_args: dict,
    known_labels: list[str] | None = None,
) -> AnnData:
    """A light AnnData that shares the count matrix of ``adata`` but owns its ``obs``.

    scvi registration writes ``_scvi_*`` columns and ``uns`` entries into the AnnData it is
    given; working on this object keeps the user's AnnData untouched. Labels absent from
    ``known_labels`` (cell types the reference never saw) and a missing labels column
    become the unlabeled category.

    Parameters
    ----------
    adata
        The user's AnnData.
    setup_args
        The model's ``setup_anndata`` arguments (``layer``, ``labels_key``, ...).
    known_labels
        Cell types of the reference.
    """
    layer = setup_args.get("layer")
    if layer is not None and layer not in adata.layers:
        raise ValueError(
            f"layer '{layer}' is not in adata.layers (available: {list(adata.layers)}); "
            "the model was set up with counts in this layer."
        )
    matrix = adata.X if layer is None else adata.layers[layer]
    obs_keys = [
        value
        for key, value in setup_args.items()
        if key.endswith("_key") and isinstance(value, str) and value in adata.obs
    ]
    obs = adata.obs[obs_keys].copy()
    labels_key = setup_args.get("labels_key")
    unlabeled = setup_args.get("unlabeled_category")
    if labels_key is not None:
        if labels_key not in obs:
            obs[labels_key] = unlabeled
        elif known_labels is not None and unlabeled is not None:
            labels = obs[labels_key].astype(str)
            unseen = ~labels.isin(list(known_labels) + [unlabeled])
            if unseen.any():
                names = sorted(labels[unseen].unique())
                warnings.warn(
                    f"adata.obs['{labels_key}'] has cell types the reference model never saw "
                    f"({names}); they are treated as '{unlabeled}' (unlabeled).",
                    UserWarning,
                    stacklevel=3,
                )
                labels[unseen] = unlabeled
            obs[labels_key] = pd.Categorical(labels)
    var = pd.DataFrame(index=adata.var_names.copy())
    if layer is None:
        return AnnData(X=matrix, obs=obs, var=var)
    return AnnData(X=None, obs=obs, var=var, layers={layer: matrix})
