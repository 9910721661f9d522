"""The model contract (docs/adding_a_model.md) and the parts several methods share.

Capabilities, each a mixin whose module satisfies a protocol: :class:`InferenceMixin`
(every model: data at the door, training, loading, query mapping), :class:`EmbeddingMixin`
and :class:`ClassifierMixin`. Shared training parts: :class:`BaseTrainingPlan`, the paired
labelled/unlabeled :class:`PairedDataSplitter`; minibatch statistics; calibration; the
query-neighbour novelty score.
"""

from ._anndata import (
    MIN_GENE_FRACTION,
    align_genes,
    detached_anndata,
    registered_obs,
    registry_gene_names,
    registry_known_labels,
    registry_label_names,
)
from ._batches import check_known_batches
from ._calibration import fit_temperature
from ._classifier import (
    BASE_NOVELTY_METHODS,
    PROBABILITY_NOVELTY_METHODS,
    ClassifierMixin,
    probability_novelty,
)
from ._distributed import barrier, global_rank, is_main_process, on_main_process
from ._embedding import EmbeddingMixin
from ._inference import InferenceMixin, valid_plan_kwargs
from ._module import (
    CLASS_WEIGHT_POWERS,
    ClassBalance,
    CrossEntropyModule,
    NonGenerativeModule,
    classification_loss,
    labelled_cross_entropy,
    log_scaled_counts,
)
from ._novelty import query_neighbour_score, registered_counts
from ._plan import (
    OPTIMIZERS,
    PLAIN_ADAM_PLAN,
    BaseTrainingPlan,
    CountCheckedBatches,
    OptimizerName,
    WarmupCosineTrainingPlan,
    create_optimizer,
    sigmoid_ramp,
    validation_early_stopping,
    warmup_cosine_factor,
)
from ._protocols import (
    ClassifierModule,
    DifferentiableClassifierModule,
    EmbeddingModule,
    InferenceModule,
    TokenAttentionModule,
)
from ._sampler import BlockBatchSampler, SliceReadCSR, check_block_size
from ._setup import (
    LabelledCountsSetupMixin,
    register_labelled_anndata,
    resolve_unlabeled_category,
    setup_anndata_method,
)
from ._soma import SomaDataModule
from ._splitter import (
    LABELLED,
    UNLABELED,
    BlockDataSplitter,
    PairedDataLoader,
    PairedDataSplitter,
    drop_small_last_batch,
    labelled_mask,
)
from ._statistics import (
    class_means,
    class_sums,
    class_weights,
    fit_label_weights,
    labelled_class_weights,
)

__all__ = [
    "PLAIN_ADAM_PLAN",
    "BASE_NOVELTY_METHODS",
    "LABELLED",
    "MIN_GENE_FRACTION",
    "CLASS_WEIGHT_POWERS",
    "ClassBalance",
    "CrossEntropyModule",
    "NonGenerativeModule",
    "classification_loss",
    "labelled_cross_entropy",
    "log_scaled_counts",
    "OPTIMIZERS",
    "PROBABILITY_NOVELTY_METHODS",
    "UNLABELED",
    "BaseTrainingPlan",
    "CountCheckedBatches",
    "BlockBatchSampler",
    "SliceReadCSR",
    "check_block_size",
    "check_known_batches",
    "ClassifierMixin",
    "ClassifierModule",
    "DifferentiableClassifierModule",
    "EmbeddingMixin",
    "EmbeddingModule",
    "InferenceMixin",
    "LabelledCountsSetupMixin",
    "InferenceModule",
    "OptimizerName",
    "PairedDataLoader",
    "PairedDataSplitter",
    "BlockDataSplitter",
    "drop_small_last_batch",
    "SomaDataModule",
    "TokenAttentionModule",
    "WarmupCosineTrainingPlan",
    "align_genes",
    "barrier",
    "class_means",
    "class_sums",
    "class_weights",
    "create_optimizer",
    "detached_anndata",
    "registered_obs",
    "fit_label_weights",
    "fit_temperature",
    "global_rank",
    "is_main_process",
    "labelled_class_weights",
    "labelled_mask",
    "on_main_process",
    "probability_novelty",
    "query_neighbour_score",
    "register_labelled_anndata",
    "registered_counts",
    "registry_gene_names",
    "registry_known_labels",
    "registry_label_names",
    "resolve_unlabeled_category",
    "setup_anndata_method",
    "sigmoid_ramp",
    "valid_plan_kwargs",
    "validation_early_stopping",
    "warmup_cosine_factor",
]
