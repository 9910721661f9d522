"""ScNym: semi-supervised adversarial cell type annotation transfer."""

from __future__ import annotations

import logging

import pandas as pd
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import CategoricalObsField
from scvi.model.base import ArchesMixin, BaseModelClass, UnsupervisedTrainingMixin

from scvi_ext.base import (
    ClassifierMixin,
    EmbeddingMixin,
    PairedDataSplitter,
    labelled_mask,
    register_labelled_anndata,
    setup_anndata_method,
)

from ._module import DOMAIN_KEY, ScNymModule
from ._plan import ScNymTrainingPlan

logger = logging.getLogger(__name__)


class ScNym(
    ClassifierMixin, EmbeddingMixin, ArchesMixin, UnsupervisedTrainingMixin, BaseModelClass
):
    """scNym cell type classifier (Kimmel & Kelley, Genome Research 2021).

    A classifier trained on labelled reference cells and, at the same time, on the
    unlabeled query cells of the same AnnData: MixMatch pseudolabel consistency and a
    domain adversary make its latent space and decisions transfer across conditions,
    technologies or batches.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; cells whose label is the
        unlabeled category are the query.
    n_hidden
        Units per hidden layer (paper: 256).
    n_layers
        Hidden layers (reference code: 2).
    dropout_rate
        Dropout after each hidden layer.

    Examples
    --------
    >>> ScNym.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    >>> model = ScNym(adata)
    >>> model.train()
    >>> adata.obs["scnym"] = model.predict()
    """

    _module_cls = ScNymModule
    _training_plan_cls = ScNymTrainingPlan
    _data_splitter_cls = PairedDataSplitter
    #: The reference code's 100 epochs, the paper's minibatch of 256; 10% of the labelled
    #: cells validate (their best epoch's weights are kept), no early stopping.
    _batch_at_inference = True  # the batch is a covariate of the first layer
    train_defaults = {
        "max_epochs": 100,
        "train_size": 0.9,
        "batch_size": 256,
        "early_stopping": False,
    }

    @setup_anndata_method
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str | None = "Unknown",
        layer: str | None = None,
        batch_key: str | None = None,
        domain_key: str | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData with raw counts for :class:`ScNym`.

        Parameters
        ----------
        %(param_adata)s
        %(param_cell_types)s
        %(param_unlabeled_or_none)s
        %(param_layer)s
        batch_key
            Optional ``obs`` column of batches, given to the first layer as a one-hot
            covariate (needed for scArches query mapping to new batches).
        domain_key
            Optional ``obs`` column of domains for the adversary; default: reference vs
            query.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = [CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key)]
        if domain_key is not None:
            fields.append(CategoricalObsField(DOMAIN_KEY, domain_key))
        register_labelled_anndata(cls, adata, setup_method_args, fields=fields, **kwargs)

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
    ):
        super().__init__(adata, registry=registry)
        n_labels = len(self.label_names)
        has_domain = DOMAIN_KEY in self.registry_["field_registries"]
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=n_labels,
            n_batch=self.summary_stats.n_batch,
            n_domains=self.summary_stats[f"n_{DOMAIN_KEY}"] if has_domain else 2,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
        )
        self.init_params_ = self._get_init_params(locals())

    def _smallest_batch_size(self) -> int:
        """Each step normalises a labelled and a query minibatch together (BatchNorm): two
        cells at ``batch_size=1``, unless the AnnData lacks one of the two kinds of cells."""
        if self.adata_manager is not None:
            labelled = labelled_mask(self.adata_manager)
            if labelled.any() and not labelled.all():
                return 1
        return 2

    def _light_copy(self, adata: AnnData) -> AnnData:
        """The base's light copy (batches checked: the first layer reads them). Domains only
        steer the adversary during training, so any domain (or none) is accepted here."""
        light = super()._light_copy(adata)
        domain_key = self.setup_args.get("domain_key")
        if domain_key is not None:
            state = self.registry_["field_registries"][DOMAIN_KEY]["state_registry"]
            first_domain = state["categorical_mapping"][0]
            light.obs[domain_key] = pd.Categorical([first_domain] * light.n_obs)
        return light

    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model, **kwargs) -> ScNym:
        """scArches query model (see :meth:`~scvi_ext.base.InferenceMixin.load_query_data`).

        Trainable after the call: the first-layer weights of new batch categories (all
        other encoder weights are held by gradient hooks) and the domain adversary,
        which learns the query's domains. BatchNorm statistics and the classifier are
        frozen (``freeze_classifier=False`` unfreezes the classifier).
        """
        return super().load_query_data(adata, reference_model, **kwargs)

    def _freeze_for_query(self) -> None:
        """The domain adversary trains in a query model (it learns the query's domains)."""
        for parameter in self.module.domain_adversary.parameters():
            parameter.requires_grad = True
