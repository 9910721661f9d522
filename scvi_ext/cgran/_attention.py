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
the shared part, never forming a cells x genes x group tensor, and
:func:`affine_full_attention` its full attention, never forming a cells x tokens x tokens
one.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F


class GeneGroups(NamedTuple):
    """Genes by group; groups of the same size are stacked and computed together.

    Attributes
    ----------
    buckets
        One (groups, size) tensor of gene indices per group size, largest size first.
        Uniform groups make one or two buckets; k-means groups of unequal sizes make one
        bucket each, and no group is padded to the largest.
    position
        (genes,) position of each gene in the buckets' rows, concatenated.
    """

    buckets: tuple[torch.Tensor, ...]
    position: torch.Tensor

    def to(self, device: torch.device) -> GeneGroups:
        """The same groups on ``device``."""
        buckets = tuple(bucket.to(device) for bucket in self.buckets)
        return GeneGroups(buckets, self.position.to(device))


def gene_groups(gene_group: torch.Tensor) -> GeneGroups:
    """The non-empty groups of ``gene_group`` (one code per gene), by size.

    Reads sizes on the host: build it once per grouping (the module does, when the groups
    are set or loaded), not in a training step.
    """
    order = torch.argsort(gene_group, stable=True)
    _, sizes = torch.unique_consecutive(gene_group[order], return_counts=True)
    by_size: dict[int, list[torch.Tensor]] = {}
    for genes in torch.split(order, sizes.tolist()):
        by_size.setdefault(len(genes), []).append(genes)
    buckets = tuple(torch.stack(by_size[size]) for size in sorted(by_size, reverse=True))
    listed = torch.cat([bucket.ravel() for bucket in buckets])
    position = torch.empty_like(listed)
    position[listed] = torch.arange(len(listed), device=listed.device)
    return GeneGroups(buckets, position)


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


def _l2_normalised_exp(scores: torch.Tensor) -> torch.Tensor:
    """``exp(scores)`` with each row divided by its L2 norm (eq. 7 on the unmasked keys:
    the softmax denominator cancels in the normalisation)."""
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


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device`` (nothing to disable where it has none, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _by_group(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gene tokens (cells, heads, 1 + genes, dim) of a bucket (groups, size) of groups:
    (cells, heads, groups, size, dim)."""
    genes = tokens[:, :, 1:].index_select(2, index.ravel())
    return genes.view(*tokens.shape[:2], *index.shape, tokens.shape[-1])


def _with_cell(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """:func:`_by_group` with the cell token first in each group: (..., 1 + size, dim)."""
    cell = tokens[:, :, :1, None].expand(-1, -1, len(index), -1, -1)
    return torch.cat([cell, _by_group(tokens, index)], dim=3)


def grouped_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: GeneGroups
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention (eq. 6-7) group by group, vectorised over groups of the same size.

    Memory and time grow with the sum of squared group sizes, not ``genes ** 2``.

    Returns
    -------
    The outputs (cells, heads, tokens, dim) and the cell row's weights (cells, heads, tokens).
    """
    cell_output, cell_weights = cell_row_attention(q, k, v, local=True)
    q = q * q.shape[-1] ** -0.5
    gene_outputs = []
    for index in groups.buckets:
        weights = _l2_normalised_exp(_by_group(q, index) @ _with_cell(k, index).mT)
        gene_outputs.append((weights @ _with_cell(v, index)).flatten(2, 3))
    gene_output = torch.cat(gene_outputs, dim=2).index_select(2, groups.position)
    return torch.cat([cell_output, gene_output], dim=2), cell_weights


def affine_local_attention(
    cell: torch.Tensor, gene: torch.Tensor, groups: GeneGroups
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
    scale = cell_q.shape[-1] ** -0.5
    key_scores = torch.einsum("bhd,hgd->hgb", cell_q * scale, gene_k)  # t: (heads, genes, cells)

    # the cell row: relative scores [0, t]
    cell_weights = _l2_normalised_exp(F.pad(key_scores.permute(2, 0, 1), (1, 0)))
    cell_output = cell_weights.sum(-1, keepdim=True) * cell_v
    cell_output = cell_output + torch.einsum("bhg,hgd->bhd", cell_weights[..., 1:], gene_v)

    with _autocast_off(cell.device):
        gene_q, gene_k, gene_v = (part.double() for part in (gene_q * scale, gene_k, gene_v))
        key_scores = key_scores.double()
        gene_outputs, on_cell = [], []
        for index in groups.buckets:
            on_cell_bucket, gene_bucket = _affine_group_rows(
                gene_q[:, index], gene_k[:, index], gene_v[:, index], key_scores[:, index]
            )
            on_cell.append(on_cell_bucket.flatten(1, 2))
            gene_outputs.append(gene_bucket.flatten(1, 2))
    on_cell = torch.cat(on_cell, dim=1).to(cell.dtype)  # (heads, genes, cells)
    gene_output = torch.cat(gene_outputs, dim=1).to(cell.dtype)  # (heads, genes, cells, dim)
    gene_output = gene_output + on_cell[..., None] * cell_v.permute(1, 0, 2)[:, None]
    gene_output = gene_output.index_select(1, groups.position).permute(2, 0, 1, 3)
    return torch.cat([cell_output[:, :, None], gene_output], dim=2), cell_weights


def _affine_group_rows(
    gene_q: torch.Tensor, gene_k: torch.Tensor, gene_v: torch.Tensor, key_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gene rows of :func:`affine_local_attention` for a bucket of equal-size groups.

    ``gene_q`` (scaled), ``gene_k``, ``gene_v``: (heads, groups, size, dim); ``key_scores``
    ``t``: (heads, groups, size, cells). Returns each row's weight on the cell token's value
    (heads, groups, size, cells) and its attended gene values (..., cells, dim).
    """
    shared = gene_q @ gene_k.mT  # C: (heads, groups, size rows, size keys)
    shared_max = shared.detach().amax(-1, keepdim=True)  # (h, G, rows, 1)
    per_cell_max = key_scores.detach().amax(2, keepdim=True)  # (h, G, 1, cells)
    shared_exp = torch.exp(shared - shared_max)
    per_cell_exp = torch.exp(key_scores - per_cell_max)
    # each row is shifted by max(row bound, 0): no term exceeds 1
    row_bound = shared_max + per_cell_max  # (h, G, rows, cells)
    shift = row_bound.clamp_min(0)
    gene_factor, cell_factor = torch.exp(row_bound - shift), torch.exp(-shift)
    weight_sum = shared_exp @ per_cell_exp  # sum over the group's keys
    squared_sum = shared_exp.square() @ per_cell_exp.square()
    norm = torch.sqrt(cell_factor.square() + gene_factor.square() * squared_sum)
    values = per_cell_exp[..., None] * gene_v[:, :, :, None]  # (h, G, keys, cells, dim)
    attended = (shared_exp @ values.flatten(3)).view(*values.shape)
    on_cell = (cell_factor + gene_factor * weight_sum) / norm
    return on_cell, (gene_factor / norm)[..., None] * attended


def affine_full_attention(
    cell: torch.Tensor, gene: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (softmax) attention of the tokens ``[c, c + G_1, ..., c + G_g]`` from the affine
    parts of their queries, keys and values (the arguments of :func:`affine_local_attention`).

    Relative to its score with the cell key, which the softmax cancels, row ``i`` scores key
    ``j`` by ``C[i, j] + t[j]`` (the cell token's offsets are zero), so its softmax is
    ``exp(C[i, j]) exp(t[j]) / sum``: one shared (1 + g) x (1 + g) matrix of ``exp(C)``
    per head, multiplied by per-cell columns, and no cells x tokens x tokens tensor. Rows
    sum to one, so each output is the cell's value plus the weighted gene offsets. Float64,
    autocast off, each part shifted by its own maximum: exact while a row's bound exceeds
    its largest score by less than about 700. The shared matrices take
    ``heads x (1 + g) ** 2`` float64 numbers (80 MB for 10 heads and 1000 genes; 2 GB at
    5000; forward and backward peak at about three times that): use
    ``full_implementation="fused"`` of ``CGRANModule`` where that is too much.

    Returns
    -------
    The outputs (cells, heads, 1 + genes, dim) and the cell row's softmax weights
    (cells, heads, 1 + genes).
    """
    cell_q, cell_k, cell_v = cell.unbind(0)
    gene_q, gene_k, gene_v = F.pad(gene, (0, 0, 1, 0)).unbind(0)  # token 0 adds nothing
    scale = cell_q.shape[-1] ** -0.5
    key_scores = torch.einsum("bhd,hgd->hgb", cell_q * scale, gene_k)  # t: (h, 1 + g, cells)
    cell_weights = torch.softmax(key_scores.permute(2, 0, 1), dim=-1)
    n_cells, n_heads, dim = cell_v.shape
    with _autocast_off(cell.device):
        shared = (gene_q.double() * scale) @ gene_k.double().mT  # C: (h, rows, keys)
        # in place: the product saves its inputs, not this g x g output
        shared_exp = torch.exp(shared.sub_(shared.detach().amax(-1, keepdim=True)))
        key_scores = key_scores.double()
        per_cell_exp = torch.exp(key_scores - key_scores.detach().amax(1, keepdim=True))
        values = per_cell_exp[..., None] * gene_v.double()[:, :, None]  # (h, keys, cells, d)
        # one product for the weights' sums and the attended values: one g x g gradient
        summed = shared_exp @ torch.cat([per_cell_exp, values.flatten(2)], dim=-1)
        weight_sum, attended = summed.split([n_cells, n_cells * dim], dim=-1)
        attended = attended.view(n_heads, -1, n_cells, dim) / weight_sum[..., None]
    return attended.to(cell.dtype).permute(2, 0, 1, 3) + cell_v[:, :, None], cell_weights


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
