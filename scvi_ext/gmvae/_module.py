"""GMVAE networks (scVAE's Gaussian-mixture VAE), with its ELBO in torch and in Pyro.

One set of networks (:class:`GMVAEModule`) serves two ways of computing the same
objective, the component ``y`` summed out exactly (never sampled):

- :meth:`GMVAEModule.loss`, a torch ``LossOutput`` with the Gaussian KL terms analytic;
- :class:`GMVAEPyroModule`, a scvi-tools ``PyroBaseModuleClass`` whose ``model`` and
  ``guide`` use the same networks and are trained with ``TraceEnum_ELBO`` (``y``
  enumerated in parallel by ``config_enumerate``).

Both are vectorised over the K components: the encoder runs once, the K posteriors
``q(z | x, y=k)`` differ by a per-component offset, and the K samples are decoded in one
batch of ``K x cells`` rows.

With ``posterior="gaussian"`` the module is instead a VAE with one Gaussian posterior
``q(z | x)`` and scvi-tools' own mixture prior, ``scvi.module.base.MogPrior`` (its KL a
Monte Carlo estimate), decoding one sample per cell; clusters are the prior's
responsibilities ``p(y | z)`` at ``E[z | x]``. Torch loss only.
"""

from __future__ import annotations

from typing import Literal

import pyro
import pyro.distributions as pyro_dist
import torch
import torch.nn.functional as F
from pyro.infer import config_enumerate
from scvi import REGISTRY_KEYS
from scvi.distributions import ZeroInflatedNegativeBinomial
from scvi.module.base import (
    BaseModuleClass,
    LossOutput,
    MogPrior,
    PyroBaseModuleClass,
    auto_move_data,
)
from scvi.nn import FCLayers
from torch import nn
from torch.distributions import Normal, kl_divergence

Likelihood = Literal["nb", "zinb", "poisson"]
LIKELIHOODS: tuple[str, ...] = ("nb", "zinb", "poisson")
Posterior = Literal["mixture", "gaussian"]
POSTERIORS: tuple[str, ...] = ("mixture", "gaussian")
#: Lower bound of the Gaussian scales (numerical safety).
MIN_SCALE = 1e-4
#: Why the Pyro backend refuses the Gaussian posterior.
PYRO_NEEDS_MIXTURE = (
    "backend='pyro' trains the mixture posterior only (MogPrior's KL is a torch loss): "
    "train with backend='torch', or build the GMVAE with posterior='mixture'."
)


class GMVAEModule(BaseModuleClass):
    """scVAE's GMVAE: p(y) p(z | y) p(x | z, library, batch); q(y | x) q(z | x, y).

    - ``p(y)``: uniform over ``n_components`` (scVAE); ``p(z | y=k) = N(mu_k, diag
      sigma_k^2)`` with learned means and scales;
    - ``p(x | z)``: negative binomial (gene-wise dispersion), zero-inflated NB or Poisson
      with mean ``library * softmax(decoder(z, batch))``, the library being the cell's
      observed total count (as scVI with ``use_observed_lib_size``);
    - ``q(y | x)``: softmax of a linear head on the encoder; ``q(z | x, y=k)``: a Gaussian
      whose mean and log-scale are linear in (encoder output, one-hot ``k``).

    The encoder reads ``log1p(counts)`` (and the batch when ``encode_covariates``); the
    decoder always reads the batch. Both are scvi ``FCLayers`` named ``encoder`` and
    ``decoder``, so that scArches query mapping trains only their new batch columns.

    Parameters
    ----------
    n_input
        Genes.
    n_batch
        Batches (1: none).
    n_latent, n_hidden, n_layers
        Latent size, hidden width and hidden layers of encoder and decoder.
    n_components
        Mixture components K.
    likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    dropout_rate
        Dropout of the encoder.
    encode_covariates
        Give the batch to the encoder too (scVI's default: no).
    component_balance
        Weight of :meth:`component_balance_penalty` added to the training loss (0: the
        plain negative ELBO, scVAE's objective). Mixture posterior only.
    posterior
        ``"mixture"`` (scVAE's ``q(y | x) q(z | x, y)``, above) or ``"gaussian"``: one
        Gaussian ``q(z | x)`` (the same encoder and ``z_mean``/``z_log_scale`` heads, no
        component offsets, no ``q(y | x)``) with scvi-tools' ``MogPrior(n_components,
        n_latent)`` as ``p(z)`` (attribute ``mog_prior``; learned weights, means and
        scales; KL by 30 posterior samples) and one decode per cell.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
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
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}.")
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, not {posterior!r}.")
        if not isinstance(component_balance, int | float) or not component_balance >= 0:
            raise ValueError(
                f"component_balance must be a number >= 0 (0: off), not {component_balance!r}."
            )
        if posterior == "gaussian" and component_balance > 0:
            raise ValueError(
                "component_balance acts on q(y | x), which posterior='gaussian' does not have: "
                "pass component_balance=0, or posterior='mixture'."
            )
        self.posterior = posterior
        self.component_balance = float(component_balance)
        self.n_components, self.n_latent, self.likelihood = n_components, n_latent, likelihood
        self.encode_covariates = encode_covariates
        self.encoder = FCLayers(
            n_input,
            n_hidden,
            [n_batch] if encode_covariates else None,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
        )
        if posterior == "mixture":
            self.y_logits = nn.Linear(n_hidden, n_components)
        # q(z | x, y=k): linear in (h, onehot(k)), i.e. a shared map of h plus a k offset
        self.z_mean = nn.Linear(n_hidden, n_latent)
        self.z_log_scale = nn.Linear(n_hidden, n_latent)
        if posterior == "mixture":
            self.z_mean_offset = nn.Parameter(torch.zeros(n_components, n_latent))
            self.z_log_scale_offset = nn.Parameter(torch.zeros(n_components, n_latent))
            # p(z | y=k)
            self.prior_means = nn.Parameter(torch.randn(n_components, n_latent))
            self.prior_log_scales = nn.Parameter(torch.zeros(n_components, n_latent))
            self.register_buffer("prior_logits", torch.zeros(n_components))  # uniform p(y)
        else:
            self.mog_prior = MogPrior(n_components, n_latent)
        self.decoder = FCLayers(
            n_latent, n_hidden, [n_batch], n_layers=n_layers, n_hidden=n_hidden, dropout_rate=0
        )
        self.px_scale = nn.Linear(n_hidden, n_input)
        self.px_dropout = nn.Linear(n_hidden, n_input) if likelihood == "zinb" else None
        self.px_log_theta = nn.Parameter(torch.zeros(n_input))

    # ------------------------------------------------------------------ networks
    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "batch_index": tensors[REGISTRY_KEYS.BATCH_KEY]}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {
            "z": inference_outputs["z"],
            "batch_index": tensors[REGISTRY_KEYS.BATCH_KEY],
            "library": inference_outputs["library"],
        }

    def encode(self, x: torch.Tensor, batch_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``q(y | x)`` logits (cells, K) and ``q(z | x, y)`` for every component (K, cells, L);
        with the Gaussian posterior, ``q(z | x)`` (cells, L) and no ``qy_logits``."""
        covariates = (batch_index,) if self.encode_covariates else ()
        h = self.encoder(torch.log1p(x), *covariates)
        if self.posterior == "gaussian":
            z_scale = torch.exp(self.z_log_scale(h)) + MIN_SCALE
            return {"qz_mean": self.z_mean(h), "qz_scale": z_scale, "h": h}
        z_mean = self.z_mean(h)[None] + self.z_mean_offset[:, None]
        z_scale = torch.exp(self.z_log_scale(h)[None] + self.z_log_scale_offset[:, None])
        return {
            "qy_logits": self.y_logits(h),
            "qz_mean": z_mean,
            "qz_scale": z_scale + MIN_SCALE,
            "h": h,
        }

    def component_posterior(self, h: torch.Tensor, y: torch.Tensor) -> Normal:
        """``q(z | x, y)`` for given components ``y`` (any shape broadcasting with cells)."""
        mean = self.z_mean(h) + self.z_mean_offset[y]
        scale = torch.exp(self.z_log_scale(h) + self.z_log_scale_offset[y]) + MIN_SCALE
        return Normal(mean, scale, validate_args=False)

    def prior(self, y: torch.Tensor | None = None) -> Normal:
        """``p(z | y)`` (all K components when ``y`` is ``None``)."""
        if self.posterior == "gaussian":
            components = self.mog_prior.get_prior(None).component_distribution.base_dist
            means, scales = components.loc, components.scale  # MogPrior's own parameters
            if y is not None:
                means, scales = means[y], scales[y]
            return Normal(means, scales, validate_args=False)
        means, log_scales = self.prior_means, self.prior_log_scales
        if y is not None:
            means, log_scales = means[y], log_scales[y]
        return Normal(means, torch.exp(log_scales) + MIN_SCALE, validate_args=False)

    def decode(
        self, z: torch.Tensor, batch_index: torch.Tensor, library: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Expression parameters of ``z`` (any leading shape ending in cells, latent).

        All components' samples go through the decoder as one batch of rows.
        """
        leading = z.shape[:-1]
        flat_z = z.reshape(-1, z.shape[-1])
        flat_batch = batch_index.reshape(-1).expand(leading).reshape(-1, 1)
        h = self.decoder(flat_z, flat_batch)
        log_scale = F.log_softmax(self.px_scale(h), dim=-1).reshape(*leading, -1)
        scale = log_scale.exp()
        outputs = {
            "px_scale": scale,
            "px_rate": library * scale,
            "px_log_rate": torch.log(library) + log_scale,
        }
        if self.px_dropout is not None:
            outputs["px_dropout"] = self.px_dropout(h).reshape(*leading, -1)
        return outputs

    def log_likelihood(self, x: torch.Tensor, decoded: dict) -> torch.Tensor:
        """``log p(x | z)`` summed over genes (shape: the leading shape of ``decoded``).

        For NB and Poisson the terms that do not depend on z (``lgamma``) are computed
        once per cell, not once per component.
        """
        rate, log_rate = decoded["px_rate"], decoded["px_log_rate"]
        if self.likelihood == "poisson":
            return (x * log_rate - rate).sum(-1) - torch.lgamma(x + 1).sum(-1)
        theta = torch.exp(self.px_log_theta)
        if self.likelihood == "zinb":
            dist = ZeroInflatedNegativeBinomial(
                mu=rate, theta=theta, zi_logits=decoded["px_dropout"], validate_args=False
            )
            return dist.log_prob(x).sum(-1)
        per_cell = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)).sum(-1)
        per_cell = per_cell + (theta * self.px_log_theta).sum()
        return per_cell + (x * log_rate - (x + theta) * torch.log(theta + rate)).sum(-1)

    @auto_move_data
    def inference(self, x: torch.Tensor, batch_index: torch.Tensor) -> dict:
        """Posterior of y and of z per component, one sample of z per component, library
        (Gaussian posterior: ``q(z | x)`` and one sample of z per cell)."""
        encoded = self.encode(x, batch_index)
        qz = Normal(encoded["qz_mean"], encoded["qz_scale"], validate_args=False)
        library = x.sum(-1, keepdim=True)
        return {**encoded, "qz": qz, "z": qz.rsample(), "library": library}

    @auto_move_data
    def generative(self, z: torch.Tensor, batch_index: torch.Tensor, library: torch.Tensor):
        """Expression parameters of each component's sample."""
        return self.decode(z, batch_index, library)

    def elbo_terms(
        self, x: torch.Tensor, inference_outputs: dict, generative_outputs: dict
    ) -> dict[str, torch.Tensor]:
        """Per-cell terms of the negative ELBO, y summed out exactly.

        ``reconstruction = -sum_k q(k|x) log p(x | z_k)``, ``kl_z = sum_k q(k|x)
        KL(q(z|x,k) || p(z|k))`` (analytic) and ``kl_y = KL(q(y|x) || p(y))``. Gaussian
        posterior: ``-log p(x | z)``, ``MogPrior.kl(q(z|x))`` (Monte Carlo) and ``kl_y = 0``.
        """
        if self.posterior == "gaussian":
            reconstruction = -self.log_likelihood(x, generative_outputs)  # cells
            return {
                "reconstruction": reconstruction,
                "kl_z": self.mog_prior.kl(inference_outputs["qz"]),
                "kl_y": torch.zeros_like(reconstruction),
            }
        log_qy = F.log_softmax(inference_outputs["qy_logits"], dim=-1)  # cells, K
        qy = log_qy.exp().T  # K, cells
        log_px = self.log_likelihood(x, generative_outputs)  # K, cells
        prior = self.prior()
        prior = Normal(prior.loc[:, None], prior.scale[:, None], validate_args=False)  # K, 1, L
        kl_z = kl_divergence(inference_outputs["qz"], prior).sum(-1)  # K, cells
        log_py = F.log_softmax(self.prior_logits, dim=-1)
        return {
            "reconstruction": -(qy * log_px).sum(0),
            "kl_z": (qy * kl_z).sum(0),
            "kl_y": (log_qy.exp() * (log_qy - log_py)).sum(-1),
        }

    def component_balance_penalty(self, qy_logits: torch.Tensor) -> torch.Tensor:
        """``KL(mean over cells of q(y | x) || p(y))``: 0 when the cells use the components
        as ``p(y)`` says (uniform), up to ``log K`` when they all use one.

        The ELBO's ``KL(q(y|x) || p(y))`` averaged over cells is this term plus the mutual
        information of x and y (Hoffman & Johnson, 2016); weighting this term more
        penalises empty components without penalising confident assignments.
        """
        mean_qy = F.softmax(qy_logits, dim=-1).mean(0)
        log_py = F.log_softmax(self.prior_logits, dim=-1)
        return (mean_qy * (torch.log(mean_qy.clamp_min(1e-12)) - log_py)).sum()

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Mean negative ELBO of the minibatch (KL terms times ``kl_weight``, for warm-up),
        plus ``component_balance`` times :meth:`component_balance_penalty` when set."""
        terms = self.elbo_terms(
            tensors[REGISTRY_KEYS.X_KEY], inference_outputs, generative_outputs
        )
        kl = terms["kl_z"] + terms["kl_y"]
        loss = (terms["reconstruction"] + kl_weight * kl).mean()
        extra_metrics = {"elbo": -(terms["reconstruction"] + kl).mean()}
        if self.component_balance > 0:
            penalty = self.component_balance_penalty(inference_outputs["qy_logits"])
            loss = loss + self.component_balance * penalty
            extra_metrics["component_balance_penalty"] = penalty
        return LossOutput(
            loss=loss,
            reconstruction_loss=terms["reconstruction"],
            kl_local={"kl_z": terms["kl_z"], "kl_y": terms["kl_y"]},
            extra_metrics=extra_metrics,
        )

    def mixture_parameters(self) -> list[nn.Parameter]:
        """The per-component parameters: the prior's means and scales and the posterior's
        component offsets (Gaussian posterior: the ``MogPrior``'s means, scales and
        weights)."""
        if self.posterior == "gaussian":
            return list(self.mog_prior.parameters())
        names = ("prior_means", "prior_log_scales", "z_mean_offset", "z_log_scale_offset")
        return [getattr(self, name) for name in names]

    # ------------------------------------------------------------------ cell summaries
    def latent(self, tensors: dict) -> torch.Tensor:
        """``E[z | x]`` under q: the component means mixed by ``q(y | x)`` (Gaussian
        posterior: its mean)."""
        encoded = self.encode(**self._get_inference_input(tensors))
        if self.posterior == "gaussian":
            return encoded["qz_mean"]
        qy = F.softmax(encoded["qy_logits"], dim=-1).T[..., None]  # K, cells, 1
        return (qy * encoded["qz_mean"]).sum(0)

    def cluster_probabilities(self, tensors: dict) -> torch.Tensor:
        """``q(y | x)`` (cells, K); Gaussian posterior: the prior's responsibilities
        ``p(y | z) ∝ pi_k N(z; mu_k, sigma_k)`` at ``z = E[z | x]``."""
        encoded = self.encode(**self._get_inference_input(tensors))
        if self.posterior == "gaussian":
            return self.prior_responsibilities(encoded["qz_mean"])
        return F.softmax(encoded["qy_logits"], dim=-1)

    def prior_responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """``p(y | z)`` of the ``MogPrior`` (cells, K) at latent points ``z`` (cells, L)."""
        prior = self.prior()
        log_pz = prior.log_prob(z[:, None]).sum(-1)  # cells, K
        log_pi = F.log_softmax(self.mog_prior.prior_logits, dim=-1)
        return F.softmax(log_pi + log_pz, dim=-1)

    def negative_elbo(self, tensors: dict) -> torch.Tensor:
        """Per-cell negative ELBO (one sample of z per component)."""
        terms = self._elbo_terms_of(tensors)
        return terms["reconstruction"] + terms["kl_z"] + terms["kl_y"]

    def reconstruction_error(self, tensors: dict) -> torch.Tensor:
        """Per-cell ``-E_q log p(x | z)`` (one sample of z per component)."""
        return self._elbo_terms_of(tensors)["reconstruction"]

    def _elbo_terms_of(self, tensors: dict) -> dict[str, torch.Tensor]:
        inference_outputs, generative_outputs = self(tensors, compute_loss=False)
        return self.elbo_terms(tensors[REGISTRY_KEYS.X_KEY], inference_outputs, generative_outputs)

    def normalized_expression(
        self, tensors: dict, transform_batch: int | None = None, n_samples: int = 1
    ) -> torch.Tensor:
        """``E_q[softmax(decoder(z, batch))]``: each component's decoding weighted by
        ``q(y | x)``, averaged over ``n_samples`` draws of z; ``transform_batch`` decodes
        every cell as that batch (as scVI: the encoder still reads the cell's own batch)."""
        x, batch_index = (tensors[REGISTRY_KEYS.X_KEY], tensors[REGISTRY_KEYS.BATCH_KEY])
        encoded = self.encode(x, batch_index)
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, transform_batch)
        qz = Normal(encoded["qz_mean"], encoded["qz_scale"], validate_args=False)
        z = qz.sample((n_samples,))  # samples, K, cells, L
        ones = torch.ones(*x.shape[:-1], 1, device=x.device)
        scale = self.decode(z, batch_index, ones)["px_scale"].mean(0)  # K, cells, genes
        if self.posterior == "gaussian":
            return scale  # cells, genes: one posterior, no components
        qy = F.softmax(encoded["qy_logits"], dim=-1).T[..., None]
        return (qy * scale).sum(0)


class GMVAEPyroModule(PyroBaseModuleClass):
    """The GMVAE of a :class:`GMVAEModule` as a Pyro model and guide (same networks).

    The guide's ``y`` site is enumerated in parallel (``config_enumerate``), so
    ``TraceEnum_ELBO`` sums it out exactly; ``z`` is sampled once per component, and the
    Gaussian KL is estimated from that sample (the torch loss computes it analytically:
    the two agree in expectation). ``log p(x | z)`` enters as a ``pyro.factor``.
    """

    def __init__(self, gmvae: GMVAEModule):
        super().__init__()
        if gmvae.posterior != "mixture":
            raise ValueError(PYRO_NEEDS_MIXTURE)
        self.gmvae = gmvae

    @staticmethod
    def _get_fn_args_from_batch(tensor_dict: dict) -> tuple[tuple, dict]:
        x = tensor_dict[REGISTRY_KEYS.X_KEY]
        return (x, tensor_dict[REGISTRY_KEYS.BATCH_KEY]), {}

    def _model(self, x: torch.Tensor, batch_index: torch.Tensor) -> None:
        gmvae = self.gmvae
        pyro.module("gmvae", gmvae)
        library = x.sum(-1, keepdim=True)
        with pyro.plate("cells", x.shape[0]):
            y = pyro.sample("y", pyro_dist.Categorical(logits=gmvae.prior_logits))
            prior = gmvae.prior(y)
            z = pyro.sample("z", pyro_dist.Normal(prior.loc, prior.scale).to_event(1))
            decoded = gmvae.decode(z, batch_index, library)
            pyro.factor("x", gmvae.log_likelihood(x, decoded))

    def _guide(self, x: torch.Tensor, batch_index: torch.Tensor) -> None:
        gmvae = self.gmvae
        pyro.module("gmvae", gmvae)
        with pyro.plate("cells", x.shape[0]):
            encoded = gmvae.encode(x, batch_index)
            y = pyro.sample("y", pyro_dist.Categorical(logits=encoded["qy_logits"]))
            posterior = gmvae.component_posterior(encoded["h"], y)
            pyro.sample("z", pyro_dist.Normal(posterior.loc, posterior.scale).to_event(1))

    @property
    def model(self):
        return self._model

    @property
    def guide(self):
        return config_enumerate(self._guide, default="parallel")


def pyro_enumerated_elbo(module: GMVAEModule, tensors: dict, num_particles: int = 1) -> float:
    """Mean per-cell ELBO of a minibatch computed by Pyro's ``TraceEnum_ELBO``.

    For checking that the torch loss and the Pyro model/guide are one objective.
    """
    pyro_module = GMVAEPyroModule(module)
    args, kwargs = pyro_module._get_fn_args_from_batch(tensors)
    elbo = pyro.infer.TraceEnum_ELBO(
        max_plate_nesting=1, num_particles=num_particles, vectorize_particles=num_particles > 1
    )
    with torch.no_grad():
        loss = elbo.loss(pyro_module.model, pyro_module.guide, *args, **kwargs)
    return -loss / args[0].shape[0]


__all__ = ["LIKELIHOODS", "POSTERIORS", "GMVAEModule", "GMVAEPyroModule", "pyro_enumerated_elbo"]
