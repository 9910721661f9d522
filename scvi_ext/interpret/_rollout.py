"""Attention rollout: how much each input token feeds a transformer's class token."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from anndata import AnnData

from scvi_ext.base import TokenAttentionModule

#: Bytes of attention weights one rollout minibatch may hold per layer (float32).
_ROLLOUT_BYTES_PER_LAYER = 2**28


def rollout(attentions: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """Attention rollout of the class token (Abnar & Zuidema 2020; TOSICA; thesis 2.3.5).

    Per layer, the attention weights are averaged over heads, the identity is added (the
    residual connection) and rows are renormalised to sum to 1; the layers are then
    multiplied, later layers on the left (``R = A_L ... A_2 A_1``), and the class token's
    row (token 0) is returned without the class token's own column.

    Parameters
    ----------
    attentions
        Per-layer attention weights, each of shape (..., heads, tokens, tokens), first
        layer first; token 0 is the class token.
    normalize
        Rescale the returned rows to sum to 1 over the input tokens, so that each is a
        distribution (the class token's share of its own row is dropped). ``False`` keeps
        the raw row of ``R``, as TOSICA does.

    Returns
    -------
    Tensor of shape (..., tokens - 1).
    """
    if len(attentions) == 0:
        raise ValueError("rollout needs the attention weights of at least one layer.")
    joint = None
    for layer in attentions:
        if layer.ndim < 3 or layer.shape[-1] != layer.shape[-2]:
            raise ValueError(
                "Attention weights must have shape (..., heads, tokens, tokens), "
                f"not {tuple(layer.shape)}."
            )
        mixed = layer.mean(dim=-3)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        if joint is not None and joint.shape != mixed.shape:
            raise ValueError("All layers' attention weights must have the same shape.")
        joint = mixed if joint is None else mixed @ joint
    row = joint[..., 0, 1:]
    if normalize:
        row = row / row.sum(dim=-1, keepdim=True)
    return row


def attention_rollout(
    model,
    adata: AnnData | None = None,
    indices: Sequence[int] | None = None,
    batch_size: int | None = None,
    tokens: str | None = None,
    normalize: bool = True,
) -> pd.DataFrame:
    """Per-cell attention rollout of a transformer model's class token over its input tokens.

    Parameters
    ----------
    model
        A trained model whose module satisfies :class:`~scvi_ext.base.TokenAttentionModule`
        with at least one token branch, e.g. ``CELLULAR(encoder="transformer")``.
    adata
        Cells to explain, counts laid out as at setup (default: the model's AnnData).
    indices
        Cells of ``adata`` to use (default: all).
    batch_size
        Minibatch size (default: as many cells as keep the attention weights of a layer
        under about 256 MB).
    tokens
        ``"genes"`` or ``"gene_sets"``: which token branch to explain. Needed only when the
        model has both (thesis Model 3).
    normalize
        Rows sum to 1 over the input tokens (see :func:`rollout`).

    Returns
    -------
    DataFrame, cells x tokens (gene names or gene set names); each row is a distribution.
    """
    module = model.module
    token_names = module.token_names if isinstance(module, TokenAttentionModule) else {}
    if not token_names:
        raise ValueError(
            "attention_rollout needs a model with a transformer encoder, e.g. "
            "CELLULAR(encoder='transformer', gene_embeddings=..., gene_sets=...)."
        )
    branches = list(token_names)
    if tokens is None:
        if len(branches) > 1:
            raise ValueError(f"This model has {branches} tokens; choose one with tokens=... .")
        tokens = branches[0]
    elif tokens not in branches:
        raise ValueError(f"tokens must be one of {branches}, not '{tokens}'.")
    names = token_names[tokens]
    if batch_size is None:
        per_cell = 4 * module.n_heads * (len(names) + 1) ** 2
        batch_size = int(min(128, max(1, _ROLLOUT_BYTES_PER_LAYER // per_cell)))

    def cell_rollout(tensors: dict) -> torch.Tensor:
        return rollout(module.token_attentions(tensors, tokens), normalize=normalize)

    values = model.map_minibatches(cell_rollout, adata, indices, batch_size)
    return pd.DataFrame(values, index=model.cell_names(adata, indices), columns=names)
