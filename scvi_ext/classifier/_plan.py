"""Training plan of the latent classifier: cross-entropy, Adam, warm-up + cosine."""

from scvi_ext.base import WarmupCosineTrainingPlan


class LatentClassifierTrainingPlan(WarmupCosineTrainingPlan):
    """Minimises ``module.loss``, the cross-entropy, with the reference code's settings
    (Adam 1e-3, weight decay 5e-5, warm-up 4 epochs, cosine schedule); see
    :class:`~scvi_ext.base.WarmupCosineTrainingPlan`."""
