"""CGRAN network: folded-in cell vector + gene vectors -> two attention blocks -> cell type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import auto_move_data
from torch import nn

from scvi_ext.base import ClassBalance, CrossEntropyModule, log_scaled_counts

from ._attention import (
    affine_full_attention,
    affine_local_attention,
    cell_row_attention,
    dense_local_attention,
    full_attention,
    gene_groups,
    grouped_local_attention,
    local_mask,
)
from ._embedding import uniform_groups

#: CGRAN (paper A.2) models log(1 + counts / total * 1e5).
COUNTS_PER_CELL = 1e5

AttentionKind = Literal["local", "full"]
LocalImplementation = Literal["factorised", "grouped", "dense"]
LOCAL_IMPLEMENTATIONS: tuple[str, ...] = ("factorised", "grouped", "dense")
FullImplementation = Literal["factorised", "fused"]
FULL_IMPLEMENTATIONS: tuple[str, ...] = ("factorised", "fused")

#: ``attend(q, k, v) -> (outputs, cell weights)``, on (cells, heads, tokens, dim) tensors.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: The first block's attention from the tokens' affine parts (``cell``, ``gene``), as
#: :func:`affine_local_attention` takes them.
AffineAttend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AttentionBlock(nn.Module):
    """Multi-head attention, a fully connected residual branch, then L2 normalisation.

    ``L2Norm(Dropout(concat_heads(Attention(x)) + Linear(x)))``: the residual branch maps
    the input to the concatenated heads' width.
    """

    def __init__(self, n_input: int, n_heads: int, head_dim: int, dropout_rate: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.query_key_value = nn.Linear(n_input, 3 * n_heads * head_dim)
        self.residual = nn.Linear(n_input, n_heads * head_dim)
        self.dropout = nn.Dropout(dropout_rate)

    def query_key_value_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Queries, keys and values, each (cells, heads, tokens, head_dim)."""
        n_cells, n_tokens, _ = x.shape
        heads = self.query_key_value(x).view(n_cells, n_tokens, 3, self.n_heads, self.head_dim)
        return list(heads.permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x: torch.Tensor, attend: Attend, local: bool, cell_only: bool = False):
        """Block output and the cell token's attention weights (cells, heads, tokens).

        ``attend(q, k, v) -> (outputs, cell weights)``; ``local`` says whether it is local
        attention. With ``cell_only`` only the cell token is updated (the last block: the
        classifier reads nothing else), and only its query is computed.
        """
        if not cell_only:
            q, k, v = self.query_key_value_heads(x)
            attended, cell_weights = attend(q, k, v)
            return self._output(attended, self.residual(x)), cell_weights
        width = self.n_heads * self.head_dim
        weight, bias = self.query_key_value.weight, self.query_key_value.bias
        q = F.linear(x[:, :1], weight[:width], bias[:width])
        key_value = F.linear(x, weight[width:], bias[width:])
        k, v = key_value.view(*x.shape[:2], 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q.view(len(x), 1, self.n_heads, self.head_dim).transpose(1, 2)
        attended, cell_weights = cell_row_attention(q, k, v, local=local)
        return self._output(attended, self.residual(x[:, :1])), cell_weights

    def forward_cell_and_genes(
        self,
        cells: torch.Tensor,
        genes: torch.Tensor,
        attend: Attend,
        local: bool,
        cell_only: bool = False,
        affine_attend: AffineAttend | None = None,
    ):
        """:meth:`forward` of the tokens ``[c, c + G_1, ..., c + G_g]`` (eq. 5), never formed.

        ``cells`` is (cells, d), ``genes`` (g, d). The layers are affine, so
        ``Linear(c + G_j) = Linear(c) + W G_j``: ``W G`` is computed once for all cells and
        broadcast-added to each cell's ``Linear(c)`` (the cell token's own value). This
        saves the ``cells x genes`` products of the layers, in the forward and the backward.
        With ``affine_attend`` (:func:`affine_local_attention` or
        :func:`affine_full_attention`), the attention itself is computed from those two
        parts and ``attend`` is not used.
        """
        offsets = F.pad(genes, (0, 0, 1, 0))  # (1 + g, d): token 0, the cell, adds nothing
        n_heads, head_dim = self.n_heads, self.head_dim
        by_cell = self.query_key_value(cells).view(len(cells), 3, n_heads, 1, head_dim)
        residual = self.residual(cells)[:, None]
        if not cell_only:
            residual = residual + offsets @ self.residual.weight.T
        if affine_attend is not None and not cell_only:
            by_gene = (genes @ self.query_key_value.weight.T).view(-1, 3, n_heads, head_dim)
            attended, cell_weights = affine_attend(
                by_cell.squeeze(3).movedim(1, 0), by_gene.permute(1, 2, 0, 3)
            )
            return self._output(attended, residual), cell_weights
        by_token = (offsets @ self.query_key_value.weight.T).view(-1, 3, n_heads, head_dim)
        by_cell = by_cell.movedim(1, 0).contiguous()  # (3, cells, heads, 1, head_dim)
        by_token = by_token.permute(1, 2, 0, 3)[:, None].contiguous()  # (3, 1, heads, tokens, .)
        q, k, v = (by_cell + by_token).unbind(0)  # contiguous, as its terms are
        if cell_only:
            attended, cell_weights = cell_row_attention(q, k, v, local=local)
        else:
            attended, cell_weights = attend(q, k, v)
        return self._output(attended, residual), cell_weights

    def _output(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``L2Norm(Dropout(concat_heads(attended) + residual))``."""
        attended = attended.transpose(1, 2).flatten(2)  # (cells, tokens, heads * head_dim)
        return F.normalize(self.dropout(attended + residual), dim=-1)


class CGRANModule(CrossEntropyModule):
    """Cell-Gene Representation Attention Network (section 4.2).

    The cell vector ``c = m P`` is the fold-in of the normalised expression ``m``; tokens
    are ``[c, c + G_1, ..., c + G_g]`` (eq. 5); two attention blocks; the cell token of the
    last one (the latent) goes through a linear classifier. Gene vectors ``G``, fold-in
    ``P`` and gene groups are buffers, filled by the model's ``fit_statistics``.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of cell types.
    n_embedding
        Dimension ``d`` of cell and gene vectors (paper: 128).
    attention
        ``"local"`` (eq. 6-7, by gene group) or ``"full"`` (softmax over all tokens).
    group_size
        Genes per uniform group (paper: 100); the initial grouping.
    n_heads
        Heads of both blocks (paper: 10).
    head_dims
        Width of each head in the first and second block (paper: 8 and 4).
    dropout_rate
        Dropout on every block (paper: 0.1).
    local_implementation
        ``"factorised"`` (the first block by :func:`affine_local_attention`, later blocks
        group by group; on an MPS device, without float64, group by group too),
        ``"grouped"`` (every block group by group) or ``"dense"`` (the masked
        (g + 1) x (g + 1) matrix, for tests and the scaling study). All three compute the
        same attention.
    full_implementation
        ``"factorised"`` (the first block by :func:`affine_full_attention`: per head, a
        shared (g + 1) x (g + 1) float64 matrix; 10 heads' forward and backward peak at
        0.45 GB at g = 1000, 5.8 GB at 5000; on an MPS device, fused) or ``"fused"``
        (PyTorch's ``scaled_dot_product_attention`` on the formed tokens: less memory,
        about 3x the time on a CPU). Both compute the same attention.
    balance_classes
        Weight each cell's cross-entropy by the inverse frequency of its type (``True``)
        or its square root (``"sqrt"``) (:class:`~scvi_ext.base.CrossEntropyModule`; not in the paper).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_embedding: int = 128,
        attention: AttentionKind = "local",
        group_size: int = 100,
        n_heads: int = 10,
        head_dims: tuple[int, int] = (8, 4),
        dropout_rate: float = 0.1,
        local_implementation: LocalImplementation = "factorised",
        full_implementation: FullImplementation = "factorised",
        balance_classes: ClassBalance = False,
    ):
        super().__init__(n_labels, balance_classes)
        if local_implementation not in LOCAL_IMPLEMENTATIONS:
            raise ValueError(
                f"local_implementation must be one of {LOCAL_IMPLEMENTATIONS}, "
                f"not {local_implementation!r}."
            )
        if full_implementation not in FULL_IMPLEMENTATIONS:
            raise ValueError(
                f"full_implementation must be one of {FULL_IMPLEMENTATIONS}, "
                f"not {full_implementation!r}."
            )
        self.attention = attention
        self.local_implementation = local_implementation
        self.full_implementation = full_implementation
        self.register_buffer("gene_vectors", torch.zeros(n_input, n_embedding))
        self.register_buffer("fold_in", torch.zeros(n_input, n_embedding))
        self.register_buffer("gene_group", uniform_groups(n_input, group_size))
        self.register_buffer("embedding_fitted", torch.tensor(False))
        self._gene_groups = gene_groups(self.gene_group)
        self.register_load_state_dict_post_hook(lambda module, _: module._group_genes())
        widths = [n_embedding] + [n_heads * dim for dim in head_dims]
        self.blocks = nn.ModuleList(
            AttentionBlock(widths[i], n_heads, dim, dropout_rate)
            for i, dim in enumerate(head_dims)
        )
        self.classifier = nn.Linear(widths[-1], n_labels)

    # ------------------------------------------------------------------ embedding
    def set_embedding(
        self, gene_vectors: torch.Tensor, fold_in: torch.Tensor, gene_group: torch.Tensor
    ) -> None:
        """Fill the fitted buffers (gene vectors, fold-in, gene group codes)."""
        self.gene_vectors.copy_(gene_vectors)
        self.fold_in.copy_(fold_in)
        self.gene_group.copy_(gene_group)
        self.embedding_fitted.fill_(True)
        self._group_genes()

    def _group_genes(self) -> None:
        """Build the gene groups once, when the groups are set or loaded."""
        device = self.gene_group.device
        self._gene_groups = gene_groups(self.gene_group.cpu()).to(device)

    def _apply(self, fn, *args, **kwargs):
        """Move the gene groups with the module (``to``, ``cuda``...)."""
        module = super()._apply(fn, *args, **kwargs)
        self._gene_groups = self._gene_groups.to(self.gene_group.device)
        return module

    @staticmethod
    def normalize(counts: torch.Tensor) -> torch.Tensor:
        """log(1 + counts / total * 1e5) of each cell."""
        return log_scaled_counts(counts, COUNTS_PER_CELL)

    def cell_vectors(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """Folded-in cell vectors (cells, d) of normalised expression."""
        return x_normalized @ self.fold_in

    def tokens(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """The token sequence of eq. 5: (cells, 1 + genes, d)."""
        cells = self.cell_vectors(x_normalized)[:, None]
        return torch.cat([cells, cells + self.gene_vectors], dim=1)

    # ------------------------------------------------------------------ attention
    def _attend(self) -> Attend:
        """``attend(q, k, v) -> (outputs, cell weights)`` of the chosen attention."""
        if self.attention == "full":
            return full_attention
        if self.local_implementation == "dense":
            mask = local_mask(self.gene_group)
            return lambda q, k, v: dense_local_attention(q, k, v, mask)
        groups = self._gene_groups
        return lambda q, k, v: grouped_local_attention(q, k, v, groups)

    def _affine_attend(self, device: torch.device) -> AffineAttend | None:
        """The first block's factorised attention, or ``None`` where it is not used (not
        chosen, or an Apple MPS device, which has no float64)."""
        if device.type == "mps":
            return None
        if self.attention == "full":
            return affine_full_attention if self.full_implementation == "factorised" else None
        if self.local_implementation == "factorised":
            groups = self._gene_groups
            return lambda cell, gene: affine_local_attention(cell, gene, groups)
        return None

    def encode(
        self, x_normalized: torch.Tensor, n_blocks: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens after ``n_blocks`` blocks (default: all; the last updates the cell token
        only) and each block's cell-token attention weights (cells, heads, tokens)."""
        attend, local = self._attend(), self.attention == "local"
        n_blocks = len(self.blocks) if n_blocks is None else n_blocks
        if n_blocks == 0:
            return self.tokens(x_normalized), []
        first, *rest = self.blocks[:n_blocks]
        x, cell_weights = first.forward_cell_and_genes(
            self.cell_vectors(x_normalized),
            self.gene_vectors,
            attend,
            local,
            cell_only=len(self.blocks) == 1,
            affine_attend=self._affine_attend(x_normalized.device),
        )
        weights = [cell_weights]
        for i, block in enumerate(rest, start=1):
            x, cell_weights = block(x, attend, local, cell_only=i == len(self.blocks) - 1)
            weights.append(cell_weights)
        return x, weights

    def classify_normalized(
        self, x_normalized: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and latent (the last block's cell token) of normalised expression."""
        x, _ = self.encode(x_normalized)
        z = x[:, 0]
        return self.classifier(z), z

    # ------------------------------------------------------------------ scvi module
    @auto_move_data
    def inference(self, x: torch.Tensor) -> dict:
        """Logits and latent of count data."""
        logits, z = self.classify_normalized(self.normalize(x))
        return {"logits": logits, "z": z}

    def latent(self, tensors: dict) -> torch.Tensor:
        """The last block's cell token of a minibatch (cells, heads x last head dim)."""
        return self.inference(tensors[REGISTRY_KEYS.X_KEY])["z"]

    @auto_move_data
    def cell_gene_attention(self, tensors: dict) -> torch.Tensor:
        """Last block's attention of the cell token to each gene, mean over heads (cells, g)."""
        _, weights = self.encode(self.normalize(tensors[REGISTRY_KEYS.X_KEY]))
        return weights[-1][:, :, 1:].mean(dim=1)

    @auto_move_data
    def gene_gene_attention(
        self, tensors: dict, genes: torch.Tensor, block: int = -1
    ) -> torch.Tensor:
        """Softmax attention among the chosen genes in ``block``, mean over heads.

        No group mask: genes of different groups are compared too (figure 4b). Returns
        (cells, chosen, chosen); rows sum to 1.
        """
        block = block % len(self.blocks)
        x, _ = self.encode(self.normalize(tensors[REGISTRY_KEYS.X_KEY]), n_blocks=block)
        q, k, _ = self.blocks[block].query_key_value_heads(x[:, 1 + genes])
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(scores, dim=-1).mean(dim=1)
