"""GMVAE component collapse (issue 14): how many mixture components each training variant
keeps, and what that does to its clusters, ELBO and latent (the ``gmvae_components`` study).

Per dataset, seed and variant: the GMVAE trained on the reference cells, then the
components used (those that are the argmax of the model's cluster probabilities,
``q(y | x)`` or, for ``mog_prior``, ``p(y | E[z | x])``, for at least one cell), ARI and
NMI of ``predict_cluster`` against the cell types (all cells), the ELBO of the reference
and query cells, the seconds of training, and the accuracy of a
:class:`~scvi_ext.model.LatentClassifier` on the latent (reference -> query). Reference
rows: K-means (as many clusters as cell types) on each GMVAE latent, and Leiden on the
scVI latent (scanpy defaults). The components used are recorded during training too
(``components_vs_epoch_{dataset}.png``). E.g.::

    scvi-ext benchmark --task gmvae_components --seeds 0 1 2 --outdir bench/gmvae_components \
        --task-option datasets=kang_ifnb --task-option epochs=100
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import Callback

from ._cellular_tasks import QUIET
from ._latent_inputs import Split, _batch_free_query, _classify, load_split, parse_options
from ._plots import _new_figure, _palette
from ._studies import register_study

logger = logging.getLogger(__name__)

DATASETS = ("kang_ifnb", "snareseq_cell_type")
#: ``default``: the model as shipped; ``kl_warmup``: KL weight ramped over half the
#: epochs; ``kmeans_init``: the prior means set to K-means centroids of the latent after
#: ``kmeans_init_epoch`` epochs; ``balance``: the GMVAE's ``component_balance`` (a
#: penalty on the components' mean use); ``mixture_lr``: the plan's ``mixture_lr_factor``
#: (the prior means and component offsets learn faster than the networks); ``mog_prior``:
#: ``posterior="gaussian"``, one Gaussian ``q(z | x)`` under scvi-tools' ``MogPrior``
#: (clusters: the prior's responsibilities at ``E[z | x]``).
VARIANTS = ("default", "kl_warmup", "kmeans_init", "balance", "mixture_lr", "mog_prior")
#: scVI's splitter (scvi-tools') keeps a last minibatch of one cell, which fails in BatchNorm
#: (e.g. 769 training cells, batch 128); ours drop a last minibatch under 3 cells.
NO_SINGLE_CELL_BATCH = {"drop_last": True}


@dataclass
class GMVAEComponentsOptions:
    """Sizes of the study (``--task-option FIELD=VALUE`` on the command line).

    Attributes
    ----------
    datasets, variants
        Of :data:`DATASETS` and :data:`VARIANTS`.
    epochs
        GMVAE (and scVI) epochs.
    n_components, n_latent, n_hidden, lr
        GMVAE K, latent size, hidden width and learning rate (the seed's: 1e-4).
    balance
        ``component_balance`` of the ``balance`` variant.
    mixture_lr_factor
        ``mixture_lr_factor`` of the ``mixture_lr`` variant.
    kmeans_init_epoch
        Epoch after which ``kmeans_init`` re-sets the prior means.
    classifier_epochs
        Epochs of the classifier on each latent.
    max_cells
        Subsample each dataset to this many cells (0: all).
    record_every
        Epochs between two counts of the components used during training.
    """

    datasets: tuple[str, ...] = DATASETS
    variants: tuple[str, ...] = VARIANTS
    epochs: int = 100
    n_components: int = 11
    n_latent: int = 10
    n_hidden: int = 128
    lr: float = 1e-4
    balance: float = 10.0
    mixture_lr_factor: float = 30.0
    kmeans_init_epoch: int = 10
    classifier_epochs: int = 50
    max_cells: int = 0
    record_every: int = 5


def study_options(**given) -> GMVAEComponentsOptions:
    """The study's sizes: the defaults updated with ``given`` (see ``parse_options``)."""
    choices = {"datasets": DATASETS, "variants": VARIANTS}
    return parse_options(GMVAEComponentsOptions, "gmvae_components", choices, given)


# ---------------------------------------------------------------------- callbacks
class _ComponentsUsed(Callback):
    """Components that are the argmax of the module's ``cluster_probabilities`` (``q(y|x)``,
    or ``p(y | E[z|x])`` with the Gaussian posterior) for at least one training-data cell,
    counted every ``every`` epochs (and after the last)."""

    def __init__(self, model, every: int):
        self.model, self.every, self.counts = model, every, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every and epoch != trainer.max_epochs:
            return
        proba = self.model.map_minibatches(
            self.model.module.cluster_probabilities, while_training=True
        )
        self.counts[epoch] = len(np.unique(proba.argmax(axis=1)))


class _KMeansPriorMeans(Callback):
    """After ``epoch`` epochs, set the prior means of ``p(z | y)`` to the K-means centroids
    (K = the components) of the latent of the training data; nothing else changes."""

    def __init__(self, model, epoch: int, seed: int):
        self.model, self.epoch, self.seed = model, epoch, seed

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import torch
        from sklearn.cluster import KMeans

        if trainer.current_epoch + 1 != self.epoch:
            return
        module = self.model.module
        latent = self.model.map_minibatches(module.latent, while_training=True)
        kmeans = KMeans(module.n_components, n_init=10, random_state=self.seed).fit(latent)
        with torch.no_grad():
            module.prior_means.copy_(torch.as_tensor(kmeans.cluster_centers_))


# ---------------------------------------------------------------------- one model
def _fit_variant(split: Split, variant: str, options: GMVAEComponentsOptions, seed: int):
    """Train one variant; return the model, seconds and the components used per epoch."""
    import scvi

    from scvi_ext.model import GMVAE

    scvi.settings.seed = seed
    adata = split.reference.copy()
    GMVAE.setup_anndata(adata, batch_key=split.batch_key)
    balance = options.balance if variant == "balance" else 0.0
    model = GMVAE(
        adata,
        n_latent=options.n_latent,
        n_hidden=options.n_hidden,
        n_components=options.n_components,
        component_balance=balance,
        posterior="gaussian" if variant == "mog_prior" else "mixture",
    )
    plan_kwargs = {"lr": options.lr}
    if variant == "kl_warmup":
        plan_kwargs["n_epochs_kl_warmup"] = max(options.epochs // 2, 1)
    if variant == "mixture_lr":
        plan_kwargs["mixture_lr_factor"] = options.mixture_lr_factor
    recorder = _ComponentsUsed(model, options.record_every)
    callbacks = [recorder]
    if variant == "kmeans_init":
        callbacks.append(_KMeansPriorMeans(model, options.kmeans_init_epoch, seed))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predict_cluster's collapse warning: counted here
        model.train(
            max_epochs=options.epochs,
            plan_kwargs=plan_kwargs,
            early_stopping=False,
            callbacks=callbacks,
            **QUIET,
        )
    return model, time.perf_counter() - start, recorder.counts


def _scores(split: Split, model, seconds: float, options, seed: int) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    query = _batch_free_query(split)
    truth = np.concatenate(
        [split.reference.obs[split.labels_key], split.query.obs[split.labels_key]]
    ).astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collapsed components: counted below
        clusters = np.concatenate([model.predict_cluster(), model.predict_cluster(query)])
    reference_latent = model.get_latent_representation()
    query_latent = model.get_latent_representation(query)
    latent = np.vstack([reference_latent, query_latent])
    kmeans = KMeans(len(np.unique(truth)), n_init=10, random_state=seed).fit_predict(latent)
    classifier = _classify(
        "default",
        reference_latent,
        split.reference.obs[split.labels_key].to_numpy(),
        query_latent,
        split.query.obs[split.labels_key].to_numpy(),
        options.classifier_epochs,
    )
    sizes = np.bincount(clusters, minlength=model.module.n_components)
    return {
        "components_used": int((sizes > 0).sum()),
        "components_over_1pct": int((sizes >= 0.01 * len(clusters)).sum()),
        "ari": adjusted_rand_score(truth, clusters),
        "nmi": normalized_mutual_info_score(truth, clusters),
        "kmeans_ari": adjusted_rand_score(truth, kmeans),
        "kmeans_nmi": normalized_mutual_info_score(truth, kmeans),
        "elbo": model.get_elbo(),
        "query_elbo": model.get_elbo(query),
        "classifier_accuracy": classifier["accuracy"],
        "classifier_macro_f1": classifier["macro_f1"],
        "seconds": seconds,
    }


def _leiden_on_scvi(split: Split, options: GMVAEComponentsOptions, seed: int) -> dict:
    """The issue's reference clustering: Leiden (scanpy defaults) on the scVI latent."""
    import anndata as ad
    import scanpy as sc
    from scvi.model import SCVI
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    start = time.perf_counter()
    adata = split.reference.copy()
    SCVI.setup_anndata(adata, batch_key=split.batch_key)
    model = SCVI(adata, n_latent=options.n_latent, n_hidden=options.n_hidden, n_layers=1)
    model.train(max_epochs=options.epochs, datasplitter_kwargs=NO_SINGLE_CELL_BATCH, **QUIET)
    seconds = time.perf_counter() - start
    query = _batch_free_query(split)
    SCVI.setup_anndata(query, batch_key=split.batch_key)
    latent = np.vstack([model.get_latent_representation(), model.get_latent_representation(query)])
    graph = ad.AnnData(obsm={"X_rep": latent})
    sc.pp.neighbors(graph, use_rep="X_rep", random_state=seed, transformer="sklearn")
    sc.tl.leiden(graph, random_state=seed, flavor="igraph", n_iterations=2)
    truth = np.concatenate(
        [split.reference.obs[split.labels_key], split.query.obs[split.labels_key]]
    ).astype(str)
    clusters = graph.obs["leiden"].to_numpy()
    sizes = pd.Series(clusters).value_counts().to_numpy()
    return {
        "components_used": int((sizes > 0).sum()),
        "components_over_1pct": int((sizes >= 0.01 * len(clusters)).sum()),
        "ari": adjusted_rand_score(truth, clusters),
        "nmi": normalized_mutual_info_score(truth, clusters),
        "seconds": seconds,
    }


def _plot_components(curves: dict[str, dict[int, int]], path: Path, title: str) -> None:
    """Components used vs epoch, one line per variant (and seed)."""
    figure = _new_figure(6.0, 4.0)
    axes = figure.subplots()
    variants = sorted({name.split(", seed")[0] for name in curves})
    colour = dict(zip(variants, _palette(len(variants)), strict=True))
    for name, counts in curves.items():
        variant = name.split(", seed")[0]
        first = not any(n.startswith(variant) for n in list(curves)[: list(curves).index(name)])
        axes.plot(
            list(counts),
            list(counts.values()),
            color=colour[variant],
            label=variant if first else None,
            marker=".",
        )
    axes.set_xlabel("epoch")
    axes.set_ylabel("components used (training cells)")
    axes.set_title(title)
    axes.legend(fontsize="small", frameon=False)
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------- the study
def gmvae_components(
    seed: int, outdir: str | Path | None = None, **options
) -> dict[str, pd.DataFrame]:
    """Run the study for one seed; see the module docstring.

    Parameters
    ----------
    seed
        Seed of the split, subsample and models.
    outdir
        Folder of the components-vs-epoch figures; default a temporary folder.
    **options
        Fields of :class:`GMVAEComponentsOptions`.

    Returns
    -------
    ``components`` (one row per dataset and variant, plus Leiden on the scVI latent) and
    ``components_vs_epoch`` (components used during training).
    """
    options = study_options(**options)
    figures = Path(outdir or tempfile.mkdtemp(prefix="scvi_ext_gmvae_components_"))
    figures.mkdir(parents=True, exist_ok=True)
    rows, curves_rows = [], []
    for dataset in options.datasets:
        logger.info("gmvae_components: %s, seed %d", dataset, seed)
        split = load_split(dataset, seed, options.max_cells)
        curves = {}
        for variant in options.variants:
            model, seconds, counts = _fit_variant(split, variant, options, seed)
            scores = _scores(split, model, seconds, options, seed)
            rows.append({"run": f"{dataset} / GMVAE {variant}", "dataset": dataset, **scores})
            curves[f"{variant}, seed {seed}"] = counts
            curves_rows += [
                {"curve": f"{dataset} / {variant} / {epoch}", "epoch": epoch, "used": used}
                for epoch, used in counts.items()
            ]
        leiden = _leiden_on_scvi(split, options, seed)
        rows.append({"run": f"{dataset} / Leiden on scVI", "dataset": dataset, **leiden})
        _plot_components(
            curves,
            figures / f"components_vs_epoch_{dataset}_seed{seed}.png",
            f"{dataset}, seed {seed}: GMVAE components used (K = {options.n_components})",
        )
    return {"components": pd.DataFrame(rows), "components_vs_epoch": pd.DataFrame(curves_rows)}


register_study(
    "gmvae_components",
    "GMVAE component collapse (issue 14): per training variant (default, KL warm-up, "
    "K-means re-set prior means, component_balance, mixture_lr_factor, scvi-tools' MogPrior "
    "with a Gaussian posterior), the components used, ARI/NMI of "
    "predict_cluster and of K-means on the latent, ELBO, seconds and a classifier's "
    "accuracy on the latent, next to Leiden on the scVI latent. Sizes: --task-option "
    "FIELD=VALUE (GMVAEComponentsOptions; docs/gmvae.md).",
    {"components": ("components_used", "ari", "classifier_accuracy")},
    check_options=lambda options: study_options(**options),
)(gmvae_components)
