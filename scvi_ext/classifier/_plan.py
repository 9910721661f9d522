"""Training plan of the latent classifier: cross-entropy, Adam, warm-up + cosine."""

from scvi.module.base import BaseModuleClass

from scvi_ext.base import WarmupCosineTrainingPlan


class LatentClassifierTrainingPlan(WarmupCosineTrainingPlan):
    """Minimises ``module.loss``, the cross-entropy, with the reference code's settings
    (Adam 1e-3 with PyTorch's ``eps`` 1e-8, weight decay 5e-5, warm-up 4 epochs, cosine
    schedule); see :class:`~scvi_ext.base.WarmupCosineTrainingPlan`.

    scvi's plans default to ``eps=0.01``, above 99% of this classifier's gradient entries
    at the start of training: Adam then steps at a fraction of the learning rate
    (docs/adding_a_model.md, "Adam's eps").
    """

    def __init__(self, module: BaseModuleClass, *, eps: float = 1e-8, **kwargs):
        super().__init__(module, eps=eps, **kwargs)
