"""Datasets, a count simulator, gene selection and input validation."""

from ._collection import Collection, CollectionCounts, read_collection
from ._genes import (
    GENE_SELECTION_DEFAULTS,
    log_normalise,
    log_normalised_anndata,
    select_genes,
)
from ._loaders import (
    DATASETS,
    datasets_available,
    load_cellbench_3lines,
    load_cellbench_5lines,
    load_dataset,
    load_kang_donors,
    load_kang_ifnb,
    load_snareseq,
    load_snareseq_gene_region_map,
)
from ._paths import DATA_DIR_ENV_VAR, get_data_dir
from ._simulate import simulate, write_simulated
from ._soma import write_soma
from ._validation import (
    check_backed_open,
    is_collection,
    validate_counts,
    validate_gene_overlap,
    validate_labels,
    validate_obs_key,
)

__all__ = [
    "Collection",
    "CollectionCounts",
    "DATASETS",
    "DATA_DIR_ENV_VAR",
    "GENE_SELECTION_DEFAULTS",
    "check_backed_open",
    "datasets_available",
    "get_data_dir",
    "is_collection",
    "load_cellbench_3lines",
    "load_cellbench_5lines",
    "load_dataset",
    "load_kang_donors",
    "load_kang_ifnb",
    "load_snareseq",
    "load_snareseq_gene_region_map",
    "log_normalise",
    "log_normalised_anndata",
    "read_collection",
    "select_genes",
    "simulate",
    "write_simulated",
    "write_soma",
    "validate_counts",
    "validate_gene_overlap",
    "validate_labels",
    "validate_obs_key",
]
