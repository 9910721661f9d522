"""Capability of embedding models: one latent vector per cell."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anndata import AnnData

from ._inference import InferenceMixin


class EmbeddingMixin(InferenceMixin):
    """``get_latent_representation`` (capability b); the module satisfies
    :class:`~scvi_ext.base.EmbeddingModule`."""

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """The model's embedding of each cell.

        Parameters
        ----------
        adata
            Cells with counts (default: the model's AnnData); genes are matched by name.
        indices
            Cells of ``adata`` to embed (default: all).
        batch_size
            Minibatch size.

        Returns
        -------
        Cells x latent dimensions.
        """
        return self.map_minibatches(self.module.latent, adata, indices, batch_size)
