"""Annotation-transfer methods compared by the benchmark.

Every method has the signature ``(reference, query, labels_key, seed, **options) ->
MethodResult``: it learns the labels ``reference.obs[labels_key]`` from raw counts in
``reference.X`` and predicts them for the cells of ``query`` (same genes). A method
whose optional dependency is missing raises :class:`MethodUnavailableError`. Register a
new method with :func:`register_method`; methods use the public API of the models only.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_ext.data import log_normalised_anndata

#: Label of the query cells in :func:`concat_reference_query` (scvi's unlabeled category).
UNLABELED_CATEGORY = "Unknown"
#: ``obs`` columns written by :func:`concat_reference_query`: labels, domain, batch.
LABELS_COLUMN = "_bench_labels"
DOMAIN_COLUMN = "_bench_domain"
BATCH_COLUMN = "batch"


@dataclass
class MethodResult:
    """What one method returns for one split and seed.

    Attributes
    ----------
    name
        Method name, as in :data:`METHODS`.
    predictions
        Predicted label (string) for each query cell.
    confidence
        Maximum class probability for each query cell.
    train_seconds
        Wall time of model fitting (preprocessing excluded).
    cells_per_second
        Training cells (:func:`n_training_cells`: validation cells excluded, unlabeled
        query cells a semi-supervised model trains on included) times epochs, per second
        of training; ``None`` for methods without epochs.
    settings
        Short description of the training settings (epochs...), shown in the report.
    uncalibrated_confidence
        For models calibrated after training: the confidence before calibration
        (temperature 1), reported as ``ece_uncalibrated``.
    """

    name: str
    predictions: np.ndarray
    confidence: np.ndarray
    train_seconds: float
    cells_per_second: float | None = None
    settings: str = ""
    uncalibrated_confidence: np.ndarray | None = None


class MethodUnavailableError(RuntimeError):
    """Raised by a method whose optional dependency is not installed."""


MethodFunction = Callable[..., MethodResult]

METHODS: dict[str, MethodFunction] = {}
"""Registered methods, by name, in registration order (:func:`register_method`)."""


DEFAULT_METHODS: list[str] = []
"""Methods a benchmark runs when none are named (registered with ``default=True``)."""


def register_method(
    name: str, *, default: bool = True
) -> Callable[[MethodFunction], MethodFunction]:
    """Decorator adding a method function to :data:`METHODS` under ``name``.

    Parameters
    ----------
    name
        The method's name in the benchmark.
    default
        Run it when a benchmark names no methods (:data:`DEFAULT_METHODS`); ``False`` for
        methods too slow to run unasked.

    Examples
    --------
    >>> @register_method("my_method")
    ... def my_method(reference, query, labels_key, seed=0, **options) -> MethodResult: ...
    """

    def decorator(function: MethodFunction) -> MethodFunction:
        if name in METHODS and METHODS[name] is not function:
            raise ValueError(f"A benchmark method named {name!r} is already registered.")
        METHODS[name] = function
        if default and name not in DEFAULT_METHODS:
            DEFAULT_METHODS.append(name)
        return function

    return decorator


def _check_inputs(reference: ad.AnnData, query: ad.AnnData, labels_key: str) -> ad.AnnData:
    """Check the labels and genes; return ``query`` with genes in the reference order."""
    if labels_key not in reference.obs:
        raise KeyError(f"labels_key {labels_key!r} is not a column of reference.obs.")
    missing = reference.var_names.difference(query.var_names)
    if len(missing) > 0:
        raise ValueError(
            f"{len(missing)} reference genes are absent from the query (e.g. "
            f"{list(missing[:3])}); subset both to their shared genes first."
        )
    if not query.var_names.equals(reference.var_names):
        query = query[:, reference.var_names]
    return query


def concat_reference_query(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    unlabeled_category: str = UNLABELED_CATEGORY,
    batch_key: str | None = None,
) -> ad.AnnData:
    """Stack reference and query counts into one AnnData for semi-supervised training.

    Parameters
    ----------
    reference
        Labelled cells, raw counts in ``X``; cells with a missing label are unlabeled.
    query
        Cells to annotate, the same genes as ``reference``.
    labels_key
        Label column of ``reference.obs``.
    unlabeled_category
        Label given to every query cell.
    batch_key
        Optional ``obs`` column present in both, copied as ``obs["batch"]``.

    Returns
    -------
    AnnData with the reference rows first; ``obs[LABELS_COLUMN]`` (reference labels,
    ``unlabeled_category`` for query cells), ``obs[DOMAIN_COLUMN]``
    (``"reference"`` / ``"query"``) and, with ``batch_key``, ``obs[BATCH_COLUMN]``. Cell
    names are prefixed with ``ref-`` / ``query-`` so they are unique.
    """
    query = _check_inputs(reference, query, labels_key)
    labels = reference.obs[labels_key]
    labels = np.where(labels.isna(), unlabeled_category, labels.astype(str))
    obs = pd.DataFrame(
        {
            LABELS_COLUMN: np.concatenate([labels, np.full(query.n_obs, unlabeled_category)]),
            DOMAIN_COLUMN: np.repeat(["reference", "query"], [reference.n_obs, query.n_obs]),
        },
        index=[f"ref-{name}" for name in reference.obs_names]
        + [f"query-{name}" for name in query.obs_names],
    )
    if batch_key is not None:
        for name, adata in (("reference", reference), ("query", query)):
            if batch_key not in adata.obs:
                raise KeyError(f"batch_key {batch_key!r} is not a column of {name}.obs.")
        obs[BATCH_COLUMN] = np.concatenate(
            [reference.obs[batch_key].astype(str), query.obs[batch_key].astype(str)]
        )
    for column in obs:
        obs[column] = obs[column].astype("category")
    counts = (
        sp.vstack([sp.csr_matrix(reference.X), sp.csr_matrix(query.X)], format="csr")
        if sp.issparse(reference.X) or sp.issparse(query.X)
        else np.vstack([np.asarray(reference.X), np.asarray(query.X)])
    )
    return ad.AnnData(
        X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=reference.var_names.copy())
    )


def reference_hvgs(reference: ad.AnnData, n_top_genes: int | None) -> np.ndarray:
    """Boolean mask of the reference's highly variable genes (the same for every method).

    scanpy ``highly_variable_genes(flavor="seurat")`` on the log-normalised reference
    counts; every gene when ``n_top_genes`` is ``None`` or not below the gene count.

    Raises
    ------
    ValueError
        When ``n_top_genes`` is below 1.
    """
    import scanpy as sc

    if n_top_genes is not None and n_top_genes < 1:
        raise ValueError(f"n_top_genes must be at least 1 (None: all genes), not {n_top_genes}.")
    if n_top_genes is None or reference.n_vars <= n_top_genes:
        return np.ones(reference.n_vars, dtype=bool)
    reference_log = log_normalised_anndata(reference)
    sc.pp.highly_variable_genes(reference_log, n_top_genes=n_top_genes, flavor="seurat")
    return reference_log.var["highly_variable"].to_numpy()


def _restrict_to_hvgs(
    reference: ad.AnnData, query: ad.AnnData, labels_key: str, n_top_genes: int | None
) -> tuple[ad.AnnData, ad.AnnData]:
    """Reference and query restricted to :func:`reference_hvgs` (views)."""
    query = _check_inputs(reference, query, labels_key)
    genes = reference_hvgs(reference, n_top_genes)
    return reference[:, genes], query[:, genes]


def keyword_settings(kwargs: dict | None) -> str:
    """``", key value"`` for each model argument a method row sets, for its settings."""
    return "".join(f", {key} {value}" for key, value in (kwargs or {}).items())


def _scaled_epochs(max_epochs: int, epochs_scale: float) -> int:
    """``max_epochs * epochs_scale`` rounded, at least 1.

    Raises
    ------
    ValueError
        When ``epochs_scale`` is not positive.
    """
    if epochs_scale <= 0:
        raise ValueError(f"epochs_scale must be positive, not {epochs_scale}.")
    return max(1, int(round(max_epochs * epochs_scale)))


def n_training_cells(model: Any) -> int:
    """Cells a trained scvi-tools model trained on: ``len(model.train_indices)``.

    Validation cells are excluded; the unlabeled cells of a semi-supervised model (the
    query of scNym and scANVI) are included, as they train.

    Raises
    ------
    ValueError
        When ``model`` has no ``train_indices`` (not trained, or trained from a datamodule).
    """
    indices = getattr(model, "train_indices", None)
    if indices is None:
        raise ValueError(
            f"This {type(model).__name__} has no train_indices: train it on its AnnData first."
        )
    return len(indices)


@register_method("scnym")
def scnym(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    max_epochs: int | None = None,
    epochs_scale: float = 1.0,
    n_top_genes: int | None = 2000,
    progress_bar: bool = False,
    train_kwargs: dict[str, Any] | None = None,
) -> MethodResult:
    """ScNym (``scvi_ext.model.ScNym``) trained on reference + unlabeled query.

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    max_epochs
        Training epochs; ``None`` keeps the model's default.
    epochs_scale
        Multiplies ``max_epochs``; other than 1 only with ``max_epochs``.
    n_top_genes
        Highly variable genes of the reference (:func:`reference_hvgs`, as for
        logistic regression); ``None``: all genes (the scNym paper's choice).
    progress_bar
        Show Lightning progress bars.
    train_kwargs
        Extra keyword arguments for ``ScNym.train``.

    Returns
    -------
    :class:`MethodResult`.

    Raises
    ------
    ValueError
        When ``epochs_scale`` is not 1 without ``max_epochs`` or is not positive, or
        ``n_top_genes`` is below 1.
    """
    from scvi_ext.model import ScNym

    if max_epochs is None and epochs_scale != 1:
        raise ValueError(
            f"epochs_scale={epochs_scale} needs max_epochs: scnym scales only a given "
            f"max_epochs (the model's default is {ScNym.train_defaults['max_epochs']})."
        )
    reference, query = _restrict_to_hvgs(reference, query, labels_key, n_top_genes)
    adata = concat_reference_query(reference, query, labels_key)
    ScNym.setup_anndata(adata, labels_key=LABELS_COLUMN, unlabeled_category=UNLABELED_CATEGORY)
    model = ScNym(adata)
    train_kwargs = {"enable_progress_bar": progress_bar, **(train_kwargs or {})}
    if max_epochs is not None:
        train_kwargs["max_epochs"] = _scaled_epochs(max_epochs, epochs_scale)
    start = time.perf_counter()
    model.train(**train_kwargs)
    train_seconds = time.perf_counter() - start

    query_cells = np.arange(reference.n_obs, adata.n_obs)
    query_proba = model.predict(indices=query_cells, soft=True)
    n_epochs = _trained_epochs(model, train_kwargs.get("max_epochs"))
    return MethodResult(
        name="scnym",
        predictions=query_proba.idxmax(axis=1).astype(str).to_numpy(),
        confidence=query_proba.max(axis=1).to_numpy(),
        uncalibrated_confidence=model.predict_proba(indices=query_cells, calibrated=False).max(
            axis=1
        ),
        train_seconds=train_seconds,
        cells_per_second=None
        if n_epochs is None
        else n_training_cells(model) * n_epochs / train_seconds,
        settings=f"{reference.n_vars} genes" + (f", {n_epochs} epochs" if n_epochs else ""),
    )


def _trained_epochs(model: Any, requested: int | None) -> int | None:
    """Epochs actually run (early stopping may stop before ``max_epochs``)."""
    history = getattr(model, "history", None) or {}
    for key in ("train_loss_epoch", "train_loss"):
        if key in history:
            return len(history[key])
    if requested is not None:
        return requested
    return getattr(getattr(model, "trainer", None), "max_epochs", None)


@register_method("logistic_regression")
def logistic_regression(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    n_top_genes: int = 2000,
    max_iter: int = 1000,
) -> MethodResult:
    """Logistic regression on log-normalised HVGs of the reference.

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    n_top_genes
        Number of highly variable genes (scanpy ``seurat`` flavour on the log data of
        the reference); all genes when there are fewer.
    max_iter
        Iterations of :class:`sklearn.linear_model.LogisticRegression`.

    Returns
    -------
    :class:`MethodResult`.
    """
    from sklearn.linear_model import LogisticRegression

    query = _check_inputs(reference, query, labels_key)
    reference_log = log_normalised_anndata(reference)
    query_log = log_normalised_anndata(query)
    genes = reference_hvgs(reference, n_top_genes)
    labels = reference.obs[labels_key].astype(str).to_numpy()

    classifier = LogisticRegression(max_iter=max_iter, random_state=seed)
    start = time.perf_counter()
    classifier.fit(reference_log.X[:, genes], labels)
    train_seconds = time.perf_counter() - start
    proba = classifier.predict_proba(query_log.X[:, genes])
    return MethodResult(
        name="logistic_regression",
        predictions=classifier.classes_[proba.argmax(axis=1)].astype(str),
        confidence=proba.max(axis=1),
        train_seconds=train_seconds,
        cells_per_second=None,
        settings=f"{int(genes.sum())} HVGs, max_iter={max_iter}",
    )


QUERY_LABEL_CEILING = "query_label_ceiling"


def query_label_ceiling(
    query: ad.AnnData, labels_key: str, seed: int = 0, *, n_folds: int = 5
) -> MethodResult:
    """What the query's own labels allow: :func:`logistic_regression` cross-validated on them.

    Not a transfer method, and not in :data:`METHODS`: it reads the query's labels, which
    the methods never see. Each query cell is predicted by logistic regression trained on
    the other ``n_folds - 1`` folds of the query (stratified, shuffled with ``seed``), so
    there is no reference-to-query shift. Label noise and overlapping types cap it below 1;
    a transfer method close to it has little left to gain on the task.

    Parameters
    ----------
    query, labels_key, seed
        See the module docstring; ``query.obs[labels_key]`` must hold the true labels.
    n_folds
        Number of cross-validation folds.

    Returns
    -------
    :class:`MethodResult` with the out-of-fold predictions of every query cell.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = query.obs[labels_key].astype(str).to_numpy()
    n_types = len(np.unique(labels))
    if n_types < 2 or query.n_obs < 2 * n_folds:
        raise ValueError(
            f"The query has {query.n_obs} cells of {n_types} label(s); cross-validating on "
            f"its labels needs at least 2 labels and {2 * n_folds} cells."
        )
    predictions = np.empty(query.n_obs, dtype=object)
    confidence = np.empty(query.n_obs)
    train_seconds = 0.0
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a rare type may have fewer cells than folds
        warnings.filterwarnings("ignore", message="The least populated class")
        splits = list(folds.split(np.zeros((query.n_obs, 1)), labels))
    for train, test in splits:
        fold = logistic_regression(query[train], query[test], labels_key, seed)
        predictions[test], confidence[test] = fold.predictions, fold.confidence
        train_seconds += fold.train_seconds
    return MethodResult(
        name=QUERY_LABEL_CEILING,
        predictions=predictions.astype(str),
        confidence=confidence,
        train_seconds=train_seconds,
        settings=f"logistic regression, {n_folds}-fold CV on the query's labels",
    )


@register_method("scanvi")
def scanvi(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    max_epochs: int = 200,
    scanvi_max_epochs: int = 20,
    epochs_scale: float = 1.0,
    n_top_genes: int | None = 2000,
    progress_bar: bool = False,
) -> MethodResult:
    """scVI pre-training then scANVI on reference + query (query cells unlabeled).

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring; ``seed`` is set by the runner through
        ``scvi.settings.seed``.
    max_epochs
        scVI epochs (scvi-tools default for this data size: 200 here).
    scanvi_max_epochs
        scANVI fine-tuning epochs.
    epochs_scale
        Multiplies both epoch counts (at least one epoch each).
    n_top_genes
        Highly variable genes of the reference (:func:`reference_hvgs`, as for
        logistic regression); ``None``: all genes.
    progress_bar
        Show Lightning progress bars.

    Returns
    -------
    :class:`MethodResult`.

    Raises
    ------
    ValueError
        When ``epochs_scale`` is not positive or ``n_top_genes`` is below 1.
    """
    import scvi

    reference, query = _restrict_to_hvgs(reference, query, labels_key, n_top_genes)
    adata = concat_reference_query(reference, query, labels_key)
    n_scvi_epochs = _scaled_epochs(max_epochs, epochs_scale)
    n_scanvi_epochs = _scaled_epochs(scanvi_max_epochs, epochs_scale)
    trainer_kwargs = {"enable_progress_bar": progress_bar}

    scvi.model.SCVI.setup_anndata(adata, batch_key=DOMAIN_COLUMN, labels_key=LABELS_COLUMN)
    start = time.perf_counter()
    vae = scvi.model.SCVI(adata)
    vae.train(max_epochs=n_scvi_epochs, **trainer_kwargs)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED_CATEGORY)
    model.train(max_epochs=n_scanvi_epochs, **trainer_kwargs)
    train_seconds = time.perf_counter() - start

    query_indices = np.arange(reference.n_obs, adata.n_obs)
    proba = model.predict(adata, indices=query_indices, soft=True)
    n_trained = n_training_cells(vae) * n_scvi_epochs + n_training_cells(model) * n_scanvi_epochs
    return MethodResult(
        name="scanvi",
        predictions=proba.idxmax(axis=1).astype(str).to_numpy(),
        confidence=proba.max(axis=1).to_numpy(),
        train_seconds=train_seconds,
        cells_per_second=n_trained / train_seconds,
        settings=f"{reference.n_vars} genes, scVI {n_scvi_epochs} + scANVI {n_scanvi_epochs} "
        "epochs",
    )


def _one_vs_rest_classifier(indata, labels, C, solver, max_iter, n_jobs, **kwargs):
    """CellTypist's one-vs-rest logistic regression for scikit-learn >= 1.8.

    CellTypist passes ``multi_class="ovr"``, which recent scikit-learn removed. This
    fits the same per-class binary models and packs them into one
    ``LogisticRegression`` (``coef_``, ``intercept_``, ``classes_``), which is all
    CellTypist reads at prediction time (``decision_function`` then a sigmoid).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    solver = solver or ("sag" if len(labels) > 50000 else "lbfgs")
    ovr = OneVsRestClassifier(
        LogisticRegression(C=C, solver=solver, max_iter=max_iter, **kwargs), n_jobs=n_jobs
    )
    ovr.fit(indata, labels)
    classifier = LogisticRegression(C=C, solver=solver, max_iter=max_iter, **kwargs)
    classifier.classes_ = ovr.classes_
    classifier.coef_ = np.vstack([estimator.coef_ for estimator in ovr.estimators_])
    classifier.intercept_ = np.concatenate([estimator.intercept_ for estimator in ovr.estimators_])
    classifier.n_features_in_ = classifier.coef_.shape[1]
    return classifier


def _sklearn_has_multi_class() -> bool:
    import inspect

    from sklearn.linear_model import LogisticRegression

    return "multi_class" in inspect.signature(LogisticRegression).parameters


@register_method("celltypist")
def celltypist(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    max_iter: int | None = None,
) -> MethodResult:
    """CellTypist logistic regression (all genes, no SGD, no majority voting).

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    max_iter
        Iterations of the logistic regression (``None``: CellTypist's own choice, 1000
        below 50,000 reference cells, 500 below 500,000, else 200; ``settings`` names the
        value used).

    Returns
    -------
    :class:`MethodResult`.

    Raises
    ------
    MethodUnavailableError
        When ``celltypist`` is not installed.

    Notes
    -----
    CellTypist <= 1.7 passes ``multi_class="ovr"`` to scikit-learn, which removed it
    in 1.8; with such a scikit-learn the same one-vs-rest fit is patched in for the
    duration of the call (see ``settings``).
    """
    try:
        celltypist_pkg = importlib.import_module("celltypist")
    except ImportError as error:
        raise MethodUnavailableError(
            "celltypist is not installed (pip install 'scvi-ext[bench]')."
        ) from error
    train_module = importlib.import_module("celltypist.train")

    query = _check_inputs(reference, query, labels_key)
    reference_log = log_normalised_anndata(reference)
    query_log = log_normalised_anndata(query)
    labels = reference.obs[labels_key].astype(str).to_numpy()

    shim = not _sklearn_has_multi_class()
    patch = contextlib.nullcontext()
    if shim:
        patch = mock.patch.object(train_module, "_LRClassifier", _one_vs_rest_classifier)
    start = time.perf_counter()
    with patch:
        model = celltypist_pkg.train(
            reference_log,
            labels=labels,
            use_SGD=False,
            feature_selection=False,
            n_jobs=1,
            max_iter=max_iter,
        )
    train_seconds = time.perf_counter() - start
    settings = f"max_iter={model.classifier.max_iter}" + (", one-vs-rest shim" if shim else "")
    annotation = celltypist_pkg.annotate(query_log, model=model, majority_voting=False)
    proba = annotation.probability_matrix
    return MethodResult(
        name="celltypist",
        predictions=annotation.predicted_labels["predicted_labels"].astype(str).to_numpy(),
        confidence=proba.max(axis=1).to_numpy(),
        train_seconds=train_seconds,
        cells_per_second=None,
        settings=settings,
    )


def _fit_sklearn(
    name: str,
    classifier: Any,
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    n_top_genes: int | None,
    settings: str,
) -> MethodResult:
    """Fit a scikit-learn classifier on log-normalised reference HVGs, predict the query.

    Predictions are the classifier's ``predict``; for a ``CalibratedClassifierCV`` with
    ``ensemble=False``, that of its one estimator fitted on every reference cell (the model
    the paper ran). The confidence is ``predict_proba`` of the predicted class.
    """
    query = _check_inputs(reference, query, labels_key)
    genes = reference_hvgs(reference, n_top_genes)
    reference_log = log_normalised_anndata(reference).X[:, genes]
    query_log = log_normalised_anndata(query).X[:, genes]
    labels = reference.obs[labels_key].astype(str).to_numpy()
    start = time.perf_counter()
    with warnings.catch_warnings():  # the paper's max_iter=1000 stops SVC before convergence
        warnings.filterwarnings("ignore", message=".*max_iter.*|.*terminated early.*")
        classifier.fit(reference_log, labels)
    train_seconds = time.perf_counter() - start
    calibrated = getattr(classifier, "calibrated_classifiers_", None)
    predictor = calibrated[0].estimator if calibrated and len(calibrated) == 1 else classifier
    predictions = np.asarray(predictor.predict(query_log)).astype(str)
    proba = classifier.predict_proba(query_log)
    column = pd.Index(np.asarray(classifier.classes_).astype(str)).get_indexer(predictions)
    return MethodResult(
        name=name,
        predictions=predictions,
        confidence=proba[np.arange(len(predictions)), column],
        train_seconds=train_seconds,
        settings=f"{int(genes.sum())} HVGs, {settings}",
    )


def _sigmoid_calibrated(estimator: Any, labels: pd.Series, folds: int) -> Any:
    """``CalibratedClassifierCV(estimator, method="sigmoid", ensemble=False)`` with at most
    as many folds as the rarest class has cells (at least 2).

    Raises
    ------
    ValueError
        When ``folds`` is below 2.
    """
    from sklearn.calibration import CalibratedClassifierCV

    if folds < 2:
        raise ValueError(f"calibration_folds must be at least 2, not {folds}.")
    folds = max(2, min(folds, int(labels.value_counts().min())))
    return CalibratedClassifierCV(estimator, method="sigmoid", cv=folds, ensemble=False)


@register_method("svm_linear")
def svm_linear(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    n_top_genes: int | None = 2000,
    max_iter: int = 1000,
    calibration_folds: int = 5,
) -> MethodResult:
    """Linear SVM as the CAN/CGRAN paper ran it: ``SVC(kernel="linear", max_iter=1000)``.

    One-vs-one multi-class (scikit-learn's ``SVC``) on log-normalised HVGs; predictions are
    ``SVC.predict`` of the SVM fitted on every reference cell. Confidence: Platt scaling,
    per-class sigmoids fitted on ``calibration_folds``-fold cross-validated decision
    values (``CalibratedClassifierCV(method="sigmoid", ensemble=False)``, scikit-learn's
    replacement of ``SVC(probability=True)``; their fits count in ``train_seconds``).

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    n_top_genes
        Highly variable genes of the reference (:func:`reference_hvgs`).
    max_iter
        Iteration limit of the solver (paper: 1000).
    calibration_folds
        Cross-validation folds of the sigmoid calibration, at least 2 (fewer when the
        rarest cell type has fewer cells, as ``settings`` says).

    Raises
    ------
    ValueError
        When ``calibration_folds`` is below 2 or ``n_top_genes`` below 1.
    """
    from sklearn.svm import SVC

    labels = reference.obs[labels_key].astype(str)
    svm = SVC(kernel="linear", max_iter=max_iter)
    classifier = _sigmoid_calibrated(svm, labels, calibration_folds)
    return _fit_sklearn(
        "svm_linear",
        classifier,
        reference,
        query,
        labels_key,
        n_top_genes,
        f"SVC linear, max_iter={max_iter}, Platt confidence ({classifier.cv}-fold)",
    )


@register_method("linear_svc")
def linear_svc(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    n_top_genes: int | None = 2000,
    calibration_folds: int = 3,
) -> MethodResult:
    """``LinearSVC`` (one-vs-rest, liblinear) on log-normalised HVGs.

    LinearSVC has no probabilities: it is wrapped in ``CalibratedClassifierCV(method=
    "sigmoid", ensemble=False)``, i.e. one LinearSVC fitted on every reference cell (its
    ``predict`` gives the predictions), and per-class sigmoids fitted on
    ``calibration_folds``-fold cross-validated decision values (the confidence).

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    n_top_genes
        Highly variable genes of the reference (:func:`reference_hvgs`).
    calibration_folds
        Cross-validation folds of the sigmoid calibration, at least 2 (fewer when the
        rarest cell type has fewer cells, as ``settings`` says).

    Raises
    ------
    ValueError
        When ``calibration_folds`` is below 2 or ``n_top_genes`` below 1.
    """
    from sklearn.svm import LinearSVC

    labels = reference.obs[labels_key].astype(str)
    classifier = _sigmoid_calibrated(LinearSVC(random_state=seed), labels, calibration_folds)
    return _fit_sklearn(
        "linear_svc",
        classifier,
        reference,
        query,
        labels_key,
        n_top_genes,
        f"LinearSVC, sigmoid calibration ({classifier.cv}-fold)",
    )


@register_method("random_forest")
def random_forest(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    n_top_genes: int | None = 2000,
    n_estimators: int = 1000,
    n_jobs: int | None = None,
) -> MethodResult:
    """Random forest on log-normalised HVGs (the CAN/CGRAN paper's: 1000 trees, defaults).

    Confidence: the fraction of trees voting for the predicted class.

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    n_top_genes
        Highly variable genes of the reference (:func:`reference_hvgs`).
    n_estimators
        Trees (paper: 1000).
    n_jobs
        Parallel jobs of scikit-learn (``None``: one).
    """
    from sklearn.ensemble import RandomForestClassifier

    classifier = RandomForestClassifier(
        n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs
    )
    return _fit_sklearn(
        "random_forest",
        classifier,
        reference,
        query,
        labels_key,
        n_top_genes,
        f"{n_estimators} trees",
    )


def _attention_model(
    name: str,
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    n_top_genes: int | None,
    max_epochs: int | None,
    progress_bar: bool,
    model_kwargs: dict[str, Any],
    plan_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> MethodResult:
    """Train CAN or CGRAN (``name``) on the reference's top-variance genes (a copy) and
    predict the query on the same genes (matched by name); ``train_kwargs`` go to
    ``model.train``."""
    import scvi_ext.model
    from scvi_ext.data import select_genes

    query = _check_inputs(reference, query, labels_key)
    reference = select_genes(reference, "can", n_top_genes=n_top_genes)
    reference.obs[labels_key] = reference.obs[labels_key].astype(str)
    model_cls = getattr(scvi_ext.model, name.upper())
    model_cls.setup_anndata(reference, labels_key=labels_key)
    model = model_cls(reference, **model_kwargs)
    start = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        enable_progress_bar=progress_bar,
        plan_kwargs=plan_kwargs,
        **(train_kwargs or {}),
    )
    train_seconds = time.perf_counter() - start
    proba = model.predict(query[:, reference.var_names], soft=True)
    n_epochs = _trained_epochs(model, None)
    return MethodResult(
        name=name,
        predictions=proba.idxmax(axis=1).astype(str).to_numpy(),
        confidence=proba.max(axis=1).to_numpy(),
        uncalibrated_confidence=model.predict_proba(
            query[:, reference.var_names], calibrated=False
        ).max(axis=1),
        train_seconds=train_seconds,
        cells_per_second=None
        if n_epochs is None
        else n_training_cells(model) * n_epochs / train_seconds,
        settings=f"{reference.n_vars} genes"
        + (f", {n_epochs} epochs" if n_epochs else "")
        + "".join(
            f", {key} {value}"
            for key, value in {**(plan_kwargs or {}), **(train_kwargs or {})}.items()
        ),
    )


@register_method("can")
def can(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    max_epochs: int | None = None,
    n_top_genes: int | None = 1000,
    progress_bar: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    plan_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> MethodResult:
    """CAN (``scvi_ext.model.CAN``) on the reference's top-variance genes (paper: 1000).

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    max_epochs
        Training epochs (``None``: the paper's 50).
    n_top_genes
        Genes of largest log-variance in the reference (``select_genes(..., "can")``).
    progress_bar
        Show Lightning progress bars.
    model_kwargs
        Arguments of :class:`~scvi_ext.model.CAN` (sizes, ``balance_classes``).
    plan_kwargs
        Training plan arguments (default: the paper's Adam at lr 1e-4, eps 1e-8).
    train_kwargs
        Other arguments of ``CAN.train`` (e.g. ``train_size=1.0``: no validation cells).
    """
    model_kwargs = model_kwargs or {}
    result = _attention_model(
        "can",
        reference,
        query,
        labels_key,
        n_top_genes,
        max_epochs,
        progress_bar,
        model_kwargs,
        plan_kwargs,
        train_kwargs,
    )
    result.settings += keyword_settings(model_kwargs)
    return result


@register_method("cgran", default=False)  # 75 epochs of attention over every gene: slow on a CPU
def cgran(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    seed: int = 0,
    *,
    embedding: str = "svd",
    grouping: str = "uniform",
    attention: str = "local",
    max_epochs: int | None = None,
    n_top_genes: int | None = 1000,
    progress_bar: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    plan_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> MethodResult:
    """CGRAN (``scvi_ext.model.CGRAN``) on the reference's top-variance genes (paper: 1000).

    Parameters
    ----------
    reference, query, labels_key, seed
        See the module docstring.
    embedding, grouping, attention
        CGRAN's setting (paper table 3; default: SVD, uniform groups, local attention).
    max_epochs
        Training epochs (``None``: the paper's 75).
    n_top_genes
        Genes of largest log-variance in the reference.
    progress_bar
        Show Lightning progress bars.
    model_kwargs
        Other arguments of CGRAN (``group_size``, ``n_heads``, ``balance_classes``...).
    plan_kwargs
        Training plan arguments (default: the paper's Adam at lr 1e-4, eps 1e-8, the last
        epoch's weights).
    train_kwargs
        Other arguments of ``CGRAN.train`` (e.g. ``train_size=1.0``: no validation cells).
    """
    setting = {"embedding": embedding, "grouping": grouping, "attention": attention}
    model_kwargs = model_kwargs or {}
    result = _attention_model(
        "cgran",
        reference,
        query,
        labels_key,
        n_top_genes,
        max_epochs,
        progress_bar,
        {**setting, **model_kwargs},
        plan_kwargs,
        train_kwargs,
    )
    result.settings += ", " + "/".join(setting.values())
    result.settings += keyword_settings(model_kwargs)
    return result
