"""CELLULAR: contrastive cell embeddings with cell type centroid structure."""

from scvi_ext.base import class_weights  # the thesis' eq. 2.12, shared with CAN

from ._losses import (
    batch_centroid_distances,
    batch_mixing_loss,
    cell_type_loss,
    centroid_loss,
    reference_centroid_distances,
)
from ._model import CELLULAR
from ._module import CELLULARModule, FeedForwardEncoder
from ._plan import CELLULARTrainingPlan

__all__ = [
    "CELLULAR",
    "CELLULARModule",
    "CELLULARTrainingPlan",
    "batch_centroid_distances",
    "FeedForwardEncoder",
    "batch_mixing_loss",
    "cell_type_loss",
    "centroid_loss",
    "class_weights",
    "reference_centroid_distances",
]
