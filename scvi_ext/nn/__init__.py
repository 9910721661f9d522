"""Reusable torch layers shared by several methods."""

from ._gradient_reversal import GradientReversal, grad_reverse

__all__ = ["GradientReversal", "grad_reverse"]
