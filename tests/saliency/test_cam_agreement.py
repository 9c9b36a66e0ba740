"""The CAM family against pytorch-grad-cam (grad-cam 1.5.7) and Captum on the same models and inputs.

pytorch-grad-cam returns min–max-normalised maps ((m − min) / (max + 1e-7), after resizing with OpenCV); ours
keep their scale, so each of ours is normalised the same way before the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from audit.models.layers import TargetLayer
from audit.saliency import build_methods, explain

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

REFERENCE = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "hirescam": pgc.HiResCAM,
}


def _minmax(maps: np.ndarray) -> np.ndarray:
    low = maps.reshape(len(maps), -1).min(1)[:, None, None]
    shifted = maps - low
    return shifted / (shifted.reshape(len(maps), -1).max(1)[:, None, None] + 1e-7)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    # Random BN statistics, so that activations are not all alike and the variants differ from each other.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_cam_variant_equals_pytorch_grad_cam(name: str, resnet: torch.nn.Module, inputs: torch.Tensor) -> None:
    targets = [1, 3, 0]
    ours = explain(build_methods([name], resnet, "layer4"), inputs, torch.tensor(targets))[name].maps.numpy()
    with REFERENCE[name](model=resnet, target_layers=[resnet.layer4]) as reference:
        theirs = reference(input_tensor=inputs, targets=[ClassifierOutputTarget(t) for t in targets])
    np.testing.assert_allclose(_minmax(ours), theirs, atol=1e-4)


def test_all_variants_together_equal_each_alone(resnet: torch.nn.Module, inputs: torch.Tensor) -> None:
    names = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam"]
    together = explain(build_methods(names, resnet, "layer4"), inputs)
    for name in names:
        alone = explain(build_methods([name], resnet, "layer4"), inputs)[name]
        torch.testing.assert_close(together[name].maps, alone.maps, atol=1e-6, rtol=1e-5)
        assert torch.equal(together[name].targets, together["gradcam"].targets)


def test_eigencam_equals_pytorch_grad_cam_up_to_the_svd_sign(resnet: torch.nn.Module, inputs: torch.Tensor) -> None:
    """pytorch-grad-cam keeps the SVD's arbitrary sign; we fix it (largest |value| positive). So the reference
    projection is given our sign rule before ReLU, resize and normalisation."""
    captured = {}
    handle = resnet.layer4.register_forward_hook(lambda _m, _i, out: captured.setdefault("a", out.detach()))
    with torch.no_grad():
        resnet(inputs)
    handle.remove()
    projection = get_2d_projection(captured["a"].numpy())  # [B, h, w]
    flat = projection.reshape(len(projection), -1)
    flip = np.abs(flat.max(1)) < np.abs(flat.min(1))
    projection = np.where(flip[:, None, None], -projection, projection)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(np.maximum(projection, 0))[:, None], size=(96, 96), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    ours = explain(build_methods(["eigencam"], resnet, "layer4"), inputs)["eigencam"].maps.numpy()
    np.testing.assert_allclose(_minmax(ours), _minmax(reference), atol=1e-4)


def test_gradcam_equals_captum_layer_gradcam(resnet: torch.nn.Module, inputs: torch.Tensor) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    targets = torch.tensor([2, 0, 1])
    ours = explain(build_methods(["gradcam"], resnet, "layer4"), inputs, targets)["gradcam"]
    layer = captum_attr.LayerGradCam(resnet, resnet.layer4).attribute(inputs, target=targets, relu_attributions=True)
    theirs = captum_attr.LayerAttribution.interpolate(layer, (96, 96), interpolate_mode="bilinear")[:, 0]
    torch.testing.assert_close(ours.maps, theirs.clamp_min(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.raw_sum, layer[:, 0].flatten(1).sum(1), atol=1e-5, rtol=1e-4)


def test_cam_equals_gradcam_times_area_on_an_average_pooling_head(
    resnet: torch.nn.Module, inputs: torch.Tensor
) -> None:
    """Zhou et al.'s CAM Σ_k w_ck A_k equals Grad-CAM × h·w when the head is global average pooling + linear
    (before the ReLU; both are ReLU'd the same way)."""
    results = explain(build_methods(["cam", "gradcam"], resnet, "layer4"), inputs)
    h, w = 3, 3  # layer4 of a 96 px input
    torch.testing.assert_close(results["cam"].maps, results["gradcam"].maps * h * w, atol=1e-4, rtol=1e-4)


def test_vision_transformer_tokens_are_read_on_the_patch_grid() -> None:
    """ViT: Grad-CAM on the tokens entering the last block equals pytorch-grad-cam with its documented
    reshape_transform (class token dropped, tokens reshaped to the grid)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    layer = TargetLayer("blocks.11.norm1", "tokens", prefix_tokens=1, grid=(4, 4))
    ours = explain(build_methods(["gradcam"], model, layer), x, torch.tensor([0, 2]))["gradcam"].maps.numpy()

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:, :].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)

    with pgc.GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape) as reference:
        theirs = reference(input_tensor=x, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(2)])
    np.testing.assert_allclose(_minmax(ours), theirs, atol=1e-4)
