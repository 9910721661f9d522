"""Command line: ``scvi-ext demo | annotate | benchmark``."""

from __future__ import annotations

import argparse
import ast
import inspect
import logging
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

DEMO_TABLE_COLUMNS = ["accuracy", "balanced_accuracy", "macro_f1", "ece", "train_seconds"]
#: Benchmark methods of the demo: ours (CELLULAR + LatentClassifier, ScNym) and two peers.
DEMO_METHODS = ["cellular", "scnym", "scanvi", "logistic_regression"]
# scANVI in the demo: fewer scVI epochs than the benchmark default (200) so the demo
# stays well under 10 minutes on 2 CPU cores.
DEMO_SCVI_EPOCHS = 60
QUICK_TASK = {"n_cells": 400, "n_genes": 200, "n_cell_types": 4}
QUICK_EPOCHS = 2
# --quick: CELLULAR's classifier trains for the epochs of every model (QUICK_EPOCHS or
# --max-epochs), scANVI's second stage for one epoch
QUICK_SCANVI_EPOCHS = 1
#: Models of ``scvi-ext annotate``: trained from counts on reference + query cells (the
#: query unlabeled) and annotated with their ``annotate`` method. LatentClassifier is not
#: one: it sits on top of another model's representation.
ANNOTATE_MODELS = ("ScNym", "CELLULAR", "CAN", "CGRAN")


class CLIError(Exception):
    """A user error: reported on stderr without a traceback."""


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment, not the one at the first ``main()``
    (a closed stream after a test or notebook swapped it, and a logging error)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging() -> None:
    logger = logging.getLogger("scvi_ext")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[scvi-ext] %(message)s"))
        logger.addHandler(handler)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def _command_line(argv: list[str]) -> str:
    return shlex.join(["scvi-ext", *argv])


def _parse_value(text: str) -> Any:
    """A Python literal (number, ``True``, ``None``, tuple...), else the text itself;
    comma-separated text is a tuple of such values (``A,B`` is ``("A", "B")``).

    Text that opens like a list, tuple, dict or quoted string must parse: ``[1, 2`` is
    a ``ValueError``, not the string ``"[1, 2"``; so must every item of a tuple.

    Raises
    ------
    ValueError
        Text that opens like a literal, or an empty item (``A,,B``), that does not parse.
    """
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as error:
        if text.strip()[:1] in ("[", "(", "{", "'", '"'):
            raise ValueError(f"{text!r} is not a valid Python literal") from error
    if "," not in text:
        return text
    items = [item.strip() for item in text.removesuffix(",").split(",")]
    if not all(items):
        raise ValueError(f"{text!r} has an empty item")
    return tuple(_parse_value(item) for item in items)


def _key_values(options: Iterable[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings as keyword arguments (values parsed by :func:`_parse_value`)."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, separator, value = option.partition("=")
        key = key.strip()
        if not separator or not key.isidentifier():
            raise CLIError(f"{flag} takes KEY=VALUE, not {option!r}.")
        if key in parsed:
            raise CLIError(f"{flag} {key} given twice; give each option once.")
        try:
            parsed[key] = _parse_value(value)
        except ValueError as error:
            raise CLIError(
                f"{flag} {option!r}: {error}; give a tuple as KEY=a,b or KEY=\"('a', 'b')\" "
                "(quote strings inside brackets), text with a comma as KEY=\"'a,b'\"."
            ) from error
    return parsed


def _check_keywords(function: Callable, options: dict[str, Any], flag: str) -> None:
    """Reject options that are not parameters of ``function`` (unless it takes ``**``)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name in parameters if name not in ("self", "adata", "registry")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CLIError(
            f"{flag}: {', '.join(unknown)} not accepted by {function.__qualname__}; "
            f"options: {', '.join(accepted)}."
        )


def _takes_max_epochs(method: Callable) -> bool:
    return "max_epochs" in inspect.signature(method).parameters


def _method_options(
    methods: Iterable[str], max_epochs: int | None, options: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """Per-method options: ``max_epochs`` for every method that takes it, then the
    ``METHOD.KEY=VALUE`` strings of ``--method-option``."""
    from scvi_ext.benchmark import METHODS

    methods = list(methods)
    kwargs: dict[str, dict[str, Any]] = {name: {} for name in methods}
    if max_epochs is not None:
        takers = [name for name in methods if _takes_max_epochs(METHODS[name])]
        if not takers:
            raise CLIError(
                f"--max-epochs: none of the methods run ({', '.join(methods)}) trains "
                "for epochs; leave it out."
            )
        for name in takers:
            kwargs[name]["max_epochs"] = max_epochs
    given: set[tuple[str, str]] = set()
    for option in options:
        name, dot, key_value = option.partition(".")
        if not dot or name not in METHODS:
            raise CLIError(
                f"--method-option takes METHOD.KEY=VALUE with a method of "
                f"{', '.join(METHODS)}, not {option!r}."
            )
        if name not in kwargs:
            raise CLIError(
                f"--method-option {option!r}: {name} is not among the methods run "
                f"({', '.join(methods)}); add it to --methods or drop the option."
            )
        for key, value in _key_values([key_value], "--method-option").items():
            if (name, key) in given:
                raise CLIError(f"--method-option {name}.{key} given twice; give it once.")
            given.add((name, key))
            kwargs[name][key] = value
    return kwargs


def _kang_missing_reason() -> str | None:
    """Why the Kang data cannot be loaded, or ``None`` when it can."""
    from scvi_ext.data import DATASETS, datasets_available, get_data_dir

    if datasets_available():
        return None
    try:
        data_dir = get_data_dir()
    except FileNotFoundError as error:
        return str(error)
    return f"{DATASETS['kang_ifnb']} is not in the data folder {data_dir}."


def _check_outdir(
    outdir: str | Path, task: str, overwrite: bool, study: bool = False
) -> list[str]:
    """The runner's :func:`~scvi_ext.benchmark._runner.check_outdir` in the command line's
    words, for the files of :func:`~scvi_ext.benchmark.run_benchmark` or, with ``study``,
    of :func:`~scvi_ext.benchmark.run_study`.

    Returns
    -------
    The files already in ``outdir`` that the run replaces.

    Raises
    ------
    CLIError
        ``outdir`` is a file, or holds a file the run would replace that is not of a
        ``task`` report, and ``--overwrite`` is not given.
    """
    from scvi_ext.benchmark._runner import PLOT_FILES, REPORT_FILES, OptionError, check_outdir
    from scvi_ext.benchmark._studies import study_report_files

    files = study_report_files(task) if study else REPORT_FILES + PLOT_FILES
    try:
        return check_outdir(outdir, task, files, overwrite, command_line=True)
    except OptionError as error:
        raise CLIError(str(error)) from error


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    from scvi_ext.benchmark import run_benchmark, summary_table

    missing = _kang_missing_reason()
    if missing is None:
        task, task_kwargs = "kang_ifnb", {}
        description = "Kang et al. 2018 PBMC: control (reference) -> IFN-beta stimulated (query)"
    else:
        print(
            "The shared datasets were not found, so the demo runs on simulated data.\n"
            f"  Reason: {missing}\n"
            "  To use the real Kang IFN-beta PBMC data, set SCVI_EXT_DATA to the folder "
            "holding kang_ifnb_pbmc_1975.h5ad, e.g.\n"
            "    export SCVI_EXT_DATA=/path/to/shared/datasets\n",
            flush=True,
        )
        task, task_kwargs = "simulated", {}
        description = "simulated counts: condition 'reference' -> shifted condition 'query'"

    if args.quick:
        if task == "simulated":
            task_kwargs = dict(QUICK_TASK)
        max_epochs = args.max_epochs or QUICK_EPOCHS
        method_kwargs = _method_options(DEMO_METHODS, max_epochs)
        method_kwargs["cellular"]["classifier_epochs"] = max_epochs
        method_kwargs["scanvi"]["scanvi_max_epochs"] = QUICK_SCANVI_EPOCHS
        caption = (
            f"Quick demo: {max_epochs} epochs for each model (CELLULAR and its classifier, "
            f"ScNym, scVI), {QUICK_SCANVI_EPOCHS} scANVI epoch."
        )
    else:
        scvi_epochs = args.max_epochs or DEMO_SCVI_EPOCHS
        method_kwargs = _method_options(DEMO_METHODS, args.max_epochs)
        method_kwargs["scanvi"]["max_epochs"] = scvi_epochs
        caption = (
            f"Demo: one seed; scANVI = scVI {scvi_epochs} epochs + scANVI 20 epochs "
            "(the benchmark default is scVI 200 epochs, reduced here to keep the demo short)."
        )
    _check_outdir(args.outdir, task, args.overwrite)
    print(f"Annotation transfer on {description}.", flush=True)
    results = run_benchmark(
        task,
        seeds=[args.seed],
        methods=DEMO_METHODS,
        outdir=args.outdir,
        method_kwargs=method_kwargs,
        task_kwargs=task_kwargs,
        command=_command_line(argv),
        caption=caption,
        overwrite=args.overwrite,
    )
    print(f"\n{caption}\n")
    print(summary_table(results, columns=DEMO_TABLE_COLUMNS))
    print(f"\nReport, UMAP and reliability diagrams written to {Path(args.outdir).resolve()}/")
    return 0


def _read_inputs(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """Check the paths and read reference and query; return them and the output path."""
    import anndata as ad

    reference_path, query_path, out_path = Path(args.reference), Path(args.query), Path(args.out)
    for flag, path in (("--reference", reference_path), ("--query", query_path)):
        if not path.is_file():
            raise CLIError(f"{flag} file not found: {path}")
    if out_path.resolve() in (reference_path.resolve(), query_path.resolve()):
        raise CLIError("--out must be a new file, not one of the inputs.")
    if out_path.is_dir():
        raise CLIError(f"--out {out_path} is a folder; give the path of an .h5ad file.")
    if out_path.exists() and not args.overwrite:
        raise CLIError(f"--out {out_path} already exists; pass --overwrite to replace it.")
    inputs = []
    for flag, path in (("--reference", reference_path), ("--query", query_path)):
        try:
            inputs.append(ad.read_h5ad(path))
        except OSError as error:  # not an HDF5 file, unreadable
            raise CLIError(f"{flag} {path} could not be read as an .h5ad file: {error}") from error
    return inputs[0], inputs[1], out_path


def _counts(adata: Any, layer: str | None, flag: str, path: str) -> Any:
    """``adata`` with the counts of ``layer`` in ``X`` (a new object; ``adata`` unchanged)."""
    import anndata as ad

    if layer is None:
        return adata
    if layer not in adata.layers:
        raise CLIError(
            f"--layer {layer!r} is not a layer of {flag} {path} "
            f"(layers: {list(adata.layers) or 'none'})."
        )
    return ad.AnnData(X=adata.layers[layer], obs=adata.obs, var=adata.var)


def _check_counts(adata: Any, flag: str, path: str, layer: str | None) -> None:
    """Raw counts in the cells and genes the model trains on, or a message naming the file."""
    from scvi_ext.data import validate_counts

    try:
        validate_counts(adata)
    except ValueError as error:
        where = f"layer {layer!r}" if layer else "X"
        raise CLIError(
            f"{flag} {path}, {where} on the training genes: {error} On the command line, "
            "--layer NAME reads the counts of a layer of both inputs."
        ) from error


def _check_labels(reference: Any, labels_key: str, unlabeled_category: str) -> None:
    """At least two labels besides the unlabeled category, or a message naming them."""
    labels = reference.obs[labels_key].dropna().astype(str)
    names = sorted(set(labels) - {unlabeled_category})
    if len(names) < 2:
        raise CLIError(
            f"--labels-key {labels_key!r} has {len(names)} label(s) {names} besides "
            f"--unlabeled-category {unlabeled_category!r}; a classifier needs at least two."
        )


def _check_free_keys(query: Any, key: str) -> None:
    """Refuse to replace annotations the query already holds."""
    columns = [f"{key}_prediction", f"{key}_confidence", f"{key}_novelty"]
    taken = [f"obs[{column!r}]" for column in columns if column in query.obs]
    taken += [f"obsm['X_{key}']"] if f"X_{key}" in query.obsm else []
    if taken:
        raise CLIError(
            f"The query already has {', '.join(taken)} (an earlier annotation?); pass "
            "--key-added NAME to write the new one under other names."
        )


def _shared_genes(reference: Any, query: Any) -> Any:
    for name, adata in (("reference", reference), ("query", query)):
        if not adata.var_names.is_unique:
            raise CLIError(
                f"The {name} has duplicated gene names; make them unique first "
                "(AnnData.var_names_make_unique())."
            )
    shared = reference.var_names.intersection(query.var_names, sort=False)
    if len(shared) == 0:
        raise CLIError(
            "Reference and query share no gene names (e.g. reference "
            f"{list(reference.var_names[:3])}, query {list(query.var_names[:3])}); "
            "use the same gene identifiers (symbols or Ensembl IDs) in both."
        )
    return shared


def _annotate(args: argparse.Namespace, argv: list[str]) -> int:
    import scvi_ext.model
    from scvi_ext.benchmark import (
        BATCH_COLUMN,
        LABELS_COLUMN,
        concat_reference_query,
        reference_hvgs,
        set_seed,
    )

    model_cls = getattr(scvi_ext.model, args.model)
    model_kwargs = _key_values(args.model_option, "--model-option")
    _check_keywords(model_cls.__init__, model_kwargs, "--model-option")
    train_kwargs = _key_values(args.train_option, "--train-option")
    if args.max_epochs is not None:
        if "max_epochs" in train_kwargs:
            raise CLIError("Give --max-epochs or --train-option max_epochs=..., not both.")
        train_kwargs["max_epochs"] = args.max_epochs
    key = args.key_added or args.model.lower()
    if not key.isidentifier():
        raise CLIError(f"--key-added {key!r}: use letters, digits and underscores.")
    reference, query, out_path = _read_inputs(args)
    if args.labels_key not in reference.obs:
        raise CLIError(
            f"--labels-key {args.labels_key!r} is not a column of the reference obs "
            f"(columns: {list(reference.obs.columns)})."
        )
    _check_labels(reference, args.labels_key, args.unlabeled_category)
    _check_free_keys(query, key)
    reference_counts = _counts(reference, args.layer, "--reference", args.reference)
    query_counts = _counts(query, args.layer, "--query", args.query)
    if args.batch_key is not None:
        for name, adata in (("reference", reference), ("query", query)):
            if args.batch_key not in adata.obs:
                raise CLIError(
                    f"--batch-key {args.batch_key!r} is not a column of the {name} obs."
                )
    shared = _shared_genes(reference_counts, query_counts)
    logger = logging.getLogger("scvi_ext.cli")
    logger.info(
        "Reference %d cells, query %d cells, %d shared genes (of %d / %d).",
        reference.n_obs,
        query.n_obs,
        len(shared),
        reference.n_vars,
        query.n_vars,
    )

    _check_counts(reference_counts[:, shared], "--reference", args.reference, args.layer)
    _check_counts(query_counts[:, shared], "--query", args.query, args.layer)
    genes = shared[reference_hvgs(reference_counts[:, shared], args.n_top_genes or None)]
    adata = concat_reference_query(
        reference_counts[:, genes],
        query_counts[:, genes],
        args.labels_key,
        unlabeled_category=args.unlabeled_category,
        batch_key=args.batch_key,
    )
    setup_kwargs = {"labels_key": LABELS_COLUMN, "unlabeled_category": args.unlabeled_category}
    if args.batch_key is not None:
        if "batch_key" not in inspect.signature(model_cls.setup_anndata).parameters:
            raise CLIError(f"--batch-key: {args.model} takes no batch covariate; leave it out.")
        setup_kwargs["batch_key"] = BATCH_COLUMN
    try:
        model_cls.setup_anndata(adata, **setup_kwargs)
    except ValueError as error:
        raise CLIError(str(error)) from error
    set_seed(args.seed)
    model = model_cls(adata, **model_kwargs)
    try:
        model.train(**train_kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise CLIError(f"--train-option: {error}") from error

    # annotate the query rows of the training AnnData, then copy what it wrote
    query_cells = adata[reference.n_obs :].copy()
    obs_before, obsm_before = set(query_cells.obs.columns), set(query_cells.obsm)
    model.annotate(query_cells, key_added=key)
    annotated = query.copy()
    for column in query_cells.obs.columns:
        if column not in obs_before:
            annotated.obs[column] = query_cells.obs[column].array
    for name in set(query_cells.obsm) - obsm_before:
        annotated.obsm[name] = query_cells.obsm[name]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    annotated.write_h5ad(out_path)
    counts = annotated.obs[f"{key}_prediction"].value_counts()
    print(
        f"Wrote {out_path} ({annotated.n_obs} query cells, {args.model} on {len(genes)} "
        "genes). Predicted labels:"
    )
    print(counts.to_string())
    return 0


def _benchmark(args: argparse.Namespace, argv: list[str]) -> int:
    from scvi_ext.benchmark import (
        DEFAULT_METHODS,
        STUDIES,
        TASKS,
        NoMethodRanError,
        OptionError,
        check_benchmark_options,
        check_study_options,
        run_benchmark,
        run_study,
        summary_table,
    )

    if args.task not in TASKS and args.task not in STUDIES:
        available = ", ".join(sorted([*TASKS, *STUDIES]))
        raise CLIError(f"Unknown task {args.task!r}; available: {available}.")
    outdir = args.outdir or f"scvi_ext_outputs/benchmark_{args.task}"
    task_options = _key_values(args.task_option, "--task-option")
    if args.task in STUDIES:
        if args.methods or args.max_epochs or args.method_option:
            raise CLIError(
                f"--methods, --max-epochs and --method-option apply to annotation tasks; "
                f"{args.task!r} is a study: set its options with --task-option KEY=VALUE."
            )
        try:
            check_study_options(args.task, args.seeds, task_options)
        except (TypeError, ValueError) as error:
            raise CLIError(str(error)) from error
        _check_outdir(outdir, args.task, args.overwrite, study=True)
        try:
            run_study(
                args.task,
                seeds=args.seeds,
                outdir=outdir,
                command=_command_line(argv),
                options=task_options,
                overwrite=args.overwrite,
            )
        except FileNotFoundError as error:  # missing data; other errors keep their traceback
            raise CLIError(str(error)) from error
        print((Path(outdir) / "summary.md").read_text())
        return 0
    methods = args.methods or list(DEFAULT_METHODS)
    method_kwargs = _method_options(methods, args.max_epochs, args.method_option)
    try:
        # every option is checked before anything runs or is written
        check_benchmark_options(args.task, args.seeds, methods, method_kwargs, task_options)
    except OptionError as error:
        raise CLIError(str(error)) from error
    _check_outdir(outdir, args.task, args.overwrite)
    try:
        results = run_benchmark(
            args.task,
            seeds=args.seeds,
            methods=methods,
            outdir=outdir,
            method_kwargs=method_kwargs,
            task_kwargs=task_options,
            command=_command_line(argv),
            overwrite=args.overwrite,
        )
    # missing data, options the task refuses, every method skipped (not installed)
    except (FileNotFoundError, OptionError, NoMethodRanError) as error:
        raise CLIError(str(error)) from error
    print(summary_table(results))
    print(f"\nReport written to {Path(outdir).resolve()}/summary.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``scvi-ext`` argument parser."""
    from scvi_ext.benchmark import DEFAULT_METHODS, METHODS, STUDIES, TASKS

    parser = argparse.ArgumentParser(
        prog="scvi-ext", description="scvi-tools plugin models: demo, annotation, benchmarks."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="CELLULAR and ScNym vs scANVI and logistic regression on the Kang IFN-beta PBMCs.",
        description=(
            "Annotation transfer from control to IFN-beta stimulated PBMCs (Kang et al. "
            "2018) with CELLULAR + LatentClassifier, ScNym, scANVI and logistic regression, "
            "one seed. Falls back to simulated data when the shared datasets "
            "(SCVI_EXT_DATA) are absent."
        ),
    )
    demo.add_argument("--outdir", default="scvi_ext_outputs/demo", help="Report folder.")
    demo.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        help="Epochs of every model (max_epochs of each method: CELLULAR, ScNym, scVI; "
        "with --quick also CELLULAR's classifier).",
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="Random seed (default 0).")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="Tiny settings (2 epochs; small simulated data without the shared datasets).",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace report files in --outdir that are not of this task's report "
        "(another task's report, a file of yours); a rerun of the same task (the simulated "
        "or the Kang demo) replaces its report without it.",
    )
    demo.set_defaults(handler=_demo)

    annotate = commands.add_parser(
        "annotate",
        help="Label query cells with a model trained on a labelled reference.",
        description=(
            "Train --model on reference + query (query cells unlabeled), then write a copy "
            "of the query with what the model's annotate() writes: obs '<key>_prediction', "
            "'<key>_confidence', '<key>_novelty' and obsm 'X_<key>', where key is "
            "--key-added or the lower-case model name (e.g. scnym). Both inputs need raw "
            "counts in X (or --layer); the model trains on the most variable of their "
            "shared genes (--n-top-genes). Neither input is modified."
        ),
    )
    annotate.add_argument("--reference", required=True, help="Labelled reference .h5ad.")
    annotate.add_argument("--query", required=True, help="Query .h5ad to annotate.")
    annotate.add_argument("--labels-key", required=True, help="Label column of reference obs.")
    annotate.add_argument(
        "--out",
        required=True,
        help="Output .h5ad: a new file, or --overwrite to replace one (never an input).",
    )
    annotate.add_argument(
        "--model",
        choices=ANNOTATE_MODELS,
        default="ScNym",
        help="Model of scvi_ext.model to train (default: ScNym).",
    )
    annotate.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Argument of the model's constructor, e.g. n_latent=32 (repeatable).",
    )
    annotate.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Argument of the model's train(), e.g. batch_size=128 (repeatable).",
    )
    annotate.add_argument(
        "--unlabeled-category",
        default="Unknown",
        help="Reference label meaning 'unlabeled' (default: Unknown).",
    )
    annotate.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        help="Training epochs (default: the model's).",
    )
    annotate.add_argument(
        "--n-top-genes",
        type=_non_negative_int,
        default=2000,
        help=(
            "Train on this many highly variable genes of the reference, as the benchmark "
            "does (default 2000; 0 = every shared gene)."
        ),
    )
    annotate.add_argument(
        "--batch-key", default=None, help="obs column of batches, in both inputs."
    )
    annotate.add_argument(
        "--layer",
        default=None,
        help="Layer of both inputs holding the raw counts (default: X).",
    )
    annotate.add_argument(
        "--key-added",
        default=None,
        metavar="KEY",
        help="Prefix of the written obs/obsm keys (default: the lower-case model name); "
        "names already in the query are refused.",
    )
    annotate.add_argument(
        "--seed", type=_non_negative_int, default=0, help="Random seed (default 0)."
    )
    annotate.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
    annotate.set_defaults(handler=_annotate)

    benchmark = commands.add_parser(
        "benchmark",
        help="Compare annotation-transfer methods on a task over several seeds.",
        description="Writes results_per_seed.csv, summary.md and PNG plots to --outdir.",
    )
    benchmark.add_argument(
        "--task",
        default="kang_ifnb",
        help=(
            f"Annotation task ({', '.join(sorted(TASKS))}) or study "
            f"({', '.join(sorted(STUDIES))}). Default: kang_ifnb."
        ),
    )
    benchmark.add_argument(
        "--seeds",
        type=_non_negative_int,
        nargs="+",
        default=[0, 1, 2],
        help="Seeds, each once (default: 0 1 2).",
    )
    benchmark.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        default=None,
        help=f"Methods (default: {', '.join(DEFAULT_METHODS)}; also: "
        f"{', '.join(sorted(set(METHODS) - set(DEFAULT_METHODS)))}).",
    )
    benchmark.add_argument(
        "--outdir", default=None, help="Report folder (default: scvi_ext_outputs/benchmark_TASK)."
    )
    benchmark.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Option of the task or study function, e.g. held_out_donor=1015 for "
        "kang_donors_lodo; a,b is a tuple (repeatable).",
    )
    benchmark.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        help="max_epochs of every method that takes it (ScNym, the scVI stage of scANVI, "
        "CELLULAR's embedding; default: each method's).",
    )
    benchmark.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="Option of one method, e.g. scanvi.scanvi_max_epochs=5 or "
        "scnym.n_top_genes=None (repeatable).",
    )
    benchmark.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace files in --outdir that are not of this task's report (another "
        "task's report, a file of yours named like a report file); a rerun of the same "
        "task replaces its report without it.",
    )
    benchmark.set_defaults(handler=_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scvi-ext`` console script.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    Exit status: 0 on success, 2 on a user error (reported on stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return args.handler(args, argv)
    except CLIError as error:
        print(f"scvi-ext {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
