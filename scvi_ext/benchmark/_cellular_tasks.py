"""CELLULAR benchmarks: annotation transfer, embedding quality, novel types, throughput.

- :func:`cellular_method`, registered as the benchmark method ``"cellular"``:
  CELLULAR + :class:`~scvi_ext.model.LatentClassifier` on one split.
- :func:`embedding_quality`, :func:`novel_type_detection` and :func:`training_throughput`
  return DataFrames; :mod:`scvi_ext.benchmark._studies` runs them over seeds and writes
  the reports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scvi_ext.data import log_normalised_anndata

from ._methods import (
    MethodResult,
    MethodUnavailableError,
    keyword_settings,
    n_training_cells,
    register_method,
)

logger = logging.getLogger(__name__)

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def _select_hvgs(
    reference: ad.AnnData, query: ad.AnnData, n_top_genes: int
) -> tuple[ad.AnnData, ad.AnnData]:
    """``n_top_genes`` ``cell_ranger`` HVGs of the reference (thesis: 2000), applied to both."""
    from scvi_ext.data import select_genes

    reference = select_genes(reference, method="cellular", n_top_genes=n_top_genes)
    return reference, query[:, reference.var_names].copy()


@register_method("cellular")
def cellular_method(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    batch_key: str | None = None,
    max_epochs: int = 50,
    classifier_epochs: int = 50,
    n_latent: int = 100,
    n_top_genes: int = 2000,
    tune_trials: int = 0,
    plan_kwargs: dict | None = None,
    classifier_kwargs: dict | None = None,
) -> MethodResult:
    """CELLULAR embedding + LatentClassifier (thesis Model 1 + classifier) on one split.

    ``cells_per_second`` counts the embedding's training cells and epochs per second of
    the embedding's training (the classifier excluded).

    Parameters
    ----------
    reference, query, labels_key, seed
        See :mod:`scvi_ext.benchmark`.
    batch_key
        Reference ``obs`` column of batches (e.g. ``"donor"``); ``None`` when the
        reference has one batch (then the batch-mixing loss is off).
    max_epochs, classifier_epochs
        Epochs of the embedding and of the classifier (reference code: 50, 50).
    n_latent
        Embedding size (thesis: 100).
    n_top_genes
        ``cell_ranger`` highly variable genes of the reference (thesis: 2000; every gene
        when there are not more).
    tune_trials
        Optuna trials for the classifier (0: default settings).
    plan_kwargs
        Training plan arguments of CELLULAR's embedding (e.g. ``{"eps": 1e-8}``), over
        the model's defaults; the classifier keeps its own.
    classifier_kwargs
        Arguments of the :class:`~scvi_ext.model.LatentClassifier` (e.g.
        ``{"balance_classes": True}``).

    Raises
    ------
    ValueError
        When ``n_top_genes`` is below 1.
    """
    from scvi_ext.model import CELLULAR, LatentClassifier

    reference, query = _select_hvgs(reference, query, n_top_genes)
    if batch_key is not None and reference.obs[batch_key].nunique() < 2:
        batch_key = None
    reference.obs[labels_key] = reference.obs[labels_key].astype(str)
    start = time.perf_counter()
    CELLULAR.setup_anndata(reference, labels_key=labels_key, batch_key=batch_key)
    model = CELLULAR(reference, n_latent=n_latent)
    model.train(max_epochs=max_epochs, plan_kwargs=plan_kwargs, **QUIET)
    embed_seconds = time.perf_counter() - start
    n_epochs = len(model.history["train_loss"])
    n_train = n_training_cells(model)
    classifier = LatentClassifier.from_model(model, reference, **(classifier_kwargs or {}))
    if tune_trials:
        classifier.tune(n_trials=tune_trials, max_epochs=classifier_epochs, **QUIET)
    else:
        classifier.train(max_epochs=classifier_epochs, **QUIET)
    train_seconds = time.perf_counter() - start
    proba = classifier.predict_proba(query)
    return MethodResult(
        name="cellular",
        predictions=classifier.label_names[proba.argmax(axis=1)].astype(str),
        confidence=proba.max(axis=1),
        uncalibrated_confidence=classifier.predict_proba(query, calibrated=False).max(axis=1),
        train_seconds=train_seconds,
        cells_per_second=n_train * n_epochs / embed_seconds,
        settings=f"{reference.n_vars} genes, CELLULAR {n_epochs} epochs, n_latent={n_latent}"
        f"{f', plan {plan_kwargs}' if plan_kwargs else ''}; classifier "
        f"{classifier_epochs} epochs{f', {tune_trials} optuna trials' if tune_trials else ''}"
        f"{keyword_settings(classifier_kwargs)}",
    )


@register_method("cellular_eps1e-8", default=False)
def cellular_eps1e_8(
    reference: ad.AnnData, query: ad.AnnData, labels_key: str, seed: int = 0, **options
) -> MethodResult:
    """``cellular`` with the embedding trained at Adam's own ``eps`` (1e-8, the reference
    code's ``torch.optim.Adam``) instead of scvi's 0.01, which CELLULAR keeps: measured side
    by side, 1e-8 lowered kang_ifnb accuracy on every seed (docs/can_cgran.md, "Adam's eps
    for the other models")."""
    options["plan_kwargs"] = {"eps": 1e-8, **(options.get("plan_kwargs") or {})}
    result = cellular_method(reference, query, labels_key, seed, **options)
    return dataclasses.replace(result, name="cellular_eps1e-8")


# ---------------------------------------------------------------------- embedding quality
def embedding_quality(
    adata: ad.AnnData,
    labels_key: str = "cell_type",
    batch_key: str = "donor",
    seed: int = 0,
    max_epochs: int = 50,
    methods: tuple[str, ...] = ("cellular", "scvi", "scanvi", "pca"),
) -> pd.DataFrame:
    """scib-metrics of embeddings of one dataset (thesis 2.4), overall = 0.6 bio + 0.4 batch.

    Every method embeds all cells of ``adata`` (2000 ``cell_ranger`` HVGs). Metrics are
    scib-metrics' defaults (isolated labels, Leiden NMI/ARI, silhouette label, cLISI;
    silhouette batch, iLISI, kBET, graph connectivity, PCR comparison), min-max scaled
    across methods as in the thesis (eq. 2.36) before the totals.

    Returns
    -------
    One row per method: each metric, ``bio_conservation``, ``batch_correction`` and
    ``overall``.
    """
    import scanpy as sc
    import scvi

    from scvi_ext.data import select_genes
    from scvi_ext.model import CELLULAR

    try:
        from scib_metrics.benchmark import Benchmarker
    except ImportError as error:  # pragma: no cover - optional dependency
        raise MethodUnavailableError("scib-metrics is not installed") from error

    adata = select_genes(adata, method="cellular")
    adata.obs[labels_key] = adata.obs[labels_key].astype(str).astype("category")
    adata.obs[batch_key] = adata.obs[batch_key].astype(str).astype("category")
    scvi.settings.seed = seed
    median_library_size = float(np.median(np.asarray(adata.X.sum(axis=1)).ravel()))
    log = log_normalised_anndata(adata, target=median_library_size)
    sc.pp.pca(log, n_comps=50, random_state=seed)
    adata.obsm["Unintegrated"] = log.obsm["X_pca"]
    embeddings = []
    if "pca" in methods:
        adata.obsm["PCA"] = log.obsm["X_pca"]
        embeddings.append("PCA")
    if "cellular" in methods:
        data = adata.copy()
        CELLULAR.setup_anndata(data, labels_key=labels_key, batch_key=batch_key)
        model = CELLULAR(data)
        model.train(max_epochs=max_epochs, **QUIET)
        adata.obsm["CELLULAR"] = model.get_latent_representation()
        embeddings.append("CELLULAR")
    if "scvi" in methods or "scanvi" in methods:
        data = adata.copy()
        scvi.model.SCVI.setup_anndata(data, batch_key=batch_key, labels_key=labels_key)
        vae = scvi.model.SCVI(data, n_latent=30, n_layers=2)
        vae.train(max_epochs=max_epochs * 2, **QUIET)
        if "scvi" in methods:
            adata.obsm["scVI"] = vae.get_latent_representation()
            embeddings.append("scVI")
        if "scanvi" in methods:
            scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
            scanvi.train(max_epochs=max_epochs // 2, **QUIET)
            adata.obsm["scANVI"] = scanvi.get_latent_representation()
            embeddings.append("scANVI")
    bench = Benchmarker(
        adata,
        batch_key=batch_key,
        label_key=labels_key,
        embedding_obsm_keys=embeddings,
        pre_integrated_embedding_obsm_key="Unintegrated",
        n_jobs=1,
    )
    bench.benchmark()
    raw = bench.get_results(min_max_scale=True, clean_names=True)
    raw = raw.drop(index="Metric Type", errors="ignore").astype(float)
    bio = [c for c in raw.columns if c in _BIO_METRICS]
    batch = [c for c in raw.columns if c in _BATCH_METRICS]
    table = raw[bio + batch].copy()
    table["bio_conservation"] = table[bio].mean(axis=1)
    table["batch_correction"] = table[batch].mean(axis=1)
    table["overall"] = 0.6 * table["bio_conservation"] + 0.4 * table["batch_correction"]
    return table.sort_values("overall", ascending=False)


_BIO_METRICS = {
    "Isolated labels",
    "Leiden NMI",
    "Leiden ARI",
    "KMeans NMI",
    "KMeans ARI",
    "Silhouette label",
    "cLISI",
}
_BATCH_METRICS = {
    "Silhouette batch",
    "iLISI",
    "KBET",
    "Graph connectivity",
    "PCR comparison",
    "BRAS",
}


# ---------------------------------------------------------------------- novel cell types
def novel_type_detection(
    adata: ad.AnnData,
    labels_key: str = "cell_type",
    batch_key: str | None = "donor",
    seed: int = 0,
    n_folds: int = 5,
    max_epochs: int = 30,
    classifier_epochs: int = 30,
    threshold: float = 0.25,
    n_latent: int = 100,
    condition_key: str | None = None,
    reference_condition: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The thesis's novel cell type protocol (2.7, Figure 3.11).

    For every cell type: remove it from the data, split the rest into ``n_folds``
    stratified folds; for the first fold, train CELLULAR + LatentClassifier on the other
    folds, then score the test fold alone (no novel type) and the test fold plus the
    removed type (novel type present). Per-cell AUROC of each novelty score on the
    second set; dataset-level flag: minimum normalised likelihood below ``threshold``.

    With ``condition_key``, the query is shifted instead: training takes the
    ``reference_condition`` cells without the left-out type, the test set is every
    other cell of the known types, and the novel cells are the left-out type's cells
    outside the reference condition.

    Returns
    -------
    ``(per_type, summary)``: one row per left-out type (AUROCs, minimum likelihoods),
    and a one-row summary with the mean AUROC per score and the dataset-level precision
    and coverage at ``threshold``.
    """
    import scvi
    from sklearn.model_selection import StratifiedKFold

    from scvi_ext.classifier import NOVELTY_METHODS
    from scvi_ext.data import select_genes, validate_obs_key
    from scvi_ext.metrics import novelty_auroc, novelty_precision_coverage
    from scvi_ext.model import CELLULAR, LatentClassifier

    labels = adata.obs[labels_key].astype(str).to_numpy()
    if condition_key is not None:
        validate_obs_key(adata, condition_key, "condition_key")
        conditions = adata.obs[condition_key].astype(str)
        if reference_condition not in set(conditions):
            raise ValueError(
                f"reference_condition '{reference_condition}' is not a value of "
                f"obs['{condition_key}'] ({sorted(set(conditions))})."
            )
        in_reference = (conditions == reference_condition).to_numpy()
    rows = []
    dataset_scores, has_novel = {}, {}
    for left_out in sorted(np.unique(labels)):
        if condition_key is None:
            known = adata[labels != left_out]
            folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            train_idx, test_idx = next(folds.split(np.zeros(known.n_obs), known.obs[labels_key]))
            train, test, novel = known[train_idx], known[test_idx], adata[labels == left_out]
        else:
            train = adata[in_reference & (labels != left_out)]
            test = adata[~in_reference & (labels != left_out)]
            novel = adata[~in_reference & (labels == left_out)]
        reference = select_genes(train.copy(), method="cellular")
        test = test[:, reference.var_names].copy()
        novel = novel[:, reference.var_names].copy()
        key = batch_key if batch_key and reference.obs[batch_key].nunique() > 1 else None
        scvi.settings.seed = seed
        CELLULAR.setup_anndata(reference, labels_key=labels_key, batch_key=key)
        model = CELLULAR(reference, n_latent=n_latent)
        model.train(max_epochs=max_epochs, **QUIET)
        classifier = LatentClassifier.from_model(model, reference)
        classifier.train(max_epochs=classifier_epochs, **QUIET)
        mixed = ad.concat([test, novel], index_unique="-")
        del mixed.obs[labels_key]  # unseen by the classifier, as for a user's query
        is_novel = np.r_[np.zeros(test.n_obs, bool), np.ones(novel.n_obs, bool)]
        row: dict[str, Any] = {"left_out": left_out, "n_novel": novel.n_obs, "n_known": test.n_obs}
        for method in NOVELTY_METHODS:
            score = classifier.novelty_score(mixed, method=method)
            row[f"auroc_{method}"] = novelty_auroc(is_novel, score)
        known_test = classifier.predict(test)
        row["accuracy_known"] = float(
            (known_test == test.obs[labels_key].astype(str).to_numpy()).mean()
        )
        row["min_likelihood_known"] = classifier.detect_novel(test, threshold).min_likelihood
        row["min_likelihood_novel"] = classifier.detect_novel(mixed, threshold).min_likelihood
        dataset_scores[f"{left_out}|known"] = row["min_likelihood_known"]
        has_novel[f"{left_out}|known"] = False
        dataset_scores[f"{left_out}|novel"] = row["min_likelihood_novel"]
        has_novel[f"{left_out}|novel"] = True
        rows.append(row)
    per_type = pd.DataFrame(rows)
    summary = {f"mean_auroc_{m}": per_type[f"auroc_{m}"].mean() for m in NOVELTY_METHODS}
    summary.update(novelty_precision_coverage(dataset_scores, has_novel, threshold))
    summary["threshold"] = threshold
    return per_type, pd.DataFrame([summary])
