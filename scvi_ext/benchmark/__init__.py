"""Benchmarks: annotation-transfer methods, tasks, the runner and its report.

Methods and tasks are registered with :func:`register_method` and :func:`register_task`;
studies that are not one reference/query split are in :data:`STUDIES`. CELLULAR's
reference code (looped losses, reference-style training epoch) is the public module
:mod:`scvi_ext.benchmark.cellular_reference`.

Examples
--------
>>> from scvi_ext.benchmark import run_benchmark
>>> results = run_benchmark("kang_ifnb", seeds=[0, 1, 2], outdir="bench_kang")
"""

# Each imported for its @register_method / @register_task / @register_study side effects.
from . import (  # noqa: F401
    _attention_tasks,
    _cgran_scaling,
    _gmvae_components,
    _latent_inputs,
    _matching,
    _scale,
)
from ._cellular_tasks import cellular_method, embedding_quality, novel_type_detection
from ._methods import (
    BATCH_COLUMN,
    DEFAULT_METHODS,
    LABELS_COLUMN,
    METHODS,
    UNLABELED_CATEGORY,
    MethodResult,
    MethodUnavailableError,
    concat_reference_query,
    query_label_ceiling,
    reference_hvgs,
    register_method,
)
from ._runner import (
    NoMethodRanError,
    OptionError,
    check_benchmark_options,
    run_benchmark,
    score_predictions,
    set_seed,
    summary_table,
)
from ._studies import (
    AUROC_COLUMNS,
    STUDIES,
    Study,
    check_study_options,
    register_study,
    run_study,
)
from ._tasks import TASK_METHOD_KWARGS, TASKS, kang_donors_lodo, register_task, split_by_column
from ._throughput import training_throughput

__all__ = [
    "AUROC_COLUMNS",
    "BATCH_COLUMN",
    "DEFAULT_METHODS",
    "LABELS_COLUMN",
    "METHODS",
    "STUDIES",
    "TASKS",
    "TASK_METHOD_KWARGS",
    "UNLABELED_CATEGORY",
    "MethodResult",
    "MethodUnavailableError",
    "NoMethodRanError",
    "OptionError",
    "Study",
    "cellular_method",
    "check_benchmark_options",
    "check_study_options",
    "concat_reference_query",
    "embedding_quality",
    "kang_donors_lodo",
    "novel_type_detection",
    "query_label_ceiling",
    "reference_hvgs",
    "register_method",
    "register_study",
    "register_task",
    "run_benchmark",
    "run_study",
    "score_predictions",
    "set_seed",
    "split_by_column",
    "summary_table",
    "training_throughput",
]
