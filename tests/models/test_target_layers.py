"""Target layers of the architectures the README lists as checked, and reading them as [B, C, h, w]."""

from __future__ import annotations

import pytest
import timm
import torch

from audit.errors import ModelError
from audit.models.layers import TargetLayer, describe_layer, find_target_layer


@pytest.mark.parametrize(
    ("arch", "size", "expected"),
    [
        ("convnext_atto", 64, TargetLayer("stages.3", "NCHW")),
        ("efficientnet_b0", 64, TargetLayer("bn2", "NCHW")),
        ("vit_tiny_patch16_224", 64, TargetLayer("blocks.11.norm1", "tokens", 1, (4, 4))),
        ("swin_tiny_patch4_window7_224", 224, TargetLayer("layers.3", "NHWC")),
    ],
)
def test_timm_architectures(arch: str, size: int, expected: TargetLayer) -> None:
    kwargs = {"img_size": size} if arch.startswith("vit") else {}
    model = timm.create_model(arch, pretrained=False, num_classes=2, **kwargs).eval()
    layer = find_target_layer(model, torch.zeros(1, 3, size, size))
    assert layer == expected


def test_token_layout_drops_prefix_tokens_and_keeps_the_grid() -> None:
    layer = TargetLayer("x", "tokens", prefix_tokens=1, grid=(2, 3))
    tokens = torch.arange(1 * 7 * 4, dtype=torch.float32).reshape(1, 7, 4)  # [B, 1 + 2·3, C]
    spatial = layer.to_spatial(tokens)
    assert spatial.shape == (1, 4, 2, 3)
    # Patch token (row 1, column 2) is token 1 + 1·3 + 2 = 6.
    assert torch.equal(spatial[0, :, 1, 2], tokens[0, 6])
    with pytest.raises(ModelError, match="grid"):
        TargetLayer("x", "tokens", prefix_tokens=0, grid=(2, 3)).to_spatial(tokens)


def test_channels_last_layout() -> None:
    nhwc = torch.randn(2, 3, 5, 8)
    assert torch.equal(TargetLayer("x", "NHWC").to_spatial(nhwc), nhwc.permute(0, 3, 1, 2))


def test_user_named_layer_gets_its_layout() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32).eval()
    layer = describe_layer(vit, "blocks.5", torch.zeros(1, 3, 32, 32))
    assert layer == TargetLayer("blocks.5", "tokens", 1, (2, 2))
    with pytest.raises(ModelError, match="no module"):
        describe_layer(vit, "blocks.99", torch.zeros(1, 3, 32, 32))
