"""Tests of choosing the saliency target layer, and of looking modules up by name."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from audit.errors import ModelError
from audit.models.layers import find_target_layer, get_module
from audit.models.probe import ProbeNet


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_torchvision_resnet18() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    assert find_target_layer(model, torch.zeros(1, 3, 64, 64)).name == "layer4"
    assert _no_hooks_left(model)


def test_timm_resnet18() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    assert find_target_layer(model, torch.zeros(1, 3, 64, 64)).name == "layer4"
    assert _no_hooks_left(model)


def test_probe_net() -> None:
    model = ProbeNet(2, width=4).eval()
    assert find_target_layer(model, torch.zeros(2, 1, 32, 32)).name == "features"
    assert _no_hooks_left(model)


def test_outermost_container_chosen_over_inner_relu() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()),  # "0": ends with an inner ReLU ("0.1")
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 2),
    ).eval()
    assert find_target_layer(model, torch.zeros(1, 1, 8, 8)).name == "0"


def test_input_too_small_for_spatial_output_picks_earlier_layer() -> None:
    # At 32 px the resnet's layer4 is 1×1, which carries no location; the last map with h·w > 1 is layer3.
    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    assert find_target_layer(model, torch.zeros(1, 3, 32, 32)).name == "layer3"


def test_no_spatial_output_raises() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    with pytest.raises(ModelError, match="no module with a spatial output.*target-layer"):
        find_target_layer(model, torch.zeros(1, 3, 4, 4))
    assert _no_hooks_left(model)


def test_hooks_removed_after_forward_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Linear(5, 2)).eval()  # Linear gets the wrong width
    with pytest.raises(RuntimeError):
        find_target_layer(model, torch.zeros(1, 3, 8, 8))
    assert _no_hooks_left(model)


def test_get_module() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    assert get_module(model, "layer4") is model.layer4
    assert get_module(model, "layer4.1.conv2") is model.layer4[1].conv2


def test_get_module_unknown_name() -> None:
    model = ProbeNet(2, width=4)
    with pytest.raises(ModelError, match=r"no module 'layer4'.*classifier"):
        get_module(model, "layer4")
