"""Run annotation-transfer methods on one task and write the report."""

from __future__ import annotations

import inspect
import logging
import os
import platform
import random
import typing
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scvi_ext.data import log_normalised_anndata

from ._methods import (
    DEFAULT_METHODS,
    METHODS,
    QUERY_LABEL_CEILING,
    MethodResult,
    MethodUnavailableError,
    query_label_ceiling,
)
from ._plots import plot_accuracy, plot_reliability, plot_umap

logger = logging.getLogger(__name__)

# (column, header, number format) of the markdown summary table.
SUMMARY_COLUMNS = (
    ("accuracy", "accuracy", ".3f"),
    ("balanced_accuracy", "balanced accuracy", ".3f"),
    ("macro_f1", "macro F1", ".3f"),
    ("weighted_f1", "weighted F1", ".3f"),
    ("ece", "ECE", ".3f"),
    ("ece_uncalibrated", "ECE uncalibrated", ".3f"),
    ("confidence_correct", "confidence (right)", ".3f"),
    ("confidence_wrong", "confidence (wrong)", ".3f"),
    ("train_seconds", "train s", ".1f"),
    ("cells_per_second", "cells/s", ".0f"),
)
#: Files :func:`run_benchmark` writes in its ``outdir``; the PNGs only with ``plots``.
REPORT_FILES = ("results_per_seed.csv", "summary.md")
PLOT_FILES = ("accuracy.png", "reliability.png", "umap_query.png")


class OptionError(ValueError):
    """A benchmark option (seed, method, task or study option) that cannot be used."""


class NoMethodRanError(RuntimeError):
    """Every method of a benchmark was skipped (e.g. its optional dependency is missing)."""


_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def allows_none(annotation: Any) -> bool:
    """Whether a parameter annotation admits ``None`` (e.g. ``int | None``); a postponed
    annotation (a string, ``from __future__ import annotations``) is read as ``|``-separated
    names."""
    if isinstance(annotation, str):
        return "None" in {part.strip() for part in annotation.split("|")}
    return annotation is None or type(None) in typing.get_args(annotation)


def check_option_type(
    what: str, name: str, value: Any, default: Any, *, none_allowed: bool = False
) -> None:
    """Refuse ``value`` when it is not of the type of ``default``.

    A tuple or list default takes one item or a sequence of items of its first item's
    type; a float default takes an integer; a bool is never an integer; ``None`` is
    accepted with ``none_allowed``. Nothing is checked for a ``None`` or empty default,
    or one of another type.

    Raises
    ------
    OptionError
        Naming the option, the expected type and the default.
    """
    if value is None and none_allowed:
        return
    if isinstance(default, tuple | list):
        items = value if isinstance(value, tuple | list) else (value,)
        example = default[0] if default else None
    else:
        items, example = (value,), default
    expected = type(example)
    if expected not in _KINDS:
        return
    accepted = (int, float) if expected is float else expected
    for item in items:
        if not isinstance(item, accepted) or (expected is not bool and isinstance(item, bool)):
            raise OptionError(
                f"{what}: {name} must be {_KINDS[expected]}{' or None' if none_allowed else ''} "
                f"(default: {default!r}), not {value!r}."
            )


def check_options(
    function: Any, options: dict[str, Any], what: str, skip: tuple[str, ...] = ()
) -> None:
    """Refuse options that ``function`` does not take, or of another type than its default
    (``None`` too unless the parameter's annotation allows it).

    Parameters
    ----------
    function
        The task, method or study function the options are for.
    options
        Keyword arguments meant for ``function``.
    what
        How the error names the options, e.g. ``"options of task 'simulated'"``.
    skip
        Parameters the options must not set (given by the runner).

    Raises
    ------
    OptionError
        Naming the option and the accepted ones (or the expected type).
    """
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {
        name: p
        for name, p in parameters.items()
        if name not in skip
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    unknown = [] if takes_any else sorted(set(options) - set(named))
    given_skipped = sorted(set(options) & set(skip))
    if given_skipped or unknown:
        raise OptionError(
            f"{what}: {', '.join(given_skipped or unknown)} not accepted; options: "
            f"{', '.join(named) or 'none'}."
        )
    for name, value in options.items():
        if name in named and named[name].default is not inspect.Parameter.empty:
            none_allowed = allows_none(named[name].annotation)
            check_option_type(what, name, value, named[name].default, none_allowed=none_allowed)


def check_seeds(seeds: list[int]) -> None:
    """Refuse no seeds, a negative or non-integer seed, and a repeated one."""
    if not seeds:
        raise OptionError("Give at least one seed.")
    bad = [
        seed
        for seed in seeds
        if isinstance(seed, bool)
        or not isinstance(seed, int | np.integer)
        or not 0 <= seed < 2**32
    ]
    if bad:
        raise OptionError(f"Seeds must be integers from 0 to 2**32 - 1, not {bad}.")
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise OptionError(
            f"Seed(s) {repeated} given twice: each seed would count as another run in the "
            "mean ± sd; give each seed once."
        )


def check_benchmark_options(
    task: str,
    seeds: list[int],
    methods: list[str],
    method_kwargs: dict[str, dict[str, Any]],
    task_kwargs: dict[str, Any],
) -> None:
    """Check every option of :func:`run_benchmark` before anything runs.

    Raises
    ------
    OptionError
        An unknown task or method, a method given twice, options for a method that is
        not run, an option a method or the task does not take or of the wrong type, and
        bad seeds (:func:`check_seeds`).
    """
    from ._tasks import TASKS

    if task not in TASKS:
        raise OptionError(f"Unknown task {task!r}; available: {sorted(TASKS)}.")
    if not methods:
        raise OptionError("Give at least one method.")
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise OptionError(f"Unknown methods {unknown}; available: {sorted(METHODS)}.")
    repeated = sorted({name for name in methods if methods.count(name) > 1})
    if repeated:
        raise OptionError(f"Method(s) {repeated} given twice; give each method once.")
    check_seeds(seeds)
    not_run = sorted(set(method_kwargs) - set(methods))
    if not_run:
        raise OptionError(
            f"Options for {', '.join(not_run)}, which is not among the methods run "
            f"({', '.join(methods)}): add it to the methods or drop its options."
        )
    for name, options in method_kwargs.items():
        check_options(
            METHODS[name],
            options,
            f"options of method {name!r}",
            skip=("reference", "query", "labels_key", "seed"),
        )
    check_options(TASKS[task], task_kwargs, f"options of task {task!r}")


def report_task(outdir: str | Path) -> str | None:
    """The task or study whose report ``outdir`` holds (the first line of its
    ``summary.md``, ``# Benchmark: TASK``), or ``None``."""
    summary = Path(outdir) / "summary.md"
    if not summary.is_file():
        return None
    with summary.open(errors="replace") as file:
        first_line = file.readline().rstrip("\n")
    task = first_line.removeprefix("# Benchmark: ")
    return task if task and task != first_line else None


def check_outdir(
    outdir: str | Path,
    task: str,
    files: tuple[str, ...] | None = REPORT_FILES + PLOT_FILES,
    overwrite: bool = False,
    command_line: bool = False,
) -> list[str]:
    """Refuse an ``outdir`` where writing ``files`` would replace files of something else.

    Files of the same task's report (its ``summary.md`` says ``# Benchmark: TASK``) are
    replaced: a rerun of a task writes into its folder. Any other file of ``files``
    already there (another task's report, a user's file) needs ``overwrite``.

    Parameters
    ----------
    outdir
        The report folder (need not exist).
    task
        The task or study about to write its report there.
    files
        Names of the files it writes in ``outdir``; ``None`` when it also writes files
        named as it runs (a study's own figures): then every entry of ``outdir`` counts,
        so only a new or empty folder or the task's own report is written without
        ``overwrite``.
    overwrite
        Replace the files whatever they hold.
    command_line
        Name the options as the command line does (``--outdir``, ``--overwrite``).

    Returns
    -------
    The names of ``files`` already in ``outdir`` (those that will be replaced).

    Raises
    ------
    OptionError
        ``outdir`` is a file, or holds one of ``files`` without being a report of
        ``task`` and ``overwrite`` is not set.
    """
    outdir = Path(outdir)
    flag, fix = ("--outdir", "--overwrite") if command_line else ("outdir", "overwrite=True")
    if outdir.exists() and not outdir.is_dir():
        raise OptionError(f"{flag} {outdir} is a file, not a folder; choose another {flag}.")
    if files is None:
        existing = sorted(path.name for path in outdir.iterdir()) if outdir.is_dir() else []
    else:
        existing = [name for name in files if (outdir / name).exists()]
    held = report_task(outdir) if existing else None
    if overwrite or not existing or held == task:
        return existing
    if held is not None:
        raise OptionError(
            f"{flag} {outdir} holds the report of {held!r}; its files would be replaced or "
            f"mixed with those of {task!r}. Choose another {flag}, or pass {fix}."
        )
    names = ", ".join(existing[:5]) + (
        f" and {len(existing) - 5} more" if len(existing) > 5 else ""
    )
    if files is None:
        raise OptionError(
            f"{flag} {outdir} holds {names}, not from a report of {task!r}; {task!r} writes "
            f"files named as it runs there (figures), which could replace them. Choose a new "
            f"or empty {flag}, or pass {fix}."
        )
    raise OptionError(
        f"{flag} {outdir} holds {names}, not from a report of {task!r}; writing that report "
        f"would replace {'it' if len(existing) == 1 else 'them'}. Choose another {flag}, "
        f"or pass {fix}."
    )


def set_seed(seed: int) -> None:
    """Seed scvi-tools (Lightning), numpy's global generator, torch and ``random``."""
    import scvi
    import torch

    scvi.settings.seed = seed
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (code under test draws from the global generator)
    torch.manual_seed(seed)


def score_predictions(y_true: np.ndarray, result: MethodResult) -> dict[str, float]:
    """Classification metrics of one method's query predictions.

    Parameters
    ----------
    y_true
        True labels of the query cells.
    result
        The method's output.

    Returns
    -------
    :func:`scvi_ext.metrics.classification_report` plus ``mean_confidence``,
    ``confidence_correct`` and ``confidence_wrong`` (mean confidence of right and of
    wrong predictions; NaN when there are none) and, for calibrated models,
    ``ece_uncalibrated`` (the ECE before calibration).
    """
    from scvi_ext.metrics import classification_report, expected_calibration_error

    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(result.predictions).astype(str)
    confidence = np.asarray(result.confidence, dtype=float)
    scores = {
        key: float(value)
        for key, value in classification_report(y_true, y_pred, confidence=confidence).items()
    }
    correct = y_true == y_pred
    scores["mean_confidence"] = float(confidence.mean())
    scores["confidence_correct"] = float(confidence[correct].mean()) if correct.any() else np.nan
    scores["confidence_wrong"] = float(confidence[~correct].mean()) if (~correct).any() else np.nan
    if result.uncalibrated_confidence is not None:
        raw = np.asarray(result.uncalibrated_confidence, dtype=float)
        scores["ece_uncalibrated"] = expected_calibration_error(y_true, y_pred, raw)
    return scores


def machine_info() -> dict[str, str]:
    """Platform, CPU count, Python, torch and scvi-tools versions, accelerator."""
    import scvi
    import torch

    accelerator = "CPU"
    if torch.cuda.is_available():
        accelerator = f"CUDA: {torch.cuda.get_device_name(0)}"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu count": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scvi-tools": scvi.__version__,
        "accelerator": accelerator,
    }


def result_row(
    task: str, method: str, seed: int, y_true: np.ndarray, result: MethodResult, n_reference: int
) -> dict[str, Any]:
    """One row of the per-seed results: the scores of ``result`` and how it ran."""
    return {
        "task": task,
        "method": method,
        "seed": seed,
        **score_predictions(y_true, result),
        "train_seconds": result.train_seconds,
        "cells_per_second": result.cells_per_second,
        "settings": result.settings,
        "n_reference": n_reference,
        "n_query": len(y_true),
    }


def _format_cell(values: pd.Series, number_format: str) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    mean = format(values.mean(), number_format)
    if len(values) < 2:
        return mean
    return f"{mean} ± {format(values.std(ddof=1), number_format)}"


def summary_table(results: pd.DataFrame, columns: list[str] | None = None) -> str:
    """Markdown table of mean ± sd over seeds, one row per method.

    Parameters
    ----------
    results
        Per-seed results as returned by :func:`run_benchmark`.
    columns
        Metric columns to show (default: all of ``SUMMARY_COLUMNS``).

    Returns
    -------
    The table, in markdown.
    """
    shown = [spec for spec in SUMMARY_COLUMNS if columns is None or spec[0] in columns]
    header = ["method", "training", *(title for _, title, _ in shown)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, rows in results.groupby("method", sort=False):
        cells = [str(method), str(rows["settings"].iloc[0]) or "–"]
        cells += [
            _format_cell(rows.get(column, pd.Series(dtype=float)), number_format)
            for column, _, number_format in shown
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_summary(
    path: Path,
    task: str,
    results: pd.DataFrame,
    seeds: list[int],
    split: dict[str, Any],
    skipped: dict[str, str],
    command: str,
    caption: str | None,
    machine: dict[str, str],
) -> None:
    lines = [f"# Benchmark: {task}", ""]
    lines += [
        f"Reference: {split['n_reference']} cells, query: {split['n_query']} cells, "
        f"{split['n_genes']} genes, labels `{split['labels_key']}` "
        f"({split['n_labels']} in the reference). Seeds: {', '.join(map(str, seeds))}. "
        "Metrics on the query cells, mean ± sd over seeds.",
        "",
    ]
    if caption:
        lines += [caption, ""]
    lines += [summary_table(results), ""]
    if skipped:
        lines += ["Skipped methods:", ""]
        lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
        lines.append("")
    if QUERY_LABEL_CEILING in set(results["method"]):
        lines += [
            f"`{QUERY_LABEL_CEILING}` is not a transfer method: logistic regression trained "
            "on the query's own labels, each cell predicted by the other folds. It shows what "
            "the labels allow without a reference-to-query shift.",
            "",
        ]
    lines += [
        "`train s`: wall time of model fitting; `cells/s`: training cells (validation "
        "cells excluded, a semi-supervised model's query cells included) times epochs, per "
        "second of training (– for methods without epochs); `confidence (right/wrong)`: mean "
        "maximum class probability of the right and of the wrong predictions.",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += ["", "Plots: `accuracy.png`, `reliability.png`, `umap_query.png` (first seed).", ""]
    path.write_text("\n".join(lines))


def _query_umap(query: ad.AnnData, seed: int) -> np.ndarray:
    """2-D UMAP of the query cells (log-normalised, HVGs, PCA, kNN graph)."""
    import scanpy as sc

    query_log = log_normalised_anndata(query)
    if query_log.n_vars > 2000:
        sc.pp.highly_variable_genes(query_log, n_top_genes=2000, flavor="seurat", subset=True)
    n_comps = int(min(30, query_log.n_obs - 1, query_log.n_vars - 1))
    sc.pp.pca(query_log, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(query_log, n_neighbors=min(15, query_log.n_obs - 1), random_state=seed)
    sc.tl.umap(query_log, random_state=seed)
    return query_log.obsm["X_umap"]


def run_benchmark(
    task: str,
    seeds: list[int],
    methods: list[str] | None = None,
    outdir: str | Path = "benchmark_outputs",
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    task_kwargs: dict[str, Any] | None = None,
    command: str | None = None,
    caption: str | None = None,
    plots: bool = True,
    ceiling: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Run methods on one task for several seeds and write a report.

    Every method sees the same reference/query split; before each method and seed the
    global seeds are set (:func:`set_seed`).

    Parameters
    ----------
    task
        Name in :data:`~scvi_ext.benchmark.TASKS`.
    seeds
        Seeds; each method runs once per seed.
    methods
        Names in :data:`~scvi_ext.benchmark.METHODS` (default: every registered method,
        in registration order). Methods whose optional dependency is missing are skipped
        and listed in the report.
    outdir
        Folder for ``results_per_seed.csv``, ``summary.md``, ``accuracy.png``,
        ``reliability.png`` and ``umap_query.png`` (created if needed). A folder holding
        the report of the same ``task`` is written over; one holding any of these files
        otherwise needs ``overwrite`` (:func:`check_outdir`).
    method_kwargs
        Options per method name, e.g. ``{"scanvi": {"max_epochs": 2}}``.
    task_kwargs
        Options of the task function (e.g. the size of the ``simulated`` task).
    command
        Command line recorded in the report (default: the Python call).
    caption
        Extra sentence written above the table.
    plots
        Write the PNG figures.
    ceiling
        Add the row ``query_label_ceiling``: logistic regression cross-validated on the
        query's own labels (:func:`~scvi_ext.benchmark.query_label_ceiling`),
        what the labels allow without a reference-to-query shift.
    overwrite
        Replace the report files in ``outdir`` even when they are not of this task's
        report (e.g. another task's, or a user's ``accuracy.png``).

    Raises
    ------
    OptionError
        (a ``ValueError``) Before anything runs, for the options
        :func:`check_benchmark_options` refuses and for an ``outdir`` whose files it would
        replace without ``overwrite`` (:func:`check_outdir`); and when the task function
        refuses its options.
    FileNotFoundError
        The task's dataset is not in the data folder.

    Returns
    -------
    One row per method and seed: the metrics of
    :func:`~scvi_ext.metrics.classification_report` on the query, ``mean_confidence``,
    ``confidence_correct``, ``confidence_wrong``, ``train_seconds``,
    ``cells_per_second`` and ``settings``.
    """
    import torch

    from ._tasks import TASK_METHOD_KWARGS, TASKS

    methods = list(DEFAULT_METHODS if methods is None else methods)
    user_options, task_kwargs = method_kwargs or {}, task_kwargs or {}
    check_benchmark_options(task, list(seeds), methods, user_options, task_kwargs)
    files = REPORT_FILES + PLOT_FILES if plots else REPORT_FILES
    replaced = check_outdir(outdir, task, files, overwrite)
    if replaced:
        logger.info("Replacing %s in %s.", ", ".join(replaced), outdir)
    task_defaults = TASK_METHOD_KWARGS.get(task, {})
    method_kwargs = {
        name: {**task_defaults.get(name, {}), **user_options.get(name, {})} for name in methods
    }
    if command is None:
        command = (
            f"run_benchmark(task={task!r}, seeds={list(seeds)}, methods={methods}, "
            f"method_kwargs={method_kwargs}, task_kwargs={task_kwargs})"
        )

    machine = machine_info()  # before the methods run: some change torch's thread count
    n_threads = torch.get_num_threads()
    try:
        reference, query, labels_key = TASKS[task](**task_kwargs)
    except (TypeError, ValueError) as error:  # e.g. a donor that is not in the data
        raise OptionError(f"Task {task!r} with options {task_kwargs}: {error}") from error
    y_true = query.obs[labels_key].astype(str).to_numpy()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)  # after the task: no empty folder on errors
    split = {
        "n_reference": reference.n_obs,
        "n_query": query.n_obs,
        "n_genes": reference.n_vars,
        "labels_key": labels_key,
        "n_labels": reference.obs[labels_key].nunique(),
    }
    logger.info("Task %s: %s", task, split)

    rows, first_seed_results, skipped = [], {}, {}
    for seed in seeds:
        for name in methods:
            if name in skipped:
                continue
            logger.info("Running %s (seed %d)", name, seed)
            set_seed(seed)
            torch.set_num_threads(n_threads)  # scikit-learn/scanpy calls may change it
            try:
                result = METHODS[name](
                    reference, query, labels_key, seed, **method_kwargs.get(name, {})
                )
            except MethodUnavailableError as error:
                logger.warning("Skipping %s: %s", name, error)
                skipped[name] = str(error)
                continue
            rows.append(result_row(task, name, seed, y_true, result, reference.n_obs))
            logger.info("%s seed %d: accuracy %.3f", name, seed, rows[-1]["accuracy"])
            if seed == seeds[0]:
                first_seed_results[name] = result
        if ceiling and QUERY_LABEL_CEILING not in skipped:
            try:
                result = query_label_ceiling(query, labels_key, seed)
            except ValueError as error:
                logger.warning("No query-label ceiling: %s", error)
                skipped[QUERY_LABEL_CEILING] = str(error)
            else:
                rows.append(
                    result_row(task, QUERY_LABEL_CEILING, seed, y_true, result, reference.n_obs)
                )

    if not first_seed_results:
        raise NoMethodRanError(f"No method could run: {skipped}.")
    results = pd.DataFrame(rows)
    results["cells_per_second"] = results["cells_per_second"].astype(float)
    results.to_csv(outdir / "results_per_seed.csv", index=False)
    _write_summary(
        outdir / "summary.md",
        task,
        results,
        list(seeds),
        split,
        skipped,
        command,
        caption,
        machine,
    )
    if plots:
        plot_accuracy(results, outdir / "accuracy.png")
        plot_reliability(y_true, first_seed_results, outdir / "reliability.png")
        plot_umap(
            _query_umap(query, seeds[0]), y_true, first_seed_results, outdir / "umap_query.png"
        )
    return results
