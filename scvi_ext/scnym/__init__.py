"""scNym: semi-supervised adversarial cell type classification."""

from ._model import ScNym
from ._module import DOMAIN_KEY, ScNymModule
from ._plan import ScNymTrainingPlan, sharpen

__all__ = ["DOMAIN_KEY", "ScNym", "ScNymModule", "ScNymTrainingPlan", "sharpen"]
