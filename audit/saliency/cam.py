"""The CAM family: Grad-CAM (Selvaraju et al. 2017).

One forward pass with the target layer captured as a leaf, one backward pass from the target scores to that
layer only (never into parameters), then the weighting and an upsampling, all batched on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from audit.models.layers import get_module
from audit.saliency.base import METHODS, SaliencyMethod, SaliencyResult, capture_layer, check_inputs


class _LayerCAM(SaliencyMethod):
    """Template: subclasses give the channel weighting (pytorch-grad-cam's split, without its CPU round trips)."""

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """activation, gradient: [B, C, h, w] → the weighted map before ReLU, [B, h, w]."""
        raise NotImplementedError

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        check_inputs(inputs, target)
        if self.target_layer is None:
            raise ValueError(f"{self.name} needs a target layer")
        layer = get_module(self.model, self.target_layer)
        with torch.enable_grad(), capture_layer(layer) as captured:
            logits = self.model(inputs)
            if target is None:
                target = logits.argmax(dim=1)
            # Samples are independent in eval mode, so the gradient of the sum gives every sample its own
            # gradient in one backward pass.
            score = logits.gather(1, target.view(-1, 1)).sum()
            activation = captured["activation"]
            (gradient,) = torch.autograd.grad(score, activation)
        with torch.no_grad():
            cam = F.relu(self.weights(activation.detach(), gradient))
            raw_sum = cam.flatten(1).sum(1)
            maps = F.interpolate(cam[:, None], size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            maps = maps.clamp_min(0)  # bilinear interpolation of non-negative values stays ≥ 0 up to rounding
        return SaliencyResult(maps=maps, raw_sum=raw_sum, logits=logits.detach(), targets=target)


@METHODS.register("gradcam")
class GradCAM(_LayerCAM):
    """Grad-CAM: α_c = mean over space of ∂y/∂A_c (Selvaraju et al. 2017, eq. 1), map = ReLU(Σ_c α_c A_c) (eq. 2)."""

    name = "gradcam"

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        alpha = gradient.mean(dim=(2, 3), keepdim=True)
        return (alpha * activation).sum(dim=1)
