"""Grad-CAM against a tiny model whose map can be computed by hand, plus the method contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from audit.errors import ShapeError, UnknownNameError
from audit.saliency import METHODS, create_method


class HandModel(nn.Module):
    """features: A_0 = x, A_1 = -x (1×1 convolution); head: global average pool and W = [[2, 1], [-1, 3]].

    logit_c = Σ_k W_ck mean(A_k), so ∂logit_c/∂A_k = W_ck / (h·w) everywhere, α_k = W_ck / (h·w), and
    Grad-CAM_c = ReLU(Σ_k W_ck A_k) / (h·w) = ReLU((W_c0 − W_c1) · x) / (h·w):
    class 0 → ReLU(x) / hw, class 1 → ReLU(−4x) / hw.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 2, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [-1.0, 3.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 4, 5, generator=generator)


def test_gradcam_equals_hand_computation(inputs: torch.Tensor, device: torch.device) -> None:
    model = HandModel().eval().to(device)
    x = inputs.to(device)
    hw = 4 * 5
    for cls, expected in ((0, torch.relu(x[:, 0]) / hw), (1, torch.relu(-4 * x[:, 0]) / hw)):
        target = torch.full((3,), cls, dtype=torch.long, device=device)
        result = create_method("gradcam", model, "features").attribute(x, target)
        assert result.maps.shape == (3, 4, 5)
        assert result.maps.device.type == device.type
        torch.testing.assert_close(result.maps, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.raw_sum, expected.flatten(1).sum(1), atol=1e-6, rtol=1e-5)
        assert (result.targets == cls).all()


def test_default_target_is_the_prediction(inputs: torch.Tensor) -> None:
    model = HandModel().eval()
    result = create_method("gradcam", model, "features").attribute(inputs)
    torch.testing.assert_close(result.targets, model(inputs).argmax(1))
    torch.testing.assert_close(result.logits, model(inputs))


@pytest.mark.parametrize("name", METHODS.names())
def test_contract_batch_equals_single_and_leaves_nothing_behind(name: str, inputs: torch.Tensor) -> None:
    """Every registered method: shape, sign, batch = per image, no hook left, no parameter gradient."""
    model = HandModel().eval()  # parameters deliberately left requiring grad
    method = create_method(name, model, "features")
    batch = method.attribute(inputs)
    singles = torch.cat([method.attribute(inputs[i : i + 1]).maps for i in range(len(inputs))])
    if name.startswith("igos"):
        # I-GOS's Armijo line search compares two nearly equal numbers per image and step; float rounding that
        # differs between batch sizes (the CPU's kernels sum in another order) can flip one such tie on some
        # machines and move a pixel or two. Mixing images in a batch would change most of the map.
        close = torch.isclose(batch.maps, singles, atol=1e-6, rtol=1e-5)
        assert close.float().mean() >= 0.95, f"{int((~close).sum())} of {close.numel()} values differ"
    else:
        torch.testing.assert_close(batch.maps, singles, atol=1e-6, rtol=1e-5)
    assert batch.maps.shape == (3, 4, 5)
    if not method.signed:
        assert (batch.maps >= 0).all()
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_hooks_released_after_an_error(inputs: torch.Tensor) -> None:
    model = HandModel().eval()
    method = create_method("gradcam", model, "features")
    with pytest.raises(RuntimeError):
        method.attribute(inputs, torch.tensor([0, 1, 7]))  # class 7 does not exist: gather fails mid-way
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_inputs_and_names() -> None:
    model = HandModel().eval()
    method = create_method("gradcam", model, "features")
    with pytest.raises(ShapeError, match=r"\[B, C, H, W\]"):
        method.attribute(torch.zeros(1, 4, 5))
    with pytest.raises(ShapeError, match="one class per sample"):
        method.attribute(torch.zeros(2, 1, 4, 5), torch.tensor([0]))
    with pytest.raises(UnknownNameError, match="gradcam"):
        create_method("grad-cam-typo", model, "features")


def test_gradcam_upsamples_to_the_input_and_localises() -> None:
    """A bright patch in the input is where the map peaks after upsampling from a stride-2 layer."""
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 1, 2, stride=2, bias=False), nn.ReLU()))
    model.add_module("pool", nn.AdaptiveMaxPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model.features[0].weight.fill_(0.25)
        model.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    model.eval()
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 10:12, 4:6] = 1.0
    result = create_method("gradcam", model, "features").attribute(x, torch.tensor([0]))
    assert result.maps.shape == (1, 16, 16)
    peak = torch.nonzero(result.maps[0] == result.maps[0].max())
    assert ((peak[:, 0] >= 9) & (peak[:, 0] <= 12) & (peak[:, 1] >= 3) & (peak[:, 1] <= 6)).all()
