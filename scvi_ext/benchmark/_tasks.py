"""Benchmark tasks: named reference/query splits with a label column.

A task is a function returning ``(reference, query, labels_key)``: two AnnData objects
with raw counts in ``X`` and the same genes, and the ``obs`` column holding the cell
labels (in the query it is the ground truth, never shown to the methods). Register a
new task with :func:`register_task`.
"""

from __future__ import annotations

from collections.abc import Callable

import anndata as ad

TaskFunction = Callable[..., tuple[ad.AnnData, ad.AnnData, str]]

TASKS: dict[str, TaskFunction] = {}
"""Registered tasks, by name."""

TASK_METHOD_KWARGS: dict[str, dict[str, dict]] = {
    "kang_donors_lodo": {
        "cellular": {"batch_key": "donor"},
        "cellular_eps1e-8": {"batch_key": "donor"},
    },
}
"""Method options a task needs (e.g. its batch column), merged under the user's."""


def register_task(name: str) -> Callable[[TaskFunction], TaskFunction]:
    """Decorator adding a task function to :data:`TASKS` under ``name``."""

    def decorator(function: TaskFunction) -> TaskFunction:
        TASKS[name] = function
        return function

    return decorator


def split_by_column(
    adata: ad.AnnData, column: str, reference_value: str, query_value: str
) -> tuple[ad.AnnData, ad.AnnData]:
    """Split ``adata`` into reference and query cells by the value of ``obs[column]``.

    Parameters
    ----------
    adata
        Cells to split.
    column
        ``obs`` column to split on.
    reference_value, query_value
        Values of ``column`` marking reference and query cells.

    Returns
    -------
    ``(reference, query)``, both copies.
    """
    values = adata.obs[column].astype(str)
    for value in (reference_value, query_value):
        if not (values == value).any():
            raise ValueError(
                f"No cell has obs[{column!r}] == {value!r}; values present: "
                f"{sorted(values.unique())}."
            )
    reference = adata[(values == reference_value).to_numpy()].copy()
    query = adata[(values == query_value).to_numpy()].copy()
    return reference, query


@register_task("kang_ifnb")
def kang_ifnb() -> tuple[ad.AnnData, ad.AnnData, str]:
    """Kang et al. 2018 PBMC: control cells (reference) -> IFN-beta stimulated (query).

    Labels: ``cell_type`` (7 types). Needs the shared datasets folder.
    """
    from scvi_ext.data import load_dataset

    adata = load_dataset("kang_ifnb")
    reference, query = split_by_column(adata, "condition", "control", "stimulated")
    return reference, query, "cell_type"


@register_task("cellbench_celseq2_dropseq")
def cellbench_celseq2_dropseq() -> tuple[ad.AnnData, ad.AnnData, str]:
    """CellBench 3 lung cancer cell lines (Tian et al. 2019): CEL-seq2 -> Drop-seq.

    Cross-technology transfer; labels ``cell_type`` (3 cell lines). Needs the shared
    datasets folder.
    """
    from scvi_ext.data import load_dataset

    adata = load_dataset("cellbench_3lines")
    reference, query = split_by_column(adata, "technology", "CEL-seq2", "Drop-seq")
    return reference, query, "cell_type"


@register_task("simulated")
def simulated(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_cell_types: int = 5,
    query_fraction: float = 0.5,
    seed: int = 0,
    **simulate_kwargs,
) -> tuple[ad.AnnData, ad.AnnData, str]:
    """Simulated counts: condition ``reference`` -> condition ``query`` (shifted).

    Parameters
    ----------
    n_cells, n_genes, n_cell_types, query_fraction, seed
        Passed to :func:`scvi_ext.data.simulate`, as are ``simulate_kwargs``.

    Returns
    -------
    ``(reference, query, "cell_type")``.
    """
    from scvi_ext.data import simulate

    adata = simulate(
        n_cells=n_cells,
        n_genes=n_genes,
        n_cell_types=n_cell_types,
        query_fraction=query_fraction,
        seed=seed,
        **simulate_kwargs,
    )
    reference, query = split_by_column(adata, "condition", "reference", "query")
    return reference, query, "cell_type"


@register_task("kang_donors_lodo")
def kang_donors_lodo(
    held_out_donor: str | int | None = None,
) -> tuple[ad.AnnData, ad.AnnData, str]:
    """Kang et al. 2018 control PBMCs, 5 donors: train on four donors, annotate the fifth.

    Labels ``cell_type`` (4 types); batches ``donor``. ``held_out_donor`` (a donor ID,
    e.g. ``1015``) defaults to the first donor in sorted order.
    """
    from scvi_ext.data import load_dataset

    adata = load_dataset("kang_donors")
    donors = adata.obs["donor"].astype(str)
    held_out = sorted(donors.unique())[0] if held_out_donor is None else str(held_out_donor)
    if held_out not in set(donors):
        raise ValueError(
            f"held_out_donor {held_out!r} is not a donor; donors: {sorted(donors.unique())}."
        )
    is_query = (donors == held_out).to_numpy()
    return adata[~is_query].copy(), adata[is_query].copy(), "cell_type"
