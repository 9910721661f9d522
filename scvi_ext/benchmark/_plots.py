"""Benchmark figures, drawn with matplotlib's object API (Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._methods import MethodResult


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_accuracy(results: pd.DataFrame, path: str | Path) -> None:
    """Bars of mean accuracy and balanced accuracy per method, one point per seed.

    Parameters
    ----------
    results
        Per-seed results (columns ``method``, ``accuracy``, ``balanced_accuracy``).
    path
        PNG file to write.
    """
    methods = list(dict.fromkeys(results["method"]))
    metrics = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")]
    width = 0.38
    figure = _new_figure(1.2 + 1.3 * len(methods), 3.6)
    axes = figure.subplots()
    positions = np.arange(len(methods))
    for offset, (column, label) in zip((-width / 2, width / 2), metrics, strict=True):
        means = [results.loc[results["method"] == name, column].mean() for name in methods]
        axes.bar(positions + offset, means, width, label=label, alpha=0.8)
        for position, name in zip(positions, methods, strict=True):
            values = results.loc[results["method"] == name, column].to_numpy()
            axes.scatter(np.full(len(values), position + offset), values, color="k", s=12)
    axes.set_xticks(positions, methods, rotation=20, ha="right")
    axes.set_ylim(0, 1.18)
    axes.set_yticks(np.linspace(0, 1, 6))
    axes.set_ylabel("query score")
    axes.legend(loc="upper center", ncols=2, fontsize="small", frameon=False)
    axes.set_title("Annotation transfer (points: seeds)")
    figure.savefig(path, dpi=120)


def plot_reliability(
    y_true: np.ndarray, results: dict[str, MethodResult], path: str | Path, n_bins: int = 15
) -> None:
    """Reliability diagram of each method: accuracy against mean confidence per bin.

    Marker area is proportional to the number of cells in the bin.

    Parameters
    ----------
    y_true
        True query labels.
    results
        Method outputs, by name.
    path
        PNG file to write.
    n_bins
        Confidence bins.
    """
    from scvi_ext.metrics import classification_report, reliability_curve

    figure = _new_figure(3.0 * max(1, len(results)), 3.2)
    axes_list = np.atleast_1d(figure.subplots(1, max(1, len(results)), sharey=True))
    for axes, (name, result) in zip(axes_list, results.items(), strict=False):
        curve = reliability_curve(y_true, result.predictions, result.confidence, n_bins=n_bins)
        curve = curve[curve["count"] > 0]
        ece = classification_report(y_true, result.predictions, result.confidence)["ece"]
        sizes = 200 * curve["count"].to_numpy(dtype=float) / curve["count"].sum()
        axes.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        axes.plot(curve["mean_confidence"], curve["accuracy"], "-", color="C0", lw=1)
        axes.scatter(
            curve["mean_confidence"], curve["accuracy"], s=10 + sizes, color="C0", zorder=3
        )
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("mean confidence in bin")
        axes.set_title(f"{name}\nECE {ece:.3f}", fontsize="medium")
    axes_list[0].set_ylabel("accuracy")
    figure.savefig(path, dpi=120)


def plot_umap(
    umap: np.ndarray, y_true: np.ndarray, results: dict[str, MethodResult], path: str | Path
) -> None:
    """UMAP of the query cells coloured by the true labels and by each method's predictions.

    Parameters
    ----------
    umap
        2-D coordinates of the query cells.
    y_true
        True query labels.
    results
        Method outputs, by name.
    path
        PNG file to write.
    """
    panels = {"truth": np.asarray(y_true).astype(str)}
    panels.update({name: np.asarray(r.predictions).astype(str) for name, r in results.items()})
    labels = sorted(set().union(*(set(values) for values in panels.values())))
    palette = _palette(len(labels))
    colour_of = dict(zip(labels, palette, strict=True))

    n_columns = min(3, len(panels))
    n_rows = int(np.ceil(len(panels) / n_columns))
    figure = _new_figure(3.4 * n_columns + 1.6, 3.2 * n_rows)
    axes_grid = np.atleast_1d(figure.subplots(n_rows, n_columns)).ravel()
    for axes, (name, values) in zip(axes_grid, panels.items(), strict=False):
        colours = [colour_of[value] for value in values]
        axes.scatter(umap[:, 0], umap[:, 1], c=colours, s=4, linewidths=0)
        title = name
        if name != "truth":
            title += f" (accuracy {np.mean(values == panels['truth']):.2f})"
        axes.set_title(title, fontsize="medium")
        axes.set_xticks([])
        axes.set_yticks([])
    for axes in axes_grid[len(panels) :]:
        axes.set_axis_off()
    handles = [
        axes_grid[0].scatter([], [], color=colour_of[label], label=label, s=20) for label in labels
    ]
    figure.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    figure.suptitle("Query cells, UMAP of log-normalised expression")
    figure.savefig(path, dpi=120)


def _palette(n_colours: int) -> list:
    from matplotlib import colormaps

    name = "tab10" if n_colours <= 10 else "tab20"
    colours = list(colormaps[name].colors)
    if n_colours > len(colours):
        colours = [colormaps["nipy_spectral"](x) for x in np.linspace(0.05, 0.95, n_colours)]
    return colours[:n_colours]


def plot_study(table: pd.DataFrame, columns: Sequence[str], path: str | Path) -> None:
    """Horizontal bars of ``columns`` per row label (first column), one point per seed.

    Parameters
    ----------
    table
        A study table with a ``seed`` column; its first column names the rows.
    columns
        Numeric columns to draw, one bar each per row.
    path
        PNG file to write.
    """
    key = table.columns[0]
    labels = list(dict.fromkeys(table[key].astype(str)))
    height = 0.8 / len(columns)
    figure = _new_figure(6.5, 1.2 + 0.3 * len(labels) * len(columns))
    axes = figure.subplots()
    positions = np.arange(len(labels))
    for number, column in enumerate(columns):
        offset = (number - (len(columns) - 1) / 2) * height
        values = [
            table.loc[table[key].astype(str) == label, column].to_numpy(float) for label in labels
        ]
        axes.barh(positions + offset, [v.mean() for v in values], height, alpha=0.8, label=column)
        for position, points in zip(positions, values, strict=True):
            axes.scatter(points, np.full(len(points), position + offset), color="k", s=10)
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    if len(columns) > 1:
        axes.legend(fontsize="small", frameon=False, loc="lower right")
    axes.set_xlabel(columns[0].replace("_", " ") if len(columns) == 1 else "value")
    axes.set_title(f"{key.replace('_', ' ')}: points are seeds")
    figure.savefig(path, dpi=120)
