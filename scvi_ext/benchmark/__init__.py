"""Benchmarks: annotation-transfer methods, tasks, the runner and its report.

Examples
--------
>>> from scvi_ext.benchmark import run_benchmark
>>> results = run_benchmark("kang_ifnb", seeds=[0, 1, 2], outdir="bench_kang")
"""

from ._cellular_tasks import (
    cellular_method,
    embedding_quality,
    novel_type_detection,
    training_throughput,
)
from ._methods import (
    METHODS,
    MethodResult,
    MethodUnavailableError,
    concat_reference_query,
    log_normalize,
    query_label_ceiling,
)
from ._runner import run_benchmark, score_predictions, set_seed, summary_table
from ._studies import STUDIES, Study, run_study
from ._tasks import TASK_METHOD_KWARGS, TASKS, kang_donors_lodo, register_task, split_by_column

METHODS["cellular"] = cellular_method

__all__ = [
    "METHODS",
    "STUDIES",
    "TASK_METHOD_KWARGS",
    "TASKS",
    "MethodResult",
    "MethodUnavailableError",
    "Study",
    "cellular_method",
    "concat_reference_query",
    "embedding_quality",
    "kang_donors_lodo",
    "novel_type_detection",
    "query_label_ceiling",
    "training_throughput",
    "log_normalize",
    "register_task",
    "run_benchmark",
    "run_study",
    "score_predictions",
    "set_seed",
    "split_by_column",
    "summary_table",
]
