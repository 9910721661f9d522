"""CAN and CGRAN (issue 13): within-dataset classification, markers, transfer.

Three studies (``scvi-ext benchmark --task NAME``):

- ``attention_classification``: the paper's protocol (section 5.3): per seed one random
  stratified 4:1 split of each dataset, the 1000 genes of largest log-variance of the
  training cells for every method; CAN, CGRAN (the four settings of table 3), ScNym,
  CELLULAR + LatentClassifier and the peers (linear SVM as the paper ran it,
  LinearSVC, logistic regression, random forest).
- ``attention_markers``: precision@10 against the marker genes the paper names, per PBMC
  type in the Kang data, of CGRAN's highly differential genes, CAN and ScNym
  integrated-gradient saliency and scanpy's Wilcoxon ``rank_genes_groups``; figures.
- ``attention_transfer``: Kang control -> stimulated, 80% of the stimulated cells
  fine-tune and 20% test: CGRAN settings A, B, C (section 5.6) and CAN's last-layer
  fine-tuning (A.6.1).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ._methods import METHODS, MethodResult, MethodUnavailableError
from ._runner import score_predictions, set_seed
from ._studies import register_study

logger = logging.getLogger(__name__)

#: The paper's genes: the 1000 of largest variance of log1p(counts / total * 1e5).
N_TOP_GENES = 1000
TEST_FRACTION = 0.2

#: Method rows of the classification study -> (registered method, its options).
CLASSIFICATION_METHODS: dict[str, tuple[str, dict]] = {
    "can": ("can", {}),
    "can_lr1e-3": ("can", {"plan_kwargs": {"lr": 1e-3}}),
    # CAN's defaults before issue 13's fixes: scvi's Adam eps (0.01; Adam's is 1e-8) and the
    # weights of the epoch of lowest validation loss (the paper keeps the last epoch's)
    "can_eps1e-2_best_epoch": (
        "can",
        {"plan_kwargs": {"eps": 1e-2, "restore_best_weights": True}},
    ),
    # Adam's eps fixed, weights of the epoch of lowest validation loss
    "can_best_epoch": ("can", {"plan_kwargs": {"restore_best_weights": True}}),
    # every training cell trains, the last epoch's weights are kept (no validation cells,
    # hence no calibration: temperature 1)
    "can_no_validation": ("can", {"train_kwargs": {"train_size": 1.0}}),
    # the cross-entropy weighted by the inverse frequency of each cell type (not in the paper)
    "can_balanced": ("can", {"model_kwargs": {"balance_classes": True}}),
    "cgran_svd_uniform_local": ("cgran", {}),
    # CGRAN's (SVD, uniform, local) defaults before issue 13's fixes: scvi's Adam eps (0.01),
    # weight decay 1e-6 and the weights of the epoch of lowest validation loss
    "cgran_eps1e-2_best_epoch": (
        "cgran",
        {"plan_kwargs": {"eps": 1e-2, "weight_decay": 1e-6, "restore_best_weights": True}},
    ),
    "cgran_mf_uniform_local": ("cgran", {"embedding": "mf"}),
    "cgran_mf_kmeans_local": ("cgran", {"embedding": "mf", "grouping": "kmeans"}),
    "cgran_mf_full": ("cgran", {"embedding": "mf", "attention": "full"}),
    # the cross-entropy weighted by the inverse frequency of each cell type (not in the paper)
    "cgran_balanced": ("cgran", {"model_kwargs": {"balance_classes": True}}),
    "scnym": ("scnym", {}),
    "cellular": ("cellular", {}),
    # the classifier's cross-entropy weighted by the inverse frequency of each cell type
    "cellular_balanced": ("cellular", {"classifier_kwargs": {"balance_classes": True}}),
    # ... by the inverse square root of each type's frequency
    "cellular_sqrt_balanced": ("cellular", {"classifier_kwargs": {"balance_classes": "sqrt"}}),
    "svm_linear": ("svm_linear", {}),
    "linear_svc": ("linear_svc", {}),
    "logistic_regression": ("logistic_regression", {}),
    "random_forest": ("random_forest", {"n_jobs": 2}),
}

#: Marker genes the paper names (sections 5.5, 5.6), per PBMC type.
PAPER_MARKERS: dict[str, tuple[str, ...]] = {
    "B": ("CD79A", "CD79B", "MS4A1"),
    "T": ("CD3D", "CD3E", "CD3G", "CD2", "IL32"),
    "NK": ("GNLY", "NKG7", "GZMB", "GZMH", "FGFBP2"),
    "monocytes": ("CST3", "LYZ", "FCER1G", "SPI1"),
}
#: Rankings of the markers study.
MARKER_METHODS = ("wilcoxon", "can_saliency", "scnym_saliency", "cgran_differential")
#: Kang cell types -> the paper's PBMC types (dendritic cells are not scored).
KANG_TYPES: dict[str, str] = {
    "B": "B",
    "CD4T": "T",
    "CD8T": "T",
    "NK": "NK",
    "CD14+Mono": "monocytes",
    "FCGR3A+Mono": "monocytes",
}


# ---------------------------------------------------------------- datasets
def pbmc68k_reduced_counts() -> ad.AnnData:
    """scanpy's ``pbmc68k_reduced`` (700 cells, 765 genes) with counts rebuilt from ``raw``.

    ``raw.X`` holds ``log1p(counts / n_counts * 1e4)`` in reduced precision; the counts are
    ``round(expm1(raw.X) * n_counts / 1e4)`` (the values are within 0.04 of integers). Only
    the 765 genes scanpy ships are there, so row sums are below ``n_counts``.
    """
    import scanpy as sc
    import scipy.sparse as sp

    pbmc = sc.datasets.pbmc68k_reduced()
    log_values = pbmc.raw.X
    log_values = log_values.toarray() if sp.issparse(log_values) else np.asarray(log_values)
    scale = pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4
    counts = np.rint(np.expm1(log_values.astype(np.float64)) * scale).astype(np.float32)
    return ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pbmc.obs[["bulk_labels"]].astype({"bulk_labels": str}).copy(),
        var=pd.DataFrame(index=pbmc.raw.var_names.copy()),
    )


def _snareseq_rna() -> ad.AnnData:
    from scvi_ext.data import load_dataset

    return load_dataset("snareseq")["rna"]


def _cellbench_singlets() -> ad.AnnData:
    from scvi_ext.data import load_dataset

    adata = load_dataset("cellbench_5lines")
    return adata[(adata.obs["demuxlet_cls"] == "SNG").to_numpy()].copy()


def _shared(name: str) -> Callable[[], ad.AnnData]:
    def load() -> ad.AnnData:
        from scvi_ext.data import load_dataset

        return load_dataset(name)

    return load


#: Datasets of the classification study -> (loader of counts, labels column).
CLASSIFICATION_DATASETS: dict[str, tuple[Callable[[], ad.AnnData], str]] = {
    "kang_donors": (_shared("kang_donors"), "cell_type"),
    "kang_ifnb": (_shared("kang_ifnb"), "cell_type"),
    "cellbench_5lines": (_cellbench_singlets, "cell_type"),
    "snareseq_cell_type": (_snareseq_rna, "cell_type"),
    "snareseq_cell_type_fine": (_snareseq_rna, "cell_type_fine"),
    "pbmc68k_reduced": (pbmc68k_reduced_counts, "bulk_labels"),
}


def stratified_split(
    adata: ad.AnnData, labels_key: str, seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[ad.AnnData, ad.AnnData]:
    """Random stratified split into training and test cells (copies; paper: 4:1)."""
    from sklearn.model_selection import train_test_split

    labels = adata.obs[labels_key].astype(str).to_numpy()
    train, test = train_test_split(
        np.arange(adata.n_obs), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return adata[np.sort(train)].copy(), adata[np.sort(test)].copy()


def top_variance_genes(
    train: ad.AnnData, test: ad.AnnData, n_top_genes: int = N_TOP_GENES
) -> tuple[ad.AnnData, ad.AnnData]:
    """Both sets on the training cells' genes of largest log-variance (paper A.2)."""
    from scvi_ext.data import select_genes

    train = select_genes(train, "can", n_top_genes=n_top_genes)
    return train, test[:, train.var_names].copy()


def _run_method(
    row: str, train: ad.AnnData, test: ad.AnnData, labels_key: str, seed: int, options: dict
) -> MethodResult | None:
    """One method on one split; ``None`` (logged) when it is unavailable."""
    import torch

    method, defaults = CLASSIFICATION_METHODS[row]
    n_threads = torch.get_num_threads()
    set_seed(seed)
    try:
        return METHODS[method](train, test, labels_key, seed, **{**defaults, **options})
    except MethodUnavailableError as error:
        logger.warning("Skipping %s: %s", row, error)
        return None
    finally:
        torch.set_num_threads(n_threads)  # scikit-learn/scanpy may change it


def _study_options(method: str, n_top_genes: int, max_epochs: int | None) -> dict:
    """The study's settings for ``method``: ``n_top_genes`` when it takes it (so that it
    keeps every gene of the split), ``max_epochs`` for each of its epoch arguments."""
    parameters = inspect.signature(METHODS[method]).parameters
    options = {"n_top_genes": n_top_genes}
    if max_epochs is not None:
        options |= dict.fromkeys(("max_epochs", "classifier_epochs"), max_epochs)
    return {name: value for name, value in options.items() if name in parameters}


def _score_row(row: str, y_true: np.ndarray, result: MethodResult) -> dict:
    scores = score_predictions(y_true, result)
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "ece")
    return {
        "method": row,
        **{key: scores.get(key, np.nan) for key in keys},
        "train_seconds": result.train_seconds,
        "settings": result.settings,
    }


def _check_names(given: Sequence[str] | None, known: dict, what: str) -> list[str]:
    names = list(known) if given is None else [given] if isinstance(given, str) else list(given)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; choose among {list(known)}.")
    return names


def classification(
    seed: int,
    datasets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    n_top_genes: int = N_TOP_GENES,
    max_epochs: int | None = None,
    max_cells: int | None = None,
) -> dict[str, pd.DataFrame]:
    """The paper's within-dataset classification (sections 5.3, 5.4), one split per seed.

    Parameters
    ----------
    seed
        Seed of the split and of every method.
    datasets
        Names of :data:`CLASSIFICATION_DATASETS` (default: all).
    methods
        Rows of :data:`CLASSIFICATION_METHODS` (default: all).
    n_top_genes
        Genes of largest log-variance of the training cells, for every method (paper:
        1000); each method given an ``n_top_genes`` option gets it too, so keeps them all.
    max_epochs
        Epochs of every neural method (``None``: each method's paper default).
    max_cells
        Subsample each dataset to this many cells first (stratified; ``None``: all).

    Returns
    -------
    ``classification_<dataset>``: one row per method: accuracy, balanced accuracy, macro
    F1, ECE, train seconds, settings.
    """
    datasets = _check_names(datasets, CLASSIFICATION_DATASETS, "datasets")
    methods = _check_names(methods, CLASSIFICATION_METHODS, "methods")
    tables = {}
    for dataset in datasets:
        load, labels_key = CLASSIFICATION_DATASETS[dataset]
        adata = load()
        if max_cells is not None and adata.n_obs > max_cells:
            adata, _ = stratified_split(adata, labels_key, seed, 1 - max_cells / adata.n_obs)
        train, test = top_variance_genes(*stratified_split(adata, labels_key, seed), n_top_genes)
        y_true = test.obs[labels_key].astype(str).to_numpy()
        rows = []
        for row in methods:
            options = _study_options(CLASSIFICATION_METHODS[row][0], n_top_genes, max_epochs)
            logger.info("%s: %s (seed %d)", dataset, row, seed)
            result = _run_method(row, train, test, labels_key, seed, options)
            if result is not None:
                rows.append(_score_row(row, y_true, result))
                logger.info("%s %s: accuracy %.3f", dataset, row, rows[-1]["accuracy"])
        tables[f"classification_{dataset}"] = pd.DataFrame(rows)
    return tables


register_study(
    "attention_classification",
    "Within-dataset classification, the CAN/CGRAN paper's protocol: per seed one random "
    "stratified 4:1 split of each dataset, the 1000 genes of largest variance of "
    "log1p(counts/total*1e5) in the training cells for every method. CAN, CGRAN (table 3's "
    "four settings), ScNym (test cells as its unlabeled domain), CELLULAR + "
    "LatentClassifier, linear SVM as the paper ran it (SVC linear, max_iter=1000, Platt "
    "confidence), LinearSVC (sigmoid-calibrated), logistic regression, random forest "
    "(1000 trees). Options: datasets, methods, n_top_genes, max_epochs, max_cells.",
    {
        f"classification_{name}": ("accuracy", "balanced_accuracy", "macro_f1")
        for name in CLASSIFICATION_DATASETS
    },
)(classification)


# ---------------------------------------------------------------- markers
def precision_at(ranked: dict[str, list[str]], k: int = 10) -> pd.DataFrame:
    """Precision@k of each Kang type's ranked genes against :data:`PAPER_MARKERS`.

    ``ranked`` maps Kang cell types to genes, best first; types without a paper group
    are skipped. Returns one row per type: ``cell_type``, ``paper_type``,
    ``precision_at_k`` and the hits.
    """
    rows = []
    for cell_type, genes in ranked.items():
        group = KANG_TYPES.get(cell_type)
        if group is None:
            continue
        top = list(genes)[:k]
        hits = [gene for gene in top if gene in PAPER_MARKERS[group]]
        rows.append(
            {
                "cell_type": cell_type,
                "paper_type": group,
                "precision_at_k": len(hits) / k,
                "hits": ",".join(hits),
            }
        )
    return pd.DataFrame(rows)


def _wilcoxon_ranking(adata: ad.AnnData, labels_key: str, n_top: int) -> dict[str, list[str]]:
    import scanpy as sc

    from scvi_ext.data import log_normalised_anndata

    log_data = log_normalised_anndata(adata)
    log_data.obs[labels_key] = adata.obs[labels_key].astype("category").to_numpy()
    sc.tl.rank_genes_groups(log_data, labels_key, method="wilcoxon", n_genes=n_top)
    names = log_data.uns["rank_genes_groups"]["names"]
    return {group: list(names[group]) for group in names.dtype.names}


def _saliency_ranking(
    model, n_top: int, seed: int, n_steps: int, n_cells: int
) -> dict[str, list[str]]:
    from scvi_ext.interpret import saliency

    table = saliency(
        model,
        method="integrated",
        n_steps=n_steps,
        n_cells=n_cells,
        n_top=n_top,
        by="label",
        seed=seed,
    )
    return {
        cell_type: list(rows.sort_values("rank")["gene"])
        for cell_type, rows in table.groupby("cell_type", sort=False)
    }


def _cgran_ranking(markers: pd.DataFrame) -> dict[str, list[str]]:
    """CGRAN's genes per type, highly differential first (its ``marker_genes`` order)."""
    return {
        cell_type: list(rows["gene"])
        for cell_type, rows in markers.groupby("cell_type", sort=False)
    }


def _save_figures(
    figures_dir: Path,
    adata: ad.AnnData,
    labels_key: str,
    can_model,
    cgran_model,
    cgran_markers: pd.DataFrame | None,
) -> None:
    """Dot plot of CGRAN's highly differential genes, their gene-gene attention, and CAN's
    mean capsule attention per cell type (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from scvi_ext.data import log_normalised_anndata

    figures_dir.mkdir(parents=True, exist_ok=True)
    if cgran_model is not None and cgran_markers is not None and len(cgran_markers):
        differential = cgran_markers[cgran_markers["highly_differential"]]
        chosen = differential if len(differential) else cgran_markers
        genes = list(dict.fromkeys(chosen.groupby("cell_type").head(8)["gene"]))
        log_data = log_normalised_anndata(adata)
        log_data.obs[labels_key] = adata.obs[labels_key].astype("category").to_numpy()
        sc.pl.dotplot(log_data, genes, groupby=labels_key, show=False)
        plt.savefig(figures_dir / "cgran_marker_dotplot.png", dpi=120, bbox_inches="tight")
        plt.close("all")
        attention = cgran_model.gene_gene_attention(genes)
        figure, axis = plt.subplots(figsize=(0.3 * len(genes) + 2, 0.3 * len(genes) + 1.5))
        image = axis.imshow(attention.to_numpy(), cmap="viridis")
        axis.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
        axis.set_yticks(range(len(genes)), genes, fontsize=7)
        axis.set_title("CGRAN gene-gene attention (highly differential genes)")
        figure.colorbar(image, ax=axis)
        figure.savefig(figures_dir / "cgran_gene_gene_attention.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
    if can_model is not None:
        attention = can_model.get_attention()
        labels = adata.obs[labels_key].astype(str).to_numpy()
        types = sorted(set(labels))
        figure, axes = plt.subplots(1, len(types), figsize=(2.2 * len(types), 2.6))
        for axis, cell_type in zip(np.atleast_1d(axes), types, strict=True):
            axis.imshow(attention[labels == cell_type].mean(axis=0), cmap="magma")
            axis.set_title(cell_type, fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
        figure.suptitle("CAN capsule attention, mean per cell type")
        figure.savefig(figures_dir / "can_capsule_attention.png", dpi=120, bbox_inches="tight")
        plt.close(figure)


def markers(
    seed: int,
    n_top: int = 10,
    n_top_genes: int = N_TOP_GENES,
    max_epochs: int | None = None,
    cgran_top_k: int = 50,
    cgran_min_fraction: float = 0.7,
    saliency_steps: int = 32,
    saliency_cells: int = 200,
    methods: Sequence[str] = MARKER_METHODS,
    outdir: str | Path | None = None,
) -> dict[str, pd.DataFrame]:
    """Precision@``n_top`` of marker rankings per PBMC type in the Kang data (both conditions).

    CGRAN (SVD, uniform groups, local attention, as the paper's 5.5) ranks each type's
    high-attention genes, highly differential first; CAN and ScNym rank genes by
    integrated-gradient saliency (zero baseline, cells grouped by label); scanpy's
    Wilcoxon ``rank_genes_groups`` on log-normalised counts. All on the 1000 genes of
    largest log-variance. The paper's markers absent from those genes are listed.

    Parameters
    ----------
    seed
        Seed of the models and the saliency's cell sampling.
    n_top
        ``k`` of precision@k.
    n_top_genes
        Genes of largest log-variance.
    max_epochs
        Epochs of the neural models (``None``: their defaults).
    cgran_top_k, cgran_min_fraction
        CGRAN's ``marker_genes`` settings (paper: 50, 0.7).
    saliency_steps, saliency_cells
        Integrated-gradient steps, and cells per type averaged.
    methods
        Rankings to compute, among :data:`MARKER_METHODS`.
    outdir
        Folder for the PNG figures (``None``: no figures; ``run_study`` passes its own).
    """
    from scvi_ext.data import load_dataset, select_genes
    from scvi_ext.model import CAN, CGRAN, ScNym

    methods = _check_names(methods, dict.fromkeys(MARKER_METHODS), "methods")

    labels_key = "cell_type"
    adata = select_genes(load_dataset("kang_ifnb"), "can", n_top_genes=n_top_genes)
    adata.obs[labels_key] = adata.obs[labels_key].astype(str)
    rankings: dict[str, dict[str, list[str]]] = {}
    seconds: dict[str, float] = {}

    if "wilcoxon" in methods:
        start = time.perf_counter()
        rankings["wilcoxon"] = _wilcoxon_ranking(adata, labels_key, n_top)
        seconds["wilcoxon"] = time.perf_counter() - start

    models = {}
    for name, model_cls in (("can_saliency", CAN), ("scnym_saliency", ScNym)):
        if name not in methods:
            continue
        set_seed(seed)
        data = adata.copy()
        model_cls.setup_anndata(data, labels_key=labels_key, unlabeled_category=None)
        model = model_cls(data)
        start = time.perf_counter()
        model.train(max_epochs=max_epochs, enable_progress_bar=False)
        rankings[name] = _saliency_ranking(model, n_top, seed, saliency_steps, saliency_cells)
        seconds[name] = time.perf_counter() - start
        models[name] = model

    cgran_model, cgran_markers = None, None
    if "cgran_differential" in methods:
        set_seed(seed)
        data = adata.copy()
        CGRAN.setup_anndata(data, labels_key=labels_key)
        cgran_model = CGRAN(data, embedding="svd", grouping="uniform", attention="local")
        start = time.perf_counter()
        cgran_model.train(max_epochs=max_epochs, enable_progress_bar=False)
        cgran_markers = cgran_model.marker_genes(
            top_k=cgran_top_k, min_fraction=cgran_min_fraction
        )
        rankings["cgran_differential"] = _cgran_ranking(cgran_markers)
        seconds["cgran_differential"] = time.perf_counter() - start

    per_type = []
    for method, ranked in rankings.items():
        table = precision_at(ranked, n_top)
        per_type.append(table.assign(method=method))
    per_type_table = pd.concat(per_type, ignore_index=True)
    per_type_table.insert(
        0, "method_type", per_type_table["method"] + " / " + per_type_table["cell_type"]
    )
    summary = (
        per_type_table.groupby("method", sort=False)["precision_at_k"]
        .mean()
        .rename("mean_precision_at_k")
    )
    summary_table = summary.reset_index()
    summary_table["seconds"] = summary_table["method"].map(seconds)
    missing = [
        gene for genes in PAPER_MARKERS.values() for gene in genes if gene not in adata.var_names
    ]
    summary_table["paper_markers_not_in_genes"] = ",".join(missing) or "none"
    if outdir is not None:
        _save_figures(
            Path(outdir),
            adata,
            labels_key,
            models.get("can_saliency"),
            cgran_model,
            cgran_markers,
        )
    return {"markers_summary": summary_table, "markers_per_type": per_type_table}


register_study(
    "attention_markers",
    "Marker genes per PBMC type in the Kang data (1975 cells, both conditions, 1000 "
    "top-variance genes): precision@10 against the genes the CAN/CGRAN paper names (B: "
    "CD79A, CD79B, MS4A1; T: CD3D, CD3E, CD3G, CD2, IL32; NK: GNLY, NKG7, GZMB, GZMH, "
    "FGFBP2; monocytes: CST3, LYZ, FCER1G, SPI1) of CGRAN's highly differential genes "
    "(top_k 50, fraction 0.7), CAN and ScNym integrated-gradient saliency and scanpy's "
    "Wilcoxon rank_genes_groups. Options: methods, n_top, max_epochs, saliency_steps, "
    "saliency_cells. Figures (PNG, in the report folder): dot plot, gene-gene attention, "
    "CAN capsule attention per type.",
    {"markers_summary": ("mean_precision_at_k",)},
)(markers)


# ---------------------------------------------------------------- transfer
def transfer(
    seed: int,
    n_top_genes: int = N_TOP_GENES,
    max_epochs: int | None = None,
    fine_tune_epochs: int | None = None,
    settings: Sequence[str] = ("A", "B", "C"),
    fine_tune_fraction: float = 0.8,
    models: Sequence[str] = ("can", "cgran"),
) -> dict[str, pd.DataFrame]:
    """Kang control -> stimulated transfer (paper 5.6, A.6.1): fine-tune on 80%, test on 20%.

    Reference models (CGRAN SVD/uniform/local, CAN) train on the control cells (genes:
    the control cells' 1000 of largest log-variance); each is scored on the test cells
    before fine-tuning, then CGRAN in settings A, B, C and CAN with its last layer only
    fine-tune on the labelled fine-tuning cells.

    Parameters
    ----------
    seed
        Seed of the split and the models.
    n_top_genes
        Genes of largest log-variance of the control cells.
    max_epochs
        Reference training epochs (``None``: the models' paper defaults).
    fine_tune_epochs
        Fine-tuning epochs (``None``: as ``max_epochs``).
    settings
        CGRAN transfer settings to run (``"A"``, ``"B"``, ``"C"``).
    fine_tune_fraction
        Fraction of the stimulated cells that fine-tune (paper: 0.8).
    models
        ``"can"`` and/or ``"cgran"``.
    """
    from scvi_ext.data import load_dataset, select_genes
    from scvi_ext.model import CAN, CGRAN

    models = _check_names(models, {"can": None, "cgran": None}, "models")
    settings = _check_names(settings, dict.fromkeys("ABC"), "settings")
    labels_key = "cell_type"
    adata = load_dataset("kang_ifnb")
    adata.obs[labels_key] = adata.obs[labels_key].astype(str)
    control = (adata.obs["condition"] == "control").to_numpy()
    reference = select_genes(adata[control].copy(), "can", n_top_genes=n_top_genes)
    stimulated = adata[~control][:, reference.var_names].copy()
    fine_tune, test = stratified_split(stimulated, labels_key, seed, 1 - fine_tune_fraction)
    y_true = test.obs[labels_key].to_numpy()
    fine_tune_epochs = max_epochs if fine_tune_epochs is None else fine_tune_epochs

    def scored(row: str, model, seconds: float, note: str) -> dict:
        proba = model.predict(test, soft=True)
        result = MethodResult(
            row, proba.idxmax(axis=1).astype(str).to_numpy(), proba.max(axis=1).to_numpy(), seconds
        )
        scores = score_predictions(y_true, result)
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "ece")
        return {"method": row, **{k: scores[k] for k in keys}, "seconds": seconds, "trains": note}

    rows = []
    references = {}
    if "can" in models:
        set_seed(seed)
        data = reference.copy()
        CAN.setup_anndata(data, labels_key=labels_key)
        references["can"] = CAN(data)
    if "cgran" in models:
        set_seed(seed)
        data = reference.copy()
        CGRAN.setup_anndata(data, labels_key=labels_key)
        references["cgran"] = CGRAN(data, embedding="svd", grouping="uniform", attention="local")
    for name, model in references.items():
        set_seed(seed)
        start = time.perf_counter()
        model.train(max_epochs=max_epochs, enable_progress_bar=False)
        rows.append(scored(f"{name}_no_fine_tuning", model, time.perf_counter() - start, "-"))

    def fine_tuned(row: str, query_model, note: str) -> None:
        set_seed(seed)
        start = time.perf_counter()
        query_model.train(max_epochs=fine_tune_epochs, enable_progress_bar=False)
        rows.append(scored(row, query_model, time.perf_counter() - start, note))

    if "can" in references:
        query_can = CAN.load_query_data(fine_tune, references["can"])
        fine_tuned("can_last_layer", query_can, "classifier")
    if "cgran" in references:
        notes = {
            "A": "new embeddings, classifier",
            "B": "new embeddings, all weights",
            "C": "reference gene vectors, query cells fitted, all weights",
        }
        for setting in settings:
            query_model = CGRAN.load_query_data(fine_tune, references["cgran"], setting=setting)
            fine_tuned(f"cgran_setting_{setting}", query_model, notes[setting])
    return {"transfer": pd.DataFrame(rows)}


register_study(
    "attention_transfer",
    "Kang control -> IFN-beta stimulated (paper 5.6 and A.6.1): CGRAN (SVD, uniform, "
    "local) and CAN trained on the control cells (1000 top-variance genes of the control "
    "cells), scored on 20% of the stimulated cells before and after fine-tuning on the "
    "other 80% (labelled): CGRAN settings A (new embeddings, last layer), B (new "
    "embeddings, all weights), C (reference gene vectors, query cell vectors fitted, all "
    "weights); CAN last layer only. Options: models, max_epochs, fine_tune_epochs, "
    "settings.",
    {"transfer": ("accuracy", "balanced_accuracy")},
)(transfer)
