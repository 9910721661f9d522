"""CAN: capsule attention network for cell type classification."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anndata import AnnData
from scvi.model.base import ArchesMixin, BaseModelClass, UnsupervisedTrainingMixin

from scvi_ext.base import (
    PLAIN_ADAM_PLAN,
    BaseTrainingPlan,
    ClassBalance,
    ClassifierMixin,
    EmbeddingMixin,
    LabelledCountsSetupMixin,
    fit_label_weights,
)

from ._module import CANModule


class CAN(
    LabelledCountsSetupMixin,
    ClassifierMixin,
    EmbeddingMixin,
    ArchesMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """Capsule attention network (CAN; paper "Attention based models for cell type
    classification on single-cell RNA-seq data", 4.1 and 5.3).

    Each cell's ``log1p(counts / total * 1e5)`` feeds 16 capsule extractors (one batched
    layer); single-head self-attention renews the capsules, a convolution and a linear
    layer classify. Choose the genes first: the paper's are the 1000 of largest variance
    (``scvi_ext.data.select_genes(adata, "can")``).

    Parameters
    ----------
    adata
        AnnData of raw counts registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by ``load``).
    n_capsules, capsule_dim
        Capsules per cell and their size (paper: 16 x 128).
    attention_dim
        Size of the capsule attention (paper: 16).
    conv_channels, kernel_size
        Convolution output channels and kernel size (paper: 8, 5).
    dropout_rate
        Dropout on every layer (paper: 0.2).
    balance_classes
        ``True``: weight each labelled cell's cross-entropy by the inverse frequency of its
        type among the labelled cells; ``"sqrt"``: by the inverse square root of that
        frequency (rare types gain less). Refitted at every :meth:`train`, also after
        :meth:`load_query_data`. Not in the paper, whose loss is the plain cross-entropy
        (the default, ``False``); it raises the recall of rare types.

    Examples
    --------
    >>> adata = scvi_ext.data.select_genes(adata, "can")
    >>> CAN.setup_anndata(adata, labels_key="cell_type")
    >>> model = CAN(adata)
    >>> model.train()
    >>> adata.obs["can"] = model.predict()
    >>> attention = model.get_attention()  # cells x 16 x 16
    """

    _module_cls = CANModule
    _training_plan_cls = BaseTrainingPlan
    _loss_needs_labels = True  # cross-entropy only
    #: Paper 5.3: 50 epochs, no early stopping; the last epoch's weights are kept. The paper
    #: gives no minibatch size: we use 32 (chosen before the eps fix below, when it gave Adam
    #: enough steps). 10% of the labelled cells validate (not in the paper: the softmax
    #: temperature is calibrated on them, and ``validation_loss`` is logged).
    train_defaults = {
        "max_epochs": 50,
        "train_size": 0.9,
        "batch_size": 32,
        "early_stopping": False,
    }

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_capsules: int = 16,
        capsule_dim: int = 128,
        attention_dim: int = 16,
        conv_channels: int = 8,
        kernel_size: int = 5,
        dropout_rate: float = 0.2,
        balance_classes: ClassBalance = False,
    ):
        sizes = {"n_capsules": n_capsules, "capsule_dim": capsule_dim}
        sizes.update({"attention_dim": attention_dim, "conv_channels": conv_channels})
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}.")
        if not 1 <= kernel_size <= min(n_capsules, attention_dim):
            raise ValueError(
                f"kernel_size={kernel_size} must be between 1 and min(n_capsules, "
                f"attention_dim) = {min(n_capsules, attention_dim)}: the convolution runs "
                "over the capsules x attention_dim map."
            )
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), not {dropout_rate}.")
        super().__init__(adata, registry=registry)
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=len(self.label_names),
            dropout_rate=dropout_rate,
            kernel_size=kernel_size,
            balance_classes=balance_classes,
            **sizes,
        )
        self.init_params_ = self._get_init_params(locals())

    def fit_statistics(self) -> None:
        """With ``balance_classes``: the inverse-frequency weight of each cell type among
        the labelled cells (``module.label_weights``)."""
        fit_label_weights(self)

    def _default_plan_kwargs(self) -> dict:
        """Paper 5.3: Adam (its own ``eps``, 1e-8), learning rate 1e-4, no weight decay, the
        weights of the last of the 50 epochs.

        scvi's training plans default to ``eps=0.01``, above 99% of CAN's gradient entries
        (median 4e-5 at initialisation on pbmc68k_reduced: the L2-normalised features keep
        them small), so Adam's steps were a small fraction of the learning rate and 50
        epochs at 1e-4 left CAN under-fitted (pbmc68k_reduced: training accuracy 0.83).
        Our plans also restore the epoch of lowest validation loss by default: early
        stopping in effect, which the paper does not do (``restore_best_weights=True``
        brings it back).
        """
        return {**PLAIN_ADAM_PLAN, "lr": 1e-4}

    def get_attention(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Capsule-to-capsule attention of each cell (paper A.4.1).

        Parameters
        ----------
        adata
            Cells with counts (default: the model's AnnData); genes are matched by name.
        indices
            Cells of ``adata`` (default: all).
        batch_size
            Minibatch size.

        Returns
        -------
        Cells x capsules x capsules; row ``i`` of a cell is the softmax weights with which
        capsule ``i`` attends to every capsule (it sums to 1).
        """
        return self.map_minibatches(self.module.capsule_attention, adata, indices, batch_size)

    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model, **kwargs) -> CAN:
        """Fine-tune a trained CAN on labelled query cells: the last layer only (paper A.6.1).

        Every weight but the classifier's (``module.classifier``) is frozen; train the
        returned model on the query's labels. Query cell types the reference never saw
        are treated as unlabeled (with a warning): the classifier keeps the reference's
        cell types. ``freeze_classifier=True`` freezes the classifier too.

        Parameters
        ----------
        adata
            Query AnnData of raw counts with the labels column of the reference.
        reference_model
            A trained CAN or the folder it was saved to.
        **kwargs
            Passed to :meth:`scvi_ext.base.InferenceMixin.load_query_data`.
        """
        kwargs.setdefault("freeze_classifier", False)
        return super().load_query_data(adata, reference_model, **kwargs)
