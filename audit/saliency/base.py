"""Base classes of the saliency engine: the registry, options, results, layer capture and small helpers.

Conventions shared by every method (README, "Saliency methods"):

* ``attribute(inputs, target)`` takes a normalised float batch [B, C, H, W] on the model's device and an int
  class per sample (or None for the predicted class) and returns :class:`SaliencyResult` with maps [B, H, W] on the
  same device. Nothing is copied to the host.
* Sign policy per method (``signed``): CAM-type maps are ReLU'd (≥ 0); signed maps (Gradient × Input, Integrated
  Gradients, Guided Grad-CAM) keep their sign, and the region metrics use their positive part.
* Multi-channel input attributions [B, C, H, W] are reduced to [B, H, W] by :func:`reduce_channels`: the sum over
  channels for signed methods, the maximum of the absolute value for unsigned gradient maps (Simonyan et al. 2014).
* No parameter gradient is ever computed or accumulated: gradients are taken with ``torch.autograd.grad`` with
  respect to the input or a captured layer only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from audit.errors import ShapeError
from audit.models.layers import TargetLayer
from audit.registry import Registry


@dataclass(frozen=True)
class SaliencyOptions:
    """Per-run settings of the methods that have any (all have defaults).

    Attributes:
        memory_budget_mb: peak extra memory a chunked method (Score-CAM, RISE, occlusion, SmoothGrad, Integrated
            Gradients, I-GOS) may use for its expanded batches; it chooses its chunk size from this.
        samples_per_batch: hard cap on the expanded samples per forward pass (Captum's ``nt_samples_batch_size``);
            None = from the memory budget.
        ig_steps: Integrated Gradients path steps (Gauss–Legendre quadrature, as Captum's default).
        smoothgrad_samples, smoothgrad_noise: SmoothGrad samples and noise σ as a fraction of each input's range.
        scorecam_channels: Score-CAM channel budget (top-k channels by mean activation); None = all channels.
        rise_masks, rise_grid, rise_probability: RISE's number of masks, grid cells per side, and keep probability.
        occlusion_window, occlusion_stride: occlusion patch side and stride, in input pixels.
        igos_iterations, igos_steps: I-GOS mask-optimisation iterations and integrated-gradient steps per iteration.
        seed: seed of every random draw (SmoothGrad noise, RISE masks), so a run is reproducible.
    """

    memory_budget_mb: int = 1024
    samples_per_batch: int | None = None
    ig_steps: int = 32
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15
    scorecam_channels: int | None = None
    rise_masks: int = 1000
    rise_grid: int = 7
    rise_probability: float = 0.5
    occlusion_window: int = 16
    occlusion_stride: int = 8
    igos_iterations: int = 15
    igos_steps: int = 10
    seed: int = 0


@dataclass
class SaliencyResult:
    """Maps and the model outputs they explain, all on the model's device.

    Attributes:
        maps: float [B, H, W] at the input resolution, with the method's sign policy.
        raw_sum: float [B]: the sum of the map before upsampling or any rescaling (at the layer's resolution for
            layer methods), since a per-map min–max hides how strong a map is.
        logits: float [B, K]: the model's outputs for the unperturbed batch.
        targets: int [B]: the class each map explains.
    """

    maps: torch.Tensor
    raw_sum: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class SaliencyMethod(ABC):
    """A saliency method bound to one model (Captum's split: model-bound settings here, per-call in ``attribute``).

    Args:
        model: the classifier in eval mode. Its parameters may require grad; no parameter gradient is computed.
        target_layer: module name of the layer that layer methods read (ignored by input methods).
        options: settings of chunked and stochastic methods.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "other"  # "cam", "gradient" or "perturbation"
    signed: ClassVar[bool] = False  # whether maps can be negative (region metrics use the positive part)
    needs_layer: ClassVar[bool] = False
    reference: ClassVar[str] = ""  # the paper, for the README and the report

    def __init__(
        self, model: nn.Module, target_layer: TargetLayer | str | None = None, options: SaliencyOptions | None = None
    ) -> None:
        self.model = model
        self.target_layer = target_layer
        self.options = options or SaliencyOptions()

    @abstractmethod
    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        """Explain a batch.

        Args:
            inputs: float [B, C, H, W], normalised, on the model's device.
            target: int [B] class per sample, or None for the predicted class.
        """


METHODS: Registry[type[SaliencyMethod]] = Registry("saliency method")


def create_method(
    name: str, model: nn.Module, target_layer: TargetLayer | str | None = None, options: SaliencyOptions | None = None
) -> SaliencyMethod:
    """Instantiate the registered method ``name`` for ``model``."""
    return METHODS.get(name)(model, target_layer, options)


def check_inputs(inputs: torch.Tensor, target: torch.Tensor | None) -> None:
    """Shape contract of ``attribute``: inputs [B, C, H, W]; target None or int [B]."""
    if inputs.ndim != 4:
        raise ShapeError("inputs", "[B, C, H, W]", tuple(inputs.shape))
    if target is not None and (target.ndim != 1 or target.shape[0] != inputs.shape[0]):
        raise ShapeError("target", f"[{inputs.shape[0]}] (one class per sample)", tuple(target.shape))


def resolve_target(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The class per sample: ``target`` when given, else the prediction. int [B] on the logits' device."""
    if target is None:
        return logits.argmax(dim=1)
    return target.to(logits.device, torch.long)


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [B, K], target [B] → the target logit per sample [B]."""
    return logits.gather(1, target.view(-1, 1))[:, 0]


def reduce_channels(attribution: torch.Tensor, signed: bool) -> torch.Tensor:
    """[B, C, H, W] → [B, H, W]: channel sum for signed maps, max |·| for unsigned gradient maps."""
    return attribution.sum(1) if signed else attribution.abs().amax(1)


def raw_sum(maps: torch.Tensor) -> torch.Tensor:
    """[B, ...] → [B]: the un-normalised sum of each map."""
    return maps.flatten(1).sum(1)


ToSpatial = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def capture_layer(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture ``module``'s output as a leaf that requires grad, and feed that leaf to the rest of the model.

    The backbone before the layer then records no autograd graph (its parameters need not require grad and its
    input does not), and ``torch.autograd.grad(score, captured)`` back-propagates through the head only: the
    cost floor of Grad-CAM (../shared/notes/saliency-baselines.md). The hook is removed even after an error.

    Yields:
        a dict whose ``"activation"`` is the layer output (any shape) after the forward pass.
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
