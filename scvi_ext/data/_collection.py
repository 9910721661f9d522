"""Several h5ad files read as one AnnData-like object, through scvi-tools' AnnCollection support."""

from __future__ import annotations

import os
from collections.abc import Sequence

import anndata as ad
import pandas as pd
from anndata.experimental import AnnCollection
from scvi.dataloaders import CollectionAdapter


class Collection(CollectionAdapter):
    """scvi-tools' :class:`~scvi.dataloaders.CollectionAdapter` with an ``uns`` of its own.

    scvi-tools' adapter keeps ``uns`` (where registration stores the AnnData's id) in one
    dictionary shared by every adapter, so two registered collections would overwrite
    each other's id; this one keeps its own.
    """

    def __init__(self, collection: AnnCollection):
        super().__init__(collection)
        self.uns = {}


class CollectionWithObs(Collection):
    """A :class:`Collection` over the same files with its own ``obs`` (a light copy)."""

    def __init__(self, collection: AnnCollection, obs: pd.DataFrame):
        super().__init__(collection)
        self.obs = obs


def read_collection(
    paths: Sequence[str | os.PathLike], label: str | None = None, layer: str = "counts"
) -> Collection:
    """Open several h5ad files read-only (backed) as one collection that every model takes.

    Genes are matched by name across files (the genes all files share, in the first file's
    order); ``obs`` holds the columns all files share. Register it with a model's
    ``setup_anndata(collection, layer=layer, ...)``: scvi-tools reads an AnnCollection
    through a layer. Nothing is loaded into memory but ``obs``.

    Parameters
    ----------
    paths
        The h5ad files; each needs the counts in ``layers[layer]``.
    label
        Optional ``obs`` column naming, for each cell, the file it came from (its index in
        ``paths``).
    layer
        The layer holding raw counts (checked in every file).

    Raises
    ------
    ValueError
        When a file lacks ``layer``.
    """
    parts = [ad.read_h5ad(path, backed="r") for path in paths]
    for path, part in zip(paths, parts, strict=True):
        if layer not in part.layers:
            available = ", ".join(repr(name) for name in part.layers) or "none"
            for opened in parts:
                opened.file.close()
            raise ValueError(
                f"{os.fspath(path)} has no layer '{layer}' (its layers: {available}); "
                "AnnCollections are read through a layer holding raw counts: write the "
                "counts to that layer, or pass layer=."
            )
    collection = AnnCollection(parts, join_obs="inner", join_vars="inner", label=label)
    return Collection(collection)
