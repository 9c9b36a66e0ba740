"""Finding the saliency target layer: the last spatial feature map before global pooling."""

from __future__ import annotations

import torch
from torch import nn

from audit.errors import ModelError


def find_target_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the module whose output is the last 4-D map with more than one spatial cell.

    A dummy forward pass records the output shape of every module in execution order; a container (such as
    ResNet's ``layer4``) finishes after its children, so the outermost module producing the final feature map is
    chosen, not an inner ReLU that may be called several times.

    Args:
        model: the classifier, in eval mode.
        example: one input batch, float [B, C, H, W], on the model's device.
    """
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
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
    spatial = [name for name, shape in order if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not spatial:
        raise ModelError(
            "found no module with a spatial output [B, C, h, w] (h·w > 1); name the target layer with "
            "model.target_layer (e.g. 'layer4'), or use a convolutional model"
        )
    return spatial[-1]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; the error lists a few valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][-8:]
        raise ModelError(f"model has no module {name!r}; the last module names are: {', '.join(names)}") from None
