"""Training plan of the matcher: an optional InfoNCE warm start of the triplet objective."""

from __future__ import annotations

from scvi_ext.base import BaseTrainingPlan


class MatcherTrainingPlan(BaseTrainingPlan):
    """:class:`~scvi_ext.base.BaseTrainingPlan` whose first ``infonce_warmup_epochs`` training
    epochs minimise InfoNCE on the self-attention embeddings instead of the triplet loss.

    The hardest-negative triplet loss from random weights can collapse (every embedding
    alike, the loss stuck at twice the margin); VSE++, where it comes from, starts from
    trained features. Validation always scores the model's own objective, so early
    stopping and the best epoch compare like with like. No effect with
    ``objective="infonce"``.
    """

    def __init__(self, module, *, infonce_warmup_epochs: int = 0, **kwargs):
        super().__init__(module, **kwargs)
        if infonce_warmup_epochs < 0:
            raise ValueError(
                f"infonce_warmup_epochs must be 0 or more, not {infonce_warmup_epochs}."
            )
        self.infonce_warmup_epochs = infonce_warmup_epochs

    def step_loss_kwargs(self, stage: str) -> dict:
        """``warm_start``: in training epochs before ``infonce_warmup_epochs``."""
        return {"warm_start": stage == "train" and self.current_epoch < self.infonce_warmup_epochs}
