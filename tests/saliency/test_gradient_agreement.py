"""Our input-gradient methods against Captum 0.9.0 (a test-only dependency) on the same models and inputs.

Maps are compared after the same per-map normalisation (each map divided by its max |value|), to 1e-4. Captum's
attributions [B, C, H, W] are reduced over channels as ours are: max |·| for the unsigned methods (Saliency with
abs=True, GuidedBackprop, Deconvolution), the sum for the signed ones (InputXGradient, GuidedGradCam,
IntegratedGradients). SmoothGrad's random draws cannot be matched with NoiseTunnel's (global RNG, absolute σ), so it
is checked against an explicit average of Captum Saliency maps over the same generator's noise.
"""

from __future__ import annotations

import pytest

captum_attr = pytest.importorskip("captum.attr")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from audit.saliency import SaliencyOptions, create_method  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients:UserWarning"),
]

TOLERANCE = 1e-4
OPTIONS = SaliencyOptions(ig_steps=16, smoothgrad_samples=6, smoothgrad_noise=0.15)


class SmallCNN(nn.Module):
    """nn.ReLU modules (one in place), max pooling, a global-average-pooling head; the target layer is features.3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


CASES = {
    "small_cnn": (lambda: SmallCNN().eval(), "features.3", 32),
    "resnet18": (_resnet18, "layer4", 64),  # layer4 is 2×2 at 64 px
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, str, torch.Tensor, torch.Tensor]:
    build, layer, size = CASES[request.param]
    model = build()
    inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = model(inputs).argmax(1)
    return model, layer, inputs, target


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """[B, H, W] → each map divided by its max |value|."""
    return maps / maps.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None]


def max_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (normalise(ours) - normalise(theirs)).abs().max().item()


def captum_maps(name: str, model: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "gradient":
        return captum_attr.Saliency(model).attribute(x, target=target, abs=True).amax(1)
    if name == "gradient_x_input":
        return captum_attr.InputXGradient(model).attribute(x, target=target).sum(1)
    if name == "guided_backprop":
        return captum_attr.GuidedBackprop(model).attribute(x, target=target).abs().amax(1)
    if name == "deconvnet":
        return captum_attr.Deconvolution(model).attribute(x, target=target).abs().amax(1)
    if name == "guided_gradcam":
        # Captum's default interpolate_mode is "nearest"; ours is bilinear, as the paper (see the test below).
        method = captum_attr.GuidedGradCam(model, model.get_submodule(layer))
        return method.attribute(x, target=target, interpolate_mode="bilinear").sum(1)
    if name == "integrated_gradients":  # default method "gausslegendre", zero baseline
        return captum_attr.IntegratedGradients(model).attribute(x, target=target, n_steps=OPTIONS.ig_steps).sum(1)
    raise KeyError(name)


@pytest.mark.parametrize(
    "name",
    ["gradient", "gradient_x_input", "guided_backprop", "deconvnet", "guided_gradcam", "integrated_gradients"],
)
def test_agrees_with_captum(name: str, case: tuple) -> None:
    model, layer, x, target = case
    ours = create_method(name, model, layer, OPTIONS).attribute(x, target)
    theirs = captum_maps(name, model, layer, x, target)
    assert ours.maps.abs().amax() > 0
    assert max_difference(ours.maps, theirs) <= TOLERANCE
    # Captum leaves the ReLU modules as it found them too, so the next case starts from the same model.
    assert all(not m._backward_hooks for m in model.modules())


def test_guided_gradcam_differs_from_captums_default_nearest_upsampling(case: tuple) -> None:
    """Why we do not match Captum's *default*: it upsamples Grad-CAM with "nearest"; the paper (Sec. 3.1) and our
    ``gradcam`` maps use bilinear. With bilinear passed to Captum the maps agree (test above)."""
    model, layer, x, target = case
    ours = create_method("guided_gradcam", model, layer, OPTIONS).attribute(x, target).maps
    nearest = captum_attr.GuidedGradCam(model, model.get_submodule(layer)).attribute(x, target=target).sum(1)
    assert max_difference(ours, nearest) > 1e-2


def test_smoothgrad_is_the_average_of_gradient_maps_over_the_generators_noise(case: tuple) -> None:
    model, layer, x, target = case
    ours = create_method("smoothgrad", model, layer, OPTIONS).attribute(x)
    torch.testing.assert_close(ours.targets, target)  # resolved once, on the clean input
    # The documented draw: one standard-normal tensor [samples, C, H, W] from a CPU generator seeded with the seed,
    # shared by every image and scaled by σ = noise · (max − min) of that image.
    noise = torch.randn((OPTIONS.smoothgrad_samples, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    sigma = OPTIONS.smoothgrad_noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    saliency = captum_attr.Saliency(model)
    # Captum's gradients of each image's noisy copies, taken in one batch per image as ours are: ResNet's max
    # pooling and ReLUs route gradients by comparisons that float rounding can tip, and the rounding depends on the
    # batch size (measured on one machine: the same Captum maps one sample at a time differ by 1e-2 from batched).
    expected = torch.stack([
        saliency.attribute(x[i] + sigma[i] * noise, target=target[i].repeat(len(noise))).amax(1).mean(0)
        for i in range(len(x))
    ])  # fmt: skip
    assert max_difference(ours.maps, expected) <= TOLERANCE


def test_smoothgrad_approaches_the_noise_free_gradient_as_sigma_shrinks(case: tuple) -> None:
    model, layer, x, target = case
    clean = captum_attr.Saliency(model).attribute(x, target=target, abs=True).amax(1)

    def error(noise: float) -> float:
        """Relative L2 distance to the noise-free gradient map, worst image."""
        options = SaliencyOptions(smoothgrad_samples=8, smoothgrad_noise=noise)
        maps = create_method("smoothgrad", model, layer, options).attribute(x, target).maps
        return ((maps - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)).max().item()

    # ReLU networks' gradients are piecewise constant and max pooling switches, so the map converges slowly
    # (roughly as √σ here): 0.43 at σ = 0.3 of the range, 0.26–0.33 at 0.03, 0.05–0.08 at 0.001.
    errors = [error(noise) for noise in (0.3, 0.03, 0.001, 0.0)]
    assert errors[0] > 0.2  # the noise does smooth at σ = 0.3
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.15
    assert errors[3] <= 1e-6
    # Averaging reduces the spread: two 8-sample estimates (different seeds) are closer to each other than two
    # single-sample maps are (variance ∝ 1/samples).
    options = [SaliencyOptions(smoothgrad_samples=n, smoothgrad_noise=0.3, seed=s) for n in (1, 8) for s in (1, 2)]
    maps = [normalise(create_method("smoothgrad", model, layer, o).attribute(x, target).maps) for o in options]
    spread_single = (maps[0] - maps[1]).pow(2).mean()
    spread_mean = (maps[2] - maps[3]).pow(2).mean()
    assert spread_mean < 0.5 * spread_single
