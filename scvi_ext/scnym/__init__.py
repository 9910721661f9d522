"""scNym: semi-supervised adversarial cell type classification."""

from ._model import ScNym
from ._module import ScNymModule
from ._plan import ScNymTrainingPlan

__all__ = ["ScNym", "ScNymModule", "ScNymTrainingPlan"]
