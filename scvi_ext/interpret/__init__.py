"""Model interpretation: gradient saliency and attention rollout."""

from ._rollout import attention_rollout, rollout
from ._saliency import saliency

__all__ = ["attention_rollout", "rollout", "saliency"]
