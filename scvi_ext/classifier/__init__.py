"""LatentClassifier: a feed-forward cell type classifier on any fixed representation."""

from ._model import NOVELTY_METHODS, LatentClassifier, NovelTypeReport, embed_with
from ._module import LatentClassifierModule
from ._plan import LatentClassifierTrainingPlan

__all__ = [
    "NOVELTY_METHODS",
    "LatentClassifier",
    "LatentClassifierModule",
    "LatentClassifierTrainingPlan",
    "NovelTypeReport",
    "embed_with",
]
