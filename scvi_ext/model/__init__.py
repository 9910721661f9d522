"""The public models."""

from scvi_ext.scnym import ScNym

__all__ = ["ScNym"]
