import warnings
from pathlib import Path

import anndata as ad
import mudata as md
import pandas as pd
import scipy.sparse as sp

from ._paths import DATA_DIR_ENV_VAR, get_data_dir

DATASETS: dict[str, str] = {
    "kang_ifnb": "kang_ifnb_pbmc_1975.h5ad",
    "kang_donors": "kang_ctrl_pbmc_5donors_8684.h5ad",
    "cellbench_3lines": "cellbench_3lines_celseq2_dropseq_499.h5ad",
    "cellbench_5lines": "cellbench_5lines_celseq2_3plates_909.h5ad",
    "snareseq": "snareseq_mouse_cortex_10309.h5mu",
}
SNARESEQ_GENE_REGION_MAP = "snareseq_mouse_cortex_gene_region_map.npz"


def _dataset_path(file_name: str) -> Path:
    path = get_data_dir() / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"Dataset file '{file_name}' not found in {path.parent}; set the environment "
            f"variable {DATA_DIR_ENV_VAR} to the folder holding the shared datasets."
        )
    return path


def _tidy(adata: ad.AnnData) -> ad.AnnData:
    """Counts in ``X`` as float32 CSR and string ``obs`` columns as categoricals."""
    if adata.X is not None:
        counts = adata.X
        if not sp.issparse(counts) or counts.format != "csr":
            counts = sp.csr_matrix(counts)
        if counts.dtype != "float32":
            counts = counts.astype("float32")
        adata.X = counts
    _categorical_strings(adata.obs)
    return adata


def _categorical_strings(frame: pd.DataFrame) -> None:
    for column in frame.columns:
        values = frame[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            continue
        if pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values):
            frame[column] = values.astype("category")


def load_dataset(name: str) -> ad.AnnData | md.MuData:
    """Load one of the shared datasets by short name.

    Parameters
    ----------
    name
        A key of :data:`DATASETS`: ``"kang_ifnb"``, ``"kang_donors"``,
        ``"cellbench_3lines"``, ``"cellbench_5lines"`` or ``"snareseq"``.

    Returns
    -------
    AnnData (MuData for ``"snareseq"``) with float32 CSR counts in ``X`` (of every
    modality) and categorical string columns in ``obs``.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset '{name}'; valid names: {', '.join(DATASETS)}.")
    path = _dataset_path(DATASETS[name])
    if path.suffix == ".h5mu":
        with warnings.catch_warnings():
            # mudata 0.3 announces a future change of .update() on every read.
            warnings.simplefilter("ignore", FutureWarning)
            mdata = md.read_h5mu(path)
        for modality in mdata.mod.values():
            _tidy(modality)
        _categorical_strings(mdata.obs)
        return mdata
    return _tidy(ad.read_h5ad(path))


def load_kang_ifnb() -> ad.AnnData:
    """Kang et al. 2018 PBMC, control vs IFN-beta stimulated (1975 cells x 6998 genes).

    ``obs``: ``cell_type`` (7 types), ``condition`` (control / stimulated).
    """
    return load_dataset("kang_ifnb")


def load_kang_donors() -> ad.AnnData:
    """Kang et al. 2018 control PBMC of 5 donors (8684 cells x 2511 genes, Ensembl IDs).

    ``obs``: ``cell_type`` (4 types), ``donor``.
    """
    return load_dataset("kang_donors")


def load_cellbench_3lines() -> ad.AnnData:
    """CellBench 3 cell lines, CEL-seq2 and Drop-seq (499 cells x 15073 genes).

    ``obs``: ``cell_type`` (cell line), ``technology``.
    """
    return load_dataset("cellbench_3lines")


def load_cellbench_5lines() -> ad.AnnData:
    """CellBench 5 cell lines on 3 CEL-seq2 plates (909 cells x 12653 genes).

    ``obs``: ``cell_type``, ``plate``, ``demuxlet_cls`` (SNG / DBL).
    """
    return load_dataset("cellbench_5lines")


def load_snareseq() -> md.MuData:
    """SNARE-seq adult mouse cortex, paired RNA and ATAC (10309 cells).

    Modalities ``rna`` (1677 genes) and ``atac`` (25734 peaks), same cell per row;
    ``obs``: ``cell_type`` (15), ``cell_type_fine`` (23), ``batch`` (12 libraries).
    """
    return load_dataset("snareseq")


def load_snareseq_gene_region_map() -> sp.csr_matrix:
    """Gene-to-peak 0/1 map of the SNARE-seq features (1677 genes x 25734 peaks, CSR)."""
    return sp.csr_matrix(sp.load_npz(_dataset_path(SNARESEQ_GENE_REGION_MAP)))


def datasets_available() -> bool:
    """Whether the data folder resolves and holds the ``kang_ifnb`` file."""
    try:
        return (get_data_dir() / DATASETS["kang_ifnb"]).is_file()
    except FileNotFoundError:
        return False
