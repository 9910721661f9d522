"""CGRAN's attention: local attention (eq. 6-7) by gene group, its dense form, full attention.

Tensors are laid out ``(cells, heads, tokens, head_dim)``; token 0 is the cell, token
``1 + j`` is gene ``j``. Local attention multiplies the softmax weights by the group mask
``F`` (the cell row and column are ones; genes see the genes of their own group) and
L2-normalises each row. The softmax denominator cancels in that normalisation, so a row
is ``exp(s - max) * F / ||exp(s - max) * F||_2``: a gene row needs only its group and the
cell token, and :func:`grouped_local_attention` computes it group by group without the
``(g + 1) x (g + 1)`` matrix. :func:`dense_local_attention` is the paper's literal form.

In the first block the tokens are ``c + G_j`` and queries, keys and values are affine in
them, so a score splits into a part shared by every cell and a part per cell and key:
:func:`affine_local_attention` computes that block's local attention with products of
the shared part, never forming a cells x genes x group tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PaddedGroups(NamedTuple):
    """Genes by group, padded to the largest group.

    Attributes
    ----------
    index
        (groups, largest group) gene indices; padding repeats gene 0.
    valid
        (groups, largest group) False on padding.
    position
        (genes,) position of each gene in ``index.ravel()``.
    padding
        Whether any group is padded (read on the host: no wait for the device in a step).
    """

    index: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor
    padding: bool

    def to(self, device: torch.device) -> PaddedGroups:
        """The same groups on ``device``."""
        return PaddedGroups(
            self.index.to(device), self.valid.to(device), self.position.to(device), self.padding
        )


def padded_groups(gene_group: torch.Tensor) -> PaddedGroups:
    """Pad the genes of each non-empty group of ``gene_group`` (one code per gene).

    Reads sizes on the host: build it once per grouping (the module does, when the groups
    are set or loaded), not in a training step.
    """
    order = torch.argsort(gene_group, stable=True)
    _, sizes = torch.unique_consecutive(gene_group[order], return_counts=True)
    n_groups, largest = len(sizes), int(sizes.max())
    group = torch.repeat_interleave(torch.arange(n_groups, device=sizes.device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(len(order), device=sizes.device) - starts[group]
    flat = group * largest + rank
    index = torch.zeros(n_groups * largest, dtype=torch.long, device=sizes.device)
    valid = torch.zeros(n_groups * largest, dtype=torch.bool, device=sizes.device)
    index[flat], valid[flat] = order, True
    position = torch.empty_like(order)
    position[order] = flat
    padding = bool(len(order) < n_groups * largest)
    return PaddedGroups(
        index.view(n_groups, largest), valid.view(n_groups, largest), position, padding
    )


def local_mask(gene_group: torch.Tensor) -> torch.Tensor:
    """The paper's (g + 1) x (g + 1) attention mask ``F`` (eq. 6), as booleans."""
    same_group = gene_group[:, None] == gene_group[None, :]
    mask = F.pad(same_group, (1, 0, 1, 0), value=True)
    return mask


class _L2NormalisedSoftmax(torch.autograd.Function):
    """``softmax(s) / ||softmax(s)||_2`` (= ``exp(s) / ||exp(s)||_2``) with a fused backward.

    Only the output is saved (the attention product saves it too), and the backward
    ``y * (g - y * <g, y>)`` needs one more score-sized tensor: about half the memory of
    autograd through softmax, norm and division.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(scores, dim=-1)
        weights.div_(torch.linalg.vector_norm(weights, dim=-1, keepdim=True))
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (weights,) = ctx.saved_tensors
        dot = grad.unsqueeze(-2) @ weights.unsqueeze(-1)  # (..., 1, 1), no score-sized copy
        return (weights * dot.squeeze(-1)).neg_().add_(grad).mul_(weights)


def _l2_normalised_exp(scores: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(scores) * keep`` with each row divided by its L2 norm (eq. 7 without ``F``'s
    zeros: the softmax denominator cancels in the normalisation)."""
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return _L2NormalisedSoftmax.apply(scores)


def cell_row_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and weights of the cell token only: (cells, heads, 1, dim), (cells, heads, tokens).

    The cell row of the local mask is all ones, so local attention is the L2-normalised
    ``exp`` of the whole row; ``local=False`` is the softmax.
    """
    scores = (q[:, :, :1] * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    weights = _l2_normalised_exp(scores) if local else torch.softmax(scores, dim=-1)
    return weights @ v, weights[:, :, 0]


def grouped_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: PaddedGroups
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention (eq. 6-7) group by group, vectorised over groups.

    Memory and time grow with ``genes x largest group``, not ``genes ** 2``.

    Returns
    -------
    The outputs (cells, heads, tokens, dim) and the cell row's weights (cells, heads, tokens).
    """
    n_cells, n_heads, _, dim = q.shape
    n_groups, largest = groups.index.shape
    cell_output, cell_weights = cell_row_attention(q, k, v, local=True)

    def by_group(tokens: torch.Tensor) -> torch.Tensor:  # (cells, heads, groups, largest, dim)
        genes = tokens[:, :, 1:].index_select(2, groups.index.ravel())
        return genes.view(n_cells, n_heads, n_groups, largest, dim)

    def with_cell(tokens: torch.Tensor) -> torch.Tensor:  # the cell token first in each group
        cell = tokens[:, :, :1, None].expand(-1, -1, n_groups, -1, -1)
        return torch.cat([cell, by_group(tokens)], dim=3)

    keep = None  # padding keys are masked out; uniform groups dividing g have none
    if groups.padding:
        keep = F.pad(groups.valid, (1, 0), value=True)[:, None, :]  # (groups, 1, 1 + largest)
    weights = _l2_normalised_exp(by_group(q * dim**-0.5) @ with_cell(k).transpose(-1, -2), keep)
    gene_output = (weights @ with_cell(v)).view(n_cells, n_heads, n_groups * largest, dim)
    gene_output = gene_output.index_select(2, groups.position)
    return torch.cat([cell_output, gene_output], dim=2), cell_weights


def affine_local_attention(
    cell: torch.Tensor, gene: torch.Tensor, groups: PaddedGroups
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention (eq. 6-7) of the tokens ``[c, c + G_1, ..., c + G_g]`` from the affine
    parts of their queries, keys and values.

    ``cell`` holds each cell token's query, key and value (bias included) and ``gene`` each
    gene vector's offset ``W G_j``, so that token ``j`` has ``q = cell_q + gene_q[j]`` (the
    cell token: ``cell_q``). Relative to its score with the cell key, which the row
    normalisation cancels, gene row ``i`` scores key gene ``j`` by ``C[i, j] + t[j]``:
    ``C = gene_q gene_k^T / sqrt(dim)`` is shared by all cells and ``t = cell_q gene_k^T /
    sqrt(dim)`` is per cell and key, not per row. The weights ``exp(C[i, j]) exp(t[j])``
    are then products of a shared (group x group) matrix with per-cell columns: the row
    norms and the attended values are matrix products over the group's keys for all
    cells at once, and memory grows with ``cells x genes x dim``, not ``x group``.

    Computed in float64 (autocast off), each part shifted by its own maximum: a row's
    shift is then the sum of the two maxima, an upper bound of its largest score, and the
    row is exact while that bound exceeds its largest score by less than about 350
    (beyond, the squared terms underflow; in float32 it would be about 40). In trained
    models it is within a unit (0.5 at most on pbmc68k_reduced).

    Parameters
    ----------
    cell
        (3, cells, heads, dim): queries, keys and values of the cell tokens.
    gene
        (3, heads, genes, dim): the genes' offsets to them.
    groups
        The gene groups.

    Returns
    -------
    The outputs (cells, heads, 1 + genes, dim) and the cell row's weights
    (cells, heads, 1 + genes), as :func:`grouped_local_attention`.
    """
    cell_q, cell_k, cell_v = cell.unbind(0)
    gene_q, gene_k, gene_v = gene.unbind(0)
    n_cells, n_heads, dim = cell_q.shape
    n_groups, largest = groups.index.shape
    scale = dim**-0.5
    key_scores = torch.einsum("bhd,hgd->hgb", cell_q * scale, gene_k)  # t: (heads, genes, cells)

    # the cell row: relative scores [0, t]
    cell_weights = _l2_normalised_exp(F.pad(key_scores.permute(2, 0, 1), (1, 0)))
    cell_output = cell_weights.sum(-1, keepdim=True) * cell_v
    cell_output = cell_output + torch.einsum("bhg,hgd->bhd", cell_weights[..., 1:], gene_v)

    def by_group(tokens: torch.Tensor) -> torch.Tensor:  # (heads, genes, ...) -> (h, G, L, ...)
        grouped = tokens.index_select(1, groups.index.ravel())
        return grouped.view(n_heads, n_groups, largest, *tokens.shape[2:])

    with torch.autocast(cell.device.type, enabled=False):
        wide = torch.float64
        shared = (by_group(gene_q).to(wide) * scale) @ by_group(gene_k).to(wide).mT  # C
        per_cell = by_group(key_scores).to(wide)  # (heads, G, L keys, cells)
        if groups.padding:
            shared = shared.masked_fill(~groups.valid[None, :, None, :], float("-inf"))
            per_cell = per_cell.masked_fill(~groups.valid[None, :, :, None], float("-inf"))
        shared_max = shared.detach().amax(-1, keepdim=True)  # (h, G, L rows, 1)
        per_cell_max = per_cell.detach().amax(2, keepdim=True)  # (h, G, 1, cells)
        shared_exp = torch.exp(shared - shared_max)
        per_cell_exp = torch.exp(per_cell - per_cell_max)
        # each row is shifted by max(row bound, 0): no term exceeds 1
        row_bound = shared_max + per_cell_max  # (h, G, L rows, cells)
        shift = row_bound.clamp_min(0)
        gene_factor, cell_factor = torch.exp(row_bound - shift), torch.exp(-shift)
        weight_sum = shared_exp @ per_cell_exp  # sum over the group's keys
        squared_sum = shared_exp.square() @ per_cell_exp.square()
        norm = torch.sqrt(cell_factor.square() + gene_factor.square() * squared_sum)
        values = per_cell_exp[..., None] * by_group(gene_v).to(wide)[:, :, :, None]
        attended = (shared_exp @ values.flatten(3)).view(*values.shape)  # (h, G, L, cells, d)
        on_cell = ((cell_factor + gene_factor * weight_sum) / norm).to(cell.dtype)
        gene_output = ((gene_factor / norm)[..., None] * attended).to(cell.dtype)
    gene_output = gene_output + on_cell[..., None] * cell_v.permute(1, 0, 2)[:, None, None]
    gene_output = gene_output.view(n_heads, n_groups * largest, n_cells, dim)
    gene_output = gene_output.index_select(1, groups.position).permute(2, 0, 1, 3)
    return torch.cat([cell_output[:, :, None], gene_output], dim=2), cell_weights


def dense_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention as eq. 7 writes it: softmax, times the mask ``F``, row L2 norm.

    Forms the (tokens x tokens) matrix: kept for tests and the scaling study.
    """
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
    weights = F.normalize(weights * mask, dim=-1)
    return weights @ v, weights[:, :, 0]


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordinary softmax attention over all tokens (the paper's "fully attention").

    Uses PyTorch's fused ``scaled_dot_product_attention``; the cell row's weights are
    computed on their own.
    """
    _, cell_weights = cell_row_attention(q, k, v, local=False)
    return F.scaled_dot_product_attention(q, k, v), cell_weights
