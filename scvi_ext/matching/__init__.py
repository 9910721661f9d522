"""CrossAttentionMatcher (Fan & Shen): RNA <-> ATAC cell matching with a cross-attention network."""

from ._assignment import (
    assign,
    bipartite_assignment,
    entropic_ot,
    fit_temperature,
    l2_normalise,
    match_embeddings,
    probabilities,
    top_k_scores,
)
from ._features import gene_genome_order, genome_order, peak_positions
from ._model import CrossAttentionMatcher
from ._module import CrossAttentionModule, LocalTokenizer, RegionTokenizer, TransformerUnit
from ._plan import MatcherTrainingPlan
from ._simulate import simulate_paired

__all__ = [
    "MatcherTrainingPlan",
    "CrossAttentionMatcher",
    "CrossAttentionModule",
    "LocalTokenizer",
    "RegionTokenizer",
    "TransformerUnit",
    "assign",
    "bipartite_assignment",
    "entropic_ot",
    "fit_temperature",
    "gene_genome_order",
    "genome_order",
    "l2_normalise",
    "match_embeddings",
    "peak_positions",
    "probabilities",
    "simulate_paired",
    "top_k_scores",
]
