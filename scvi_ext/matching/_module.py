"""The cross-attention network of Fan & Shen (RNA <-> ATAC cell matching) and its losses."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

Objective = Literal["triplet", "infonce"]
Tokenizer = Literal["conv", "local"]
AtacInput = Literal["peaks", "gene_activity"]
Encoder = Literal["attention", "linear"]

#: Counts per cell after RNA normalisation and TF-IDF scaling (before log1p).
SCALE_FACTOR = 1e4
#: Softmax temperature of the InfoNCE warm start of the triplet objective (CLIP's start).
WARM_START_TEMPERATURE = 0.07


class RegionTokenizer(nn.Module):
    """1-D CNN over features in genome order -> ``n_tokens`` region tokens of width ``embed_dim``.

    ``n_filters`` filters of width ``kernel_size`` slide with stride ``kernel_size`` (paper
    3.1, after Mostavi et al.); an adaptive max pooling keeps the strongest response of each
    filter in ``n_tokens`` consecutive stretches of the genome, and a linear layer projects
    each token to the shared width, plus a learned embedding of its position.
    """

    def __init__(self, n_filters: int, kernel_size: int, n_tokens: int, embed_dim: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.n_tokens = n_tokens
        self.conv = nn.Conv1d(1, n_filters, kernel_size, stride=kernel_size)
        self.pool = nn.AdaptiveMaxPool1d(n_tokens)
        self.projection = nn.Linear(n_filters, embed_dim)
        self.position = nn.Parameter(torch.zeros(n_tokens, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cells x features -> cells x tokens x ``embed_dim``."""
        padding = (-x.shape[1]) % self.kernel_size + max(
            0, self.n_tokens * self.kernel_size - x.shape[1]
        )
        x = F.pad(x, (0, padding))
        filters = F.gelu(self.conv(x.unsqueeze(1)))
        return self.projection(self.pool(filters).transpose(1, 2)) + self.position

    def token_spans(self, n_features: int) -> np.ndarray:
        """First and last feature (in genome order) each token pools over: tokens x 2."""
        n_positions = max(-(-n_features // self.kernel_size), self.n_tokens)
        token = np.arange(self.n_tokens)
        first = token * n_positions // self.n_tokens  # AdaptiveMaxPool1d's windows
        last = -(-(token + 1) * n_positions // self.n_tokens) - 1
        spans = np.stack([first * self.kernel_size, (last + 1) * self.kernel_size - 1], 1)
        return np.clip(spans, 0, n_features - 1)


class LocalTokenizer(nn.Module):
    """Locally connected tokens: features in genome order cut into ``n_tokens`` consecutive
    stretches, each projected to ``embed_dim`` by its own weights.

    A 1-D convolution whose filters are not shared across positions (kernel = stride =
    stretch length): tokens keep which features are open or expressed, not only how much.
    """

    def __init__(self, n_features: int, n_tokens: int, embed_dim: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.width = -(-n_features // n_tokens)
        scale = 1.0 / np.sqrt(self.width)
        self.weight = nn.Parameter(torch.randn(n_tokens, self.width, embed_dim) * scale)
        self.bias = nn.Parameter(torch.zeros(n_tokens, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cells x features -> cells x tokens x ``embed_dim``."""
        x = F.pad(x, (0, self.n_tokens * self.width - x.shape[1]))
        stretches = x.view(len(x), self.n_tokens, self.width)
        return torch.einsum("ctw,twp->ctp", stretches, self.weight) + self.bias

    def token_spans(self, n_features: int) -> np.ndarray:
        """First and last feature (in genome order) of each token: tokens x 2."""
        first = np.arange(self.n_tokens) * self.width
        return np.clip(np.stack([first, first + self.width - 1], 1), 0, n_features - 1)


class TransformerUnit(nn.Module):
    """Multi-head self-attention and feed-forward sub-layers, each residual + LayerNorm
    (paper figure 2, post-norm as in Vaswani et al.)."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dim, n_heads, dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(embed_dim, 2 * embed_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * embed_dim, embed_dim),
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tokens: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens -> tokens, and the head-averaged attention (cells x tokens x tokens)."""
        attended, weights = self.attention(
            tokens, tokens, tokens, need_weights=need_weights, average_attn_weights=True
        )
        tokens = self.norm1(tokens + self.dropout(attended))
        return self.norm2(tokens + self.dropout(self.feed_forward(tokens))), weights


class CrossAttentionModule(BaseModuleClass):
    """RNA and ATAC encoders (CNN tokens -> self-attention -> ``e0``/``t0``), a cross-attention
    unit over the stacked tokens of a pair (-> ``e1``/``t1``) and the matching losses.

    The similarity of an RNA/ATAC pair is ``S = e0 . t0 + alpha e1 . t1`` on unit-norm
    embeddings. ``objective="triplet"`` is the paper's bidirectional triplet ranking loss
    with the hardest in-batch negative; the cross term needs both cells of a pair, so the
    hardest negative is searched among the ``n_hard_candidates`` best negatives by
    ``e0 . t0`` (all of them when it is at least the batch size - 1).
    ``objective="infonce"`` is CLIP's symmetric InfoNCE on ``e0 . t0`` with a learned
    temperature (the NeurIPS 2021 "Novel" recipe; ``alpha`` must then be 0).

    Parameters
    ----------
    n_genes, n_peaks
        Features of each modality (registered order).
    gene_order, peak_order
        Permutations putting the features in genome order.
    n_filters, kernel_size_rna, kernel_size_atac, n_tokens_rna, n_tokens_atac
        CNN tokenizers (see :class:`RegionTokenizer`).
    embed_dim, n_heads, dropout
        Width ``p`` of the tokens and the attention units.
    alpha
        Weight of the cross-attention term (0: no cross-attention unit).
    margin
        Triplet margin ``m``.
    objective
        ``"triplet"`` or ``"infonce"``.
    n_hard_candidates
        Negatives per cell whose cross term is scored to find the hardest (triplet).
    tokenizer
        ``"conv"``: the paper's shared 1-D convolution + pooling (:class:`RegionTokenizer`);
        ``"local"``: untied weights per genomic stretch (:class:`LocalTokenizer`).
    atac_input
        ``"peaks"``: the ATAC encoder reads TF-IDF peaks (the paper); ``"gene_activity"``:
        it reads each gene's summed linked peaks (``links``), per-cell normalised + log1p
        as the RNA, genes in ``gene_order``.
    links
        (gene, peak) index pairs of the gene-region map; needed for ``"gene_activity"``.
    shared_encoder
        With ``"gene_activity"``: one tokenizer and self-attention unit (the RNA's) encode
        both modalities, each modality's features standardised first with its training
        cells' means and standard deviations (``feature_means``, ``feature_scales``).
    encoder
        ``"attention"``: tokenizer + self-attention (the paper). ``"linear"``: one linear
        map of the standardised genes to ``embed_dim`` (``projection``, shared by both
        modalities; needs ``shared_encoder`` and ``alpha=0``; no tokens, no attention),
        which the model starts at the PCA of its training RNA.
    """

    def __init__(
        self,
        n_genes: int,
        n_peaks: int,
        gene_order: np.ndarray,
        peak_order: np.ndarray,
        n_filters: int = 32,
        kernel_size_rna: int = 4,
        kernel_size_atac: int = 16,
        n_tokens_rna: int = 16,
        n_tokens_atac: int = 32,
        embed_dim: int = 64,
        n_heads: int = 4,
        dropout: float = 0.1,
        alpha: float = 0.5,
        margin: float = 0.2,
        objective: Objective = "triplet",
        n_hard_candidates: int = 8,
        tokenizer: Tokenizer = "conv",
        atac_input: AtacInput = "peaks",
        links: np.ndarray | None = None,
        shared_encoder: bool = False,
        encoder: Encoder = "attention",
    ):
        super().__init__()
        if encoder not in ("attention", "linear"):
            raise ValueError(f"encoder must be 'attention' or 'linear', not {encoder!r}.")
        if encoder == "linear" and not shared_encoder:
            raise ValueError(
                "encoder='linear' projects the genes of both modalities with one matrix: "
                "set atac_input='gene_activity' and shared_encoder=True."
            )
        if encoder == "linear" and alpha != 0:
            raise ValueError(
                "encoder='linear' makes no tokens for the cross-attention unit: set alpha=0."
            )
        if encoder == "linear" and not 1 <= embed_dim <= n_genes:
            raise ValueError(
                f"encoder='linear' needs 1 <= embed_dim <= the {n_genes} genes, not {embed_dim}."
            )
        self.encoder = encoder
        if shared_encoder and atac_input != "gene_activity":
            raise ValueError(
                "shared_encoder=True encodes both modalities as genes: set "
                "atac_input='gene_activity' (with a gene_region_map)."
            )
        self.shared_encoder = shared_encoder
        if atac_input not in ("peaks", "gene_activity"):
            raise ValueError(f"atac_input must be 'peaks' or 'gene_activity', not {atac_input!r}.")
        if atac_input == "gene_activity" and links is None:
            raise ValueError("atac_input='gene_activity' needs the (gene, peak) links.")
        self.atac_input = atac_input
        links = np.zeros((0, 2), dtype=np.int64) if links is None else np.asarray(links)
        self.register_buffer("link_genes", torch.as_tensor(links[:, 0], dtype=torch.long))
        self.register_buffer("link_peaks", torch.as_tensor(links[:, 1], dtype=torch.long))
        self.n_genes = n_genes
        n_atac_features = n_genes if atac_input == "gene_activity" else n_peaks
        if objective not in ("triplet", "infonce"):
            raise ValueError(f"objective must be 'triplet' or 'infonce', not {objective!r}.")
        if objective == "infonce" and alpha != 0:
            raise ValueError(
                "objective='infonce' scores the self-attention embeddings only (CLIP); "
                "set alpha=0."
            )
        self.alpha, self.margin, self.objective = alpha, margin, objective
        self.n_hard_candidates = n_hard_candidates
        self.register_buffer("gene_order", torch.as_tensor(gene_order, dtype=torch.long))
        self.register_buffer("peak_order", torch.as_tensor(peak_order, dtype=torch.long))
        self.register_buffer("peak_idf", torch.ones(n_peaks))
        if encoder == "linear":
            self.projection = nn.Linear(n_genes, embed_dim, bias=False)
        # created in this order (RNA, ATAC tokenizer, RNA, ATAC attention) so that a seed
        # gives the same initial weights as before the gene-activity options
        elif tokenizer == "conv":
            self.rna_tokenizer = RegionTokenizer(
                n_filters, kernel_size_rna, n_tokens_rna, embed_dim
            )
            if not shared_encoder:
                self.atac_tokenizer = RegionTokenizer(
                    n_filters, kernel_size_atac, n_tokens_atac, embed_dim
                )
        elif tokenizer == "local":
            self.rna_tokenizer = LocalTokenizer(n_genes, n_tokens_rna, embed_dim)
            if not shared_encoder:
                self.atac_tokenizer = LocalTokenizer(n_atac_features, n_tokens_atac, embed_dim)
        else:
            raise ValueError(f"tokenizer must be 'conv' or 'local', not {tokenizer!r}.")
        if encoder == "attention":
            self.rna_self_attention = TransformerUnit(embed_dim, n_heads, dropout)
        if shared_encoder:  # the same modules (parameters) for both modalities
            if encoder == "attention":
                self.atac_tokenizer = self.rna_tokenizer
                self.atac_self_attention = self.rna_self_attention
            self.register_buffer("feature_means", torch.zeros(2, n_genes))  # rna, atac
            self.register_buffer("feature_scales", torch.ones(2, n_genes))
        else:
            self.atac_self_attention = TransformerUnit(embed_dim, n_heads, dropout)
        self.cross_attention = TransformerUnit(embed_dim, n_heads, dropout) if alpha else None
        if objective == "infonce":  # CLIP's learned temperature, 1 / 0.07 at the start
            self.log_logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    # ------------------------------------------------------------------ normalisation
    def normalise_rna(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-cell normalisation to 1e4 counts + log1p, features in genome order."""
        counts = counts[:, self.gene_order]
        library = counts.sum(1, keepdim=True).clamp_min(1.0)
        return torch.log1p(counts / library * SCALE_FACTOR)

    def normalise_atac(self, counts: torch.Tensor) -> torch.Tensor:
        """TF-IDF (IDF of the training cells) + log1p, peaks in genome order; with
        ``atac_input="gene_activity"``, the genes' summed linked peaks normalised as RNA."""
        if self.atac_input == "gene_activity":
            activity = counts.new_zeros(len(counts), self.n_genes)
            activity.index_add_(1, self.link_genes, counts[:, self.link_peaks])
            return self.normalise_rna(activity)
        term_frequency = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
        tf_idf = torch.log1p(term_frequency * self.peak_idf * SCALE_FACTOR)
        return tf_idf[:, self.peak_order]

    # ------------------------------------------------------------------ encoders
    def encode(
        self, counts: torch.Tensor, modality: str, need_weights: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Counts of one modality -> ``tokens`` (projected CNN tokens, the cross unit's
        input), ``embedding`` (unit-norm ``e0`` or ``t0``) and the self-attention map."""
        features = self.normalise_rna(counts) if modality == "rna" else self.normalise_atac(counts)
        if self.shared_encoder:
            side = 0 if modality == "rna" else 1
            features = (features - self.feature_means[side]) / self.feature_scales[side]
        if self.encoder == "linear":
            projected = self.projection(features)
            embedding = F.normalize(projected, dim=-1)
            return {"tokens": projected[:, None], "embedding": embedding, "attention": None}
        if modality == "rna":
            tokens = self.rna_tokenizer(features)
            attended, weights = self.rna_self_attention(tokens, need_weights)
        else:
            tokens = self.atac_tokenizer(features)
            attended, weights = self.atac_self_attention(tokens, need_weights)
        embedding = F.normalize(attended.mean(1), dim=-1)
        return {"tokens": tokens, "embedding": embedding, "attention": weights}

    def cross_scores(self, rna_tokens: torch.Tensor, atac_tokens: torch.Tensor) -> torch.Tensor:
        """``e1 . t1`` of each pair (row ``i`` of both): cross-attention over the stacked
        tokens, mean pooled per modality, unit norm."""
        n_rna_tokens = rna_tokens.shape[1]
        attended, _ = self.cross_attention(torch.cat([rna_tokens, atac_tokens], 1))
        e1 = F.normalize(attended[:, :n_rna_tokens].mean(1), dim=-1)
        t1 = F.normalize(attended[:, n_rna_tokens:].mean(1), dim=-1)
        return (e1 * t1).sum(-1)

    # ------------------------------------------------------------------ scvi interface
    def _get_inference_input(self, tensors: dict) -> dict:
        return {
            "rna": tensors[REGISTRY_KEYS.X_KEY],
            "atac": tensors[REGISTRY_KEYS.ATAC_X_KEY],
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {}

    @auto_move_data
    def inference(self, rna: torch.Tensor, atac: torch.Tensor) -> dict:
        """Encode the RNA and ATAC profiles of the same cells."""
        rna_out, atac_out = self.encode(rna, "rna"), self.encode(atac, "atac")
        return {
            "rna_tokens": rna_out["tokens"],
            "atac_tokens": atac_out["tokens"],
            "e0": rna_out["embedding"],
            "t0": atac_out["embedding"],
        }

    def generative(self) -> dict:
        """No generative model."""
        return {}

    def _triplet_loss(self, outputs: dict, self_scores: torch.Tensor) -> torch.Tensor:
        n_cells = len(self_scores)
        eye = torch.eye(n_cells, dtype=torch.bool, device=self_scores.device)
        negatives = self_scores.masked_fill(eye, -torch.inf)
        n_candidates = min(self.n_hard_candidates, n_cells - 1)
        if self.cross_attention is None or n_candidates < 1:
            positive = self_scores.diagonal()
            hardest_atac = negatives.max(1).values if n_cells > 1 else positive - self.margin
            hardest_rna = negatives.max(0).values if n_cells > 1 else positive - self.margin
        else:
            rows = torch.arange(n_cells, device=self_scores.device)
            atac_candidates = negatives.topk(n_candidates, dim=1).indices  # per RNA cell
            rna_candidates = negatives.topk(n_candidates, dim=0).indices.T  # per ATAC cell
            pair_rna = torch.cat(
                [rows, rows.repeat_interleave(n_candidates), rna_candidates.ravel()]
            )
            pair_atac = torch.cat(
                [rows, atac_candidates.ravel(), rows.repeat_interleave(n_candidates)]
            )
            cross = self.cross_scores(
                outputs["rna_tokens"][pair_rna], outputs["atac_tokens"][pair_atac]
            )
            scores = self_scores[pair_rna, pair_atac] + self.alpha * cross
            positive = scores[:n_cells]
            hardest_atac = (
                scores[n_cells : n_cells * (1 + n_candidates)].view(n_cells, -1).max(1).values
            )
            hardest_rna = scores[n_cells * (1 + n_candidates) :].view(n_cells, -1).max(1).values
        return (
            F.relu(self.margin - positive + hardest_atac)
            + F.relu(self.margin - positive + hardest_rna)
        ).mean()

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        warm_start: bool = False,
    ) -> LossOutput:
        """Triplet ranking or InfoNCE loss on the cells of the minibatch (paired by row).

        ``warm_start`` (triplet objective): InfoNCE on the self-attention embeddings at
        CLIP's starting temperature (0.07) instead, for the first epochs
        (``plan_kwargs={"infonce_warmup_epochs": n}``).
        """
        self_scores = inference_outputs["e0"] @ inference_outputs["t0"].T
        if self.objective == "infonce" or warm_start:
            scale = (
                self.log_logit_scale.clamp(max=np.log(100)).exp()
                if self.objective == "infonce"
                else 1 / WARM_START_TEMPERATURE
            )
            logits = self_scores * scale
            targets = torch.arange(len(logits), device=logits.device)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        else:
            loss = self._triplet_loss(inference_outputs, self_scores)
        targets = torch.arange(len(self_scores), device=self_scores.device)
        top1 = (self_scores.argmax(1) == targets).float().mean()
        return LossOutput(
            loss=loss, n_obs_minibatch=len(self_scores), extra_metrics={"top1_in_batch": top1}
        )
