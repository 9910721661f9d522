"""CGRAN: Cell-Gene Representation Attention Network (seed paper, section 4.2)."""

from ._attention import (
    affine_full_attention,
    affine_local_attention,
    dense_local_attention,
    full_attention,
    gene_groups,
    grouped_local_attention,
    local_mask,
)
from ._model import CGRAN
from ._module import CGRANModule

__all__ = [
    "CGRAN",
    "CGRANModule",
    "affine_full_attention",
    "affine_local_attention",
    "dense_local_attention",
    "full_attention",
    "gene_groups",
    "grouped_local_attention",
    "local_mask",
]
