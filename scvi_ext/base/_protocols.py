"""What a module must offer for each capability of a model (see docs/adding_a_model.md).

A model class combines capability mixins (:class:`~scvi_ext.base.InferenceMixin` for every
model, :class:`~scvi_ext.base.EmbeddingMixin`, :class:`~scvi_ext.base.ClassifierMixin`);
each mixin calls its module only through the protocol below, so a new module satisfies
the protocols of the capabilities its model offers and nothing else. ``isinstance`` works
on them (``runtime_checkable``), which the contract tests use.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from scvi.module.base import LossOutput


@runtime_checkable
class InferenceModule(Protocol):
    """Every module: scvi's inference/generative/loss triple, with the training loss in ``loss``.

    ``loss(tensors, inference_outputs, generative_outputs, **loss_kwargs)`` returns scvi's
    :class:`~scvi.module.base.LossOutput` whose ``loss`` *is* the loss the training plan
    minimises; the plan passes what changes over training (ramp weights, pseudolabels,
    MixUp inputs) as ``loss_kwargs`` and logs ``extra_metrics``.
    """

    def inference(self, *args, **kwargs) -> dict: ...

    def generative(self, *args, **kwargs) -> dict: ...

    def loss(
        self, tensors: dict, inference_outputs: dict, generative_outputs: dict, **loss_kwargs
    ) -> LossOutput: ...


@runtime_checkable
class EmbeddingModule(Protocol):
    """Modules of embedding models: one latent vector per cell of a minibatch."""

    def latent(self, tensors: dict) -> torch.Tensor: ...


@runtime_checkable
class ClassifierModule(Protocol):
    """Modules of classifier models: one row of logits per cell, one column per cell type."""

    n_labels: int

    def predict_logits(self, tensors: dict) -> torch.Tensor: ...


@runtime_checkable
class DifferentiableClassifierModule(ClassifierModule, Protocol):
    """Classifiers whose logits are a differentiable function of normalised expression.

    :func:`scvi_ext.interpret.saliency` attributes decisions to genes through these two.
    """

    def normalize(self, counts: torch.Tensor) -> torch.Tensor: ...

    def classify_normalized(
        self, x_normalized: torch.Tensor, batch_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class TokenAttentionModule(Protocol):
    """Modules with a token encoder: :func:`scvi_ext.interpret.attention_rollout` reads these.

    ``token_names`` maps each token branch to the names of its tokens (genes, gene sets);
    ``token_attentions`` returns that branch's per-layer attention weights
    (cells, heads, tokens, tokens), the class token first.
    """

    @property
    def token_names(self) -> dict[str, list[str]]: ...

    @property
    def n_heads(self) -> int: ...

    def token_attentions(self, tensors: dict, branch: str) -> list[torch.Tensor]: ...
