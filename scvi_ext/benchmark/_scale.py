"""Scale (issue 16): seconds per epoch, prediction speed and peak memory against cells.

Simulated counts (:func:`scvi_ext.data.write_simulated`: ``n_genes`` genes, 20 cell types,
8 batches, the last 30% of cells in a shifted ``"query"`` condition, unlabeled) are read
in memory (``anndata.read_h5ad(path)``), backed (``read_h5ad(path, backed="r")``), as a
collection of files (:func:`scvi_ext.data.read_collection`, here of the one file) or from
a TileDB-SOMA experiment (:class:`scvi_ext.base.SomaDataModule`). Each method x storage x
size is measured in a fresh process, so that its peak resident memory is its own: seconds
and the process's CPU seconds inside the training epochs (validation included; CPU
seconds barely depend on other load on the machine), the first epoch's seconds and the
mean of the later ones (the first holds one-time costs; with ``epochs`` >= 2), training
cells/s (all epochs, and the later ones), prediction cells/s
on the query cells (``predict``; ``get_latent_representation`` for GMVAE) and the peak RSS
of training and of prediction (rank 0's under DDP). Every model keeps its default
architecture; only the epochs are reduced, and all share one batch size and training
fraction (scANVI too, the peer, trained directly on the same labels and batches).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._studies import register_study

logger = logging.getLogger(__name__)

#: Methods of the study: our models and scANVI, the peer; CGRAN is measured only when
#: asked for (``methods=...``), as it is too slow on a CPU.
DEFAULT_SCALE_METHODS = ("scnym", "cellular", "can", "gmvae", "scanvi")
SCALE_METHODS = (*DEFAULT_SCALE_METHODS, "cgran")
#: Where the counts are read from.
SCALE_STORAGES = ("memory", "backed", "collection", "soma")
#: Lightning settings of the one-process runs.
SCALE_ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
SCALE_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
#: ``obs`` column written into the simulated files: cell types, ``"Unknown"`` on query cells.
LABELS_COLUMN = "reference_cell_type"
UNLABELED = "Unknown"

#: Model class (module, name) and ``setup_anndata`` arguments of each method.
_MODELS: dict[str, tuple[str, str, dict]] = {
    "scnym": (
        "scvi_ext.model",
        "ScNym",
        {"labels_key": LABELS_COLUMN, "unlabeled_category": UNLABELED, "batch_key": "batch"},
    ),
    "cellular": (
        "scvi_ext.model",
        "CELLULAR",
        {"labels_key": LABELS_COLUMN, "unlabeled_category": UNLABELED, "batch_key": "batch"},
    ),
    "can": (
        "scvi_ext.model",
        "CAN",
        {"labels_key": LABELS_COLUMN, "unlabeled_category": UNLABELED},
    ),
    "cgran": (
        "scvi_ext.model",
        "CGRAN",
        {"labels_key": LABELS_COLUMN, "unlabeled_category": UNLABELED},
    ),
    "gmvae": ("scvi_ext.model", "GMVAE", {"batch_key": "batch"}),
    "scanvi": (
        "scvi.model",
        "SCANVI",
        {"labels_key": LABELS_COLUMN, "unlabeled_category": UNLABELED, "batch_key": "batch"},
    ),
}

#: Runs one measurement in a fresh process (a file, so that Lightning's DDP launcher can
#: start the second rank with the same command).
_WORKER = "import sys\nfrom scvi_ext.benchmark._scale import measure_from_file\n"
_WORKER += "measure_from_file(sys.argv[1])\n"

_COLUMNS = (
    "seconds_per_epoch",
    "cpu_seconds_per_epoch",
    "first_epoch_seconds",
    "later_seconds_per_epoch",
    "train_cells_per_second",
    "later_train_cells_per_second",
    "train_cells_per_cpu_second",
    "predict_cells_per_second",
    "predict_cells_per_cpu_second",
    "peak_rss_train_gb",
    "peak_rss_predict_gb",
)


def _as_tuple(value: object) -> tuple:
    """A single option value (``--task-option methods=scnym``) as a one-element tuple."""
    return (value,) if isinstance(value, str | int) else tuple(value)


def _check_choices(values: Sequence[str], known: Sequence[str], what: str) -> None:
    unknown = [value for value in values if value not in known]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; choose among {list(known)}.")


# ---------------------------------------------------------------------- data


def _add_reference_labels(path: Path) -> None:
    """Write :data:`LABELS_COLUMN` into the file's ``obs``: the cell type, unlabeled in
    the query condition (the cells whose labels a user would transfer)."""
    import h5py
    from anndata.io import read_elem, write_elem

    with h5py.File(path, "r+") as handle:
        obs = read_elem(handle["obs"])
        reference = obs["condition"].to_numpy() == "reference"
        labels = np.where(reference, obs["cell_type"].astype(str).to_numpy(), UNLABELED)
        obs[LABELS_COLUMN] = pd.Categorical(labels)
        del handle["obs"]
        write_elem(handle, "obs", obs)


def _file_names(n_cells: int, n_genes: int, seed: int, data_dir: Path) -> dict[str, Path]:
    stem = f"simulated_{n_cells}x{n_genes}_seed{seed}"
    return {"h5ad": data_dir / f"{stem}.h5ad", "soma": data_dir / f"{stem}.soma"}


def simulated_files(
    n_cells: int,
    n_genes: int,
    seed: int,
    data_dir: str | Path,
    soma: bool = False,
    chunk_size: int = 10_000,
) -> dict[str, Path]:
    """The simulated h5ad (and SOMA experiment) of ``n_cells`` cells, written once.

    Files that exist for the same size and seed are reused; a file is only given its
    final name once complete, so an interrupted write is not reused.

    Returns
    -------
    ``{"h5ad": path}``, with ``"soma"`` (the experiment's folder) when ``soma``.
    """
    from scvi_ext.data import write_simulated

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = _file_names(n_cells, n_genes, seed, data_dir)
    h5ad, stem = names["h5ad"], names["h5ad"].stem
    if not h5ad.exists():
        partial = data_dir / f"{stem}.partial.h5ad"
        logger.info("Writing %s", h5ad)
        write_simulated(
            partial,
            overwrite=True,
            n_cells=n_cells,
            n_genes=n_genes,
            n_cell_types=20,
            n_batches=8,
            seed=seed,
            chunk_size=min(chunk_size, n_cells),
        )
        _add_reference_labels(partial)
        partial.rename(h5ad)
    files = {"h5ad": h5ad}
    if soma:
        import anndata as ad

        from scvi_ext.data import write_soma

        uri, complete = names["soma"], data_dir / f"{stem}.soma.complete"
        if not complete.exists():
            logger.info("Writing %s", uri)
            # from the h5ad, so that the SOMA cells are the same (labels column included)
            write_soma(ad.read_h5ad(h5ad, backed="r"), str(uri), overwrite=True)
            complete.touch()
        files["soma"] = uri
    return files


# ---------------------------------------------------------------------- one measurement


def _peak_rss_gb(reset: bool = False) -> float:
    """The process's peak resident memory so far (GB); ``reset`` starts a new peak."""
    try:
        with open("/proc/self/status") as handle:
            peak_kib = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w") as handle:  # peak := current RSS
                handle.write("5")
    except (OSError, StopIteration):  # not Linux: the high-water mark of the whole process
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 2**20


def _epoch_clock():
    """:class:`._throughput._EpochTimer` that also counts the process's CPU seconds inside
    epochs (all its threads: on a shared machine they barely depend on the other load) and
    keeps each epoch's seconds (the first holds one-time costs, such as the compilation of
    ``tiledbsoma_ml``'s numba kernels on the first read)."""
    from ._throughput import _EpochTimer

    class EpochClock(_EpochTimer):
        def __init__(self):
            super().__init__()
            self.cpu_seconds, self._cpu_start = 0.0, 0.0
            self.epoch_seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            super().on_train_epoch_start(trainer, pl_module)
            self._cpu_start = time.process_time()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            before = self.seconds
            super().on_train_epoch_end(trainer, pl_module)
            self.epoch_seconds.append(self.seconds - before)
            self.cpu_seconds += time.process_time() - self._cpu_start

    return EpochClock()


def measure(spec: dict) -> dict:
    """Train one method for ``spec["epochs"]`` epochs and predict its query cells.

    ``spec``: ``method``, ``storage``, ``path`` (h5ad file or SOMA folder), ``h5ad`` (the
    h5ad file, for the query cells), ``epochs``, ``batch_size``, ``train_size``, ``seed``,
    ``processes`` (2: CPU DDP), ``torch_threads`` (``None``: torch's default). Meant to
    run in a fresh process (:func:`run_measurement`).
    """
    import importlib

    import anndata as ad
    import scvi
    import torch

    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])  # DDP ranks: Lightning sets their own
    module_name, class_name, setup_kwargs = _MODELS[spec["method"]]
    model_cls = getattr(importlib.import_module(module_name), class_name)
    scvi.settings.seed = spec["seed"]
    storage = spec["storage"]
    settings = {"batch_size": spec["batch_size"], "train_size": spec["train_size"]}
    if storage == "soma":
        from scvi_ext.base import SomaDataModule

        data = SomaDataModule(spec["path"], model_cls, **setup_kwargs, **settings)
        # scANVI reads the labels from the datamodule (SomaDataModule.labels)
        peer = {"datamodule": data} if spec["method"] == "scanvi" else {}
        model = model_cls(registry=data.registry, **peer)
        data_kwargs = {"datamodule": data}
    else:
        if storage == "collection":
            from scvi_ext.data import read_collection

            data = read_collection([spec["path"]], layer=None)
        else:
            data = ad.read_h5ad(spec["path"], backed="r" if storage == "backed" else None)
        model_cls.setup_anndata(data, **setup_kwargs)
        model = model_cls(data)
        data_kwargs = settings
        if spec.get("block_size") is not None and spec["method"] != "scanvi":
            data_kwargs = {**settings, "datasplitter_kwargs": {"block_size": spec["block_size"]}}
    processes = {"accelerator": spec.get("accelerator", "cpu")}
    if spec["processes"] > 1:
        # scANVI leaves some parameters unused in a step: scvi-tools' advice for its DDP
        strategy = "ddp_find_unused_parameters_true" if spec["method"] == "scanvi" else "ddp"
        processes = {"accelerator": "cpu", "devices": spec["processes"], "strategy": strategy}
    if spec.get("precision") is not None:
        processes["precision"] = spec["precision"]
    timer = _epoch_clock()
    _peak_rss_gb(reset=True)
    start = time.perf_counter()
    model.train(
        max_epochs=spec["epochs"],
        early_stopping=False,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        **processes,
        **data_kwargs,
    )
    train_call_seconds = time.perf_counter() - start
    peak_train = _peak_rss_gb(reset=True)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return {}
    n_cells = int(spec["n_cells"])
    train_indices = getattr(model, "train_indices", None)
    n_train = n_cells * spec["train_size"] if train_indices is None else len(train_indices)

    condition = ad.read_h5ad(spec["h5ad"], backed="r").obs["condition"].to_numpy()
    query = np.flatnonzero(condition == "query")
    del condition
    infer = model.get_latent_representation if spec["method"] == "gmvae" else model.predict
    start, cpu_start = time.perf_counter(), time.process_time()
    if spec["method"] == "scanvi" and storage == "soma":  # scvi-tools' custom loader
        outputs = model.predict(dataloader=data.loader(query))
    else:
        outputs = infer(data, indices=query)  # SOMA rows are the h5ad's, in order
    predict_seconds = time.perf_counter() - start
    predict_cpu_seconds = time.process_time() - cpu_start
    n_predicted = len(outputs)
    seconds_per_epoch = timer.seconds / spec["epochs"]
    later = timer.epoch_seconds[1:]  # without the first epoch's one-time costs
    later_seconds_per_epoch = float(np.mean(later)) if later else float("nan")
    return {
        "seconds_per_epoch": seconds_per_epoch,
        "first_epoch_seconds": timer.epoch_seconds[0],
        "later_seconds_per_epoch": later_seconds_per_epoch,
        "train_cells_per_second": n_train / seconds_per_epoch,
        "later_train_cells_per_second": n_train / later_seconds_per_epoch,
        "predict_cells_per_second": n_predicted / predict_seconds,
        "cpu_seconds_per_epoch": timer.cpu_seconds / spec["epochs"],
        "train_cells_per_cpu_second": n_train * spec["epochs"] / timer.cpu_seconds,
        "predict_cells_per_cpu_second": n_predicted / predict_cpu_seconds,
        "peak_rss_train_gb": peak_train,
        "peak_rss_predict_gb": _peak_rss_gb(),
        "train_call_seconds": train_call_seconds,
        "n_train_cells": int(n_train),
        "n_predicted_cells": int(n_predicted),
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
    }


def measure_from_file(spec_path: str) -> None:
    """Entry point of the measuring process: reads the spec, writes the result (rank 0)."""
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    result = measure(spec)
    if result:
        Path(spec["result_path"]).write_text(json.dumps(result))


def run_measurement(
    spec: dict, folder: Path, timeout: float | None = None, reuse_only: bool = False
) -> dict:
    """:func:`measure` in a fresh Python process; its result, or ``{"error": ...}``.

    A result already in ``folder`` for the same spec is reused (the study can then be
    extended, e.g. to 1e6 cells, without measuring the smaller sizes again);
    ``reuse_only`` measures nothing new.
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{spec['method']}_{spec['storage']}_n{spec['n_cells']}_p{spec['processes']}_{key}"
    result_path = folder / f"{name}.json"
    if result_path.exists():
        logger.info("Reusing %s", result_path)
        return json.loads(result_path.read_text())
    if reuse_only:
        return {"error": "not measured (reuse_only)"}
    spec_path, log_path = folder / f"{name}.spec.json", folder / f"{name}.log"
    spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}))
    worker = folder / "_measure.py"
    worker.write_text(_WORKER)
    load = os.getloadavg()[0]
    logger.info("Measuring %s (load %.1f)", name, load)
    with open(log_path, "w") as log:
        try:
            process = subprocess.run(
                [sys.executable, str(worker), str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            failed = process.returncode != 0 or not result_path.exists()
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout} s", "load_before": load}
    if failed:
        lines = log_path.read_text().strip().splitlines() or ["no output"]
        logger.warning("%s failed: %s (log: %s)", name, lines[-1], log_path)
        return {"error": lines[-1][:200], "load_before": load}
    result = {**json.loads(result_path.read_text()), "load_before": load}
    result_path.write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------------- tables and figures


def scaling_exponents(table: pd.DataFrame) -> pd.DataFrame:
    """Least-squares slope of log(seconds per epoch) on log(n), per method and storage
    (one process); ``x10_cells_time_factor`` = 10 ** slope, the time per epoch with 10x
    more cells relative to now; the same slope for CPU seconds and for peak RSS."""
    rows = []
    single = table[(table["processes"] == 1) & table["seconds_per_epoch"].notna()]
    for (method, storage), group in single.groupby(["method", "storage"], sort=False):
        if group["n_cells"].nunique() < 2:
            continue
        log_n, log_t = np.log(group["n_cells"]), np.log(group["seconds_per_epoch"])
        slope = float(np.polyfit(log_n, log_t, 1)[0])
        cpu = group.get("cpu_seconds_per_epoch", pd.Series(np.nan, index=group.index))
        cpu_slope = np.nan
        if cpu.notna().all():
            cpu_slope = float(np.polyfit(log_n, np.log(cpu), 1)[0])
        log_rss = np.log(group["peak_rss_train_gb"])
        rows.append(
            {
                "model_storage": f"{method} / {storage}",
                "time_exponent": slope,
                "x10_cells_time_factor": 10**slope,
                "cpu_time_exponent": cpu_slope,
                "peak_rss_exponent": float(np.polyfit(log_n, log_rss, 1)[0]),
                "n_sizes": int(group["n_cells"].nunique()),
                "largest_n": int(group["n_cells"].max()),
            }
        )
    columns = ["model_storage", "time_exponent", "x10_cells_time_factor", "cpu_time_exponent"]
    return pd.DataFrame(rows, columns=[*columns, "peak_rss_exponent", "n_sizes", "largest_n"])


#: Throughput columns compared by :func:`_ratios`, and their short names.
_THROUGHPUTS = {
    "train_cells_per_second": "train",
    "later_train_cells_per_second": "later_train",
    "train_cells_per_cpu_second": "train_cpu",
    "predict_cells_per_second": "predict",
    "predict_cells_per_cpu_second": "predict_cpu",
}


def _ratios(table: pd.DataFrame, by: str, baseline: str, percent: bool) -> pd.DataFrame:
    """Each throughput of each row over the row with ``by == baseline`` at the same other
    keys (one process), as a percentage or a ratio."""
    keys = [k for k in ("method", "storage", "n_cells") if k != by]
    single = table[table["processes"] == 1].set_index([*keys, by])
    suffix, factor = ("pct", 100.0) if percent else ("ratio", 1.0)
    rows = []
    for index, row in single.iterrows():
        *others, value = index
        if value == baseline or (*others, baseline) not in single.index:
            continue
        base = single.loc[(*others, baseline)]
        rows.append(
            {
                "comparison": " / ".join(map(str, [*others, value])) + f" vs {baseline}",
                **dict(zip(keys, others, strict=True)),
                by: value,
                **{
                    f"{short}_throughput_{suffix}": factor * row[column] / base[column]
                    for column, short in _THROUGHPUTS.items()
                    if column in single.columns
                },
            }
        )
    frame = pd.DataFrame(rows)
    ratios = [column for column in frame.columns if column.endswith(f"_throughput_{suffix}")]
    return frame.dropna(how="all", subset=ratios) if ratios else frame  # not measured


def _settings(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Device and precision of each measurement.

    Parameters
    ----------
    table
        Measurements, as the ``scale`` table.

    Returns
    -------
    device, precision
        ``"cpu"`` where no device is recorded (measurements made before it was: all on
        the CPU) and ``"32-true"`` (Lightning's default) where no precision was set.
    """
    blank = pd.Series("", index=table.index, dtype=object)
    device = table.get("device", blank).fillna("").astype(str).replace("", "cpu")
    precision = table.get("precision", blank).fillna("").astype(str).replace("", "32-true")
    return device, precision


def ddp_table(table: pd.DataFrame) -> pd.DataFrame:
    """Several CPU processes (DDP) against one, same method, storage, size, device and
    precision.

    Parameters
    ----------
    table
        Measurements, as the ``scale`` table (``device`` and ``precision`` columns
        optional, see :func:`_settings`).

    Returns
    -------
    pandas.DataFrame
        One row per DDP measurement with a one-process run of its method, storage and
        size. Where that run was on another device or precision (``accelerator`` or
        ``precision`` of :func:`scale_study`; DDP runs are on the CPU in 32-true), the
        one-process columns and ``speedup`` are empty and ``note`` names its setting.
    """
    device, precision = _settings(table)
    rows = []
    multi = table[(table["processes"] > 1) & table["seconds_per_epoch"].notna()]
    for index, row in multi.iterrows():
        single = (
            (table["method"] == row["method"])
            & (table["storage"] == row["storage"])
            & (table["n_cells"] == row["n_cells"])
            & (table["processes"] == 1)
        )
        if not single.any():
            continue
        like = single & (device == device[index]) & (precision == precision[index])
        one, note = pd.Series(np.nan, index=table.columns), ""
        if like.any():
            one = table[like].iloc[0]
        else:
            other = single.idxmax()
            note = f"1 proc on {device[other]} / {precision[other]}: not compared"
        rows.append(
            {
                "comparison": f"{row['method']} / {row['storage']} / n={row['n_cells']}",
                "device": device[index],
                "precision": precision[index],
                "seconds_per_epoch_1": one["seconds_per_epoch"],
                f"seconds_per_epoch_{row['processes']}": row["seconds_per_epoch"],
                "speedup": one["seconds_per_epoch"] / row["seconds_per_epoch"],
                "cpu_seconds_per_epoch_1": one["cpu_seconds_per_epoch"],
                "rank0_cpu_seconds_per_epoch": row["cpu_seconds_per_epoch"],
                "peak_rss_rank0_gb": row["peak_rss_train_gb"],
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def plot_scaling(table: pd.DataFrame, path: str | Path) -> None:
    """Log-log seconds and CPU seconds per epoch and peak training RSS against cells, one
    line per method and storage (one process)."""
    from ._plots import _new_figure

    single = table[(table["processes"] == 1) & table["seconds_per_epoch"].notna()]
    panels = [
        ("seconds_per_epoch", "seconds per epoch"),
        ("cpu_seconds_per_epoch", "CPU seconds per epoch"),
        ("peak_rss_train_gb", "peak RSS of training (GB)"),
    ]
    figure = _new_figure(15, 4.5)
    styles = {"memory": "-", "backed": "--", "collection": "-.", "soma": ":"}
    colours = {method: f"C{number}" for number, method in enumerate(SCALE_METHODS)}
    sizes = np.sort(single["n_cells"].unique()).astype(float)
    for axes, (column, label) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        for (method, storage), group in single.groupby(["method", "storage"], sort=False):
            group = group.sort_values("n_cells")
            axes.loglog(
                group["n_cells"],
                group[column],
                styles.get(storage, "-"),
                marker="o",
                color=colours[method],
                label=f"{method} ({storage})",
            )
        if column != "peak_rss_train_gb" and len(sizes) > 1:
            start = single.loc[single["n_cells"] == sizes[0], column].median()
            axes.loglog(sizes, start * sizes / sizes[0], "k:", lw=1, label="linear in n")
        axes.set_xlabel("cells n")
        axes.set_ylabel(label)
    figure.axes[-1].legend(
        fontsize="x-small", frameon=False, loc="upper left", bbox_to_anchor=(1, 1)
    )
    figure.savefig(path, dpi=120, bbox_inches="tight")


# ---------------------------------------------------------------------- the study


@register_study(
    "scale",
    "Scale (issue 16): simulated counts (2000 genes, 20 types, 8 batches, the last 30% of "
    "cells a shifted, unlabeled query) in memory, backed h5ad and TileDB-SOMA. Per method, "
    "storage and size, in a fresh process: seconds per training epoch (validation "
    "included; each model's default architecture, one batch size and training fraction "
    "for all, scANVI trained directly as the peer), training cells/s, prediction cells/s "
    "on the query cells (GMVAE: latent), peak RSS of training and of "
    "prediction. Then the log-log exponent of time per epoch against n, disk throughput "
    "as % of in memory, each model over scANVI, and 2 CPU DDP processes vs 1.",
    {"scale": ("train_cells_per_second",), "scaling": ("time_exponent",)},
)
def scale_study(
    seed: int,
    outdir: str | Path | None = None,
    sizes: int | Sequence[int] = (10_000, 100_000, 1_000_000),
    methods: str | Sequence[str] = DEFAULT_SCALE_METHODS,
    storages: str | Sequence[str] = SCALE_STORAGES,
    epochs: int = 1,
    ddp: bool = True,
    n_genes: int = 2000,
    data_dir: str | Path | None = None,
    batch_size: int = 256,
    train_size: float = 0.9,
    measurement_timeout: float | None = None,
    torch_threads: int | None = None,
    reuse_only: bool = False,
    block_size: int | None = None,
    accelerator: str = "cpu",
    precision: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Measure every method x storage x size; tables and log-log PNGs (in ``outdir``).

    ``epochs`` per measurement (2 or more also give the later epochs' throughput, without
    the first epoch's one-time costs); ``ddp`` adds 2 CPU DDP processes on the backed h5ad
    at the smallest size; ``data_dir`` caches the simulated files (default:
    ``outdir/data``); measurements already in ``outdir/measurements`` for the same
    settings are reused;
    ``measurement_timeout`` (seconds) records a measurement that runs longer as failed;
    ``torch_threads`` sets the threads of one-process runs (``None``: torch's default, one
    per core; on a shared machine 1 thread is far less sensitive to the other load);
    ``reuse_only`` reports the measurements already in ``outdir/measurements`` and
    measures nothing (missing ones are rows marked so, and no data is written);
    ``block_size`` sets our models' training blocks from an h5ad (``None``: the library's
    default, 32 rows on disk; 1: single rows, as scANVI's loader); ``accelerator``
    (``"gpu"``...) and ``precision`` (``"bf16-mixed"``...) are those of the one-process
    runs (DDP runs stay on the CPU, in 32-true: the ``ddp`` table then leaves their
    speedup empty, with a note, rather than compare across devices or precisions).
    """
    sizes = sorted(_as_tuple(sizes))
    methods, storages = _as_tuple(methods), _as_tuple(storages)
    _check_choices(methods, SCALE_METHODS, "method(s)")
    _check_choices(storages, SCALE_STORAGES, "storage(s)")
    _check_choices([accelerator], SCALE_ACCELERATORS, "accelerator")
    if precision is not None:
        _check_choices([precision], SCALE_PRECISIONS, "precision")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}.")
    if block_size is not None:
        from scvi_ext.base import check_block_size

        block_size = check_block_size(block_size)
    outdir = Path(outdir if outdir is not None else "scale_benchmark")
    data_dir = Path(data_dir) if data_dir is not None else outdir / "data"
    if "soma" in storages:
        try:
            from scvi_ext.base import SomaDataModule  # noqa: F401
            from scvi_ext.data import write_soma  # noqa: F401
        except ImportError as error:
            logger.warning("Leaving out the soma rows: %s", error)
            storages = tuple(s for s in storages if s != "soma")
    runs = [(n, method, storage, 1) for n in sizes for storage in storages for method in methods]
    if ddp:
        runs += [(sizes[0], method, "backed", 2) for method in methods]
    rows = []
    for n_cells, method, storage, processes in runs:
        if reuse_only:
            files = _file_names(n_cells, n_genes, seed, data_dir)
        else:
            files = simulated_files(n_cells, n_genes, seed, data_dir, soma=storage == "soma")
        spec = {
            "method": method,
            "storage": storage,
            "path": str(files["soma" if storage == "soma" else "h5ad"]),
            "h5ad": str(files["h5ad"]),
            "n_cells": n_cells,
            "n_genes": n_genes,
            "epochs": epochs,
            "batch_size": batch_size,
            "train_size": train_size,
            "seed": seed,
            "processes": processes,
            "torch_threads": torch_threads,
        }
        # only when set, so that earlier measurements stay reusable
        if block_size is not None:
            spec["block_size"] = block_size
        if accelerator != "cpu" and processes == 1:
            spec["accelerator"] = accelerator
        if precision is not None and processes == 1:
            spec["precision"] = precision
        result = run_measurement(spec, outdir / "measurements", measurement_timeout, reuse_only)
        rows.append(
            {
                "measurement": f"{method} / {storage} / n={n_cells} / {processes} proc",
                "method": method,
                "storage": storage,
                "n_cells": n_cells,
                "processes": processes,
                **{column: result.get(column, np.nan) for column in _COLUMNS},
                "train_call_seconds": result.get("train_call_seconds", np.nan),
                "torch_threads": result.get("torch_threads", np.nan),
                "device": result.get("device", ""),
                "precision": spec.get("precision", ""),
                "load_before": result.get("load_before", np.nan),
                "error": result.get("error", ""),
            }
        )
        logger.info("%s", rows[-1])
    table = pd.DataFrame(rows)
    outdir.mkdir(parents=True, exist_ok=True)
    plot_scaling(table, outdir / f"scale_loglog_seed{seed}.png")
    tables = {
        "scale": table,
        "scaling": scaling_exponents(table),
        "disk_vs_memory": _ratios(table, "storage", "memory", percent=True),
        "vs_scanvi": _ratios(table, "method", "scanvi", percent=False),
        "ddp": ddp_table(table),
    }
    return {name: frame for name, frame in tables.items() if not frame.empty}
