"""GMVAE (issue 14): does a generative latent help a cell type classifier (the latent_inputs study).

The seed study (scVAE's GMVAE on 1,300 PBMCs) found no clear difference between a
feed-forward classifier on raw data, on PCA and on the GMVAE latent. This study runs the
comparison properly: the same :class:`~scvi_ext.model.LatentClassifier` (the seed's
one-hidden-layer FFNN and our default) on log-normalised HVGs, PCA, GMVAE, scVI and
CELLULAR representations, several datasets, a learning curve over the training cells,
clustering (GMVAE's own clusters vs Leiden and K-means) and training speed.

Its sizes are keyword options (:class:`LatentInputsOptions`; defaults: the issue's full
run), so a reduced run is one command, e.g.::

    scvi-ext benchmark --task latent_inputs --seeds 0 1 --outdir bench/latent_inputs \
        --task-option datasets=kang_ifnb --task-option "ks=(10, 50)" \
        --task-option "fractions=(0.25, 1)" --task-option epochs=30
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from torch import nn

from scvi_ext.base import PLAIN_ADAM_PLAN
from scvi_ext.classifier import LatentClassifier
from scvi_ext.classifier._module import LatentClassifierModule

from ._cellular_tasks import QUIET
from ._methods import MethodResult
from ._plots import _new_figure, _palette
from ._runner import score_predictions
from ._studies import register_study
from ._throughput import _EpochTimer

logger = logging.getLogger(__name__)

DATASETS = ("snareseq_cell_type", "snareseq_cell_type_fine", "kang_donors", "kang_ifnb")
REPRESENTATIONS = ("log_hvg", "pca", "gmvae", "scvi", "cellular")
CLASSIFIERS = ("seed_ffnn", "default")
#: Classifiers the study also takes when named: one of :data:`CLASSIFIERS` with other
#: training plan arguments and a multiple of ``classifier_epochs``. Scvi's Adam ``eps``
#: (0.01) is the setting both had before it was measured against PyTorch's 1e-8
#: (docs/can_cgran.md, "Adam's eps for the other models"); 4x epochs asks whether the seed's
#: FFNN had fitted its input (docs/gmvae.md, "Why the seed's FFNN learns slowly").
CLASSIFIER_VARIANTS: dict[str, tuple[str, dict, int]] = {
    "seed_ffnn_eps1e-2": ("seed_ffnn", {"eps": 1e-2}, 1),
    "default_eps1e-2": ("default", {"eps": 1e-2}, 1),
    "seed_ffnn_4x_epochs": ("seed_ffnn", {}, 4),
}
#: Genes every representation reads: the top 1000 of the reference by log-variance.
N_GENES = 1000


# ---------------------------------------------------------------------- options
@dataclass
class LatentInputsOptions:
    """Sizes of the study (``--task-option FIELD=VALUE`` on the command line).

    Attributes
    ----------
    datasets
        Of :data:`DATASETS`.
    ks
        Latent sizes of PCA, GMVAE and scVI.
    fractions
        Fractions of the training cells the classifiers see (the learning curve).
    representations, classifiers
        Of :data:`REPRESENTATIONS`; of :data:`CLASSIFIERS` and :data:`CLASSIFIER_VARIANTS`.
    epochs
        Epochs of GMVAE, scVI and CELLULAR (the seed: 100).
    classifier_epochs
        Epochs of each classifier (the seed: 100).
    n_hidden
        Hidden width of GMVAE and scVI (the seed's best: 500).
    n_components
        GMVAE components (the seed: 11).
    gmvae_lr
        GMVAE learning rate (the seed: 1e-4); scVI and CELLULAR keep their own defaults.
    max_cells
        Subsample each dataset to this many cells (0: all).
    umap
        Draw UMAPs of every latent (seed 0 only).
    backends
        Also train GMVAE (smallest k) by the torch loss and by Pyro, without validation,
        for the ``backends`` table (two more GMVAE fits).
    """

    datasets: tuple[str, ...] = DATASETS
    ks: tuple[int, ...] = (10, 25, 50, 100)
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    representations: tuple[str, ...] = REPRESENTATIONS
    classifiers: tuple[str, ...] = CLASSIFIERS
    epochs: int = 100
    classifier_epochs: int = 100
    n_hidden: int = 500
    n_components: int = 11
    gmvae_lr: float = 1e-4
    max_cells: int = 0
    umap: bool = True
    backends: bool = True


def parse_options(options_cls: type, study: str, choices: dict[str, tuple], given: dict):
    """``options_cls`` (a dataclass of a study's sizes) with its defaults updated by ``given``.

    A single value is taken for a one-element tuple (``ks=10`` is ``ks=(10,)``).

    Raises
    ------
    ValueError
        An unknown option, a value of another type than the default's (an integer is
        taken for a float), or a value outside ``choices[option]``.
    """
    defaults = vars(options_cls())
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown {study} option(s) {unknown}; options: {list(defaults)}.")
    given = dict(given)
    for name, value in given.items():
        default = defaults[name]
        if isinstance(default, tuple):
            value = tuple(value) if isinstance(value, list | tuple) else (value,)
            given[name] = value
        for item in value if isinstance(default, tuple) else (value,):
            _check_option_type(study, name, item, default)
        bad = sorted(set(value) - set(choices[name])) if name in choices else []
        if bad:
            raise ValueError(f"{study} {name}: unknown {bad}; choose from {choices[name]}.")
    return options_cls(**given)


def _check_option_type(study: str, name: str, value: object, default: object) -> None:
    """``value`` of the type of ``default`` (of its items for a tuple; any type for ``None``
    or an empty tuple; an integer, not a bool, where a float is expected)."""
    example = (default or (None,))[0] if isinstance(default, tuple) else default
    if example is None:
        return
    expected = type(example)
    accepted = (int, float) if expected is float else expected
    if isinstance(value, accepted) and (expected is bool or not isinstance(value, bool)):
        return
    kinds = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(expected, f"a {expected.__name__}")
    raise ValueError(f"{study} {name} must be {kind} (default: {default!r}), not {value!r}.")


def study_options(**given) -> LatentInputsOptions:
    """The study's sizes: the defaults (the issue's full run) updated with ``given``
    (see :func:`parse_options`)."""
    choices = {
        "datasets": DATASETS,
        "representations": REPRESENTATIONS,
        "classifiers": CLASSIFIERS + tuple(CLASSIFIER_VARIANTS),
    }
    return parse_options(LatentInputsOptions, "latent_inputs", choices, given)


# ---------------------------------------------------------------------- data
@dataclass
class Split:
    """Reference (training) and query cells of one dataset, on the same genes."""

    name: str
    reference: ad.AnnData
    query: ad.AnnData
    labels_key: str
    batch_key: str | None


def _subsample(adata: ad.AnnData, max_cells: int, seed: int) -> ad.AnnData:
    if not max_cells or adata.n_obs <= max_cells:
        return adata
    keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
    return adata[keep].copy()


def load_split(name: str, seed: int, max_cells: int = 0) -> Split:
    """The dataset's split: SNARE-seq RNA random 80/20 (by seed), Kang donors leave the
    first donor out, Kang IFN-beta control -> stimulated; genes: the reference's top
    :data:`N_GENES` by log-variance (``select_genes(method="can")``)."""
    from scvi_ext.data import load_dataset, select_genes

    from ._tasks import kang_donors_lodo, kang_ifnb

    batch_key = None
    if name.startswith("snareseq"):
        adata = _subsample(load_dataset("snareseq")["rna"].copy(), max_cells, seed)
        labels_key = "cell_type_fine" if name.endswith("fine") else "cell_type"
        adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
        is_query = np.random.default_rng(seed).random(adata.n_obs) < 0.2
        reference, query = adata[~is_query].copy(), adata[is_query].copy()
        batch_key = "batch"
    elif name == "kang_donors":
        reference, query, labels_key = kang_donors_lodo()
        reference = _subsample(reference, max_cells, seed)
        batch_key = "donor"
    elif name == "kang_ifnb":
        reference, query, labels_key = kang_ifnb()
        reference = _subsample(reference, max_cells, seed)
    else:
        raise ValueError(f"Unknown dataset {name!r}; choose from {DATASETS}.")
    reference = select_genes(reference, method="can", n_top_genes=N_GENES)
    query = query[:, reference.var_names].copy()
    keep = np.asarray(query.X.sum(axis=1)).ravel() > 0
    query = query[keep].copy()
    for part in (reference, query):
        part.obs[labels_key] = part.obs[labels_key].astype(str)
    return Split(name, reference, query, labels_key, batch_key)


def _log_normalised(adata: ad.AnnData) -> np.ndarray:
    from scvi_ext.data import log_normalise

    return np.asarray(log_normalise(adata.X, 1e4).toarray(), dtype=np.float32)


# ---------------------------------------------------------------------- representations
@dataclass
class Representation:
    """One representation of the reference and query cells."""

    name: str
    k: int | None
    reference: np.ndarray
    query: np.ndarray
    seconds: float
    model: object | None = None
    cells_per_second: float | None = None


def _batch_free_query(split: Split) -> ad.AnnData:
    """The query with the reference's first batch: the encoders (GMVAE, scVI) do not read
    the batch, and a held-out donor is a batch the models never saw."""
    query = split.query.copy()
    if split.batch_key is not None:
        first = str(sorted(split.reference.obs[split.batch_key].astype(str).unique())[0])
        query.obs[split.batch_key] = first
    return query


def _fit_gmvae(split: Split, k: int, options: LatentInputsOptions, seed: int, **train):
    from scvi_ext.model import GMVAE

    adata = split.reference.copy()
    GMVAE.setup_anndata(adata, batch_key=split.batch_key)
    model = GMVAE(adata, n_latent=k, n_hidden=options.n_hidden, n_components=options.n_components)
    timer = _EpochTimer()
    train = {
        "max_epochs": options.epochs,
        "plan_kwargs": {"lr": options.gmvae_lr},
        "early_stopping": False,
        "callbacks": [timer],
        **QUIET,
        **train,
    }
    model.train(**train)
    n_epochs = max(len(model.history.get("train_loss", model.history.get("elbo_train"))), 1)
    n_train = adata.n_obs * train.get("train_size", model.train_defaults["train_size"])
    return model, n_train * n_epochs / max(timer.seconds, 1e-9), timer.seconds / n_epochs


def _representations(
    split: Split, options: LatentInputsOptions, seed: int
) -> list[Representation]:
    """Every representation of :attr:`options.representations` for each k."""
    from scvi.model import SCVI
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    reps: list[Representation] = []
    start = time.perf_counter()
    log_reference, log_query = _log_normalised(split.reference), _log_normalised(split.query)
    if "log_hvg" in options.representations:
        reps.append(
            Representation("log_hvg", None, log_reference, log_query, time.perf_counter() - start)
        )
    query = _batch_free_query(split)
    for k in options.ks:
        if "pca" in options.representations:
            start = time.perf_counter()
            scaler = StandardScaler().fit(log_reference)  # the seed: standardise, then PCA
            pca = PCA(n_components=k, random_state=seed).fit(scaler.transform(log_reference))
            reps.append(
                Representation(
                    "pca",
                    k,
                    pca.transform(scaler.transform(log_reference)).astype(np.float32),
                    pca.transform(scaler.transform(log_query)).astype(np.float32),
                    time.perf_counter() - start,
                )
            )
        if "gmvae" in options.representations:
            start = time.perf_counter()
            model, speed, _ = _fit_gmvae(split, k, options, seed)
            reps.append(
                Representation(
                    "gmvae",
                    k,
                    model.get_latent_representation(),
                    model.get_latent_representation(query),
                    time.perf_counter() - start,
                    model,
                    speed,
                )
            )
        if "scvi" in options.representations:
            start = time.perf_counter()
            adata = split.reference.copy()
            SCVI.setup_anndata(adata, batch_key=split.batch_key)
            model = SCVI(adata, n_latent=k, n_hidden=options.n_hidden, n_layers=1)
            timer = _EpochTimer()
            model.train(max_epochs=options.epochs, callbacks=[timer], **QUIET)
            n_epochs = len(model.history["elbo_train"])
            speed = adata.n_obs * 0.9 * n_epochs / max(timer.seconds, 1e-9)  # scVI: 90% trains
            query_adata = query.copy()
            SCVI.setup_anndata(query_adata, batch_key=split.batch_key)
            reps.append(
                Representation(
                    "scvi",
                    k,
                    model.get_latent_representation(),
                    model.get_latent_representation(query_adata),
                    time.perf_counter() - start,
                    model,
                    speed,
                )
            )
    return reps


def _cellular(split: Split, options: LatentInputsOptions, train_cells: np.ndarray):
    """CELLULAR (supervised) trained on the labelled training cells of one fraction."""
    from scvi_ext.model import CELLULAR

    start = time.perf_counter()
    adata = split.reference[train_cells].copy()
    batch_key = split.batch_key
    if batch_key is not None and adata.obs[batch_key].nunique() < 2:
        batch_key = None
    CELLULAR.setup_anndata(adata, labels_key=split.labels_key, batch_key=batch_key)
    model = CELLULAR(adata, n_latent=max(options.ks))
    model.train(max_epochs=options.epochs, **QUIET)
    return Representation(
        "cellular",
        max(options.ks),
        model.get_latent_representation(),
        model.get_latent_representation(_batch_free_query(split)),
        time.perf_counter() - start,
        model,
    )


# ---------------------------------------------------------------------- classifiers
class SeedFFNNModule(LatentClassifierModule):
    """The seed's FFNN: one hidden layer (516, ReLU), Xavier-Glorot initialisation, logits.

    The widths and dropout of :class:`LatentClassifierModule` are ignored.
    """

    SEED_HIDDEN = 516

    def __init__(self, n_input: int, n_labels: int, **_ignored):
        super().__init__(n_input, n_labels)
        self.network = nn.Sequential(
            nn.Linear(n_input, self.SEED_HIDDEN), nn.ReLU(), nn.Linear(self.SEED_HIDDEN, n_labels)
        )
        for layer in self.network:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)


class SeedFFNNClassifier(LatentClassifier):
    """:class:`LatentClassifier` trained as the seed's FFNN: PyTorch's Adam (``eps`` 1e-8,
    not scvi's 0.01) at a constant 1e-4, no weight decay, every epoch asked for (no early
    stopping) and the last epoch's weights kept."""

    _module_cls = SeedFFNNModule
    train_defaults = {**LatentClassifier.train_defaults, "early_stopping": False}

    def _default_plan_kwargs(self) -> dict:
        return {**PLAIN_ADAM_PLAN, "lr": 1e-4, "warmup_epochs": 0, "cosine_epochs": 10**9}


def _classify(
    classifier_name: str,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    query: np.ndarray,
    query_labels: np.ndarray,
    epochs: int,
) -> dict[str, float]:
    """Train one classifier on a representation and score the query.

    Also its accuracy on its own training cells (``train_accuracy``): whether it fitted
    them, which tells an under-trained classifier from an uninformative representation.
    """
    obsm_key = "X_representation"
    train = ad.AnnData(
        obs=pd.DataFrame(
            {"label": reference_labels}, index=[f"r{i}" for i in range(len(reference))]
        ),
        obsm={obsm_key: reference},
    )
    test = ad.AnnData(
        obs=pd.DataFrame(index=[f"q{i}" for i in range(len(query))]), obsm={obsm_key: query}
    )
    base_name, plan_kwargs, epochs_factor = CLASSIFIER_VARIANTS.get(
        classifier_name, (classifier_name, {}, 1)
    )
    cls = SeedFFNNClassifier if base_name == "seed_ffnn" else LatentClassifier
    cls.setup_anndata(train, labels_key="label", obsm_key=obsm_key)
    model = cls(train)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=epochs * epochs_factor, plan_kwargs=plan_kwargs, **QUIET)
    seconds = time.perf_counter() - start
    proba = model.predict_proba(test)
    result = MethodResult(
        classifier_name,
        np.asarray(model.label_names)[proba.argmax(axis=1)].astype(str),
        proba.max(axis=1),
        seconds,
        uncalibrated_confidence=model.predict_proba(test, calibrated=False).max(axis=1),
    )
    scores = score_predictions(query_labels, result)
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_uncalibrated")
    fitted = np.asarray(model.label_names)[model.predict_proba(train).argmax(axis=1)]
    return {
        **{key: scores[key] for key in keep if key in scores},
        "train_accuracy": float(np.mean(fitted.astype(str) == np.asarray(reference_labels, str))),
        "classifier_seconds": seconds,
    }


def _training_cells(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded subset of the training cells (at least one per cell type)."""
    if fraction >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        n = max(1, int(round(fraction * len(cells))))
        chosen.append(rng.choice(cells, n, replace=False))
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------- clustering
def _clustering_rows(split: Split, reps: list[Representation], seed: int) -> list[dict]:
    """ARI/NMI vs cell types on all cells: GMVAE's predict_cluster, Leiden on the scVI latent
    and PCA (scanpy defaults: 15 neighbours, resolution 1), K-means on every latent."""
    import scanpy as sc
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = np.concatenate(
        [split.reference.obs[split.labels_key], split.query.obs[split.labels_key]]
    ).astype(str)
    n_types = len(np.unique(truth))
    rows = []

    def add(method: str, clusters: np.ndarray) -> None:
        rows.append(
            {
                "clustering": f"{split.name} / {method}",
                "dataset": split.name,
                "ari": adjusted_rand_score(truth, clusters),
                "nmi": normalized_mutual_info_score(truth, clusters),
                "n_clusters": len(np.unique(clusters)),
            }
        )

    query = _batch_free_query(split)
    for rep in reps:
        if rep.name == "log_hvg":
            continue
        latent = np.vstack([rep.reference, rep.query])
        label = f"{rep.name}_k{rep.k}"
        if rep.name == "gmvae":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # collapsed components: n_clusters shows them
                own = np.concatenate(
                    [rep.model.predict_cluster(), rep.model.predict_cluster(query)]
                )
            add(f"{label} predict_cluster", own)
        if rep.name in ("scvi", "pca"):
            graph = ad.AnnData(obsm={"X_rep": latent})
            # exact neighbours: scanpy 1.11's default (pynndescent) path fails above 8192
            # cells with current scipy (csr_array has no getnnz)
            sc.pp.neighbors(graph, use_rep="X_rep", random_state=seed, transformer="sklearn")
            sc.tl.leiden(graph, random_state=seed, flavor="igraph", n_iterations=2)
            add(f"{label} leiden", graph.obs["leiden"].to_numpy())
        kmeans = KMeans(n_types, n_init=10, random_state=seed).fit_predict(latent)
        add(f"{label} kmeans", kmeans)
    return rows


# ---------------------------------------------------------------------- figures
def _plot_elbo_curves(curves: dict[str, pd.Series], path: Path, title: str) -> None:
    figure = _new_figure(6.0, 4.0)
    axes = figure.subplots()
    for name, curve in curves.items():
        axes.plot(np.arange(1, len(curve) + 1), curve.to_numpy(), label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel("ELBO per cell (training cells)")
    axes.set_title(title)
    axes.legend(fontsize="small", frameon=False)
    figure.savefig(path, dpi=120)


def _plot_umaps(split: Split, reps: list[Representation], path: Path, seed: int) -> None:
    import umap

    labels = np.concatenate(
        [split.reference.obs[split.labels_key], split.query.obs[split.labels_key]]
    ).astype(str)
    names = sorted(set(labels))
    colour = dict(zip(names, _palette(len(names)), strict=True))
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(len(labels), min(len(labels), 3000), replace=False))
    n_columns = min(3, len(reps))
    n_rows = int(np.ceil(len(reps) / n_columns))
    figure = _new_figure(3.4 * n_columns + 1.8, 3.2 * n_rows)
    grid = np.atleast_1d(figure.subplots(n_rows, n_columns)).ravel()
    for axes, rep in zip(grid, reps, strict=False):
        latent = np.vstack([rep.reference, rep.query])[shown]
        coordinates = umap.UMAP(random_state=seed).fit_transform(latent)
        axes.scatter(*coordinates.T, c=[colour[x] for x in labels[shown]], s=3, linewidths=0)
        axes.set_title(rep.name if rep.k is None else f"{rep.name} k={rep.k}", fontsize="medium")
        axes.set_xticks([])
        axes.set_yticks([])
    for axes in grid[len(reps) :]:
        axes.set_axis_off()
    handles = [grid[0].scatter([], [], color=colour[n], label=n, s=20) for n in names]
    figure.legend(handles=handles, loc="outside right center", fontsize="x-small", frameon=False)
    figure.suptitle(f"{split.name}: UMAP of each representation (reference + query cells)")
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------- the study
def latent_inputs(
    seed: int, outdir: str | Path | None = None, **options
) -> dict[str, pd.DataFrame]:
    """Run the study for one seed; see the module docstring and :class:`LatentInputsOptions`.

    Parameters
    ----------
    seed
        Seed of the splits, subsamples and models.
    outdir
        Folder of the PNG figures (ELBO curves, UMAPs); default a temporary folder.
    **options
        Fields of :class:`LatentInputsOptions`.

    Returns
    -------
    ``classification`` (one row per dataset, classifier, representation and fraction),
    ``clustering`` (ARI/NMI), ``speed`` (GMVAE vs scVI cells/s per epoch, same widths)
    and ``backends`` (GMVAE trained by the torch loss and by Pyro: final ELBO, s/epoch).
    """
    options = study_options(**options)
    figures = Path(outdir or tempfile.mkdtemp(prefix="scvi_ext_latent_inputs_"))
    figures.mkdir(parents=True, exist_ok=True)
    classification, clustering, speed, backends = [], [], [], []
    for dataset in options.datasets:
        logger.info("latent_inputs: %s, seed %d", dataset, seed)
        split = load_split(dataset, seed, options.max_cells)
        reps = _representations(split, options, seed)
        labels = split.reference.obs[split.labels_key].to_numpy()
        query_labels = split.query.obs[split.labels_key].to_numpy()
        reps_for_plots = list(reps)
        for fraction in sorted(options.fractions):
            cells = _training_cells(labels, fraction, seed)
            fraction_reps = list(reps)
            if "cellular" in options.representations:
                fraction_reps.append(_cellular(split, options, cells))
                reps_for_plots = [*reps, fraction_reps[-1]]  # the largest fraction's
            for rep in fraction_reps:
                reference = rep.reference if rep.name == "cellular" else rep.reference[cells]
                for classifier in options.classifiers:
                    scores = _classify(
                        classifier,
                        reference,
                        labels[cells],
                        rep.query,
                        query_labels,
                        options.classifier_epochs,
                    )
                    name = rep.name if rep.k is None else f"{rep.name}_k{rep.k}"
                    classification.append(
                        {
                            "row": f"{dataset} / {classifier} / {name} / {fraction:g}",
                            "dataset": dataset,
                            "classifier": classifier,
                            "representation": name,
                            "fraction": fraction,
                            "n_train_cells": len(cells),
                            **scores,
                            "representation_seconds": rep.seconds,
                        }
                    )
        clustering += _clustering_rows(split, reps, seed)
        for rep in reps:
            if rep.cells_per_second is not None:
                speed.append(
                    {
                        "model": f"{dataset} / {rep.name}_k{rep.k}",
                        "dataset": dataset,
                        "cells_per_second": rep.cells_per_second,
                        "n_hidden": options.n_hidden,
                        "n_components": options.n_components if rep.name == "gmvae" else 0,
                    }
                )
        if "gmvae" in options.representations:
            curves = {
                f"GMVAE k={rep.k} (torch)": rep.model.history["train_elbo"].iloc[:, 0]
                for rep in reps
                if rep.name == "gmvae"
            }
            if options.backends:
                backends += _backend_rows(split, options, seed, curves)
            _plot_elbo_curves(
                curves, figures / f"elbo_{dataset}_seed{seed}.png", f"{dataset}, seed {seed}"
            )
        if options.umap and seed == 0:
            _plot_umaps(split, reps_for_plots, figures / f"umap_{dataset}.png", seed)
    return {
        "classification": pd.DataFrame(classification),
        "clustering": pd.DataFrame(clustering),
        "speed": pd.DataFrame(speed),
        "backends": pd.DataFrame(backends),
    }


def _backend_rows(
    split: Split, options: LatentInputsOptions, seed: int, curves: dict[str, pd.Series]
) -> list[dict]:
    """GMVAE (smallest k) trained by the torch loss and by Pyro, the same epochs, without
    validation passes (Pyro's plan has none): the ELBO of the reference cells after
    training, seconds per epoch."""
    import scvi

    rows = []
    k = min(options.ks)
    for backend in ("torch", "pyro"):
        scvi.settings.seed = seed
        model, cells_per_second, seconds_per_epoch = _fit_gmvae(
            split, k, options, seed, backend=backend, limit_val_batches=0
        )
        if backend == "pyro":  # Pyro logs the mean over minibatches of their summed loss
            n_train = int(round(split.reference.n_obs * model.train_defaults["train_size"]))
            n_batches = int(np.ceil(n_train / model.train_defaults["batch_size"]))
            per_cell = -model.history["elbo_train"].iloc[:, 0] * n_batches / n_train
            curves[f"GMVAE k={k} (pyro, no validation)"] = per_cell
        else:
            curves[f"GMVAE k={k} (torch, no validation)"] = model.history["train_elbo"].iloc[:, 0]
        rows.append(
            {
                "backend": f"{split.name} / {backend}",
                "dataset": split.name,
                "final_elbo": model.get_elbo(),
                "seconds_per_epoch": seconds_per_epoch,
                "cells_per_second": cells_per_second,
            }
        )
    return rows


register_study(
    "latent_inputs",
    "Does a generative latent help a cell type classifier? (issue 14, the scVAE seed). "
    "The same LatentClassifier (the seed's FFNN: 1 hidden layer of 516, Adam 1e-4; and our "
    "default) on log-normalised HVGs, PCA, GMVAE and scVI latents (same k) and CELLULAR's "
    "latent; learning curve over the training cells; clustering ARI/NMI of GMVAE's own "
    "clusters vs Leiden and K-means; GMVAE vs scVI cells/s; GMVAE torch vs Pyro ELBO. "
    "Sizes: --task-option FIELD=VALUE (LatentInputsOptions; docs/gmvae.md).",
    {
        "classification": ("accuracy", "macro_f1"),
        "clustering": ("ari", "nmi"),
        "speed": ("cells_per_second",),
    },
    check_options=lambda options: study_options(**options),
)(latent_inputs)
