"""Model interpretation: gradient saliency."""

from ._saliency import saliency

__all__ = ["saliency"]
