"""GMVAE: scVAE's Gaussian-mixture VAE (Pyro and torch ELBOs on one set of networks)."""

from ._model import GMVAE
from ._module import LIKELIHOODS, GMVAEModule, GMVAEPyroModule, pyro_enumerated_elbo
from ._plan import GMVAEPyroTrainingPlan, GMVAETrainingPlan

__all__ = [
    "GMVAE",
    "LIKELIHOODS",
    "GMVAEModule",
    "GMVAEPyroModule",
    "GMVAEPyroTrainingPlan",
    "GMVAETrainingPlan",
    "pyro_enumerated_elbo",
]
