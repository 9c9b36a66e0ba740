"""The CAM family, all from ONE forward pass and at most ONE backward pass that stops at the target layer.

The target layer's output A [B, C, h, w] is captured as a leaf (:func:`capture_layer`); the gradient
G = ∂y_t/∂A of each sample's target score is taken with ``torch.autograd.grad`` through the head only (no
parameter gradients, no backbone backward). Every variant is then a weighting of (A, G), computed batched on the
device; asking for several variants costs one pass plus a little arithmetic (:func:`cam_maps`). Formulas follow
the papers and pytorch-grad-cam's implementations (tests/saliency/test_cam_agreement.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from audit.errors import ModelError
from audit.models.layers import TargetLayer, as_target_layer, get_module
from audit.saliency.base import (
    METHODS,
    SaliencyMethod,
    SaliencyResult,
    capture_layer,
    check_inputs,
    resolve_target,
    target_scores,
)

Weighting = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "CAMContext"], torch.Tensor]


class CAMContext:
    """What a weighting may need besides A and G: the model (CAM reads the classifier's weights)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=(2, 3), keepdim=True)


def gradcam_map(a: torch.Tensor, g: torch.Tensor, _t: torch.Tensor, _c: CAMContext) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): α_k = mean_ij G_kij (eq. 1); map = Σ_k α_k A_k (eq. 2)."""
    return (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)


def gradcam_pp_map(a: torch.Tensor, g: torch.Tensor, _t: torch.Tensor, _c: CAMContext) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), eq. 19 with the exponential's derivatives as powers of G:
    a_kij = G² / (2G² + Σ_ab A_kab · G³); w_k = Σ_ij a_kij · ReLU(G_kij); map = Σ_k w_k A_k."""
    g2 = g * g
    g3 = g2 * g
    alpha = g2 / (2 * g2 + _spatial_sum(a) * g3 + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = _spatial_sum(alpha * g.clamp_min(0))
    return (weights * a).sum(1)


def xgradcam_map(a: torch.Tensor, g: torch.Tensor, _t: torch.Tensor, _c: CAMContext) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020, eq. 8): w_k = Σ_ij (A_kij / Σ_ab A_kab) · G_kij; map = Σ_k w_k A_k."""
    weights = _spatial_sum(g * a / (_spatial_sum(a) + 1e-7))
    return (weights * a).sum(1)


def layercam_map(a: torch.Tensor, g: torch.Tensor, _t: torch.Tensor, _c: CAMContext) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021, eq. 5): map = Σ_k ReLU(G_kij) · A_kij."""
    return (g.clamp_min(0) * a).sum(1)


def hirescam_map(a: torch.Tensor, g: torch.Tensor, _t: torch.Tensor, _c: CAMContext) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): map = Σ_k G_kij · A_kij (element-wise, no spatial averaging)."""
    return (g * a).sum(1)


def eigencam_map(a: torch.Tensor, _g: torch.Tensor | None, _t: torch.Tensor, _c: CAMContext) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): the projection of the centred activations [hw, C] on their first
    principal component. The SVD's sign is arbitrary; it is fixed so that the map's largest absolute value is
    positive (as Seg-Eigen-CAM's sign correction, Chung & Ying 2025, eq. 13)."""
    b, c, h, w = a.shape
    precise = torch.float32 if a.device.type == "mps" else torch.float64  # MPS has no float64
    flat = a.reshape(b, c, h * w).transpose(1, 2).to(precise)  # [B, hw, C]
    centred = flat - flat.mean(dim=1, keepdim=True)
    # With X = U S Vᵀ, the projection X v₁ equals s₁ u₁, and u₁, s₁² are the top eigenpair of the small hw × hw
    # Gram matrix X Xᵀ: one batched eigh of [B, hw, hw] instead of an SVD of [B, hw, C] (C up to 2048).
    eigenvalues, eigenvectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
    projection = eigenvectors[:, :, -1] * eigenvalues[:, -1:].clamp_min(0).sqrt()  # [B, hw]
    flip = projection.amax(1, keepdim=True).abs() < projection.amin(1, keepdim=True).abs()
    projection = torch.where(flip, -projection, projection)
    return projection.reshape(b, h, w).to(a.dtype)


def classifier_weights(model: nn.Module, channels: int) -> torch.Tensor:
    """The weight [K, C] of the final linear classifier, for CAM on a global-average-pooling head."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None or head.in_features != channels:
        raise ModelError(
            f"CAM needs a global-average-pooling head whose linear classifier reads the target layer's {channels} "
            "channels; this model has none. Use gradcam, which equals CAM on such heads and works on any head."
        )
    return head.weight


def cam_map(a: torch.Tensor, _g: torch.Tensor | None, target: torch.Tensor, context: CAMContext) -> torch.Tensor:
    """CAM (Zhou et al. 2016, eq. 2): map_c = Σ_k w_ck A_k with the classifier's weights w (GAP heads only)."""
    weights = classifier_weights(context.model, a.shape[1])[target]  # [B, C]
    return (weights[:, :, None, None].to(a.dtype) * a).sum(1)


class CAMVariant(SaliencyMethod):
    """One member of the family; ``attribute`` runs the shared pass for this variant alone."""

    family = "cam"
    needs_layer = True
    uses_gradient: bool = True
    weighting: Weighting

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        return cam_maps(self.model, self.target_layer, inputs, [self], target)[self.name]


def cam_maps(
    model: nn.Module,
    layer: TargetLayer | str | None,
    inputs: torch.Tensor,
    variants: Sequence[CAMVariant],
    target: torch.Tensor | None = None,
) -> dict[str, SaliencyResult]:
    """Several CAM variants from one forward pass and (if any variant needs it) one backward pass.

    Args:
        model: the classifier in eval mode.
        layer: the target layer.
        inputs: float [B, C, H, W], normalised, on the model's device.
        variants: the methods to compute.
        target: int [B] or None for the prediction.

    Returns:
        name → result with maps [B, H, W] (ReLU'd) and raw_sum [B] (the sum of the ReLU'd map at layer resolution).
    """
    check_inputs(inputs, target)
    spec = as_target_layer(layer)
    if spec is None:
        raise ModelError("CAM methods need a target layer; set model.target_layer or let it be found automatically")
    module = get_module(model, spec.name)
    need_gradient = any(v.uses_gradient for v in variants)
    with torch.enable_grad(), capture_layer(module) as captured:
        logits = model(inputs)
        target = resolve_target(logits, target)
        leaf = captured["activation"]
        gradient = None
        if need_gradient:
            # Samples are independent in eval mode, so the gradient of the sum gives each sample its own gradient.
            (gradient,) = torch.autograd.grad(target_scores(logits, target).sum(), leaf)
    with torch.no_grad():
        a = spec.to_spatial(leaf.detach())
        g = spec.to_spatial(gradient) if gradient is not None else None
        context = CAMContext(model)
        low = torch.stack([F.relu(v.weighting(a, g, target, context)) for v in variants])  # [M, B, h, w]
        sums = low.flatten(2).sum(2)  # [M, B]
        m, b, h, w = low.shape
        # One interpolation for every variant: [M·B, 1, h, w] → [M·B, 1, H, W].
        up = (
            F.interpolate(
                low.reshape(m * b, 1, h, w).float(), size=inputs.shape[-2:], mode="bilinear", align_corners=False
            )
            .reshape(m, b, *inputs.shape[-2:])
            .clamp_min(0)
        )
        logits = logits.detach()
    return {
        v.name: SaliencyResult(maps=up[i], raw_sum=sums[i], logits=logits, targets=target)
        for i, v in enumerate(variants)
    }


def _register(name: str, weighting: Weighting, reference: str, uses_gradient: bool = True) -> type[CAMVariant]:
    cls = type(
        name,
        (CAMVariant,),
        {
            "name": name,
            "weighting": staticmethod(weighting),
            "reference": reference,
            "uses_gradient": uses_gradient,
            "__doc__": weighting.__doc__,
        },
    )
    return METHODS.register(name)(cls)


GradCAM = _register("gradcam", gradcam_map, "Selvaraju et al., ICCV 2017")
GradCAMPlusPlus = _register("gradcam++", gradcam_pp_map, "Chattopadhay et al., WACV 2018")
XGradCAM = _register("xgradcam", xgradcam_map, "Fu et al., BMVC 2020")
LayerCAM = _register("layercam", layercam_map, "Jiang et al., IEEE TIP 2021")
HiResCAM = _register("hirescam", hirescam_map, "Draelos & Carin, arXiv 2011.08891, 2020")
EigenCAM = _register("eigencam", eigencam_map, "Muhammad & Yeasin, IJCNN 2020", uses_gradient=False)
CAM = _register("cam", cam_map, "Zhou et al., CVPR 2016", uses_gradient=False)
