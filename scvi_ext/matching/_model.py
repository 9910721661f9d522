"""CrossAttentionMatcher: match cells between RNA and ATAC profiles measured separately."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import MuDataCategoricalObsField, MuDataLayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.utils import setup_anndata_dsp

from scvi_ext.base import MIN_GENE_FRACTION, InferenceMixin, align_genes
from scvi_ext.data import validate_counts

from ._assignment import (
    TEMPERATURE_FITS,
    Assignment,
    TemperatureFit,
    assign,
    check_assignment,
    check_temperature,
    check_top_k,
    fit_temperature,
    probabilities,
    top_k_scores,
)
from ._features import gene_genome_order, genome_order
from ._module import AtacInput, CrossAttentionModule, Encoder, Objective, Tokenizer
from ._plan import MatcherTrainingPlan

#: Smallest standard deviation a standardised gene is divided by (``shared_encoder``).
MIN_FEATURE_SCALE = 0.01

#: The modalities the model reads: setup argument -> role in the messages.
MODALITY_ROLES = {"rna_layer": "RNA", "atac_layer": "ATAC"}
#: Default ``modalities`` of :meth:`CrossAttentionMatcher.setup_mudata`.
DEFAULT_MODALITIES = {"rna_layer": "rna", "atac_layer": "atac"}
_FIELD_KEYS = {"rna": REGISTRY_KEYS.X_KEY, "atac": REGISTRY_KEYS.ATAC_X_KEY}
#: Paired validation cells (at most) on which the softmax temperature is fitted.
N_TEMPERATURE_CELLS = 2000


def _check_paired_mudata(mdata: MuData, modalities: dict) -> None:
    """Both modalities present, with the same cells in the same order."""
    if not isinstance(mdata, MuData):
        raise ValueError(
            f"CrossAttentionMatcher.setup_mudata needs a MuData with RNA and ATAC modalities, "
            f"not {type(mdata).__name__}."
        )
    for argument, role in MODALITY_ROLES.items():
        name = modalities[argument]
        if name not in mdata.mod:
            raise ValueError(
                f"The MuData has no {role} modality '{name}' (modalities: {list(mdata.mod)}). "
                f"Pass modalities={{'{argument}': <name of the {role} modality>}}."
            )
    rna, atac = (mdata.mod[modalities[argument]] for argument in MODALITY_ROLES)
    same_cells = rna.n_obs == atac.n_obs == mdata.n_obs and rna.obs_names.is_unique
    if same_cells and not rna.obs_names.equals(atac.obs_names):
        if set(rna.obs_names) == set(atac.obs_names):
            raise ValueError(
                "The RNA and ATAC modalities hold the same cells in different orders (e.g. "
                f"{list(rna.obs_names[:2])} vs {list(atac.obs_names[:2])}). Training reads "
                "row i of both as one pair: put the ATAC cells in the RNA order, e.g. "
                "mdata = mudata.MuData({'rna': rna, 'atac': atac[rna.obs_names].copy()})."
            )
    if not rna.obs_names.equals(atac.obs_names) or rna.n_obs != mdata.n_obs:
        raise ValueError(
            f"The RNA and ATAC modalities hold different cells ({rna.n_obs} and {atac.n_obs} "
            f"cells, MuData {mdata.n_obs}; e.g. {list(rna.obs_names[:2])} vs "
            f"{list(atac.obs_names[:2])}). Training needs paired cells: the same obs_names in "
            "the same order in both, e.g. mdata = mdata[shared_cells].copy() with "
            "mudata.MuData(..., axis=0) after intersecting obs_names."
        )


def _check_batch_column(mdata: MuData, batch_key: str, modality: str | None) -> None:
    """The batch column exists (in ``mdata.obs``, or in ``modality``'s ``obs``) without NaN."""
    if modality is not None and modality not in mdata.mod:
        raise ValueError(
            f"modalities['batch_key'] names '{modality}', which is not a modality of the MuData "
            f"(modalities: {list(mdata.mod)})."
        )
    if modality is None:
        obs, where = mdata.obs, "mdata.obs"
    else:
        obs, where = mdata.mod[modality].obs, f"mdata.mod['{modality}'].obs"
    if batch_key not in obs.columns:
        available = [str(column) for column in obs.columns if not str(column).startswith("_")]
        raise ValueError(
            f"batch_key '{batch_key}' is not a column of {where} (columns: {available[:10]}). "
            "A column of a modality is named '<modality>:<column>' in mdata.obs, e.g. "
            "batch_key='rna:batch'."
        )
    n_missing = int(obs[batch_key].isna().sum())
    if n_missing:
        raise ValueError(
            f"batch_key '{batch_key}' has {n_missing} missing (NaN) values in {where}; fill "
            "them (e.g. with 'unknown') or remove those cells."
        )


def _aligned_mudata(mdata: MuData, registry: dict) -> MuData:
    """``mdata``, or a light MuData whose RNA and ATAC features are the model's (``registry``),
    matched by name (missing ones read as zeros with a warning; extra ones dropped).

    The light MuData holds the aligned count matrices and copies of the ``obs``; the
    user's MuData is not modified.

    Raises
    ------
    ValueError
        When fewer than :data:`~scvi_ext.base.MIN_GENE_FRACTION` of a modality's features
        are present, or the features of a backed modality differ from the model's.
    """
    setup_args = registry["setup_args"]
    modalities = {**DEFAULT_MODALITIES, **(setup_args.get("modalities") or {})}
    names = [modalities[argument] for argument in MODALITY_ROLES]
    if any(name not in mdata.mod for name in names):
        return mdata  # setup_mudata names the missing modality
    field_keys = {"rna_layer": REGISTRY_KEYS.X_KEY, "atac_layer": REGISTRY_KEYS.ATAC_X_KEY}
    aligned, changed = {}, False
    for argument, role in MODALITY_ROLES.items():
        name, layer = modalities[argument], setup_args.get(argument)
        state = registry["field_registries"][field_keys[argument]]["state_registry"]
        features = pd.Index([str(feature) for feature in state["column_names"]])
        modality = mdata.mod[name]
        if modality.var_names.astype(str).equals(features):
            aligned[name] = modality
            continue
        changed = True
        if modality.isbacked:
            raise ValueError(
                f"The {role} modality '{name}' is backed and its features are not the model's "
                "(in the model's order); write it with the model's features first, e.g. "
                f"mdata.mod['{name}'][:, model.feature_names('{role.lower()}')], or load it "
                "into memory."
            )
        validate_counts(modality, layer)  # names a missing layer
        matrix = modality.X if layer is None else modality.layers[layer]
        matrix = align_genes(matrix, modality.var_names, features, f"the {role} modality")
        var = pd.DataFrame(index=features.copy())
        obs = modality.obs.copy()
        aligned[name] = (
            AnnData(X=matrix, obs=obs, var=var)
            if layer is None
            else AnnData(X=None, obs=obs, var=var, layers={layer: matrix})
        )
    if not changed:
        return mdata
    for name, modality in aligned.items():  # the unchanged one: its obs copied too
        if modality is mdata.mod[name] and not modality.isbacked:
            aligned[name] = AnnData(X=modality.X, obs=modality.obs.copy(), var=modality.var)
            aligned[name].layers.update(dict(modality.layers))
    batch_modality = modalities.get("batch_key")
    if batch_modality is not None and batch_modality in mdata.mod and batch_modality not in names:
        other = mdata.mod[batch_modality]
        aligned[batch_modality] = AnnData(obs=other.obs.copy(), var=other.var.copy())
    light = MuData(aligned)
    for column in mdata.obs.columns:  # columns of the MuData's own obs (e.g. a batch)
        if column not in light.obs.columns and mdata.obs_names.equals(light.obs_names):
            light.obs[column] = mdata.obs[column].to_numpy()
    return light


class CrossAttentionMatcher(InferenceMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Cross-attention network for matching RNA and ATAC profiles of the same cells.

    Fan & Shen, "Matching Cells Between Modalities with a Cross Attention Network": per
    modality a 1-D CNN over features in genome order yields region tokens, projected to a
    shared width; a Transformer self-attention unit per modality gives the unit-norm
    embeddings ``e0`` (RNA) and ``t0`` (ATAC), a cross-attention unit over the stacked
    tokens of a pair ``e1``/``t1``; the score is ``S = e0 . t0 + alpha e1 . t1``, trained on
    paired cells with a bidirectional triplet loss (hardest in-batch negative, margin).
    ``objective="infonce"`` (with ``alpha=0``) is the CLIP baseline. RNA counts are
    normalised per cell + log1p, ATAC counts TF-IDF (IDF of the training cells) inside the
    module, so new cells go through the same transform.

    Parameters
    ----------
    mdata
        MuData registered with :meth:`setup_mudata` (paired cells).
    registry
        Registry of a saved model (used by ``load(adata=False)``).
    gene_region_map
        Genes x peaks (registered order), non-zero where a peak is linked to a gene: genes
        are then ordered by the position of their peaks; ``None`` keeps the given order.
    n_filters, kernel_size_rna, kernel_size_atac, n_tokens_rna, n_tokens_atac
        The CNN tokenizers: filters, their width (= stride), tokens after pooling.
    embed_dim, n_heads, dropout
        Width ``p`` of the tokens and attention heads.
    alpha, margin
        Weight of the cross-attention term and triplet margin.
    objective
        ``"triplet"`` (the paper) or ``"infonce"`` (CLIP; needs ``alpha=0``). The triplet
        objective can start with InfoNCE epochs: ``train(plan_kwargs={"infonce_warmup_epochs":
        5})`` (:class:`~scvi_ext.matching.MatcherTrainingPlan`).
    n_hard_candidates
        In-batch negatives per cell whose cross term is scored to find the hardest.
    n_rerank
        Candidates per cell re-ranked with the cross term at :meth:`match`.
    tokenizer
        ``"conv"`` (the paper: shared filters, max pooled to ``n_tokens_*`` tokens) or
        ``"local"`` (untied weights per genomic stretch; ``n_filters`` and the kernel sizes
        are then unused).
    temperature_fit
        How the softmax temperature of :meth:`match` is fitted on paired validation cells
        after training: ``"likelihood"`` (mean log-probability of the true pair: P is as
        confident as the model is right) or ``"score"`` (the competition score, which
        drives a weak model's rows to one-hot on wrong cells). Both fitted temperatures
        are kept in ``match_temperatures_``.
    atac_input
        What the ATAC encoder reads: ``"peaks"`` (TF-IDF peaks in genome order, the paper)
        or ``"gene_activity"`` (each gene's summed linked peaks of ``gene_region_map``,
        normalised as the RNA: both encoders then read genes in the same order).
    shared_encoder
        With ``atac_input="gene_activity"``: one encoder (the RNA's tokenizer and
        self-attention unit) for both modalities, each modality's genes standardised with
        its training cells' statistics first (as the gene-activity PCA baseline does).
    encoder
        ``"attention"`` (tokenizer + self-attention, the paper) or ``"linear"``: one linear
        map of the standardised genes of both modalities to ``embed_dim`` (needs
        ``atac_input="gene_activity"``, ``shared_encoder=True``, ``alpha=0``), started at
        the first ``embed_dim`` principal components of the training RNA (the
        ``gene_activity_pca`` baseline) and trained from there; no attention maps.

    Examples
    --------
    >>> CrossAttentionMatcher.setup_mudata(mdata)
    >>> model = CrossAttentionMatcher(mdata, gene_region_map=gene_region_map)
    >>> model.train(max_epochs=30)
    >>> P = model.match(rna_query, atac_query, top_k=1000)
    """

    _module_cls = CrossAttentionModule
    _training_plan_cls = MatcherTrainingPlan
    _counts_input = False  # the base's gene checks read one AnnData; this model does its own
    train_defaults = {
        "max_epochs": 30,
        "train_size": 0.9,
        "batch_size": 256,
        "early_stopping": True,
        "early_stopping_patience": 10,
    }

    def __init__(
        self,
        mdata: MuData | None = None,
        registry: dict | None = None,
        gene_region_map: sp.spmatrix | None = None,
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
        n_rerank: int = 20,
        tokenizer: Tokenizer = "conv",
        temperature_fit: TemperatureFit = "likelihood",
        atac_input: AtacInput = "peaks",
        shared_encoder: bool = False,
        encoder: Encoder = "attention",
    ):
        if temperature_fit not in TEMPERATURE_FITS:
            raise ValueError(
                f"temperature_fit must be 'likelihood' or 'score', not {temperature_fit!r}."
            )
        super().__init__(mdata, registry=registry)
        genes, peaks = self.feature_names("rna"), self.feature_names("atac")
        self.n_rerank = n_rerank
        self.temperature_fit = temperature_fit
        self.match_temperature_ = 0.05
        self.match_temperatures_: dict[str, float] = {}
        if atac_input == "gene_activity" and gene_region_map is None:
            raise ValueError(
                "atac_input='gene_activity' sums the peaks linked to each gene: pass "
                "gene_region_map= (genes x peaks, in the registered order)."
            )
        links = None
        if gene_region_map is not None:
            coo = sp.coo_matrix(gene_region_map)
            links = np.stack([coo.row, coo.col], 1)[coo.data != 0]
        self.module = self._module_cls(
            len(genes),
            len(peaks),
            gene_genome_order(genes, peaks, gene_region_map),
            genome_order(peaks),
            n_filters=n_filters,
            kernel_size_rna=kernel_size_rna,
            kernel_size_atac=kernel_size_atac,
            n_tokens_rna=n_tokens_rna,
            n_tokens_atac=n_tokens_atac,
            embed_dim=embed_dim,
            n_heads=n_heads,
            dropout=dropout,
            alpha=alpha,
            margin=margin,
            objective=objective,
            n_hard_candidates=n_hard_candidates,
            tokenizer=tokenizer,
            atac_input=atac_input,
            links=links,
            shared_encoder=shared_encoder,
            encoder=encoder,
        )
        self._model_summary_string = (
            f"CrossAttentionMatcher ({objective}, alpha={alpha}) on {len(genes)} genes and "
            f"{len(peaks)} peaks (ATAC read as {atac_input})"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_mudata(
        cls,
        mdata: MuData,
        modalities: dict[str, str] | None = None,
        rna_layer: str | None = None,
        atac_layer: str | None = None,
        batch_key: str | None = None,
        **kwargs,
    ):
        """Register the paired RNA and ATAC counts of a MuData.

        Parameters
        ----------
        mdata
            MuData whose RNA and ATAC modalities hold the same cells in the same order.
        modalities
            Setup argument -> modality name; default ``{"rna_layer": "rna", "atac_layer":
            "atac"}`` (``"batch_key"`` may name the modality whose ``obs`` has the batches).
        rna_layer, atac_layer
            Layers of raw counts (``None``: ``X`` of the modality).
        batch_key
            Column of library batches (recorded; the network does not condition on it, so
            cells of new batches can be matched).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        modalities = {**DEFAULT_MODALITIES, **(modalities or {})}
        _check_paired_mudata(mdata, modalities)
        for argument, layer in (("rna_layer", rna_layer), ("atac_layer", atac_layer)):
            validate_counts(mdata.mod[modalities[argument]], layer)
        if batch_key is not None:
            _check_batch_column(mdata, batch_key, modalities.get("batch_key"))
        fields = [
            MuDataLayerField(
                REGISTRY_KEYS.X_KEY,
                rna_layer,
                mod_key=modalities["rna_layer"],
                is_count_data=True,
                mod_required=True,
            ),
            MuDataLayerField(
                REGISTRY_KEYS.ATAC_X_KEY,
                atac_layer,
                mod_key=modalities["atac_layer"],
                is_count_data=True,
                mod_required=True,
            ),
            MuDataCategoricalObsField(
                REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=modalities.get("batch_key")
            ),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(mdata, **kwargs)
        cls.register_manager(manager)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: MuData | None = None, **kwargs):
        """Load a saved matcher; the features of ``adata`` are matched to the model's by name.

        Parameters
        ----------
        dir_path
            Folder written by ``save``.
        adata
            MuData to attach (``None``: the one saved with the model, ``False``: none). When
            a modality's features differ from the model's (another order, a subset or a
            superset), the model holds a light MuData on its features, matched by name
            (missing ones read as zeros, with a warning), and the user's MuData is untouched.
        **kwargs
            Passed to :meth:`scvi_ext.base.InferenceMixin.load`.
        """
        if isinstance(adata, MuData):
            try:
                registry = cls.load_registry(os.fspath(dir_path), prefix=kwargs.get("prefix"))
            except Exception:  # the base's load names the damaged file
                registry = None
            if registry is not None:
                adata = _aligned_mudata(adata, registry)
        return super().load(dir_path, adata=adata, **kwargs)

    def _check_registered_genes(self, adata: MuData) -> None:
        """The model's MuData must still have the features it was set up with, in order (and
        an open file, when backed)."""
        super()._check_registered_genes(adata)
        for modality in ("rna", "atac"):
            data = adata.mod[self._modality_name(modality)]
            features = self.feature_names(modality)
            if data.n_vars != len(features) or not data.var_names.astype(str).equals(features):
                raise ValueError(
                    f"The {modality.upper()} modality of the MuData registered with this "
                    f"CrossAttentionMatcher changed after setup: it has {data.n_vars} features, "
                    f"the model {len(features)} (e.g. {list(features[:3])}), or another order. "
                    "Register the edited MuData with setup_mudata and build a new model."
                )

    @classmethod
    def setup_anndata(cls, adata: AnnData, **kwargs):
        """Not available: the model reads paired RNA and ATAC, registered with
        :meth:`setup_mudata`."""
        raise ValueError(
            "CrossAttentionMatcher reads paired RNA and ATAC counts: build a MuData "
            "(mudata.MuData({'rna': rna, 'atac': atac})) and call setup_mudata."
        )

    def feature_names(self, modality: str) -> pd.Index:
        """Genes (``"rna"``) or peaks (``"atac"``) the model reads, in registered order."""
        field = self.registry_["field_registries"][_FIELD_KEYS[self._modality(modality)]]
        return pd.Index([str(name) for name in field["state_registry"]["column_names"]])

    @property
    def gene_names(self) -> pd.Index:
        """The RNA features."""
        return self.feature_names("rna")

    @staticmethod
    def _modality(modality: str) -> str:
        if modality not in _FIELD_KEYS:
            raise ValueError(f"modality must be 'rna' or 'atac', not {modality!r}.")
        return modality

    # ------------------------------------------------------------------ training
    def fit_statistics(self) -> None:
        """IDF of each peak, log(1 + n_cells / (1 + cells with the peak)), on the
        registered (training) cells, read in minibatches; with ``shared_encoder``, the
        mean and standard deviation of each modality's normalised genes too; with
        ``encoder="linear"``, before the first training, its start: the principal axes of
        the standardised training RNA."""
        module = self.module
        n_cells, cells_with_peak = 0, torch.zeros(module.peak_idf.shape[0])
        sums = torch.zeros(2, 2, module.n_genes, dtype=torch.float64)  # side, (x, x^2), gene
        for tensors in self.iter_minibatches(batch_size=1024):
            atac = tensors[REGISTRY_KEYS.ATAC_X_KEY]
            cells_with_peak += (atac > 0).sum(0).float().cpu()
            n_cells += len(atac)
            if module.shared_encoder:
                device = module.feature_means.device
                rna = module.normalise_rna(tensors[REGISTRY_KEYS.X_KEY].to(device))
                for side, features in enumerate((rna, module.normalise_atac(atac.to(device)))):
                    features = features.double().cpu()
                    sums[side, 0] += features.sum(0)
                    sums[side, 1] += (features**2).sum(0)
        idf = torch.log1p(n_cells / (1.0 + cells_with_peak))
        module.peak_idf.copy_(idf.to(module.peak_idf.device))
        if module.shared_encoder:
            means = sums[:, 0] / n_cells
            std = (sums[:, 1] / n_cells - means**2).clamp_min(0).sqrt()
            module.feature_means.copy_(means.float())
            # genes (nearly) constant in training would blow up: at least MIN_FEATURE_SCALE
            module.feature_scales.copy_(std.clamp_min(MIN_FEATURE_SCALE).float())
        if module.encoder == "linear" and not self.is_trained_:
            self._start_at_principal_axes()

    def _start_at_principal_axes(self) -> None:
        """The linear encoder's weights := the first ``embed_dim`` principal axes of the
        standardised training RNA (its covariance summed minibatch by minibatch)."""
        module = self.module
        device = module.feature_means.device
        gram, n_cells = torch.zeros(module.n_genes, module.n_genes, dtype=torch.float64), 0
        for tensors in self.iter_minibatches(batch_size=1024):
            rna = module.normalise_rna(tensors[REGISTRY_KEYS.X_KEY].to(device))
            rna = ((rna - module.feature_means[0]) / module.feature_scales[0]).double().cpu()
            gram += rna.T @ rna
            n_cells += len(rna)
        _, axes = torch.linalg.eigh(gram / max(n_cells - 1, 1))  # ascending eigenvalues
        weight = module.projection.weight
        with torch.no_grad():
            weight.copy_(axes.flip(1)[:, : weight.shape[0]].T.to(weight))

    def _after_training(self) -> None:
        """Fit the softmax temperature of :meth:`match` on paired validation cells (at
        most ``N_TEMPERATURE_CELLS``; without validation cells, training cells), both ways
        (``match_temperatures_``); ``match_temperature_`` is the one of ``temperature_fit``."""
        validation = getattr(self, "validation_indices", None)
        indices = np.asarray([] if validation is None else validation, dtype=int)
        if len(indices) < 2:
            indices = np.asarray(self.train_indices, dtype=int)
        rng = np.random.default_rng(0)
        if len(indices) > N_TEMPERATURE_CELLS:
            indices = np.sort(rng.choice(indices, N_TEMPERATURE_CELLS, replace=False))
        rna = self._encode(self._registered_modality("rna")[indices], "rna")
        atac = self._encode(self._registered_modality("atac")[indices], "atac")
        candidates, scores = self._candidate_scores(rna, atac, top_k=len(indices))
        self.match_temperatures_ = {
            fit: fit_temperature(candidates, scores, fit) for fit in TEMPERATURE_FITS
        }
        self.match_temperature_ = self.match_temperatures_[self.temperature_fit]

    # ------------------------------------------------------------------ data of one modality
    @property
    def _count_locations(self) -> dict[str, str]:
        """Both modalities' counts, checked in every minibatch read (the MuData may have
        changed since setup)."""
        locations = {}
        for modality, key in _FIELD_KEYS.items():
            name, layer = self._modality_name(modality), self.setup_args.get(f"{modality}_layer")
            matrix = "X" if layer is None else f"layers['{layer}']"
            locations[key] = f"mdata.mod['{name}'].{matrix}"
        return locations

    def _modality_name(self, modality: str) -> str:
        """Name of ``modality``'s AnnData in the MuData (as given to ``setup_mudata``)."""
        modalities = {**DEFAULT_MODALITIES, **(self.setup_args.get("modalities") or {})}
        return modalities[f"{modality}_layer"]

    def _registered_modality(self, modality: str) -> AnnData:
        if self.adata is None:
            raise ValueError(
                "This CrossAttentionMatcher was loaded without data (adata=False); pass the "
                "cells to use."
            )
        return self.adata.mod[self._modality_name(modality)]

    def _modality_anndata(self, data: AnnData | MuData | None, modality: str) -> AnnData:
        """The AnnData of ``modality`` in ``data`` (default: the model's MuData)."""
        modality = self._modality(modality)
        if data is None:
            return self._registered_modality(modality)
        if isinstance(data, MuData):
            name = self._modality_name(modality)
            if name not in data.mod:
                role = MODALITY_ROLES[f"{modality}_layer"]
                raise ValueError(
                    f"The MuData has no {role} modality '{name}' (modalities: "
                    f"{list(data.mod)}); the model was set up with '{name}'."
                )
            return data.mod[name]
        if not isinstance(data, AnnData):
            raise ValueError(
                f"Expected an AnnData of {modality.upper()} counts or a MuData, not "
                f"{type(data).__name__}."
            )
        return data

    @torch.inference_mode()
    def _encode(
        self, adata: AnnData, modality: str, batch_size: int = 256, need_weights: bool = False
    ) -> dict[str, np.ndarray | torch.Tensor]:
        """Embeddings (and tokens, attention) of the cells of one modality, in row blocks.

        Features are matched to the model's by name (reordered; missing ones read as zeros
        with a warning; fewer than half shared is an error); counts are validated.
        """
        self._check_trained()
        if adata.n_obs == 0:
            raise ValueError(
                f"The {modality.upper()} AnnData has no cells; pass at least one cell."
            )
        layer = self.setup_args.get(f"{modality}_layer")
        validate_counts(adata, layer)
        matrix = adata.X if layer is None else adata.layers[layer]
        features, name = self.feature_names(modality), f"the {modality.upper()} AnnData"
        n_shared = int(features.isin(adata.var_names.astype(str)).sum())
        if n_shared < MIN_GENE_FRACTION * len(features):
            kind = "genes" if modality == "rna" else "peaks"
            missing = list(features[~features.isin(adata.var_names.astype(str))][:3])
            raise ValueError(
                f"{name} shares only {n_shared} of the model's {len(features)} {kind} (e.g. "
                f"missing {missing}). Pass cells measured on the training features "
                f"(model.feature_names('{modality}')); missing ones read as zeros only while "
                f"at least {MIN_GENE_FRACTION:.0%} are present."
            )
        device = self.module.device
        was_training = self.module.training
        self.module.eval()
        outputs: dict[str, list] = {"embedding": [], "tokens": [], "attention": []}
        try:
            for start in range(0, adata.n_obs, batch_size):
                block = align_genes(
                    matrix[start : start + batch_size], adata.var_names, features, name
                )
                block = block.toarray() if sp.issparse(block) else np.asarray(block)
                counts = torch.as_tensor(block, dtype=torch.float32, device=device)
                encoded = self.module.encode(counts, modality, need_weights=need_weights)
                outputs["embedding"].append(encoded["embedding"].cpu())
                outputs["tokens"].append(encoded["tokens"].cpu())
                if need_weights:
                    outputs["attention"].append(encoded["attention"].sum(0).cpu())
        finally:
            self.module.train(was_training)
        result = {
            "embedding": torch.cat(outputs["embedding"]).numpy(),
            "tokens": torch.cat(outputs["tokens"]),
        }
        if need_weights:
            result["attention_sum"] = torch.stack(outputs["attention"]).sum(0).numpy()
        return result

    # ------------------------------------------------------------------ outputs
    def get_latent_representation(
        self,
        adata: AnnData | MuData | None = None,
        modality: str = "rna",
        batch_size: int = 256,
    ) -> np.ndarray:
        """Unit-norm self-attention embeddings (``e0`` for RNA, ``t0`` for ATAC).

        Parameters
        ----------
        adata
            AnnData of that modality's counts, or a MuData (default: the model's).
        modality
            ``"rna"`` or ``"atac"``.
        batch_size
            Cells encoded at a time.

        Returns
        -------
        Cells x ``embed_dim``; RNA and ATAC embeddings live in the same space.
        """
        modality = self._modality(modality)
        return self._encode(self._modality_anndata(adata, modality), modality, batch_size)[
            "embedding"
        ]

    def get_attention(
        self,
        adata: AnnData | MuData | None = None,
        modality: str = "rna",
        indices: Sequence[int] | None = None,
        batch_size: int = 256,
    ) -> pd.DataFrame:
        """Region-region self-attention of one modality (paper 3.2), averaged over cells
        and heads.

        Returns
        -------
        Tokens x tokens (rows attend to columns; rows sum to 1), labelled by the first and
        last feature, in genome order, that each token pools over.
        """
        modality = self._modality(modality)
        if self.module.encoder == "linear":
            raise ValueError(
                "This matcher's encoder is linear (encoder='linear'): it has no attention."
            )
        data = self._modality_anndata(adata, modality)
        if indices is not None:
            data = data[np.asarray(indices)]
        encoded = self._encode(data, modality, batch_size, need_weights=True)
        attention = encoded["attention_sum"] / data.n_obs
        module = self.module
        tokenizer = module.rna_tokenizer if modality == "rna" else module.atac_tokenizer
        if modality == "rna" or module.atac_input == "gene_activity":
            order, names = module.gene_order.cpu().numpy(), self.feature_names("rna")
        else:
            order, names = module.peak_order.cpu().numpy(), self.feature_names("atac")
        ordered = names[order]
        spans = tokenizer.token_spans(len(ordered))
        labels = [f"{ordered[first]}..{ordered[last]}" for first, last in spans]
        return pd.DataFrame(attention, index=labels, columns=labels)

    @torch.inference_mode()
    def _candidate_scores(
        self,
        rna: dict,
        atac: dict,
        top_k: int,
        n_rerank: int | None = None,
        block_size: int = 1024,
        pair_batch_size: int = 4096,
        rows: str = "rna",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``top_k`` candidates of each cell of ``rows`` by ``e0 . t0`` (in blocks), the
        first ``n_rerank`` re-scored with the full ``S = e0 . t0 + alpha e1 . t1``."""
        queries, candidates = (rna, atac) if rows == "rna" else (atac, rna)
        indices, scores = top_k_scores(
            queries["embedding"], candidates["embedding"], top_k, block_size
        )
        n_rerank = min(self.n_rerank if n_rerank is None else n_rerank, indices.shape[1])
        if self.module.cross_attention is None or n_rerank < 1:
            return indices, scores
        pair_rows = np.repeat(np.arange(len(indices)), n_rerank)
        columns = indices[:, :n_rerank].ravel()
        cross = np.empty(len(pair_rows), dtype=np.float32)
        was_training = self.module.training
        self.module.eval()
        device = self.module.device
        try:
            for start in range(0, len(pair_rows), pair_batch_size):
                chunk = slice(start, start + pair_batch_size)
                query_tokens = queries["tokens"][pair_rows[chunk]].to(device)
                candidate_tokens = candidates["tokens"][columns[chunk]].to(device)
                rna_tokens, atac_tokens = (
                    (query_tokens, candidate_tokens)
                    if rows == "rna"
                    else (candidate_tokens, query_tokens)
                )
                cross[chunk] = self.module.cross_scores(rna_tokens, atac_tokens).cpu().numpy()
        finally:
            self.module.train(was_training)
        cross = cross.reshape(len(indices), n_rerank)
        alpha = self.module.alpha
        rescored = scores.copy()
        rescored[:, :n_rerank] += alpha * cross
        rescored[:, n_rerank:] += alpha * cross.min(1, keepdims=True)
        order = np.argsort(-rescored, axis=1, kind="stable")
        return np.take_along_axis(indices, order, 1), np.take_along_axis(rescored, order, 1)

    def match_candidates(
        self,
        rna: AnnData | MuData,
        atac: AnnData | None = None,
        top_k: int = 1000,
        n_rerank: int | None = None,
        batch_size: int = 256,
        block_size: int = 1024,
        rows: Literal["rna", "atac"] = "rna",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` candidates of each cell and their scores ``S``, best first: what
        :meth:`match` turns into probabilities (parameters as there).

        Returns
        -------
        Column indices (int32) and scores (float32), both rows x ``min(top_k, columns)``.

        Raises
        ------
        ValueError
            If ``top_k`` is below 1 or ``rows`` is unknown.
        """
        if atac is None:
            if not isinstance(rna, MuData):
                raise ValueError(
                    "Pass the ATAC cells (match(rna_adata, atac_adata)) or one MuData holding "
                    "both modalities."
                )
            atac = rna
        check_top_k(top_k)
        if rows not in ("rna", "atac"):
            raise ValueError(f"rows must be 'rna' or 'atac', not {rows!r}.")
        rna_encoded = self._encode(self._modality_anndata(rna, "rna"), "rna", batch_size)
        atac_encoded = self._encode(self._modality_anndata(atac, "atac"), "atac", batch_size)
        return self._candidate_scores(
            rna_encoded, atac_encoded, top_k, n_rerank, block_size, rows=rows
        )

    def match(
        self,
        rna: AnnData | MuData,
        atac: AnnData | None = None,
        top_k: int = 1000,
        assignment: Assignment = None,
        temperature: float | None = None,
        n_rerank: int | None = None,
        batch_size: int = 256,
        block_size: int = 1024,
        rows: Literal["rna", "atac"] = "rna",
    ) -> sp.csr_matrix:
        """Probability that each RNA cell and each ATAC cell are the same cell.

        Scores ``e0 . t0`` in blocks of ``block_size`` RNA cells (never a dense n x n
        matrix), keeps the ``top_k`` best ATAC cells of each RNA cell, re-ranks the first
        ``n_rerank`` of them with the cross-attention term (the other kept candidates get
        the row's lowest re-ranked cross term) (:meth:`match_candidates`), then takes a
        softmax at ``temperature``.

        Parameters
        ----------
        rna
            RNA counts (AnnData), or a MuData with both modalities (``atac`` then ``None``).
        atac
            ATAC counts (AnnData); any number of cells.
        top_k
            Non-zeros kept per row (the competition allows 1000).
        assignment
            One-to-one post-processing: ``"bipartite"`` (maximum-likelihood matching,
            0/1 rows), ``"ot"`` (entropic optimal transport between uniform marginals, as
            MatchCLOT) or ``None``.
        temperature
            Softmax temperature (default: ``match_temperature_``, fitted after training on
            paired validation cells as ``temperature_fit`` says).
        n_rerank
            Candidates re-ranked with the cross term (default: the model's ``n_rerank``).
        batch_size, block_size
            Cells encoded at a time; RNA cells scored at a time.
        rows
            Modality of the rows: ``"atac"`` matches each ATAC cell to the RNA cells.

        Returns
        -------
        CSR matrix (RNA cells x ATAC cells, or ATAC x RNA with ``rows="atac"``); rows sum
        to 1, at most ``top_k`` non-zeros per row.

        Raises
        ------
        ValueError
            If ``temperature`` is not a positive finite number, ``top_k`` is below 1, or
            ``rows`` or ``assignment`` is unknown.
        """
        temperature = self.match_temperature_ if temperature is None else temperature
        check_temperature(temperature)  # before encoding the cells, not after
        check_assignment(assignment)
        indices, scores = self.match_candidates(
            rna, atac, top_k, n_rerank, batch_size, block_size, rows
        )
        atac = rna if atac is None else atac  # one MuData holding both
        columns, modality = (atac, "atac") if rows == "rna" else (rna, "rna")
        n_columns = self._modality_anndata(columns, modality).n_obs
        matrix = probabilities(indices, scores, n_columns, temperature)
        return assign(matrix, assignment, temperature)
