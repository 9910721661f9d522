"""Base of modules without a generative part (classifiers, embedders)."""

from __future__ import annotations

from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass


class NonGenerativeModule(BaseModuleClass):
    """A :class:`~scvi.module.base.BaseModuleClass` whose ``generative`` step is empty.

    ``inference`` receives the registered ``X`` as ``x`` (override
    ``_get_inference_input`` to pass more, e.g. the batch); subclasses implement
    ``inference`` and ``loss``.
    """

    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {}

    def generative(self) -> dict:
        """No generative model."""
        return {}
