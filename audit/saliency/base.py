"""Base classes of the saliency engine: a registry, the result type, and the layer-capture context manager."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from audit.errors import ShapeError
from audit.registry import Registry


@dataclass
class SaliencyResult:
    """Maps and the model outputs they explain, all on the model's device.

    Attributes:
        maps: float [B, H, W] at the input resolution; the sign policy is the method's (CAM maps are ≥ 0).
        raw_sum: float [B]: the un-normalised sum of the map before any rescaling, since a per-map min–max
            hides how strong a map is.
        logits: float [B, K]: the model's outputs for the batch.
        targets: int [B]: the class each map explains.
    """

    maps: torch.Tensor
    raw_sum: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class SaliencyMethod(ABC):
    """A saliency method bound to one model (Captum's split: model-bound settings here, per-call in ``attribute``).

    Args:
        model: the classifier in eval mode; its parameters should not require gradients (no parameter gradient
            is ever computed).
        target_layer: module name of the layer the method reads (for layer methods).
    """

    name: str = ""
    signed: bool = False  # whether maps can be negative (region metrics use the positive part)

    def __init__(self, model: nn.Module, target_layer: str | None = None) -> None:
        self.model = model
        self.target_layer = target_layer

    @abstractmethod
    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        """Explain a batch.

        Args:
            inputs: float [B, C, H, W], normalised, on the model's device.
            target: int [B] class per sample, or None for the predicted class.
        """


METHODS: Registry[type[SaliencyMethod]] = Registry("saliency method")


def create_method(name: str, model: nn.Module, target_layer: str | None = None) -> SaliencyMethod:
    """Instantiate the registered method ``name`` for ``model``."""
    return METHODS.get(name)(model, target_layer)


def check_inputs(inputs: torch.Tensor, target: torch.Tensor | None) -> None:
    if inputs.ndim != 4:
        raise ShapeError("inputs", "[B, C, H, W]", tuple(inputs.shape))
    if target is not None and (target.ndim != 1 or target.shape[0] != inputs.shape[0]):
        raise ShapeError("target", f"[{inputs.shape[0]}] (one class per sample)", tuple(target.shape))


@contextmanager
def capture_layer(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture ``module``'s output as a leaf that requires grad, and feed that leaf to the rest of the model.

    The backbone before the layer then records no autograd graph (its parameters do not require grad and its
    input does not), and ``torch.autograd.grad(score, captured)`` back-propagates through the head only: the
    cost floor of Grad-CAM (../shared/notes/saliency-baselines.md). The hook is removed even after an error.

    Yields:
        a dict whose ``"activation"`` is the layer output [B, C, h, w] after the forward pass.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        store["activation"] = leaf
        # A clone goes downstream, so an in-place op after the layer (ReLU(inplace=True)) cannot touch the leaf.
        return leaf.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
