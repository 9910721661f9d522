"""CrossAttentionMatcher (Fan & Shen): RNA <-> ATAC cell matching by cross-attention."""

from ._assignment import (
    TEMPERATURE_FITS,
    assign,
    bipartite_assignment,
    entropic_ot,
    fit_temperature,
    l2_normalise,
    match_embeddings,
    probabilities,
    top_k_scores,
    true_pair_log_probabilities,
)
from ._features import gene_genome_order, genome_order, peak_positions
from ._model import CrossAttentionMatcher
from ._module import CrossAttentionModule, LocalTokenizer, RegionTokenizer, TransformerUnit
from ._plan import MatcherTrainingPlan
from ._simulate import simulate_paired

__all__ = [
    "TEMPERATURE_FITS",
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
    "true_pair_log_probabilities",
]
