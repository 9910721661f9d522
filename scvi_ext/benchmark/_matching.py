"""RNA-ATAC cell matching (issue 15): the snareseq_matching study and its baselines.

``snareseq_matching``: SNARE-seq mouse cortex, 20% of the cells held out (stratified by
library batch), every method trained on the paired 80%, then the held-out RNA matched
against the held-out ATAC without their pairing, in both directions, with and without a
one-to-one assignment. ``matching_scale``: matching simulated embeddings of up to
100,000 x 100,000 cells in blocks, peak memory and time.

Options (``--task-option KEY=VALUE``) for reduced runs: ``snareseq_matching`` takes
``epochs`` (of every trained model), ``methods`` (a subset of :data:`MATCHING_METHODS`) and
``plots`` (``False``: no figures);
``matching_scale`` takes ``sizes`` (cell numbers). Figures (PNG) go to the report folder.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._studies import register_study

logger = logging.getLogger(__name__)

TOP_K = 1000
#: (one-to-one assignment, temperature fit) of each matching: the default likelihood-fitted
#: temperature with every assignment, and the competition-score-fitted one without.
MATCHINGS = (
    (None, "likelihood"),
    ("bipartite", "likelihood"),
    ("ot", "likelihood"),
    (None, "score"),
)
DIRECTIONS = ("rna_to_atac", "atac_to_rna")
#: Settings of the trained models in the study (a CPU-sized version of the paper's).
MODEL_SETTINGS = {
    "embed_dim": 32,
    "n_heads": 4,
    "n_tokens_rna": 16,
    "n_tokens_atac": 32,
    "n_filters": 16,
    "kernel_size_rna": 4,
    "kernel_size_atac": 16,
    "n_hard_candidates": 4,
    "n_rerank": 20,
}
DEFAULT_EPOCHS = 30
#: Share of the epochs of the warm-started triplet models trained with InfoNCE first (the
#: simulated ablation of docs/matching.md: 5 of 20).
WARMUP_FRACTION = 0.25


@dataclass
class MatchingOutput:
    """One method's matching of the held-out cells."""

    matrices: dict[tuple[str, str | None, str], sp.csr_matrix]  # (direction, assignment, fit)
    rna_embedding: np.ndarray | None  # for FOSCTTM and the UMAP (None: random)
    atac_embedding: np.ndarray | None
    train_seconds: float
    match_seconds: dict[tuple[str, str | None, str], float]
    model: object | None = None


def _split(mdata, seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out cell indices, held-out stratified by library batch."""
    from sklearn.model_selection import train_test_split

    batches = mdata.mod["rna"].obs["batch"].astype(str).to_numpy()
    cells = np.arange(mdata.n_obs)
    train, test = train_test_split(
        cells, test_size=test_fraction, stratify=batches, random_state=seed
    )
    return np.sort(train), np.sort(test)


def _timed_matrices(
    candidates: Callable[[str], tuple[np.ndarray, np.ndarray]],
    n_columns: int,
    temperatures: dict[str, float],
) -> tuple[dict, dict]:
    """The matrix of every direction and matching (:data:`MATCHINGS`) from
    ``candidates(direction)``, the kept columns and scores of each row, computed once per
    direction; the seconds of each matrix include those of its candidates."""
    from scvi_ext.matching import assign, probabilities

    matrices, seconds = {}, {}
    for direction in DIRECTIONS:
        start = time.perf_counter()
        indices, scores = candidates(direction)
        candidate_seconds = time.perf_counter() - start
        for assignment, fit in MATCHINGS:
            start = time.perf_counter()
            temperature = temperatures[fit]
            matrix = probabilities(indices, scores, n_columns, temperature)
            matrices[direction, assignment, fit] = assign(matrix, assignment, temperature)
            seconds[direction, assignment, fit] = candidate_seconds + time.perf_counter() - start
    return matrices, seconds


def _matcher_method(
    warm_start: bool = False, plan_kwargs: dict | None = None, **settings
) -> Callable:
    """A :class:`~scvi_ext.matching.CrossAttentionMatcher` of ``MODEL_SETTINGS`` updated by
    ``settings``; ``warm_start``: InfoNCE for the first ``WARMUP_FRACTION`` of the epochs;
    ``plan_kwargs``: training plan arguments over its defaults (e.g. ``lr``, Adam ``eps``)."""

    def run(mdata, train, test, gene_region_map, seed, epochs=DEFAULT_EPOCHS) -> MatchingOutput:
        import scvi

        from scvi_ext.matching import CrossAttentionMatcher

        scvi.settings.seed = seed
        reference = mdata[train].copy()
        CrossAttentionMatcher.setup_mudata(reference)
        model = CrossAttentionMatcher(
            reference, gene_region_map=gene_region_map, **{**MODEL_SETTINGS, **settings}
        )
        start = time.perf_counter()
        warmup_epochs = max(1, round(WARMUP_FRACTION * epochs)) if warm_start else 0
        plan = {"infonce_warmup_epochs": warmup_epochs, **(plan_kwargs or {})}
        model.train(max_epochs=epochs, enable_progress_bar=False, plan_kwargs=plan)
        train_seconds = time.perf_counter() - start
        held_out = mdata[test].copy()
        rna, atac = held_out.mod["rna"], held_out.mod["atac"]

        def candidates(direction):
            rows = "rna" if direction == "rna_to_atac" else "atac"
            return model.match_candidates(rna, atac, TOP_K, rows=rows)

        matrices, seconds = _timed_matrices(candidates, len(test), model.match_temperatures_)
        return MatchingOutput(
            matrices,
            model.get_latent_representation(rna, modality="rna"),
            model.get_latent_representation(atac, modality="atac"),
            train_seconds,
            seconds,
            model,
        )

    return run


def _embedding_output(
    rna_train: np.ndarray,
    atac_train: np.ndarray,
    rna_test: np.ndarray,
    atac_test: np.ndarray,
    train_seconds: float,
) -> MatchingOutput:
    """Cosine matching of linear embeddings, temperatures fitted on 2000 training pairs."""
    from scvi_ext.matching import TEMPERATURE_FITS, fit_temperature, l2_normalise, top_k_scores

    rna_train, atac_train = l2_normalise(rna_train), l2_normalise(atac_train)
    rna_test, atac_test = l2_normalise(rna_test), l2_normalise(atac_test)
    fit = np.random.default_rng(0).choice(len(rna_train), min(2000, len(rna_train)), False)
    candidates = top_k_scores(rna_train[fit], atac_train[fit], TOP_K)
    temperatures = {way: fit_temperature(*candidates, way) for way in TEMPERATURE_FITS}

    def test_candidates(direction):
        rows, columns = (
            (rna_test, atac_test) if direction == "rna_to_atac" else (atac_test, rna_test)
        )
        return top_k_scores(rows, columns, TOP_K)

    matrices, seconds = _timed_matrices(test_candidates, len(atac_test), temperatures)
    return MatchingOutput(matrices, rna_test, atac_test, train_seconds, seconds)


def _log_normalise(counts: sp.spmatrix) -> sp.csr_matrix:
    counts = sp.csr_matrix(counts, dtype=np.float64)
    library = np.asarray(counts.sum(1)).ravel()
    normalised = sp.diags(1e4 / np.maximum(library, 1)) @ counts
    normalised.data = np.log1p(normalised.data)
    return sp.csr_matrix(normalised)


def _tf_idf(
    counts: sp.spmatrix, idf: np.ndarray | None = None
) -> tuple[sp.csr_matrix, np.ndarray]:
    counts = sp.csr_matrix(counts, dtype=np.float64)
    if idf is None:
        idf = np.log1p(counts.shape[0] / (1.0 + np.asarray((counts > 0).sum(0)).ravel()))
    library = np.asarray(counts.sum(1)).ravel()
    tf_idf = sp.diags(1e4 / np.maximum(library, 1)) @ counts @ sp.diags(idf)
    tf_idf = sp.csr_matrix(tf_idf)
    tf_idf.data = np.log1p(tf_idf.data)
    return tf_idf, idf


def _cca(
    x: np.ndarray, y: np.ndarray, n_components: int, ridge: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form (ridge-regularised) CCA: projections of centred ``x`` and ``y`` onto
    their ``n_components`` most correlated directions."""

    def inverse_sqrt(covariance: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(
            covariance + ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
        )
        return vectors @ np.diag(values**-0.5) @ vectors.T

    x, y = x - x.mean(0), y - y.mean(0)
    whiten_x, whiten_y = inverse_sqrt(x.T @ x / len(x)), inverse_sqrt(y.T @ y / len(y))
    left, _, right = np.linalg.svd(whiten_x @ (x.T @ y / len(x)) @ whiten_y)
    return whiten_x @ left[:, :n_components], whiten_y @ right.T[:, :n_components]


def _linear_cca(mdata, train, test, gene_region_map, seed, **_untrained) -> MatchingOutput:
    """PCA (RNA log-normalised) and LSI (ATAC TF-IDF), 50 components each, fitted on the
    training cells; CCA (20 components) on the training pairs; cosine."""
    from sklearn.decomposition import TruncatedSVD

    start = time.perf_counter()
    rna = _log_normalise(mdata.mod["rna"].X)
    atac_train, idf = _tf_idf(mdata.mod["atac"].X[train])
    atac_test, _ = _tf_idf(mdata.mod["atac"].X[test], idf)
    rna_mean = np.asarray(rna[train].mean(0)).ravel()
    pca = TruncatedSVD(50, random_state=seed).fit(np.asarray(rna[train] - rna_mean))
    lsi = TruncatedSVD(51, random_state=seed).fit(atac_train)
    rna_train = pca.transform(np.asarray(rna[train] - rna_mean))
    rna_test = pca.transform(np.asarray(rna[test] - rna_mean))
    atac_train_lsi = lsi.transform(atac_train)[:, 1:]  # first LSI component: depth
    atac_test_lsi = lsi.transform(atac_test)[:, 1:]
    atac_mean = atac_train_lsi.mean(0)
    atac_train_lsi, atac_test_lsi = atac_train_lsi - atac_mean, atac_test_lsi - atac_mean
    rna_projection, atac_projection = _cca(rna_train, atac_train_lsi, n_components=20)
    rna_train_c, atac_train_c = rna_train @ rna_projection, atac_train_lsi @ atac_projection
    rna_test_c, atac_test_c = rna_test @ rna_projection, atac_test_lsi @ atac_projection
    seconds = time.perf_counter() - start
    return _embedding_output(rna_train_c, atac_train_c, rna_test_c, atac_test_c, seconds)


def _gene_activity_pca(mdata, train, test, gene_region_map, seed, **_untrained) -> MatchingOutput:
    """ATAC -> gene activity through the gene-region map; both log-normalised and scaled
    with the RNA training cells' statistics, projected on the RNA PCA (50); cosine. Uses no
    pairing."""
    from sklearn.decomposition import PCA

    start = time.perf_counter()
    links = sp.csr_matrix(gene_region_map, dtype=np.float64)
    links.data[:] = 1.0
    rna = _log_normalise(mdata.mod["rna"].X).toarray()
    activity = _log_normalise(sp.csr_matrix(mdata.mod["atac"].X) @ links.T).toarray()

    def scaled(x, reference):
        return (x - reference.mean(0)) / np.maximum(reference.std(0), 1e-6)

    rna_scaled, activity_scaled = scaled(rna, rna[train]), scaled(activity, activity[train])
    pca = PCA(50, random_state=seed).fit(rna_scaled[train])
    seconds = time.perf_counter() - start
    return _embedding_output(
        pca.transform(rna_scaled[train]),
        pca.transform(activity_scaled[train]),
        pca.transform(rna_scaled[test]),
        pca.transform(activity_scaled[test]),
        seconds,
    )


def _random(mdata, train, test, gene_region_map, seed, **_untrained) -> MatchingOutput:
    """Uniform probability over ``TOP_K`` random columns per row (expected score 1/n)."""
    rng = np.random.default_rng(seed)
    n = len(test)
    k = min(TOP_K, n)

    def candidates(direction):
        columns = np.argsort(rng.random((n, n)), axis=1)[:, :k].astype(np.int32)
        # scores jittered by 1e-3: P stays uniform to 0.1%, and the one-to-one solvers see
        # no exact ties (scipy's matching breaks ties in a way that favours the diagonal)
        return columns, rng.random((n, k)).astype(np.float32) * 1e-3

    matrices, seconds = _timed_matrices(candidates, n, {"likelihood": 1.0, "score": 1.0})
    return MatchingOutput(matrices, None, None, 0.0, seconds)


#: The best trained matcher so far: CLIP-InfoNCE, ATAC read as gene activity, one encoder.
_SHARED_GENE_ACTIVITY = {
    "tokenizer": "local",
    "alpha": 0.0,
    "objective": "infonce",
    "atac_input": "gene_activity",
    "shared_encoder": True,
}

#: Methods of the study: name -> ``run(mdata, train, test, gene_region_map, seed, epochs=...)``
#: (methods without training ignore ``epochs``).
MATCHING_METHODS: dict[str, Callable] = {
    "cross_attention_triplet": _matcher_method(tokenizer="conv", alpha=0.5),
    # the model's defaults with Adam's own eps (1e-8) instead of scvi's plan's 0.01
    "cross_attention_triplet_eps1e-8": _matcher_method(
        tokenizer="conv", alpha=0.5, plan_kwargs={"eps": 1e-8}
    ),
    "cross_attention_triplet_local": _matcher_method(tokenizer="local", alpha=0.5),
    "cross_attention_triplet_warm_local": _matcher_method(
        warm_start=True, tokenizer="local", alpha=0.5
    ),
    "self_attention_triplet_local": _matcher_method(tokenizer="local", alpha=0.0),
    "self_attention_triplet_warm_local": _matcher_method(
        warm_start=True, tokenizer="local", alpha=0.0
    ),
    "clip_infonce_local": _matcher_method(tokenizer="local", alpha=0.0, objective="infonce"),
    "clip_infonce_local_gene_activity": _matcher_method(
        tokenizer="local", alpha=0.0, objective="infonce", atac_input="gene_activity"
    ),
    "clip_infonce_shared_gene_activity": _matcher_method(**_SHARED_GENE_ACTIVITY),
    "clip_infonce_shared_gene_activity_wide": _matcher_method(
        **_SHARED_GENE_ACTIVITY, embed_dim=64, n_tokens_rna=32, n_tokens_atac=32
    ),
    "clip_infonce_shared_gene_activity_conv": _matcher_method(
        **{**_SHARED_GENE_ACTIVITY, "tokenizer": "conv"}
    ),
    # one linear map started at the gene_activity_pca baseline's 50 axes
    "clip_linear_gene_activity": _matcher_method(
        **_SHARED_GENE_ACTIVITY, encoder="linear", embed_dim=50
    ),
    "clip_linear_gene_activity_lr1e-4": _matcher_method(
        **_SHARED_GENE_ACTIVITY, encoder="linear", embed_dim=50, plan_kwargs={"lr": 1e-4}
    ),
    "clip_linear_gene_activity_eps1e-8": _matcher_method(
        **_SHARED_GENE_ACTIVITY, encoder="linear", embed_dim=50, plan_kwargs={"eps": 1e-8}
    ),
    "cross_attention_triplet_warm_local_gene_activity": _matcher_method(
        warm_start=True, tokenizer="local", alpha=0.5, atac_input="gene_activity"
    ),
    "linear_cca": _linear_cca,
    "gene_activity_pca": _gene_activity_pca,
    "random": _random,
}


def _scores(output: MatchingOutput, test_obs: pd.DataFrame, seed: int) -> list[dict]:
    from scvi_ext.metrics import (
        foscttm,
        matched_label_fraction,
        matching_aupr,
        matching_log_likelihood,
        matching_score,
        matching_top_k,
    )

    rows = []
    for (direction, assignment, fit), matrix in output.matrices.items():
        if output.rna_embedding is None:
            fos = 0.5
        else:
            x, y = output.rna_embedding, output.atac_embedding
            way = "x_to_y" if direction == "rna_to_atac" else "y_to_x"
            fos = foscttm(x, y, metric="cosine", direction=way)
        row = {
            "assignment": assignment or "none",
            "temperature_fit": fit,
            "direction": direction,
            "competition_score": matching_score(matrix),
            "log_likelihood": matching_log_likelihood(matrix),
            "top1": matching_top_k(matrix, 1),
            "top5": matching_top_k(matrix, 5),
            "top50": matching_top_k(matrix, 50),
            "foscttm": fos,
            "aupr": matching_aupr(matrix),
            "train_seconds": output.train_seconds,
            "match_seconds": output.match_seconds[direction, assignment, fit],
            "max_nonzeros_per_row": int(np.diff(matrix.indptr).max()),
        }
        for key in ("cell_type", "cell_type_fine"):
            labels = test_obs[key].astype(str).to_numpy()
            row[f"same_{key}"] = matched_label_fraction(matrix, labels, labels)
        rows.append(row)
    return rows


def _plots(
    name: str, output: MatchingOutput, test_obs: pd.DataFrame, seed: int, folder: Path
) -> None:
    """Similarity matrix of 200 held-out cells ordered by type, UMAP of the joint embedding,
    region-region attention maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    cell_types = test_obs["cell_type"].astype(str).to_numpy()
    chosen = rng.choice(len(cell_types), min(200, len(cell_types)), replace=False)
    chosen = chosen[np.argsort(cell_types[chosen], kind="stable")]
    matrix = output.matrices["rna_to_atac", None, "likelihood"][chosen][:, chosen].toarray()
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    sorted_types = cell_types[chosen]
    starts = np.flatnonzero(np.r_[True, sorted_types[1:] != sorted_types[:-1]])
    ax.set_yticks(starts, sorted_types[starts], fontsize=6)
    ax.set_xticks([])
    ax.set_xlabel("held-out ATAC cells (ordered by type)")
    ax.set_title(f"{name}: P (200 held-out RNA x ATAC cells)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / f"{name}_similarity_seed{seed}.png", dpi=120)
    plt.close(fig)

    if output.rna_embedding is not None:
        import umap

        joint = np.vstack([output.rna_embedding, output.atac_embedding])
        coords = umap.UMAP(random_state=seed, n_jobs=1).fit_transform(joint)
        modality = np.repeat(["RNA", "ATAC"], len(output.rna_embedding))
        types = np.concatenate([cell_types, cell_types])
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        for ax, values, title in ((axes[0], modality, "modality"), (axes[1], types, "cell type")):
            for value in np.unique(values):
                mask = values == value
                ax.scatter(*coords[mask].T, s=2, label=value)
            ax.set_title(f"{name}: joint embedding by {title}")
            ax.legend(markerscale=4, fontsize=6)
        fig.tight_layout()
        fig.savefig(folder / f"{name}_umap_seed{seed}.png", dpi=120)
        plt.close(fig)

    if output.model is not None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        for ax, modality in zip(axes, ("rna", "atac"), strict=True):
            attention = output.model.get_attention(modality=modality)
            ax.imshow(attention.to_numpy(), cmap="magma")
            ax.set_title(f"{modality.upper()} region-region self-attention")
            ticks = np.arange(0, len(attention), max(1, len(attention) // 8))
            labels = [attention.index[i].split("..")[0] for i in ticks]
            ax.set_yticks(ticks, labels, fontsize=6)
            ax.set_xticks([])
        fig.tight_layout()
        fig.savefig(folder / f"{name}_attention_seed{seed}.png", dpi=120)
        plt.close(fig)


def _selected_methods(methods: str | tuple[str, ...] | list[str] | None) -> list[str]:
    if methods is None:
        return list(MATCHING_METHODS)
    chosen = [methods] if isinstance(methods, str) else list(methods)
    unknown = sorted(set(chosen) - set(MATCHING_METHODS))
    if unknown:
        raise ValueError(f"Unknown matching methods {unknown}; known: {sorted(MATCHING_METHODS)}.")
    return chosen


@register_study(
    "snareseq_matching",
    "SNARE-seq mouse cortex (10,309 paired cells): 20% held out (stratified by library "
    "batch), models trained on the paired 80%, held-out RNA matched against held-out ATAC "
    "without the pairing, both directions, top_k = 1000, with and without one-to-one "
    "assignment (bipartite, entropic OT). Softmax temperature fitted on paired cells by "
    "likelihood (the default) or, rows 'T by score', by the competition score. "
    "competition_score = mean probability on the true pair (random 1/n); log_likelihood = "
    "mean log of it (floor 1e-6; uniform P: log 1/n); FOSCTTM on the embeddings (cosine; lower "
    "is better, random 0.5); same_cell_type = probability mass on cells of the same type.",
    {"matching": ("competition_score", "log_likelihood", "top5", "foscttm")},
)
def snareseq_matching(
    seed: int,
    outdir: str | Path | None = None,
    epochs: int = DEFAULT_EPOCHS,
    methods: str | tuple[str, ...] | list[str] | None = None,
    plots: bool = True,
) -> dict[str, pd.DataFrame]:
    """Every method of :data:`MATCHING_METHODS`, or those of ``methods``.

    Parameters
    ----------
    seed
        Seed of the held-out split and the models.
    outdir
        Folder of the figures (``None``: a temporary folder).
    epochs
        Epochs of every trained model.
    methods
        Names of :data:`MATCHING_METHODS` (default: all).
    plots
        Draw the figures (the UMAP takes minutes per method on a loaded CPU).
    """
    from scvi_ext.data import load_snareseq, load_snareseq_gene_region_map

    mdata = load_snareseq()
    gene_region_map = load_snareseq_gene_region_map()
    train, test = _split(mdata, seed)
    test_obs = mdata.mod["rna"].obs.iloc[test]
    folder = Path(outdir or tempfile.mkdtemp(prefix="snareseq_matching_"))
    rows = []
    for name in _selected_methods(methods):
        logger.info("snareseq_matching: %s, seed %d", name, seed)
        output = MATCHING_METHODS[name](mdata, train, test, gene_region_map, seed, epochs=epochs)
        for row in _scores(output, test_obs, seed):
            rows.append(
                {
                    "run": f"{name}: {row['assignment']}, T by {row['temperature_fit']}, "
                    f"{row['direction']}",
                    "method": name,
                    **row,
                }
            )
        try:
            if plots:
                _plots(name, output, test_obs, seed, folder)
        except Exception as error:  # a figure must not lose the table
            logger.warning("Plots of %s failed: %s", name, error)
        # the rows so far, in case a later method is stopped (hours on a CPU)
        pd.DataFrame(rows).to_csv(folder / f"partial_seed{seed}.csv", index=False)
    return {"matching": pd.DataFrame(rows)}


class _PeakMemory:
    """Peak resident memory (MB above the start) of this process, sampled every 10 ms."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *args):
        self._running = False
        self._thread.join()

    @property
    def megabytes(self) -> float:
        return (self.peak - self.start) / 2**20


@register_study(
    "matching_scale",
    "Matching simulated embeddings (32 dimensions, ATAC = RNA + noise, unit norm) of n x n "
    "cells with top_k = 1000: scores in blocks of 1024 rows, never a dense n x n matrix. "
    "Peak resident memory above the start and seconds; memory should grow linearly in n "
    "(n * top_k entries).",
    {"scale": ("seconds", "peak_mb")},
)
def matching_scale(
    seed: int, sizes: int | tuple[int, ...] = (10_000, 25_000, 50_000, 100_000)
) -> dict[str, pd.DataFrame]:
    """Time and peak memory of :func:`scvi_ext.matching.match_embeddings` as n grows."""
    from scvi_ext.matching import l2_normalise, match_embeddings
    from scvi_ext.metrics import matching_score

    rows = []
    for n in (sizes,) if isinstance(sizes, int) else sizes:
        rng = np.random.default_rng(seed)
        rna = rng.normal(size=(n, 32)).astype(np.float32)
        atac = l2_normalise(rna + rng.normal(scale=0.5, size=rna.shape).astype(np.float32))
        rna = l2_normalise(rna)
        with _PeakMemory() as memory:
            start = time.perf_counter()
            matrix = match_embeddings(rna, atac, top_k=TOP_K, temperature=0.05)
            seconds = time.perf_counter() - start
        rows.append(
            {
                "n_cells": n,
                "seconds": seconds,
                "peak_mb": memory.megabytes,
                "peak_bytes_per_cell": memory.megabytes * 2**20 / n,
                "nonzeros": matrix.nnz,
                "competition_score": matching_score(matrix),
            }
        )
        del matrix
    return {"scale": pd.DataFrame(rows)}
