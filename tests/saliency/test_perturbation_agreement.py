"""The perturbation family against references: pytorch-grad-cam's ScoreCAM, Captum's Occlusion (test-only
dependencies, skipped when absent), RISE's expectation on a model where it can be derived by hand, and I-GOS /
iGOS++ on a model that reads one region only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audit.saliency import SaliencyOptions, create_method


class TinyCNN(nn.Module):
    """conv-ReLU-conv(stride 2)-ReLU ("features", 8 channels at half resolution), global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def min_max(maps: torch.Tensor) -> np.ndarray:
    """Per-map min–max normalisation, as pytorch-grad-cam's ``scale_cam_image``."""
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - low) / (high - low)).view_as(maps).numpy()


def resnet18(seed: int = 0) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=3).eval()


# ------------------------------------------------------------------------------------------------ Score-CAM


@pytest.mark.parametrize("case", ["tiny_cnn", "resnet18_layer4"])
def test_scorecam_matches_pytorch_grad_cam(case: str) -> None:
    """Same masks (align_corners=True upsampling, 1e-8 epsilon), same softmax weights; pytorch-grad-cam min–max
    normalises before and after its cv2 bilinear resize, an affine map that commutes with our bilinear upsampling."""
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    if case == "tiny_cnn":
        torch.manual_seed(0)
        model, layer, x = TinyCNN().eval(), "features", torch.randn(2, 3, 24, 24)
    else:  # 512 channels on a 2 × 2 grid at 64 px: 513 forward passes per image, so one image
        model, layer = resnet18(), "layer4"
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = create_method("scorecam", model, layer).attribute(x)
    with grad_cam.ScoreCAM(model, [model.get_submodule(layer)]) as cam:
        reference = cam(x, None)  # targets=None: each image's predicted class
    assert (ours.maps.flatten(1).amax(1) > ours.maps.flatten(1).amin(1)).all()  # not a degenerate constant map
    np.testing.assert_allclose(min_max(ours.maps), reference, atol=1e-4)


# ------------------------------------------------------------------------------------------------ occlusion


@pytest.mark.parametrize(("window", "stride"), [(8, 4), (6, 4), (5, 5)])
def test_occlusion_matches_captum(window: int, stride: int) -> None:
    """(6, 4) on 32 px: the last window overhangs the border and is clipped, as in Captum."""
    attr = pytest.importorskip("captum.attr")
    model = resnet18()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 2])
    options = SaliencyOptions(occlusion_window=window, occlusion_stride=stride)
    ours = create_method("occlusion", model, None, options).attribute(x, target)
    reference = attr.Occlusion(model).attribute(
        x,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=0,
        target=target,
        perturbations_per_eval=32,
    )
    torch.testing.assert_close(ours.maps, reference.sum(1) / 3, atol=1e-4, rtol=0)
    assert ours.maps.abs().amax() > 1e-3


# ------------------------------------------------------------------------------------------------ RISE


class RegionFraction(nn.Module):
    """s = mean of channel 0 over rows and columns [0, 6); logits (log s, log(1 − s)), so softmax = (s, 1 − s)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0, :6, :6].mean((1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([s.log(), (1 - s).log()], 1)


def test_rise_converges_to_its_expectation() -> None:
    """With x ≡ 1 and P_0(x ⊙ M) = s = mean_{v∈R} M(v), RISE estimates S(u) = E[s M(u)] / p.

    Given the random shift, M(u) = Σ_c w_u(c) G_c with G_c ~ Bernoulli(p) independent and bilinear weights
    Σ_c w_u(c) = 1, so E[M(u) M(v)] = p² + p(1 − p) Σ_c w_u(c) w_v(c) and

        S(u) = p + (1 − p) · E_shift[Σ_c w_u(c) · mean_{v∈R} w_v(c)],

    which is exactly p wherever u shares no grid cell with R. Tolerance: one mask's term s·M(u)/p lies in [0, 1/p]
    with E[(s M(u)/p)²] ≤ E[M(u)]/p² = 1/p, so the standard error of the mean over N masks is at most
    (p N)^(-1/2) = 0.01 for N = 20000, p = 0.5; we allow 5 of them at every pixel.
    """
    size, grid, p, count = 24, 4, 0.5, 20000
    x = torch.ones(1, 1, size, size)
    options = SaliencyOptions(rise_masks=count, rise_grid=grid, rise_probability=p, seed=0)
    result = create_method("rise", RegionFraction(), None, options).attribute(x, torch.tensor([0]))

    cell = -(-size // grid)
    one_hot = torch.eye(grid * grid).view(grid * grid, 1, grid, grid)
    weights = F.interpolate(one_hot, size=((grid + 1) * cell,) * 2, mode="bilinear", align_corners=False)[:, 0]
    shared = torch.zeros(size, size)
    for dy in range(cell):
        for dx in range(cell):
            w = weights[:, dy : dy + size, dx : dx + size]  # [cells, H, W] for this shift
            shared += torch.einsum("c,chw->hw", w[:, :6, :6].mean((1, 2)), w)
    expected = p + (1 - p) * shared / cell**2

    tolerance = 5 / (p * count) ** 0.5
    torch.testing.assert_close(result.maps[0], expected, atol=tolerance, rtol=0)
    assert expected[:6, :6].mean() - p > 4 * tolerance  # the region stands out by far more than the noise
    assert torch.allclose(expected[20:, 20:], torch.full((4, 4), p))  # independent of R: exactly p


# ------------------------------------------------------------------------------------------------ I-GOS


SIZE, ROWS, COLS = 64, slice(8, 32), slice(30, 54)


class ReadsOneRegion(nn.Module):
    """logit_0 = 6 · (mean over the region of x² − 0.5), logit_1 = 0: nothing outside the region matters."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(6.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * (x[:, :, ROWS, COLS].square().mean((1, 2, 3)) - 0.5)
        return torch.stack([score, torch.zeros_like(score)], 1)


@pytest.mark.parametrize(("name", "inside", "within_two_cells"), [("igos", 0.75, 0.95), ("igos++", 0.5, 0.85)])
def test_igos_mass_concentrates_on_the_region_the_model_reads(
    name: str, inside: float, within_two_cells: float
) -> None:
    """The region is a ±1 checkerboard (blurring erases it, so deleting it drops P_0 from 0.95 to ≈ 0.05) on a
    noise background the model ignores; it covers 14 % of the image.

    The thresholds leave a margin under what the methods reach (I-GOS 0.78 inside / 0.97 within 4 px, about two
    28-px-mask cells; iGOS++ 0.58 / 0.87): the λ₂ = 20 squared-TV term makes the optimal mask a ramp several cells
    wide around the region, and iGOS++'s insertion mask widens it further.
    """
    generator = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(2, 3, SIZE, SIZE, generator=generator)
    checker = ((torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None, :]) % 2 * 2 - 1).float()
    x[:, :, ROWS, COLS] = checker[ROWS, COLS] * torch.tensor([1.0, 0.9])[:, None, None, None]
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[ROWS, COLS] = True
    model = ReadsOneRegion()
    result = create_method(name, model, None, SaliencyOptions(igos_iterations=15, igos_steps=10)).attribute(x)
    assert (result.targets == 0).all()
    total = result.maps.flatten(1).sum(1)
    assert (result.maps[:, region].sum(1) / total > inside).all()
    grown = F.max_pool2d(region[None, None].float(), 9, 1, 4)[0, 0].bool()  # the region plus 4 px
    assert (result.maps[:, grown].sum(1) / total > within_two_cells).all()
    far = ~F.max_pool2d(region[None, None].float(), 25, 1, 12)[0, 0].bool()  # more than 12 px away
    assert result.maps[:, far].abs().max() < 0.01  # inside, the maps reach 0.3–1
    assert model.scale.grad is None
