"""Parts several methods share: the classifier mixin, the paired splitter, the plan base,
the query-neighbour novelty score."""

from ._anndata import detached_anndata, label_names, registry_label_names
from ._mixin import BASE_NOVELTY_METHODS, MIN_GENE_FRACTION, ClassifierMixin
from ._novelty import query_neighbour_score, registered_counts
from ._plan import (
    OPTIMIZERS,
    BaseTrainingPlan,
    WarmupCosineMixin,
    create_optimizer,
    sigmoid_ramp,
    validation_early_stopping,
    warmup_cosine_factor,
)
from ._splitter import LABELLED, UNLABELLED, PairedDataLoader, PairedDataSplitter, labelled_mask

__all__ = [
    "BASE_NOVELTY_METHODS",
    "LABELLED",
    "MIN_GENE_FRACTION",
    "OPTIMIZERS",
    "UNLABELLED",
    "BaseTrainingPlan",
    "ClassifierMixin",
    "PairedDataLoader",
    "PairedDataSplitter",
    "WarmupCosineMixin",
    "create_optimizer",
    "detached_anndata",
    "label_names",
    "labelled_mask",
    "query_neighbour_score",
    "registered_counts",
    "registry_label_names",
    "sigmoid_ramp",
    "validation_early_stopping",
    "warmup_cosine_factor",
]
