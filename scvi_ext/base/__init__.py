"""Parts several methods share: the classifier mixin, the paired splitter, the plan base."""

from ._anndata import detached_anndata, label_names, registry_label_names
from ._mixin import MIN_GENE_FRACTION, ClassifierMixin
from ._plan import (
    OPTIMIZERS,
    BaseTrainingPlan,
    WarmupCosineMixin,
    sigmoid_ramp,
    validation_early_stopping,
    warmup_cosine_factor,
)
from ._splitter import LABELLED, UNLABELLED, PairedDataLoader, PairedDataSplitter, labelled_mask

__all__ = [
    "LABELLED",
    "MIN_GENE_FRACTION",
    "OPTIMIZERS",
    "UNLABELLED",
    "BaseTrainingPlan",
    "ClassifierMixin",
    "PairedDataLoader",
    "PairedDataSplitter",
    "WarmupCosineMixin",
    "detached_anndata",
    "label_names",
    "labelled_mask",
    "registry_label_names",
    "sigmoid_ramp",
    "validation_early_stopping",
    "warmup_cosine_factor",
]
