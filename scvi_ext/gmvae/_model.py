"""GMVAE: scVAE's Gaussian-mixture VAE as a scvi-tools model (issue 14)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import (
    ArchesMixin,
    BaseModelClass,
    PyroSviTrainMixin,
    UnsupervisedTrainingMixin,
)

from scvi_ext.base import EmbeddingMixin, register_labelled_anndata, setup_anndata_method
from scvi_ext.data import validate_counts, validate_obs_key

from ._module import PYRO_NEEDS_MIXTURE, GMVAEModule, GMVAEPyroModule, Likelihood, Posterior
from ._plan import GMVAEPyroTrainingPlan, GMVAETrainingPlan

logger = logging.getLogger(__name__)

Backend = Literal["torch", "pyro"]


class GMVAE(
    EmbeddingMixin, ArchesMixin, UnsupervisedTrainingMixin, PyroSviTrainMixin, BaseModelClass
):
    """Gaussian-mixture VAE of raw counts (scVAE, Grønbech et al. 2020).

    A categorical cluster ``y`` (uniform prior over ``n_components``), a Gaussian ``z | y``
    with learned means and diagonal variances, counts ``x | z`` with the chosen likelihood
    and the cell's observed library size (as scVI); inference ``q(y | x)`` and
    ``q(z | x, y)``. The component is summed out exactly in the ELBO (never sampled), in
    one pass vectorised over the components. The batch, if any, is a decoder covariate
    (and an encoder one with ``encode_covariates=True``), so that
    :meth:`load_query_data` maps new batches scArches-style.

    The same networks are trained by one of two paths (``train(backend=...)``): the torch
    loss (default: analytic Gaussian KL, scvi-tools' training loop, early stopping, DDP)
    or the Pyro model/guide with ``TraceEnum_ELBO`` (scvi-tools' ``PyroSviTrainMixin``).
    docs/gmvae.md compares them (ELBO, time per epoch).

    ``posterior="gaussian"`` swaps scVAE's structured posterior for one Gaussian
    ``q(z | x)`` under scvi-tools' ``MogPrior`` (same marginal prior family; KL by Monte
    Carlo; one decode per cell); its clusters are the prior's responsibilities at
    ``E[z | x]`` (torch backend only; docs/gmvae.md measures the two).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts).
    registry
        Registry of a saved model (used by ``load``).
    n_latent, n_hidden, n_layers
        Latent size, hidden width and hidden layers (the seed: 100, 500, 1).
    n_components
        Mixture components K (the seed: 11).
    likelihood
        ``"nb"`` (the seed's), ``"zinb"`` or ``"poisson"``.
    dropout_rate
        Encoder dropout.
    encode_covariates
        Also give the batch to the encoder (scVI's default: no).
    component_balance
        Weight of a penalty on unused components added to the training loss:
        ``KL(mean over the minibatch of q(y | x) || p(y))`` (0: off, the plain ELBO;
        docs/gmvae.md measures its effect on component collapse). Torch backend and
        mixture posterior only.
    posterior
        ``"mixture"`` (default, scVAE's ``q(y | x) q(z | x, y)``, y summed out exactly) or
        ``"gaussian"``: one Gaussian ``q(z | x)`` with scvi-tools'
        ``scvi.module.base.MogPrior`` as the prior (see
        :class:`~scvi_ext.gmvae.GMVAEModule`).

    Examples
    --------
    >>> GMVAE.setup_anndata(adata, batch_key="batch")
    >>> model = GMVAE(adata, n_latent=10, n_components=11)
    >>> model.train()
    >>> adata.obsm["X_gmvae"] = model.get_latent_representation()
    >>> adata.obs["gmvae_cluster"] = model.predict_cluster().astype(str)
    """

    _module_cls = GMVAEModule
    _training_plan_cls = GMVAETrainingPlan
    #: New cells' batches must be the model's (the decoder reads them; scvi's registration
    #: needs them): checked by the base at inference and load, with a pointer to
    #: :meth:`load_query_data` (:func:`~scvi_ext.base.check_known_batches`).
    _batch_at_inference = True
    #: The seed's: 100 epochs, 80:20 split; minibatch 128; learning rate 1e-4 (plan).
    train_defaults = {
        "max_epochs": 100,
        "train_size": 0.8,
        "batch_size": 128,
        "early_stopping": True,
        "early_stopping_patience": 20,
    }
    #: The seed's learning rate (scVAE's default).
    default_lr: float = 1e-4

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_latent: int = 100,
        n_hidden: int = 500,
        n_layers: int = 1,
        n_components: int = 11,
        likelihood: Likelihood = "nb",
        dropout_rate: float = 0.1,
        encode_covariates: bool = False,
        component_balance: float = 0.0,
        posterior: Posterior = "mixture",
    ):
        super().__init__(adata, registry=registry)
        stats = self.summary_stats
        self.module = self._module_cls(
            n_input=stats.n_vars,
            n_batch=stats.n_batch,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_components=n_components,
            likelihood=likelihood,
            dropout_rate=dropout_rate,
            encode_covariates=encode_covariates,
            component_balance=component_balance,
            posterior=posterior,
        )
        self._model_summary_string = (
            f"GMVAE with n_latent={n_latent}, n_hidden={n_hidden}, n_layers={n_layers}, "
            f"n_components={n_components}, likelihood={likelihood!r}, "
            f"component_balance={component_balance}, posterior={posterior!r}"
        )
        #: Components no cell was assigned to by the last :meth:`predict_cluster` call.
        self.collapsed_components: list[int] = []
        self.init_params_ = self._get_init_params(locals())

    @setup_anndata_method
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        **kwargs,
    ) -> None:
        """Register raw counts, and optionally batches and cell types.

        Parameters
        ----------
        %(param_adata)s
        layer
            Layer of raw counts (``None``: ``X``). Counts are checked: log-normalised or
            scaled values are refused with a message.
        batch_key
            ``obs`` column of batches, a decoder covariate (``None``: one batch).
        labels_key
            Optional ``obs`` column of cell types: not used in training, but the default
            of :meth:`LatentClassifier.from_model <scvi_ext.model.LatentClassifier.from_model>`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        batch_field = CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key)
        if labels_key is not None:
            register_labelled_anndata(cls, adata, setup_method_args, [batch_field], **kwargs)
            return
        validate_counts(adata, layer)
        if batch_key is not None:
            validate_obs_key(adata, batch_key, "batch_key")
        fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True), batch_field]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    # ------------------------------------------------------------------ training
    def _default_plan_kwargs(self) -> dict:
        # Adam's eps: scvi's plans use 0.01, which on this per-cell mean loss slows Adam
        # (measured: ELBO -679 vs -677 after 10 epochs on kang_ifnb); scVAE and Pyro: 1e-8
        return {"lr": self.default_lr, "eps": 1e-8}

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int | None = None,
        early_stopping: bool | None = None,
        early_stopping_patience: int | None = None,
        plan_kwargs: dict | None = None,
        backend: Backend = "torch",
        **trainer_kwargs,
    ):
        """Train the GMVAE (Adam, learning rate 1e-4 as the seed, unless ``plan_kwargs`` says).

        Parameters
        ----------
        max_epochs, accelerator, devices, train_size, validation_size, batch_size
            As :meth:`scvi_ext.base.InferenceMixin.train` (defaults: :attr:`train_defaults`).
        early_stopping, early_stopping_patience
            On the validation negative ELBO (torch backend only).
        plan_kwargs
            Torch: :class:`~scvi_ext.gmvae.GMVAETrainingPlan` arguments (``lr``,
            ``eps``, ``weight_decay``, ``n_epochs_kl_warmup``...). Pyro: ``lr`` and ``eps``.
            Adam's ``eps`` defaults to 1e-8 (scVAE's and Pyro's) in both.
        backend
            ``"torch"`` (default): the loss with analytic Gaussian KL. ``"pyro"``: the Pyro
            model and guide with ``TraceEnum_ELBO`` through scvi-tools'
            ``PyroSviTrainMixin`` (no early stopping or best-epoch restore; one process;
            mixture posterior only).
        **trainer_kwargs
            Passed to the Lightning trainer.
        """
        if backend == "torch":
            return super().train(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                train_size=train_size,
                validation_size=validation_size,
                batch_size=batch_size,
                early_stopping=early_stopping,
                early_stopping_patience=early_stopping_patience,
                plan_kwargs=plan_kwargs,
                **trainer_kwargs,
            )
        if backend != "pyro":
            raise ValueError(f"backend must be 'torch' or 'pyro', not {backend!r}.")
        return self._train_pyro(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            plan_kwargs=plan_kwargs,
            **trainer_kwargs,
        )

    def _train_pyro(
        self,
        max_epochs: int | None,
        accelerator: str,
        devices: int | list[int] | str,
        train_size: float | None,
        validation_size: float | None,
        batch_size: int | None,
        plan_kwargs: dict | None,
        **trainer_kwargs,
    ):
        """Train the module's networks with Pyro SVI (``TraceEnum_ELBO``, y enumerated).

        The Pyro view of the networks (:class:`GMVAEPyroModule`) stands in for the module
        while scvi-tools' ``PyroSviTrainMixin.train`` runs, so that the torch module (the
        one saved, loaded and used for inference) holds the trained weights.
        """
        plan_kwargs = {**self._default_plan_kwargs(), **(plan_kwargs or {})}
        unknown = sorted(set(plan_kwargs) - {"lr", "eps"})
        if unknown:
            raise ValueError(
                f"Unknown plan_kwargs {unknown} for backend='pyro'; valid: ['eps', 'lr']."
            )
        if self.module.posterior != "mixture":
            raise ValueError(PYRO_NEEDS_MIXTURE)
        if self.module.component_balance > 0:
            raise ValueError(
                "component_balance is a term of the torch loss: train with backend='torch', "
                "or build the GMVAE with component_balance=0 to train with Pyro."
            )
        if max_epochs is None:
            max_epochs = self.train_defaults["max_epochs"]
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, not {max_epochs}.")
        if self.adata is None:
            raise ValueError("This GMVAE has no data to train on (adata=False).")
        self._check_registered_genes(self.adata)
        pyro.clear_param_store()  # the store is global: no parameters of another model
        torch_module, pyro_module = self.module, GMVAEPyroModule(self.module)
        plan = GMVAEPyroTrainingPlan(
            pyro_module,
            loss_fn=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
            optim_kwargs={"lr": plan_kwargs["lr"], "eps": plan_kwargs["eps"]},
        )
        plan.count_locations = self._count_locations
        self.module = pyro_module
        try:
            result = PyroSviTrainMixin.train(
                self,
                max_epochs=max_epochs,
                accelerator=accelerator,
                device=devices,
                train_size=train_size or self.train_defaults["train_size"],
                validation_size=validation_size,
                batch_size=batch_size or self.train_defaults["batch_size"],
                training_plan=plan,
                **trainer_kwargs,
            )
        finally:
            self.module = torch_module
            pyro.clear_param_store()
        self.module.eval()
        return result

    # ------------------------------------------------------------------ clusters
    def predict_cluster(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Mixture component of each cell: argmax of ``q(y | x)`` (``posterior="gaussian"``:
        of the prior's responsibilities ``p(y | z)`` at ``z = E[z | x]``).

        Components to which no cell is assigned (collapsed, or unused by these cells) are
        reported, not hidden: a ``UserWarning`` names them and
        :attr:`collapsed_components` holds them (empty when every component has cells).

        Parameters
        ----------
        adata
            Cells with counts (default: the model's); genes are matched by name.
        indices
            Cells of ``adata`` (default: all).
        soft
            Return ``q(y | x)`` (or ``p(y | E[z | x])``): a cells x components DataFrame
            (columns 0..K-1).
        batch_size
            Minibatch size.

        Returns
        -------
        Integer component per cell, or the DataFrame of probabilities (``soft=True``).
        """
        proba = self.map_minibatches(self.module.cluster_probabilities, adata, indices, batch_size)
        clusters = proba.argmax(axis=1)
        counts = np.bincount(clusters, minlength=self.module.n_components)
        self.collapsed_components = [int(k) for k in np.flatnonzero(counts == 0)]
        if self.collapsed_components:
            warnings.warn(
                f"{len(self.collapsed_components)} of {self.module.n_components} GMVAE "
                f"components have no cell assigned: {self.collapsed_components} "
                "(model.collapsed_components). Fewer clusters than n_components are in use.",
                UserWarning,
                stacklevel=2,
            )
        if not soft:
            return clusters
        return pd.DataFrame(
            proba, index=self.cell_names(adata, indices), columns=range(self.module.n_components)
        )

    # ------------------------------------------------------------------ scVI-style outputs
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | int | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1.0,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_numpy: bool = False,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression, as scVI's: the decoder's frequencies times ``library_size``.

        The frequencies are averaged over ``q(y | x)`` (each component's decoding weighted
        by its probability; not with ``posterior="gaussian"``) and ``n_samples`` draws of
        ``z``.

        Parameters
        ----------
        adata, indices, batch_size
            Cells (default: the model's; genes matched by name) and minibatch size.
        transform_batch
            Decode every cell as this batch (a category of ``batch_key``).
        gene_list
            Genes to return (default: all).
        library_size
            Scale of the frequencies (1: they sum to 1 per cell); ``"latent"``: each
            cell's observed library size.
        n_samples
            Draws of z per component.
        return_numpy
            Return an array instead of a cells x genes DataFrame.
        """
        if isinstance(gene_list, str):
            gene_list = [gene_list]
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer of at least 1, not {n_samples!r}.")
        if library_size != "latent" and (
            isinstance(library_size, str | bool)
            or not isinstance(library_size, int | float | np.number)
            or not library_size > 0
        ):
            raise ValueError(
                f"library_size must be a number > 0 or 'latent' (each cell's observed total "
                f"count), not {library_size!r}."
            )
        batch_code = None
        if transform_batch is not None:
            mapping = self.batch_categories
            if str(transform_batch) not in mapping:
                raise ValueError(
                    f"transform_batch {transform_batch!r} is not a batch of this model "
                    f"(batches: {mapping})."
                )
            batch_code = mapping.index(str(transform_batch))

        def expression(tensors: dict) -> torch.Tensor:
            scale = self.module.normalized_expression(tensors, batch_code, n_samples)
            if library_size == "latent":
                return scale * tensors[REGISTRY_KEYS.X_KEY].sum(-1, keepdim=True).to(scale)
            return scale * library_size

        values = self.map_minibatches(expression, adata, indices, batch_size)
        genes = self.gene_names
        if gene_list is not None:
            missing = sorted(set(gene_list) - set(genes))
            if missing:
                raise ValueError(f"gene_list has genes the model lacks: {missing[:5]}.")
            columns = genes.get_indexer(list(gene_list))
            values, genes = values[:, columns], genes[columns]
        if return_numpy:
            return values
        return pd.DataFrame(values, index=self.cell_names(adata, indices), columns=genes)

    @property
    def batch_categories(self) -> list[str]:
        """The batch categories of the model, in code order."""
        state = self.registry_["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
        return [str(name) for name in state["categorical_mapping"]]

    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Evidence lower bound (higher is better), as scVI's ``get_elbo``: y summed out
        exactly, z one posterior sample per component, Gaussian KL analytic
        (``posterior="gaussian"``: one sample of z, ``MogPrior``'s Monte Carlo KL).

        Returns the mean over cells, or one value per cell (``return_mean=False``).
        """
        values = -self.map_minibatches(self.module.negative_elbo, adata, indices, batch_size)
        return float(values.mean()) if return_mean else values

    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        """``{"reconstruction_loss": -E_q log p(x | z)}`` as scVI's (lower is better).

        The expectation is over ``q(y | x)`` exactly and one sample of z per component.
        """
        values = self.map_minibatches(self.module.reconstruction_error, adata, indices, batch_size)
        return {"reconstruction_loss": float(values.mean()) if return_mean else values}
