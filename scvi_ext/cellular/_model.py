"""CELLULAR: contrastive cell embeddings with cell type centroid structure."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import CategoricalObsField
from scvi.model.base import ArchesMixin, BaseModelClass, UnsupervisedTrainingMixin

from scvi_ext.base import (
    ClassifierMixin,
    EmbeddingMixin,
    class_means,
    class_sums,
    labelled_class_weights,
    labelled_mask,
    register_labelled_anndata,
    setup_anndata_method,
)

from ._losses import batch_centroid_distances
from ._module import CELLULARModule
from ._plan import CELLULARTrainingPlan
from ._transformer import (
    SAVED_EMBEDDINGS_KEY,
    TransformerEncoder,
    gene_embedding_matrix,
    resolve_gene_sets,
)

logger = logging.getLogger(__name__)

REPRESENTATION_METHODS = ("centroid", "median", "medoid")


class CELLULAR(
    ClassifierMixin, EmbeddingMixin, ArchesMixin, UnsupervisedTrainingMixin, BaseModelClass
):
    """CELLULAR cell embedding (Andersson, master's thesis 2024, Models 1-3).

    An encoder from 2000 HVG counts to an ``n_latent``-dimensional space trained with a
    class-weighted soft nearest-neighbour loss on cell types, a batch-mixing loss among
    cells of the same type, and a centroid loss that keeps the relative distances between
    cell type centroids of a 100-component PCA. The encoder takes no batch covariate, so
    it embeds unseen cells and unseen batches directly (inductive).

    With ``encoder="transformer"`` the feed-forward encoder is replaced by the thesis's
    token encoders: ``gene_embeddings`` alone gives Model 2 (one token per gene: a learned
    embedding of its binned expression + its gene embedding, e.g. gene2vec),
    ``gene_sets`` alone one token per gene set (a linear map of the set's expression), both
    together Model 3 (the two transformers side by side). Each has a class token whose
    attention :func:`scvi_ext.interpret.attention_rollout` turns into per-cell weights of
    genes or gene sets. Attention over ``n`` tokens costs memory in ``n**2`` per cell: gene
    tokens over 2000 HVGs need a GPU; gene sets (hundreds of tokens) fit a CPU.

    ``predict`` is a nearest-centroid classifier in the embedding (cosine similarity to
    the training centroids of each cell type); :class:`~scvi_ext.model.LatentClassifier`
    is the thesis's classifier head.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by ``load(adata=False)``).
    n_latent
        Embedding size (thesis: 100).
    n_hidden
        Hidden widths of the feed-forward encoder (thesis: 1000, 500 for 2000 HVGs).
    dropout_rate
        Encoder dropout (reference code: 0.2).
    cell_type_weight, batch_weight, centroid_weight
        Loss weights (thesis: 0.9, 0.1, 1.0); 0 switches a term off. The thesis's
        ablation: "CL only" ``centroid_weight=0``; "centroid only" ``cell_type_weight=0,
        batch_weight=0``.
    encoder
        ``"feedforward"`` (Model 1) or ``"transformer"`` (Models 2 and 3; needs
        ``gene_embeddings``, ``gene_sets`` or both).
    gene_embeddings
        Transformer only: a gene embedding per gene, as a DataFrame indexed by gene names
        (every gene of the data needs a row; extra rows are ignored) or an array with one
        row per gene in ``adata.var_names`` order. Kept frozen; saved in the module state.
    gene_sets
        Transformer only: a GMT file path or a dict gene set name -> gene names. Genes not in
        the data are dropped (with a warning); a gene set without any gene of the data is an
        error. The resolved sets are saved with the model.
    d_model
        Token width (default: the gene embedding width, without projection, as in the
        thesis; 64 for gene sets alone). With gene embeddings of another width, a learned
        linear map projects them.
    n_heads, n_layers
        Attention heads and transformer layers of each token branch.
    n_bins
        Expression bins of gene tokens, equally spaced between each gene's minimum and
        maximum normalised expression in the reference (thesis: 1000).

    Examples
    --------
    >>> adata = scvi_ext.data.select_genes(adata, method="cellular")
    >>> CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="donor")
    >>> model = CELLULAR(adata)
    >>> model.train()
    >>> adata.obsm["X_cellular"] = model.get_latent_representation()

    Model 3, with gene2vec vectors (a DataFrame indexed by gene symbols) and a GMT file:

    >>> model = CELLULAR(adata, encoder="transformer", gene_embeddings=gene2vec,
    ...                  gene_sets="c5.go.bp.v2023.1.Hs.symbols.gmt")
    """

    _module_cls = CELLULARModule
    _training_plan_cls = CELLULARTrainingPlan
    _loss_needs_labels = True  # every loss term reads cell types
    #: The reference code's: 50 epochs, minibatch 256, 80:20 split, early stopping
    #: patience 20 (see :meth:`~scvi_ext.base.InferenceMixin.train`).
    train_defaults = {
        "max_epochs": 50,
        "train_size": 0.8,
        "batch_size": 256,
        "early_stopping": True,
        "early_stopping_patience": 20,
    }

    # ------------------------------------------------------------------ setup
    @setup_anndata_method
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        batch_key: str | None = None,
        layer: str | None = None,
        unlabeled_category: str | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData with raw counts for :class:`CELLULAR`.

        Select genes first (``scvi_ext.data.select_genes(adata, method="cellular")``:
        2000 ``cell_ranger`` HVGs, as in the thesis); the model normalises counts itself.

        Parameters
        ----------
        %(param_adata)s
        %(param_cell_types)s
        batch_key
            ``obs`` column of batches (patients, donors, ...) for the batch-mixing loss and
            the centroid reference. Must have at least two batches; ``None`` switches the
            batch-mixing loss off. A cell type present in one batch only is allowed (with
            a warning): its batch-mixing term is empty and its centroid distances come from
            that batch alone.
        %(param_layer)s
        %(param_unlabeled_or_none)s
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        batch_field = CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key)
        register_labelled_anndata(cls, adata, setup_method_args, [batch_field], **kwargs)
        if batch_key is not None and "source_registry" not in kwargs:
            _check_batches(adata, labels_key, batch_key, unlabeled_category)

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_latent: int = 100,
        n_hidden: Sequence[int] = (1000, 500),
        dropout_rate: float = 0.2,
        cell_type_weight: float = 0.9,
        batch_weight: float = 0.1,
        centroid_weight: float = 1.0,
        encoder: Literal["feedforward", "transformer"] = "feedforward",
        gene_embeddings: np.ndarray | pd.DataFrame | None = None,
        gene_sets: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
        d_model: int | None = None,
        n_heads: int = 4,
        n_layers: int = 2,
        n_bins: int = 1000,
    ):
        super().__init__(adata, registry=registry)
        if cell_type_weight == 0 and batch_weight == 0 and centroid_weight == 0:
            raise ValueError("At least one of the loss weights must be non-zero.")
        n_labels = len(self.label_names)
        n_input = self.summary_stats.n_vars
        token_encoder, embedding_matrix, resolved_sets = None, None, None
        if encoder == "transformer":
            if gene_embeddings is None and gene_sets is None:
                raise ValueError(
                    "encoder='transformer' needs gene_embeddings (Model 2: binned expression "
                    "tokens + gene embeddings), gene_sets (one token per gene set) or both "
                    "(Model 3)."
                )
            genes = list(self.gene_names)
            if gene_embeddings is not None:
                embedding_matrix = gene_embedding_matrix(gene_embeddings, genes)
            if gene_sets is not None:
                resolved_sets = resolve_gene_sets(gene_sets, genes)
            token_encoder = TransformerEncoder(
                genes,
                n_latent,
                gene_embeddings=embedding_matrix,
                gene_sets=resolved_sets,
                d_model=d_model,
                n_heads=n_heads,
                n_layers=n_layers,
                n_bins=n_bins,
                dropout_rate=dropout_rate,
            )
        elif encoder != "feedforward":
            raise ValueError(f"encoder must be 'feedforward' or 'transformer', not '{encoder}'.")
        elif gene_embeddings is not None or gene_sets is not None:
            raise ValueError(
                "gene_embeddings and gene_sets are inputs of encoder='transformer'; the "
                "feed-forward encoder reads expression only."
            )
        self.module = self._module_cls(
            n_input=n_input,
            n_labels=n_labels,
            n_batch=self.summary_stats.n_batch,
            n_latent=n_latent,
            n_hidden=tuple(n_hidden),
            dropout_rate=dropout_rate,
            cell_type_weight=cell_type_weight,
            batch_weight=batch_weight,
            centroid_weight=centroid_weight,
            encoder=token_encoder,
        )
        if token_encoder is None:
            architecture = f"n_hidden={tuple(n_hidden)}"
        else:
            tokens = " + ".join(
                f"{len(names)} {branch.replace('_', ' ')}"
                for branch, names in token_encoder.token_names.items()
            )
            architecture = f"tokens {tokens}, n_heads={n_heads}, n_layers={n_layers}"
        self._model_summary_string = (
            f"CELLULAR model ({encoder} encoder) with n_latent={n_latent}, {architecture}, "
            f"loss weights cell type {cell_type_weight} / batch {batch_weight} / centroid "
            f"{centroid_weight}, n_labels={n_labels}"
        )
        self.init_params_ = self._get_init_params(locals())
        # Saved init parameters stay small: the embedding matrix lives in the module state
        # (load rebuilds a zero matrix of this shape, then loads the values); the gene sets
        # are saved as plain lists of the data's genes.
        saved = self.init_params_["non_kwargs"]
        if embedding_matrix is not None:
            saved["gene_embeddings"] = {SAVED_EMBEDDINGS_KEY: list(embedding_matrix.shape)}
        if resolved_sets is not None:
            saved["gene_sets"] = resolved_sets

    # ------------------------------------------------------------------ training
    def fit_statistics(self, n_pca_components: int | None = None) -> None:
        """Fit the module's statistics, reading the counts minibatch by minibatch.

        Every call: the class and batch weights (inverse frequencies among the labelled
        cells). Once per reference model (not for a query model): the mean library size of
        all cells, and from the labelled cells normalised with it, the reference centroid
        distance matrix (an exact PCA with ``n_pca_components``, default ``n_latent``,
        from the accumulated gene covariance, which holds ``n_genes**2`` numbers) and, for
        gene tokens, each gene's expression range.
        """
        manager, module = self.adata_manager, self.module
        module.label_weights.copy_(
            labelled_class_weights(manager, REGISTRY_KEYS.LABELS_KEY, module.n_labels)
        )
        if module.n_batch > 1:
            module.batch_weights.copy_(
                labelled_class_weights(manager, REGISTRY_KEYS.BATCH_KEY, module.n_batch)
            )
        if self.is_query_model or float(module.library_size) > 0:
            return
        total = sum(
            float(tensors[REGISTRY_KEYS.X_KEY].double().sum())
            for tensors in self.iter_minibatches()
        )
        module.library_size.fill_(total / self.adata.n_obs)
        labelled = labelled_mask(manager)
        gram, group_sums, group_counts, low, high = self._labelled_expression_moments(labelled)
        n_cells, n_genes = float(group_counts.sum()), gram.shape[0]
        mean = group_sums.sum(dim=0) / n_cells
        covariance = (gram - n_cells * torch.outer(mean, mean)) / max(n_cells - 1, 1)
        n_components = int(min(n_pca_components or module.n_latent, n_cells - 1, n_genes - 1))
        components = torch.linalg.eigh(covariance).eigenvectors[:, -n_components:]
        centroids = class_means(group_sums, group_counts) @ components
        distances = batch_centroid_distances(
            centroids.reshape(module.n_batch, module.n_labels, -1).numpy(),
            group_counts.reshape(module.n_batch, module.n_labels).numpy() > 0,
        )
        module.reference_distances.copy_(torch.as_tensor(distances, dtype=torch.float32))
        if isinstance(module.encoder, TransformerEncoder):
            module.encoder.set_expression_range(low.numpy(), high.numpy())

    @torch.no_grad()
    def _labelled_expression_moments(self, labelled: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Of the normalised expression of the labelled cells, read minibatch by minibatch:
        the gene x gene sum of products, the sums and counts of each (batch, cell type)
        group, and each gene's minimum and maximum."""
        module = self.module
        n_genes, n_groups = self.summary_stats.n_vars, module.n_batch * module.n_labels
        gram = torch.zeros(n_genes, n_genes, dtype=torch.float64)
        group_sums = torch.zeros(n_groups, n_genes, dtype=torch.float64)
        group_counts = torch.zeros(n_groups, dtype=torch.float64)
        low = torch.full((n_genes,), torch.inf, dtype=torch.float64)
        high = torch.full((n_genes,), -torch.inf, dtype=torch.float64)
        for tensors in self.iter_minibatches(indices=np.flatnonzero(labelled)):
            counts = tensors[REGISTRY_KEYS.X_KEY].to(module.library_size)
            x = module.normalize(counts)
            # the minibatch's products on the model's device in float32 (the pass's cost:
            # n_cells * n_genes**2; on a CPU 1.6x faster than float64), summed over
            # minibatches in float64 on the CPU (MPS has no float64)
            gram += (x.T @ x).cpu().double()
            x = x.cpu().double()
            batches = tensors[REGISTRY_KEYS.BATCH_KEY].long().ravel()
            groups = batches * module.n_labels + tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
            sums, counts = class_sums(x, groups, n_groups)
            group_sums += sums
            group_counts += counts
            low = torch.minimum(low, x.min(dim=0).values)
            high = torch.maximum(high, x.max(dim=0).values)
        return gram, group_sums, group_counts, low, high

    def _after_training(self) -> None:
        """Store the cell type centroids of a reference model (for :meth:`predict`), then
        calibrate."""
        if not self.is_query_model:
            labelled = labelled_mask(self.adata_manager)
            n_labels = self.module.n_labels

            def sums_and_counts(tensors: dict) -> torch.Tensor:  # (1, types, latent + 1)
                latent = self.module.latent(tensors)
                labels = tensors[REGISTRY_KEYS.LABELS_KEY].to(latent.device)
                sums, counts = class_sums(latent, labels, n_labels)
                return torch.cat([sums, counts[:, None]], dim=1)[None]

            # summed minibatch by minibatch: no latent of every cell is held
            totals = self.map_minibatches(sums_and_counts, indices=np.flatnonzero(labelled))
            totals = totals.sum(axis=0)
            sums, counts = torch.as_tensor(totals[:, :-1]), torch.as_tensor(totals[:, -1])
            self.module.centroids.copy_(class_means(sums, counts).float())
        super()._after_training()

    def _light_copy(self, adata: AnnData) -> AnnData:
        """Like the base's, but any batch is accepted: the encoder does not read batches."""
        light = super()._light_copy(adata)
        batch_key = self.setup_args.get("batch_key")
        if batch_key is not None:
            state = self.registry_["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
            reference_batch = state["categorical_mapping"][0]
            light.obs[batch_key] = pd.Categorical([reference_batch] * light.n_obs)
        return light

    # ------------------------------------------------------------------ downstream
    def cell_type_representations(
        self,
        adata: AnnData | None = None,
        method: Literal["centroid", "median", "medoid"] = "centroid",
        labels_key: str | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """One vector per cell type in the embedding (thesis 2.5).

        Parameters
        ----------
        adata
            Cells to embed (default: the model's AnnData).
        method
            ``"centroid"`` (mean), ``"median"`` (per dimension) or ``"medoid"`` (the cell
            with the smallest summed Euclidean distance to the others of its type).
        labels_key
            ``obs`` column of cell types (default: the one given to ``setup_anndata``).
        batch_size
            Minibatch size for embedding.

        Returns
        -------
        DataFrame, cell types x embedding dimensions.
        """
        if method not in REPRESENTATION_METHODS:
            raise ValueError(f"method must be one of {REPRESENTATION_METHODS}, not '{method}'.")
        labels_key = labels_key or self.setup_args["labels_key"]
        source = self.adata if adata is None else adata
        if source is None:
            raise ValueError("This model was loaded without data (adata=False); pass adata=... .")
        if labels_key not in source.obs:
            raise ValueError(f"labels_key '{labels_key}' is not a column of adata.obs.")
        latent = self.get_latent_representation(adata, batch_size=batch_size)
        labels = source.obs[labels_key].astype(str).to_numpy()
        unlabeled = self.unlabeled_category
        types = [name for name in pd.unique(labels) if name != unlabeled]
        rows = {name: _aggregate(latent[labels == name], method) for name in sorted(types)}
        columns = [f"dim_{i}" for i in range(latent.shape[1])]
        return pd.DataFrame.from_dict(rows, orient="index", columns=columns)

    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model, **kwargs) -> CELLULAR:
        """Query model for new data, new batches included (scArches-style).

        The encoder has no batch covariate, so the reference weights embed the query
        directly: new batch categories are registered, every encoder weight is frozen,
        and the returned model is ready for :meth:`get_latent_representation` and
        :meth:`predict` (reference centroids) without training. With ``unfrozen=True``
        all weights train on the query's labelled cells (weight decay 0 by default);
        the reference's library size, centroid matrix and centroids are kept.
        """
        model = super().load_query_data(adata, reference_model, **kwargs)
        model.is_trained_ = True
        return model


def _aggregate(latent: np.ndarray, method: str) -> np.ndarray:
    if method == "centroid":
        return latent.mean(axis=0)
    if method == "median":
        return np.median(latent, axis=0)
    points = torch.as_tensor(latent, dtype=torch.float64)
    totals = torch.cat(
        [
            torch.cdist(points[start : start + 1024], points).sum(dim=1)
            for start in range(0, len(points), 1024)
        ]
    )
    return latent[int(totals.argmin())]


def _check_batches(adata: AnnData, labels_key: str, batch_key: str, unlabeled: str) -> None:
    batches = adata.obs[batch_key].astype(str)
    n_batches = batches.nunique()
    if n_batches < 2:
        raise ValueError(
            f"batch_key '{batch_key}' has a single batch ('{batches.iloc[0]}'); the "
            "batch-mixing loss needs at least two. Pass batch_key=None for data from one batch."
        )
    labels = adata.obs[labels_key].astype(str)
    keep = (labels != unlabeled).to_numpy()
    per_type = pd.crosstab(labels[keep], batches[keep]).gt(0).sum(axis=1)
    single = sorted(per_type.index[per_type < 2])
    if single:
        warnings.warn(
            f"Cell types {single} occur in one batch of '{batch_key}' only: their "
            "batch-mixing term is empty and their centroid distances come from that batch.",
            UserWarning,
            stacklevel=3,
        )
