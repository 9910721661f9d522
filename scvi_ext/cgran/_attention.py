"""CGRAN's attention: local attention (eq. 6-7) by gene group, its dense form, full attention.

Tensors are laid out ``(cells, heads, tokens, head_dim)``; token 0 is the cell, token
``1 + j`` is gene ``j``. Local attention multiplies the softmax weights by the group mask
``F`` (the cell row and column are ones; genes see the genes of their own group) and
L2-normalises each row. The softmax denominator cancels in that normalisation, so a row
is ``exp(s - max) * F / ||exp(s - max) * F||_2``: a gene row needs only its group and the
cell token, and :func:`grouped_local_attention` computes it group by group without the
``(g + 1) x (g + 1)`` matrix. :func:`dense_local_attention` is the paper's literal form.
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
