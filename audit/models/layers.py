"""Finding the saliency target layer, and reading its output as a spatial map [B, C, h, w].

The target layer is the last spatial feature map before global pooling. Checked architectures (tests/models):
torchvision and timm ResNets (``layer4``), timm ConvNeXt (``stages.3``), EfficientNet (``bn2``), the probe
(``features``), timm Swin (channels-last ``layers.3``) and timm ViT/DeiT (``blocks.<last>.norm1``: the tokens
entering the last block; the last block's output reaches a class-token head through the class token only, so its
patch tokens would get no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from audit.errors import ModelError

Layout = Literal["NCHW", "NHWC", "tokens"]


@dataclass(frozen=True)
class TargetLayer:
    """A module and how to read its output as [B, C, h, w].

    Attributes:
        name: module name (``model.get_submodule(name)``).
        layout: ``NCHW`` (convolutional), ``NHWC`` (channels last, e.g. timm Swin) or ``tokens`` ([B, N, C]).
        prefix_tokens: leading tokens to drop (class and register tokens) for ``tokens``.
        grid: (h, w) of the patch grid for ``tokens``; None = square.
    """

    name: str
    layout: Layout = "NCHW"
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None

    def to_spatial(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output (or its gradient) → [B, C, h, w]; differentiable, a view where possible."""
        if self.layout == "NCHW":
            return output
        if self.layout == "NHWC":
            return output.permute(0, 3, 1, 2)
        tokens = output[:, self.prefix_tokens :, :]
        count = tokens.shape[1]
        h, w = self.grid if self.grid else (math.isqrt(count), math.isqrt(count))
        if h * w != count:
            raise ModelError(
                f"layer {self.name!r}: {count} patch tokens do not form a {h}x{w} grid; "
                "set the number of prefix tokens or the grid"
            )
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def as_target_layer(layer: TargetLayer | str | None) -> TargetLayer | None:
    return TargetLayer(layer) if isinstance(layer, str) else layer


def _record_outputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) in execution order; identity modules (placeholders such as timm's
    ``norm_pre``) are skipped, so the module that computes a map is named rather than its pass-through."""
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name or isinstance(module, nn.Identity):
            continue
        handles.append(
            module.register_forward_hook(
                lambda _m, _i, out, name=name: order.append((name, tuple(out.shape))) if torch.is_tensor(out) else None
            )
        )
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _final_channels(model: nn.Module) -> int | None:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict):
        return info[-1].get("num_chs")
    return None


def _vit_layer(model: nn.Module, example: torch.Tensor) -> TargetLayer | None:
    """timm's VisionTransformer family: the last block's first norm, tokens on the patch grid."""
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if not isinstance(blocks, nn.Sequential) or patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        return None
    last = len(blocks) - 1
    if not hasattr(blocks[last], "norm1"):
        return None
    patch = patch_embed.patch_size if hasattr(patch_embed, "patch_size") else (16, 16)
    grid = (example.shape[-2] // patch[0], example.shape[-1] // patch[1])
    return TargetLayer(f"blocks.{last}.norm1", "tokens", int(model.num_prefix_tokens), grid)


def describe_layer(model: nn.Module, name: str, example: torch.Tensor) -> TargetLayer:
    """A user-named layer, with its layout inferred from its output shape on ``example``."""
    get_module(model, name)
    vit = _vit_layer(model, example)
    shapes = dict(_record_outputs(model, example))
    shape = shapes.get(name)
    if shape is None:
        raise ModelError(f"module {name!r} produced no tensor output in a forward pass; choose another layer")
    if len(shape) == 3:
        prefix = vit.prefix_tokens if vit else int(getattr(model, "num_prefix_tokens", 0))
        return TargetLayer(name, "tokens", prefix, vit.grid if vit else None)
    if len(shape) != 4:
        raise ModelError(f"module {name!r} outputs shape {shape}; a target layer needs [B, C, h, w] or [B, N, C]")
    channels = _final_channels(model)
    nhwc = channels is not None and shape[-1] == channels and shape[1] != channels
    return TargetLayer(name, "NHWC" if nhwc else "NCHW")


def find_target_layer(model: nn.Module, example: torch.Tensor) -> TargetLayer:
    """The last spatial feature map before global pooling.

    A dummy forward pass records the output shape of every module in execution order; a container (such as
    ResNet's ``layer4``) finishes after its children, so the outermost module producing the final feature map is
    chosen, not an inner ReLU that may be called several times.

    Args:
        model: the classifier, in eval mode.
        example: one input batch, float [B, C, H, W], on the model's device.
    """
    vit = _vit_layer(model, example)
    if vit is not None:
        return vit
    channels = _final_channels(model)
    candidates: list[tuple[TargetLayer, tuple[int, ...]]] = []
    for name, shape in _record_outputs(model, example):
        if len(shape) != 4:
            continue
        nhwc = channels is not None and shape[-1] == channels and shape[1] != channels
        cells = shape[1] * shape[2] if nhwc else shape[2] * shape[3]
        if cells > 1:
            candidates.append((TargetLayer(name, "NHWC" if nhwc else "NCHW"), shape))
    if not candidates:
        raise ModelError(
            "found no module with a spatial output [B, C, h, w] (h·w > 1); name the target layer with "
            "--target-layer (e.g. 'layer4'), or use a convolutional model"
        )
    # timm names its last feature stage (``stages.3`` rather than the container ``stages``): prefer that name when
    # it produces the same map.
    info = getattr(model, "feature_info", None)
    named = info[-1].get("module") if isinstance(info, list) and info and isinstance(info[-1], dict) else None
    last, last_shape = candidates[-1]
    for layer, shape in candidates:
        if layer.name == named and shape == last_shape:
            return TargetLayer(layer.name, last.layout)
    return last


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; the error lists a few valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][-8:]
        raise ModelError(f"model has no module {name!r}; the last module names are: {', '.join(names)}") from None
