"""CELLULAR token encoders (thesis Models 2 and 3): gene and gene set tokens + a transformer.

Model 2 turns each gene into a token: its normalised expression, binned between the
gene's minimum and maximum in the reference, selects a learned bin embedding, to which the
user's gene embedding (e.g. gene2vec) is added. The gene set encoder turns each gene set
into a token: a learned linear map of the expression of the set's genes (the thesis's
binary gene set mask followed by a linear transform). Model 3 runs both branches side by
side. Each branch prepends a learnable class token and runs a post-LayerNorm transformer
encoder (thesis eq. 2.18-2.24); the class token outputs are projected to the embedding.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

#: Key of the placeholder that replaces the gene embedding matrix in saved init parameters;
#: the matrix itself is saved in the module state (buffer ``gene_embeddings``).
SAVED_EMBEDDINGS_KEY = "saved_in_module_state"

GeneEmbeddings = np.ndarray | pd.DataFrame
GeneSets = str | os.PathLike | Mapping[str, Sequence[str]]


# ---------------------------------------------------------------------- inputs
def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file (``name<TAB>description<TAB>gene<TAB>gene...`` per line).

    Parameters
    ----------
    path
        GMT file, e.g. from MSigDB.

    Returns
    -------
    Gene set name -> gene names, in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gene set file '{path}' does not exist.")
    gene_sets: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(
                f"Line {number} of '{path}' is not GMT: expected "
                "'name<TAB>description<TAB>gene<TAB>gene...'."
            )
        name = fields[0].strip()
        if name in gene_sets:
            raise ValueError(f"Gene set '{name}' appears twice in '{path}'.")
        gene_sets[name] = [gene.strip() for gene in fields[2:] if gene.strip()]
    return gene_sets


def resolve_gene_sets(gene_sets: GeneSets, gene_names: Sequence[str]) -> dict[str, list[str]]:
    """Gene sets restricted to the genes of the data.

    Genes absent from ``gene_names`` are dropped with a warning; a gene set left without
    any gene is an error.

    Parameters
    ----------
    gene_sets
        GMT file path, or a mapping gene set name -> gene names.
    gene_names
        The model's genes (``adata.var_names``).

    Returns
    -------
    Gene set name -> genes of the data (duplicates removed, order kept).
    """
    if isinstance(gene_sets, str | os.PathLike):
        gene_sets = read_gmt(gene_sets)
    elif not isinstance(gene_sets, Mapping):
        raise TypeError(
            "gene_sets must be a GMT file path or a dict gene set name -> gene names, "
            f"not {type(gene_sets).__name__}."
        )
    if len(gene_sets) == 0:
        raise ValueError("gene_sets contains no gene set.")
    known = set(map(str, gene_names))
    resolved: dict[str, list[str]] = {}
    dropped: set[str] = set()
    empty: list[str] = []
    for name, genes in gene_sets.items():
        if isinstance(genes, str):
            raise ValueError(f"Gene set '{name}' is a string; give a list of gene names.")
        genes = [str(gene) for gene in genes]
        dropped.update(gene for gene in genes if gene not in known)
        resolved[str(name)] = list(dict.fromkeys(gene for gene in genes if gene in known))
        if not resolved[str(name)]:
            empty.append(str(name))
    if empty:
        raise ValueError(
            f"{len(empty)} gene set(s) have no gene in the data, e.g. {empty[:5]}. Remove "
            "them (a GMT file can be read into a dict with "
            "scvi_ext.cellular._transformer.read_gmt) or keep more genes."
        )
    if dropped:
        warnings.warn(
            f"{len(dropped)} gene(s) of gene_sets are not in the data and were dropped, "
            f"e.g. {sorted(dropped)[:5]}.",
            UserWarning,
            stacklevel=3,
        )
    return resolved


def gene_embedding_matrix(
    gene_embeddings: GeneEmbeddings | dict, gene_names: Sequence[str]
) -> np.ndarray:
    """Gene embedding rows in the order of ``gene_names``, as float32.

    Parameters
    ----------
    gene_embeddings
        DataFrame indexed by gene names (extra rows are ignored), or an array with one
        row per gene in the order of ``gene_names``. A saved model's placeholder
        ``{"saved_in_module_state": [n_genes, n_dims]}`` gives zeros of that shape (the
        values are loaded with the module state).
    gene_names
        The model's genes (``adata.var_names``).

    Returns
    -------
    Array of shape ``(len(gene_names), n_dims)``.
    """
    n_genes = len(gene_names)
    if isinstance(gene_embeddings, dict) and SAVED_EMBEDDINGS_KEY in gene_embeddings:
        shape = tuple(gene_embeddings[SAVED_EMBEDDINGS_KEY])
        if shape[0] != n_genes:
            raise ValueError(f"Saved gene embeddings have {shape[0]} genes, the data {n_genes}.")
        return np.zeros(shape, dtype=np.float32)
    if isinstance(gene_embeddings, pd.DataFrame):
        index = gene_embeddings.index.astype(str)
        if index.has_duplicates:
            duplicated = sorted(set(index[index.duplicated()]))
            raise ValueError(f"gene_embeddings has duplicated genes, e.g. {duplicated[:5]}.")
        available = set(index)
        missing = [gene for gene in map(str, gene_names) if gene not in available]
        if missing:
            raise ValueError(
                f"gene_embeddings has no row for {len(missing)} of the {n_genes} genes, e.g. "
                f"{missing[:5]}. Subset the AnnData to genes with an embedding, or add rows "
                "for the missing genes (e.g. zeros)."
            )
        frame = gene_embeddings.set_axis(index, axis=0)
        matrix = frame.loc[list(map(str, gene_names))].to_numpy(dtype=np.float32)
    elif isinstance(gene_embeddings, np.ndarray):
        matrix = np.asarray(gene_embeddings, dtype=np.float32)
        if matrix.ndim != 2:
            raise ValueError(f"gene_embeddings must be 2-D (genes x dims), not {matrix.ndim}-D.")
        if matrix.shape[0] != n_genes:
            difference = abs(n_genes - matrix.shape[0])
            what = "missing" if matrix.shape[0] < n_genes else "too many"
            raise ValueError(
                f"gene_embeddings has {matrix.shape[0]} rows but the data has {n_genes} genes "
                f"({difference} {what}). Pass a DataFrame indexed by gene names to align rows "
                "with adata.var_names."
            )
    else:
        raise TypeError(
            "gene_embeddings must be a DataFrame indexed by gene names or an array "
            f"(genes x dims), not {type(gene_embeddings).__name__}."
        )
    if matrix.shape[1] == 0:
        raise ValueError("gene_embeddings has no columns.")
    if not np.isfinite(matrix).all():
        raise ValueError("gene_embeddings contains NaN or infinite values.")
    return matrix


# ---------------------------------------------------------------------- layers
class SelfAttention(nn.Module):
    """Multi-head self-attention that can return its weights (thesis eq. 2.19-2.22).

    Parameters
    ----------
    d_model
        Token width.
    n_heads
        Attention heads; must divide ``d_model``.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend; weights have shape (batch, heads, tokens, tokens) when returned."""
        n_cells, n_tokens, d_model = x.shape
        qkv = self.qkv(x).view(n_cells, n_tokens, 3, self.n_heads, d_model // self.n_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        if not return_weights:  # the fused kernel does not materialise the weights
            attended, weights = F.scaled_dot_product_attention(query, key, value), None
        else:
            scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
            weights = scores.softmax(dim=-1)
            attended = weights @ value
        attended = attended.transpose(1, 2).reshape(n_cells, n_tokens, d_model)
        return self.out(attended), weights


class TransformerLayer(nn.Module):
    """Post-LayerNorm encoder layer: ``LN(X + MHA(X))`` then ``LN(O + MLP(O))``, MLP 4x wide."""

    def __init__(self, d_model: int, n_heads: int, dropout_rate: float):
        super().__init__()
        self.attention = SelfAttention(d_model, n_heads)
        self.norm_attention = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Dropout(dropout_rate),
            nn.Linear(4 * d_model, d_model),
        )
        self.norm_mlp = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer; returns the tokens and (optionally) the attention weights."""
        attended, weights = self.attention(x, return_weights)
        x = self.norm_attention(x + self.dropout(attended))
        x = self.norm_mlp(x + self.dropout(self.mlp(x)))
        return x, weights


class GeneTokenizer(nn.Module):
    """Model 2 tokens: learned bin embedding of each gene's expression + its gene embedding.

    Parameters
    ----------
    gene_embeddings
        ``(n_genes, n_dims)`` matrix, kept frozen in the buffer ``gene_embeddings``.
    d_model
        Token width; when it differs from ``n_dims`` a learned linear map projects the
        gene embeddings to it.
    n_bins
        Expression bins, equally spaced between each gene's reference minimum and maximum
        (thesis: 1000), set with :meth:`set_expression_range` before training.
    """

    def __init__(self, gene_embeddings: np.ndarray, d_model: int, n_bins: int):
        super().__init__()
        n_genes, n_dims = gene_embeddings.shape
        self.n_bins = n_bins
        self.register_buffer("gene_embeddings", torch.as_tensor(gene_embeddings).float())
        self.register_buffer("expression_low", torch.zeros(n_genes))
        self.register_buffer("expression_high", torch.zeros(n_genes))
        self.projection = nn.Linear(n_dims, d_model) if n_dims != d_model else nn.Identity()
        self.bin_embedding = nn.Embedding(n_bins, d_model)

    @torch.no_grad()
    def set_expression_range(self, low: np.ndarray, high: np.ndarray) -> None:
        """Per-gene range of the normalised reference expression that the bins divide."""
        self.expression_low.copy_(torch.as_tensor(low, dtype=torch.float32))
        self.expression_high.copy_(torch.as_tensor(high, dtype=torch.float32))

    def bins(self, x: torch.Tensor) -> torch.Tensor:
        """Bin index of each gene's expression; values outside the range go to the end bins."""
        width = (self.expression_high - self.expression_low).clamp_min(1e-6)
        position = (x - self.expression_low) / width * self.n_bins
        return position.floor().clamp(0, self.n_bins - 1).long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of shape (cells, genes, d_model)."""
        return self.bin_embedding(self.bins(x)) + self.projection(self.gene_embeddings)


class GeneSetTokenizer(nn.Module):
    """Gene set tokens: for set ``k``, ``sum_{g in k} x_g W_{k,g} + b_k`` (a masked linear map).

    Parameters
    ----------
    gene_indices
        Per gene set, the indices of its genes in the data.
    d_model
        Token width.
    """

    def __init__(self, gene_indices: Sequence[Sequence[int]], d_model: int):
        super().__init__()
        n_sets, longest = len(gene_indices), max(len(genes) for genes in gene_indices)
        index = torch.zeros(n_sets, longest, dtype=torch.long)
        mask = torch.zeros(n_sets, longest)
        for k, genes in enumerate(gene_indices):
            index[k, : len(genes)] = torch.as_tensor(list(genes), dtype=torch.long)
            mask[k, : len(genes)] = 1.0
        # derived from the saved gene sets, so not part of the state dict
        self.register_buffer("gene_index", index, persistent=False)
        self.register_buffer("gene_mask", mask, persistent=False)
        bound = 1.0 / mask.sum(dim=1).sqrt()
        weight = (torch.rand(n_sets, longest, d_model) * 2 - 1) * bound[:, None, None]
        self.weight = nn.Parameter(weight * mask[..., None])
        self.bias = nn.Parameter(torch.randn(n_sets, d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of shape (cells, gene sets, d_model)."""
        members = x[:, self.gene_index] * self.gene_mask  # cells x sets x genes per set
        return torch.bmm(members.transpose(0, 1), self.weight).transpose(0, 1) + self.bias


class TokenTransformer(nn.Module):
    """A tokenizer, a learnable class token (position 0) and ``n_layers`` transformer layers."""

    def __init__(
        self, tokenizer: nn.Module, d_model: int, n_heads: int, n_layers: int, dropout: float
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.class_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, n_heads, dropout) for _ in range(n_layers)
        )

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Class token output (cells, d_model) and per-layer attention weights (if asked)."""
        tokens = self.tokenizer(x)
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        attentions = []
        for layer in self.layers:
            tokens, weights = layer(tokens, return_weights)
            if return_weights:
                attentions.append(weights)
        return tokens[:, 0], attentions


class TransformerEncoder(nn.Module):
    """CELLULAR token encoder: gene tokens (Model 2), gene set tokens, or both (Model 3).

    Each branch is a :class:`TokenTransformer`; the class token outputs of the branches
    are concatenated, layer-normalised and linearly projected to ``n_latent``.

    Parameters
    ----------
    gene_names
        The model's genes, in data order.
    n_latent
        Embedding size.
    gene_embeddings
        ``(n_genes, n_dims)`` matrix for gene tokens, or ``None``.
    gene_sets
        Gene set name -> genes of the data (see :func:`resolve_gene_sets`), or ``None``.
    d_model
        Token width (default: the gene embedding width, else 64).
    n_heads, n_layers
        Attention heads and transformer depth of each branch.
    n_bins
        Expression bins of gene tokens.
    dropout_rate
        Dropout in the transformer layers.
    """

    def __init__(
        self,
        gene_names: Sequence[str],
        n_latent: int,
        gene_embeddings: np.ndarray | None = None,
        gene_sets: Mapping[str, Sequence[str]] | None = None,
        d_model: int | None = None,
        n_heads: int = 4,
        n_layers: int = 2,
        n_bins: int = 1000,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        if gene_embeddings is None and gene_sets is None:
            raise ValueError("A transformer encoder needs gene_embeddings, gene_sets or both.")
        if d_model is None:
            d_model = gene_embeddings.shape[1] if gene_embeddings is not None else 64
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, not {n_layers}.")
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, not {n_bins}.")
        self.n_heads = n_heads
        #: Token names of each branch: genes and/or gene set names.
        self.token_names: dict[str, list[str]] = {}
        branches = {}
        if gene_embeddings is not None:
            tokenizer = GeneTokenizer(gene_embeddings, d_model, n_bins)
            branches["genes"] = TokenTransformer(
                tokenizer, d_model, n_heads, n_layers, dropout_rate
            )
            self.token_names["genes"] = [str(gene) for gene in gene_names]
        if gene_sets is not None:
            position = {str(gene): i for i, gene in enumerate(gene_names)}
            indices = [[position[gene] for gene in genes] for genes in gene_sets.values()]
            branches["gene_sets"] = TokenTransformer(
                GeneSetTokenizer(indices, d_model), d_model, n_heads, n_layers, dropout_rate
            )
            self.token_names["gene_sets"] = list(gene_sets)
        self.branches = nn.ModuleDict(branches)
        width = d_model * len(branches)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_latent))

    def set_expression_range(self, low: np.ndarray, high: np.ndarray) -> None:
        """Set the binning range of gene tokens (no-op without a gene branch)."""
        if "genes" in self.branches:
            self.branches["genes"].tokenizer.set_expression_range(low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed normalised expression."""
        outputs = [branch(x)[0] for branch in self.branches.values()]
        return self.head(torch.cat(outputs, dim=1))

    def attentions(self, x: torch.Tensor, branch: str) -> list[torch.Tensor]:
        """Per-layer attention weights (cells, heads, tokens, tokens) of one branch.

        Token 0 is the class token; tokens ``1:`` follow ``token_names[branch]``.
        """
        if branch not in self.branches:
            raise ValueError(
                f"Unknown token branch '{branch}'; this encoder has {list(self.branches)}."
            )
        return self.branches[branch](x, return_weights=True)[1]
