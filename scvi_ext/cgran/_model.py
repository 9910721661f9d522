"""CGRAN: cell type classifier whose cell-to-gene attention names marker genes."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.model.base import ArchesMixin, BaseModelClass, UnsupervisedTrainingMixin

from scvi_ext.base import (
    PLAIN_ADAM_PLAN,
    BaseTrainingPlan,
    ClassBalance,
    ClassifierMixin,
    EmbeddingMixin,
    LabelledCountsSetupMixin,
    fit_label_weights,
)
from scvi_ext.data._validation import is_positive_int

from ._embedding import fit_matrix_factorisation, fit_svd, kmeans_groups, uniform_groups
from ._module import CGRANModule

logger = logging.getLogger(__name__)

EMBEDDINGS = ("svd", "mf")
GROUPINGS = ("uniform", "kmeans")
ATTENTIONS = ("local", "full")
#: Transfer settings of section 5.6 (:meth:`CGRAN.load_query_data`).
TRANSFER_SETTINGS = ("A", "B", "C")
#: Cells per minibatch when fitting the embedding and reading attention.
READ_BATCH_SIZE = 512


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, not {value!r}.")


class CGRAN(
    LabelledCountsSetupMixin,
    ClassifierMixin,
    EmbeddingMixin,
    ArchesMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """Cell-Gene Representation Attention Network (section 4.2 of the seed paper).

    Cell and gene vectors come from a factorisation of the normalised training matrix
    (SVD or NN matrix factorisation, fitted when training starts); every cell, in training
    and after, is *folded in* against the fixed gene vectors, so new cells are classified
    without refitting. Tokens ``[c, c + G_1, ..., c + G_g]`` go through two attention
    blocks; the cell token is classified. Local attention (eq. 6-7) lets a gene attend to
    the cell and to its own group of genes; it is computed group by group, so memory grows
    with ``genes x group_size``, not ``genes ** 2``.

    Parameters
    ----------
    adata
        AnnData of raw counts registered with :meth:`setup_anndata` (top 1000 genes by
        variance: ``scvi_ext.data.select_genes(adata, "cgran")``).
    embedding
        ``"svd"`` (``U S^1/2``, ``V S^1/2``) or ``"mf"`` (NN matrix factorisation, MSE).
    grouping
        ``"uniform"`` (``group_size`` genes in order) or ``"kmeans"`` (k-means of the
        gene vectors into ``ceil(genes / group_size)`` groups).
    attention
        ``"local"`` (eq. 6-7) or ``"full"`` (softmax over all tokens; its first block is
        computed from a float64 (1 + g) x (1 + g) matrix per head: its forward and
        backward peak at 0.45 GB at g = 1000 and 5.8 GB at 5000. Where memory is short,
        ``model.module.full_implementation = "fused"`` uses PyTorch's fused attention:
        the same results, about 3x slower).
    group_size
        Genes per group (paper: 100); at most the number of genes.
    n_heads
        Heads of each block (paper: 10).
    head_dims
        Width of each head, one per block (paper: 8 then 4).
    n_embedding
        Dimension of cell and gene vectors (paper: 128).
    dropout_rate
        Dropout in the attention blocks (paper: 0.1).
    mf_epochs, mf_lr, mf_dropout_rate
        Matrix factorisation: epochs, Adam learning rate and dropout (paper: 130,
        0.005, 0.1).
    balance_classes
        ``True``: weight each labelled cell's cross-entropy by the inverse frequency of its
        type among the labelled cells; ``"sqrt"``: by the inverse square root of that
        frequency (rare types gain less). Refitted at every :meth:`train`, also after
        :meth:`load_query_data`. Not in the paper, whose loss is the plain cross-entropy
        (the default, ``False``); it raises the recall of rare types.

    Examples
    --------
    >>> adata = scvi_ext.data.select_genes(adata, "cgran")
    >>> CGRAN.setup_anndata(adata, labels_key="cell_type")
    >>> model = CGRAN(adata)
    >>> model.train()
    >>> markers = model.marker_genes(top_k=50, min_fraction=0.7)
    """

    _module_cls = CGRANModule
    _training_plan_cls = BaseTrainingPlan
    _loss_needs_labels = True  # cross-entropy only
    #: The paper's 75 epochs (Adam, lr 1e-4: :meth:`_default_plan_kwargs`); no early
    #: stopping; the last epoch's weights are kept. 10% of the cells validate (not in the
    #: paper: the softmax temperature is calibrated on them, ``validation_loss`` is logged).
    train_defaults = {
        "max_epochs": 75,
        "train_size": 0.9,
        "batch_size": 64,
        "early_stopping": False,
    }

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        embedding: Literal["svd", "mf"] = "svd",
        grouping: Literal["uniform", "kmeans"] = "uniform",
        attention: Literal["local", "full"] = "local",
        group_size: int = 100,
        n_heads: int = 10,
        head_dims: tuple[int, ...] = (8, 4),
        n_embedding: int = 128,
        dropout_rate: float = 0.1,
        mf_epochs: int = 130,
        mf_lr: float = 0.005,
        mf_dropout_rate: float = 0.1,
        balance_classes: ClassBalance = False,
    ):
        super().__init__(adata, registry=registry)
        _check_choice("embedding", embedding, EMBEDDINGS)
        _check_choice("grouping", grouping, GROUPINGS)
        _check_choice("attention", attention, ATTENTIONS)
        n_genes = self.summary_stats.n_vars
        if isinstance(head_dims, int | np.integer):
            raise ValueError(
                f"head_dims must hold one width per attention block, e.g. head_dims=(8, 4), "
                f"not the number {head_dims}."
            )
        for name, value in {"group_size": group_size, "n_embedding": n_embedding}.items():
            if not is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, not {value!r}.")
        if group_size > n_genes:
            raise ValueError(
                f"group_size ({group_size}) must be between 1 and the number of genes "
                f"({n_genes}); use a smaller group_size or more genes."
            )
        if n_embedding > n_genes:
            raise ValueError(
                f"n_embedding ({n_embedding}) is larger than the number of genes ({n_genes}); "
                "use a smaller n_embedding or more genes."
            )
        if not head_dims or not all(map(is_positive_int, (*head_dims, n_heads))):
            raise ValueError(
                f"n_heads ({n_heads}) and every head_dims width ({head_dims}) must be positive "
                "integers, one width per attention block, e.g. head_dims=(8, 4)."
            )
        head_dims = tuple(int(dim) for dim in head_dims)
        self.module = self._module_cls(
            n_input=n_genes,
            n_labels=len(self.label_names),
            n_embedding=n_embedding,
            attention=attention,
            group_size=group_size,
            n_heads=n_heads,
            head_dims=head_dims,
            dropout_rate=dropout_rate,
            balance_classes=balance_classes,
        )
        self._model_summary_string = (
            f"CGRAN with embedding={embedding}, grouping={grouping}, attention={attention}, "
            f"group_size={group_size}, n_heads={n_heads}, head_dims={head_dims}, "
            f"balance_classes={self.module.balance_classes}"
        )
        self.init_params_ = self._get_init_params(locals())

    def _default_plan_kwargs(self) -> dict:
        """Paper 5.3: Adam (its own ``eps``, 1e-8), learning rate 1e-4, no weight decay, the
        weights of the last of the 75 epochs.

        scvi's training plans default to ``eps=0.01``, above 99% of CGRAN's gradient
        entries (median 1.7e-5 at initialisation on pbmc68k_reduced, paper sizes: the L2
        normalisation after each block keeps them small), so Adam's first steps were a
        median 0.2% of the learning rate and 75 epochs at 1e-4 left CGRAN under-fitted.
        Our plans also restore the epoch of lowest validation loss by default: early
        stopping in effect, which the paper does not do (``restore_best_weights=True``
        brings it back). The matrix factorisation has its own Adam (torch's eps, 1e-8).
        """
        return {**PLAIN_ADAM_PLAN, "lr": 1e-4}

    # ------------------------------------------------------------------ embedding
    def _init_param(self, name: str):
        return self.init_params_["non_kwargs"][name]

    def _check_enough_cells(self, n_cells: int) -> None:
        n_embedding = self._init_param("n_embedding")
        if n_cells < n_embedding:
            raise ValueError(
                f"CGRAN fits {n_embedding}-dimensional cell and gene vectors on its training "
                f"cells, but the AnnData has only {n_cells} cells; use at least {n_embedding} "
                "cells or a smaller n_embedding."
            )

    def fit_statistics(self) -> None:
        """Fit the cell/gene factorisation and the gene groups, unless already fitted; with
        ``balance_classes``, the inverse-frequency weight of each cell type (every time).

        Reads the normalised training matrix minibatch by minibatch: SVD accumulates
        ``M^T M`` in one pass; matrix factorisation takes ``mf_epochs`` passes.
        """
        fit_label_weights(self)
        if bool(self.module.embedding_fitted):
            return
        self._check_enough_cells(self.adata.n_obs)
        n_genes, n_embedding = self.summary_stats.n_vars, self._init_param("n_embedding")
        seed = int(scvi.settings.seed or 0)

        def minibatches() -> Iterator[torch.Tensor]:
            for tensors in self.iter_minibatches(batch_size=READ_BATCH_SIZE):
                yield self.module.normalize(tensors[REGISTRY_KEYS.X_KEY].float())

        if self._init_param("embedding") == "svd":
            gene_vectors, fold_in = fit_svd(minibatches, n_embedding)
        else:
            gene_vectors, fold_in = fit_matrix_factorisation(
                minibatches,
                n_cells=self.adata.n_obs,
                n_genes=n_genes,
                n_embedding=n_embedding,
                n_epochs=self._init_param("mf_epochs"),
                lr=self._init_param("mf_lr"),
                dropout_rate=self._init_param("mf_dropout_rate"),
                seed=seed,
            )
        group_size = self._init_param("group_size")
        if self._init_param("grouping") == "kmeans":
            groups = kmeans_groups(gene_vectors, group_size, seed)
        else:
            groups = uniform_groups(n_genes, group_size)
        self.module.set_embedding(gene_vectors, fold_in, groups)

    # ------------------------------------------------------------------ attention
    def get_attention(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Cell-to-gene attention: the last block's cell-token weights, mean over heads.

        Parameters
        ----------
        adata
            Cells with counts (default: the model's AnnData); genes matched by name.
        indices
            Cells of ``adata`` (default: all).
        batch_size
            Minibatch size.

        Returns
        -------
        Cells x genes, indexed by cell names, columns ``model.gene_names`` (the model's
        genes in its order, whatever the order of ``adata``'s genes). Local attention rows
        are L2-normalised over the cell and all genes.
        """
        attention = self._attention_array(adata, indices, batch_size)
        cells = self.cell_names(adata, indices)
        return pd.DataFrame(attention, index=cells, columns=self.gene_names.copy())

    def _attention_array(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """:meth:`get_attention` as an array (cells x the model's genes)."""
        return self.map_minibatches(self.module.cell_gene_attention, adata, indices, batch_size)

    def _cell_types(self, registered: AnnData) -> np.ndarray:
        """Each cell's type: its label when known to the model, else its prediction.

        ``registered`` is registered with the model (:meth:`registered_anndata`): labels the
        model never saw and a missing labels column are its unlabeled category there.
        """
        names = self.label_names
        manager = self.get_anndata_manager(registered, required=True)
        codes = manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY).ravel()
        known = codes < len(names)
        labels = names[np.clip(codes, 0, len(names) - 1)].astype(object)
        if not known.all():
            labels = np.where(known, labels, np.asarray(self.predict(registered)))
        return labels.astype(str)

    def marker_genes(
        self,
        top_k: int = 50,
        min_fraction: float = 0.7,
        adata: AnnData | None = None,
        batch_size: int = READ_BATCH_SIZE,
    ) -> pd.DataFrame:
        """High-attention and highly differential genes of each cell type (section 5.5).

        Each cell's ``top_k`` genes of largest attention (:meth:`get_attention`) form its
        top-k list. A gene in the lists of at least ``min_fraction`` of the cells of a type
        is a high-attention gene (HAG) of that type; a HAG of one type only is *highly
        differential*. Cells are grouped by their label (the prediction for unlabeled cells
        and cell types the model does not know).

        Parameters
        ----------
        top_k
            Length of each cell's top list (paper: 50).
        min_fraction
            Fraction of a type's cells whose list must hold the gene (paper: 0.7).
        adata
            Cells to read (default: the model's AnnData).
        batch_size
            Cells read at a time.

        Returns
        -------
        One row per (cell type, HAG), sorted by type, highly differential first, then by
        fraction: ``cell_type``, ``gene``, ``fraction`` (of the type's cells with the gene
        in their list), ``mean_attention`` (in the type's cells), ``other_fraction`` (the
        largest fraction among other types), ``highly_differential``, ``n_cells``.
        """
        n_genes = len(self.gene_names)
        if not 1 <= top_k <= n_genes:
            raise ValueError(f"top_k must be between 1 and the number of genes ({n_genes}).")
        if not 0 < min_fraction <= 1:
            raise ValueError(f"min_fraction must be in (0, 1], not {min_fraction}.")
        if not is_positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
        self._check_trained()
        in_top, attention_sums, types, n_cells = self._top_k_counts(adata, top_k, batch_size)
        fraction = in_top / n_cells[:, None]
        high = fraction >= min_fraction
        rows = []
        for t, cell_type in enumerate(types):
            others = np.delete(fraction, t, axis=0)
            other_fraction = others.max(axis=0) if len(others) else np.zeros(n_genes)
            other_high = np.delete(high, t, axis=0).any(axis=0)
            for gene in np.flatnonzero(high[t]):
                rows.append(
                    {
                        "cell_type": cell_type,
                        "gene": self.gene_names[gene],
                        "fraction": fraction[t, gene],
                        "mean_attention": attention_sums[t, gene] / n_cells[t],
                        "other_fraction": other_fraction[gene],
                        "highly_differential": not other_high[gene],
                        "n_cells": int(n_cells[t]),
                    }
                )
        columns = [
            "cell_type",
            "gene",
            "fraction",
            "mean_attention",
            "other_fraction",
            "highly_differential",
            "n_cells",
        ]
        table = pd.DataFrame(rows, columns=columns)
        table = table.sort_values(
            ["cell_type", "highly_differential", "fraction", "mean_attention"],
            ascending=[True, False, False, False],
        )
        return table.reset_index(drop=True)

    def _top_k_counts(
        self, adata: AnnData | None, top_k: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per cell type (rows): how many cells hold each gene in their top-k list, the sum
        of each gene's attention; the types and their numbers of cells."""
        n_genes = len(self.gene_names)
        with self.registered_anndata(adata) as registered:  # genes matched and checked once
            cell_types = self._cell_types(registered)
            types, codes = np.unique(cell_types, return_inverse=True)
            in_top = np.zeros((len(types), n_genes))
            attention_sums = np.zeros((len(types), n_genes))
            for start in range(0, len(codes), batch_size):
                chunk = np.arange(start, min(start + batch_size, len(codes)))
                attention = self._attention_array(registered, chunk, batch_size)
                top = np.argpartition(-attention, top_k - 1, axis=1)[:, :top_k]
                hits = np.zeros_like(attention)
                np.put_along_axis(hits, top, 1.0, axis=1)
                np.add.at(in_top, codes[chunk], hits)
                np.add.at(attention_sums, codes[chunk], attention)
        n_cells = np.bincount(codes, minlength=len(types)).astype(float)
        return in_top, attention_sums, types, n_cells

    def gene_gene_attention(
        self,
        genes: Sequence[str],
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        block: int = -1,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Attention among chosen genes (figure 4b), mean over heads and cells.

        The softmax of the query-key scores of ``block`` restricted to the chosen genes,
        without the group mask, so genes of different groups are compared.

        Parameters
        ----------
        genes
            Gene names of the model (``model.gene_names``).
        adata, indices
            Cells to average over (default: all cells of the model's AnnData).
        block
            Attention block (default: the last).
        batch_size
            Minibatch size.

        Returns
        -------
        Genes x genes; row ``i`` is how gene ``i`` attends to the others (rows sum to 1).
        """
        if isinstance(genes, str):
            raise ValueError(
                f"genes must be a list of gene names, not the string {genes!r}; e.g. "
                f"genes=[{genes!r}]."
            )
        genes = [str(gene) for gene in genes]
        unknown = [gene for gene in genes if gene not in self.gene_names]
        if unknown:
            raise ValueError(
                f"Unknown genes {unknown}: not among the model's {len(self.gene_names)} genes "
                "(model.gene_names)."
            )
        if not genes or len(set(genes)) < len(genes):
            raise ValueError(f"genes must be a non-empty list of distinct names, not {genes}.")
        if indices is not None and len(indices) == 0:
            raise ValueError("indices selects no cell; pass at least one, or None for all.")
        n_blocks = len(self.module.blocks)
        if not -n_blocks <= block < n_blocks:
            raise ValueError(f"block must be between {-n_blocks} and {n_blocks - 1}.")
        chosen = torch.as_tensor(self.gene_names.get_indexer(genes))

        def summed(tensors: dict) -> torch.Tensor:
            return self.module.gene_gene_attention(tensors, chosen, block).sum(0, keepdim=True)

        sums = self.map_minibatches(summed, adata, indices, batch_size)
        if indices is not None:
            n_cells = len(indices)
        else:
            n_cells = (self.adata if adata is None else adata).n_obs
        return pd.DataFrame(sums.sum(0) / n_cells, index=genes, columns=genes)

    # ------------------------------------------------------------------ transfer
    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: str | BaseModelClass,
        setting: Literal["A", "B", "C"] = "C",
        **kwargs,
    ) -> CGRAN:
        """Transfer a trained CGRAN to a new dataset (section 5.6); then ``train`` it.

        Parameters
        ----------
        adata
            Query AnnData with raw counts (genes matched to the reference's by name;
            labelled query cells fine-tune, cell types the reference never saw are
            treated as unlabeled).
        reference_model
            A trained CGRAN or the folder it was saved to.
        setting
            - ``"A"``: new cell and gene vectors (and k-means groups) fitted on the query
              when training starts; only the last layer (``classifier``) trains.
            - ``"B"``: new vectors as in A; every weight trains.
            - ``"C"``: the reference gene vectors are kept and query cells are fitted
              against them (least squares, the optimum of the paper's MSE); every
              weight trains.
        **kwargs
            Passed to :meth:`~scvi_ext.base.InferenceMixin.load_query_data`.
        """
        if setting not in TRANSFER_SETTINGS:
            raise ValueError(
                f"setting must be one of {list(TRANSFER_SETTINGS)} (paper section 5.6), "
                f"not {setting!r}."
            )
        kwargs["unfrozen"] = True
        model = super().load_query_data(adata, reference_model, **kwargs)
        model.transfer_setting_ = setting
        if setting in ("A", "B"):
            model._check_enough_cells(model.adata.n_obs)
            model.module.embedding_fitted.fill_(False)
        model._freeze_for_query()
        return model

    def _freeze_for_query(self) -> None:
        """Transfer setting A trains the last layer (``classifier``) only (also when a saved
        setting-A query model is loaded)."""
        if getattr(self, "transfer_setting_", None) == "A":
            for name, parameter in self.module.named_parameters():
                parameter.requires_grad = name.startswith("classifier.")
