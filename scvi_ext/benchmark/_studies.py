"""Benchmark studies that are not one reference/query split: embeddings, novel types, speed.

A study is a function ``(seed) -> {table name: DataFrame}``; :func:`run_study` runs it
for several seeds and writes every table (per seed, and mean ± sd over seeds) with a bar
chart of its headline columns. They run from the command line like the annotation
tasks: ``scvi-ext benchmark --task kang_donors_embedding``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from scvi_ext.classifier import NOVELTY_METHODS

from ._plots import plot_study
from ._runner import (
    _format_cell,
    allows_none,
    check_option_type,
    check_outdir,
    check_seeds,
    machine_info,
    set_seed,
)

logger = logging.getLogger(__name__)


StudyFunction = Callable[..., dict[str, pd.DataFrame]]


def _check_options(run: StudyFunction, options: dict) -> None:
    """Refuse options that ``run`` does not take, naming those it does, and options of
    another type than their default (:func:`check_option_type`)."""
    parameters = inspect.signature(run).parameters
    accepted = {
        name: p.default
        for name, p in parameters.items()
        if name not in ("seed", "outdir") and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [] if takes_any else sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"Option(s) {', '.join(unknown)} not accepted by this study; options: "
            f"{', '.join(accepted) or 'none'}."
        )
    for name, value in options.items():
        if accepted.get(name, inspect.Parameter.empty) is not inspect.Parameter.empty:
            none_allowed = allows_none(parameters[name].annotation)
            check_option_type(
                "--task-option", name, value, accepted[name], none_allowed=none_allowed
            )


@dataclass(frozen=True)
class Study:
    """A named study.

    Attributes
    ----------
    run
        ``run(seed, **options)`` returns named tables; the first column of each names its
        rows. Options (sizes, datasets...) come from ``run_study(..., options=...)``, on
        the command line ``--task-option KEY=VALUE``. A ``run`` with an ``outdir``
        parameter gets the report folder, for figures of its own (PNG).
    description
        One paragraph for the report.
    headline
        Table name -> the columns drawn in ``<table>.png``.
    check_options
        For a ``run`` taking ``**options``: ``check_options(options)`` raises a
        ``ValueError`` for options the study refuses, before anything runs.
    """

    run: StudyFunction
    description: str
    headline: dict[str, tuple[str, ...]]
    check_options: Callable[[dict], object] | None = None


#: Columns of :func:`novel_type_detection`'s per-type table, one per LatentClassifier
#: novelty score (:data:`scvi_ext.classifier.NOVELTY_METHODS`).
AUROC_COLUMNS: tuple[str, ...] = tuple(f"auroc_{method}" for method in NOVELTY_METHODS)


def _embedding(seed: int) -> dict[str, pd.DataFrame]:
    from scvi_ext.data import load_dataset

    from ._cellular_tasks import embedding_quality

    table = embedding_quality(load_dataset("kang_donors"), "cell_type", "donor", seed=seed)
    return {"embedding_quality": table.rename_axis("method").reset_index()}


def _novel_types(
    dataset: str, batch_key: str, **shift: str
) -> Callable[[int], dict[str, pd.DataFrame]]:
    def run(seed: int) -> dict[str, pd.DataFrame]:
        from scvi_ext.data import load_dataset

        from ._cellular_tasks import novel_type_detection

        per_type, summary = novel_type_detection(
            load_dataset(dataset), "cell_type", batch_key, seed=seed, **shift
        )
        summary.insert(0, "dataset", dataset)
        return {"novel_types_per_left_out_type": per_type, "novel_types_summary": summary}

    return run


def _throughput(seed: int) -> dict[str, pd.DataFrame]:
    from scvi_ext.data import load_dataset

    from ._throughput import training_throughput

    table = training_throughput(load_dataset("kang_donors"), "cell_type", "donor", seed=seed)
    return {"throughput": table.reset_index()}


def register_study(
    name: str,
    description: str,
    headline: dict[str, tuple[str, ...]] | None = None,
    check_options: Callable[[dict], object] | None = None,
) -> Callable[[StudyFunction], StudyFunction]:
    """Decorator adding ``run(seed, **options) -> {table name: DataFrame}`` to :data:`STUDIES`
    (``check_options``: see :class:`Study`).

    Examples
    --------
    >>> @register_study("my_study", "What it measures.", {"scores": ("accuracy",)})
    ... def my_study(seed: int) -> dict[str, pd.DataFrame]: ...
    """

    def decorator(run: StudyFunction) -> StudyFunction:
        STUDIES[name] = Study(run, description, headline or {}, check_options)
        return run

    return decorator


STUDIES: dict[str, Study] = {
    "kang_donors_embedding": Study(
        _embedding,
        "scib-metrics of CELLULAR, scVI, scANVI and PCA embeddings of the Kang control "
        "PBMCs (5 donors, 2000 cell_ranger HVGs); overall = 0.6 bio conservation + 0.4 "
        "batch correction, metrics min-max scaled across methods (thesis 2.4).",
        {"embedding_quality": ("bio_conservation", "batch_correction", "overall")},
    ),
    "kang_donors_novel_types": Study(
        _novel_types("kang_donors", "donor"),
        "Novel cell type detection (thesis 2.7): each cell type in turn is left out of "
        "training (CELLULAR + LatentClassifier) and added to the test fold. Per-cell "
        "AUROC of each novelty score; dataset-level precision/coverage of the minimum "
        "normalised likelihood at threshold 0.25.",
        {"novel_types_per_left_out_type": AUROC_COLUMNS},
    ),
    "kang_ifnb_novel_types": Study(
        _novel_types("kang_ifnb", "condition"),
        "As kang_donors_novel_types on the Kang IFN-beta data (control and stimulated "
        "cells, condition as batch).",
        {"novel_types_per_left_out_type": AUROC_COLUMNS},
    ),
    "kang_ifnb_shifted_novel_types": Study(
        _novel_types(
            "kang_ifnb", "condition", condition_key="condition", reference_condition="control"
        ),
        "Novel cell type in a shifted query: train on the control cells without one cell "
        "type, score all stimulated cells (the left-out type among them).",
        {"novel_types_per_left_out_type": AUROC_COLUMNS},
    ),
    "kang_donors_throughput": Study(
        _throughput,
        "Training cells/s per epoch of CELLULAR (`cellular_api`) vs a cross-entropy MLP of "
        "the same size, vs our rewrite of the reference code's epoch (per-cell loader, "
        "Python loops) and vs the reference package CELLULAR-CL itself, in one process.",
        {"throughput": ("cells_per_second",)},
    ),
}
"""Registered studies, by name (run with ``scvi-ext benchmark --task NAME``)."""


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a markdown table (values as strings, no index)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def summarise_over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over the ``seed`` column of every numeric column, by the first column."""
    key = table.columns[0]
    numeric = [
        c
        for c in table.columns
        if c not in (key, "seed") and pd.api.types.is_numeric_dtype(table[c])
    ]
    rows = []
    for name, group in table.groupby(key, sort=False):
        formats = {c: ".0f" if (table[c] % 1 == 0).all() else ".3f" for c in numeric}
        rows.append({key: name, **{c: _format_cell(group[c], formats[c]) for c in numeric}})
    return pd.DataFrame(rows)


def check_study_options(name: str, seeds: list[int], options: dict) -> None:
    """Refuse an unknown study, bad seeds and options the study does not take, before it
    runs (``TypeError``: an option it does not take; ``ValueError``: the rest)."""
    if name not in STUDIES:
        raise ValueError(f"Unknown study {name!r}; available: {sorted(STUDIES)}.")
    check_seeds(list(seeds))
    study = STUDIES[name]
    _check_options(study.run, options)
    if study.check_options is not None:
        study.check_options(options)


def _writes_own_files(study: Study) -> bool:
    """Whether the study's ``run`` takes ``outdir``: it writes files of its own there."""
    return "outdir" in inspect.signature(study.run).parameters


def study_report_files(name: str) -> tuple[str, ...] | None:
    """The files :func:`run_study` writes for study ``name``: ``summary.md`` and the CSV
    and PNG of each headline table; ``None`` for a study whose ``run`` takes ``outdir``,
    as it writes files named as it runs (figures, caches): every file of the folder counts
    (:func:`~scvi_ext.benchmark._runner.check_outdir`)."""
    if _writes_own_files(STUDIES[name]):
        return None
    tables = STUDIES[name].headline
    return (
        "summary.md",
        *(f"{table}{end}" for table in tables for end in ("_per_seed.csv", ".png")),
    )


def run_study(
    name: str,
    seeds: list[int],
    outdir: str | Path,
    command: str | None = None,
    options: dict | None = None,
    overwrite: bool = False,
) -> dict[str, pd.DataFrame]:
    """Run a study of :data:`STUDIES` for each seed and write its report.

    Parameters
    ----------
    name
        Study name.
    seeds
        Seeds, one run each (global seeds set by :func:`set_seed` first).
    outdir
        Folder for ``<table>_per_seed.csv``, ``<table>.png`` and ``summary.md``.
    command
        Command line recorded in the report.
    options
        Keyword arguments of the study's ``run`` (e.g. smaller sizes), checked first by
        :func:`check_study_options`: an unknown key is a ``TypeError`` naming the
        accepted ones, a value of another type than the default a ``ValueError``.
    overwrite
        Write into an ``outdir`` holding files that are not of this study's report
        (another task's report, a user's file), replacing those of the same names; a rerun
        of the study replaces its report without it. A study that writes figures of its
        own (its ``run`` takes ``outdir``) needs it for any folder that is neither new,
        empty nor its report. ``summary.md`` is written first, marked unfinished, so that
        the folder of a stopped run is the study's (its caches are reused).

    Returns
    -------
    Each table with a ``seed`` column, all seeds stacked.

    Raises
    ------
    OptionError
        (a ``ValueError``) ``outdir`` holds files of :func:`study_report_files` that are
        not of this study's report, and ``overwrite`` is not set
        (:func:`~scvi_ext.benchmark._runner.check_outdir`).
    """
    options = dict(options or {})
    check_study_options(name, seeds, options)
    replaced = check_outdir(outdir, name, study_report_files(name), overwrite)
    if replaced:
        logger.info("Replacing %s in %s.", ", ".join(replaced), outdir)
    study = STUDIES[name]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "summary.md").write_text(
        f"# Benchmark: {name}\n\nNot finished: this run was stopped or is still running.\n"
    )
    folder = {"outdir": outdir} if _writes_own_files(study) else {}
    machine = machine_info()  # before the study runs: some methods change torch's threads
    per_seed: dict[str, list[pd.DataFrame]] = {}
    for seed in seeds:
        logger.info("Study %s, seed %d", name, seed)
        set_seed(seed)
        for table_name, table in study.run(seed, **options, **folder).items():
            per_seed.setdefault(table_name, []).append(table.assign(seed=seed))
    tables = {key: pd.concat(parts, ignore_index=True) for key, parts in per_seed.items()}

    lines = [f"# Benchmark: {name}", "", study.description, ""]
    lines += [f"Seeds: {', '.join(map(str, seeds))}; mean ± sd over seeds.", ""]
    if options:
        lines += ["Options: " + ", ".join(f"{k}={v!r}" for k, v in options.items()), ""]
    for table_name, table in tables.items():
        if table.drop(columns="seed").empty:  # e.g. no GMVAE asked for: no backends table
            continue
        table.to_csv(outdir / f"{table_name}_per_seed.csv", index=False)
        lines += [f"## {table_name}", "", markdown_table(summarise_over_seeds(table)), ""]
        if table_name in study.headline:
            plot_study(table, study.headline[table_name], outdir / f"{table_name}.png")
    lines += ["## Command", "", "```", command or f"run_study({name!r}, {seeds})", "```", ""]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()] + [""]
    (outdir / "summary.md").write_text("\n".join(lines))
    return tables
