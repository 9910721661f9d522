"""The public models."""

from scvi_ext.can import CAN
from scvi_ext.cellular import CELLULAR
from scvi_ext.cgran import CGRAN
from scvi_ext.classifier import LatentClassifier
from scvi_ext.gmvae import GMVAE
from scvi_ext.matching import CrossAttentionMatcher
from scvi_ext.scnym import ScNym

__all__ = [
    "CAN",
    "CELLULAR",
    "CGRAN",
    "CrossAttentionMatcher",
    "GMVAE",
    "LatentClassifier",
    "ScNym",
]
