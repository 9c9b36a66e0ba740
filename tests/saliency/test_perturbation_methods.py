"""The perturbation family (Score-CAM, RISE, occlusion, I-GOS, iGOS++): contract, exact values on small models,
chunking under a memory budget, and the Score-CAM channel budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audit.errors import ConfigError, ModelError, ShapeError
from audit.saliency import METHODS, SaliencyOptions, create_method
from audit.saliency.perturbation import (
    RiseMasks,
    blur_baseline,
    chunk_size,
    measure_forward_bytes,
    occlusion_cover,
    sample_bytes,
    scorecam_agreement,
    total_variation,
)

PERTURBATION_METHODS = ["scorecam", "rise", "occlusion", "igos", "igos++"]
FAST = SaliencyOptions(
    rise_masks=48, rise_grid=4, occlusion_window=4, occlusion_stride=2, igos_iterations=3, igos_steps=3
)


class TinyCNN(nn.Module):
    """conv-ReLU-conv(stride 2)-ReLU ("features", 8 channels at half resolution), global average pool, linear."""

    def __init__(self, in_channels: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class LinearScore(nn.Module):
    """logit_0 = Σ_u v(u)·Σ_c x_c(u), logit_1 = 0: occluding a window drops logit_0 by Σ over the window."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x.sum(1) * self.weights).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], 1)


class BatchRecorder:
    """Records the batch size of every forward pass of a model (a forward pre-hook, removed on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sizes: list[int] = []

    def __enter__(self) -> BatchRecorder:
        self.handle = self.model.register_forward_pre_hook(lambda _m, args: self.sizes.append(args[0].shape[0]))
        return self

    def __exit__(self, *_exc: object) -> None:
        self.handle.remove()


@pytest.fixture
def model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()  # parameters deliberately left requiring grad


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_registered_with_metadata() -> None:
    signed = {"scorecam": False, "rise": False, "occlusion": True, "igos": False, "igos++": False}
    for name in PERTURBATION_METHODS:
        cls = METHODS.get(name)
        assert cls.name == name
        assert cls.family == "perturbation"
        assert cls.signed is signed[name]
        assert cls.needs_layer is (name == "scorecam")
        assert cls.reference


@pytest.mark.parametrize("name", PERTURBATION_METHODS)
def test_contract(name: str, model: TinyCNN, images: torch.Tensor, device: torch.device) -> None:
    """Shape, device, sign, default target, clean logits, batch = per image, no parameter gradient, no hook."""
    model = model.to(device)
    x = images.to(device)
    method = create_method(name, model, "features", FAST)
    batch = method.attribute(x)
    assert batch.maps.shape == (3, 12, 12) and batch.maps.device.type == device.type
    assert batch.raw_sum.shape == (3,) and torch.isfinite(batch.maps).all()
    with torch.no_grad():
        clean = model(x)
    torch.testing.assert_close(batch.logits, clean)
    torch.testing.assert_close(batch.targets, clean.argmax(1))
    if not method.signed:
        assert (batch.maps >= 0).all()
    singles = [method.attribute(x[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(batch.maps, torch.cat([s.maps for s in singles]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batch.raw_sum, torch.cat([s.raw_sum for s in singles]), atol=1e-5, rtol=1e-5)
    assert batch.maps.abs().amax() > 0  # the method did something
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", PERTURBATION_METHODS)
def test_explicit_target_is_explained(name: str, model: TinyCNN, images: torch.Tensor) -> None:
    method = create_method(name, model, "features", FAST)
    target = torch.tensor([2, 0, 1])
    result = method.attribute(images, target)
    torch.testing.assert_close(result.targets, target)
    other = method.attribute(images, (target + 1) % 3)
    assert not torch.allclose(result.maps, other.maps)


@pytest.mark.parametrize("name", PERTURBATION_METHODS)
def test_tiny_chunks_give_the_same_maps(name: str, model: TinyCNN, images: torch.Tensor) -> None:
    """Memory bounded, result unchanged: 3 samples per forward pass vs everything in one pass."""
    small = SaliencyOptions(**{**FAST.__dict__, "samples_per_batch": 3})
    with BatchRecorder(model) as tiny:
        chunked = create_method(name, model, "features", small).attribute(images)
    with BatchRecorder(model) as large:
        whole = create_method(name, model, "features", FAST).attribute(images)
    assert max(tiny.sizes[1:]) <= 3 < max(large.sizes[1:])  # sizes[0] is the clean forward pass
    torch.testing.assert_close(chunked.maps, whole.maps, atol=1e-6, rtol=1e-5)


def test_memory_budget_sets_the_chunk() -> None:
    """A 1 MB budget on a 3 × 64 × 64 input allows only a few samples per pass, as the estimate says."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), measure_forward_bytes(model) as footprint:
        model(x)
    # conv 6×64², ReLU 6×64², conv 8×32², ReLU 8×32², pool 8, fc 3 floats per image.
    assert footprint[0] // 2 == 4 * (2 * 6 * 64 * 64 + 2 * 8 * 32 * 32 + 8 + 3)
    options = SaliencyOptions(memory_budget_mb=1, occlusion_window=32, occlusion_stride=16)
    assert footprint[1] // 2 == 4 * 6 * 64 * 64  # the largest output: the first convolution's
    expected = chunk_size(
        sample_bytes(footprint[0] // 2, 4 * 3 * 64 * 64, input_copies=3, largest_output=footprint[1] // 2), options
    )
    assert expected == 2**20 // (4 * footprint[1] // 2 + 3 * 4 * 3 * 64 * 64)
    with BatchRecorder(model) as recorder:
        create_method("occlusion", model, None, options).attribute(x)
    assert max(recorder.sizes[1:]) == expected < 2 * 9  # 9 windows × 2 images would not fit
    assert chunk_size(10, SaliencyOptions(memory_budget_mb=1, samples_per_batch=7)) == 7
    assert chunk_size(10**9, SaliencyOptions(memory_budget_mb=1)) == 1
    with pytest.raises(ConfigError):
        chunk_size(10, SaliencyOptions(samples_per_batch=0))


@pytest.mark.parametrize("name", PERTURBATION_METHODS)
def test_hooks_released_after_an_error(name: str, model: TinyCNN, images: torch.Tensor) -> None:
    """Two input channels for a three-channel model: the first forward pass fails while the hooks are in place."""
    with pytest.raises(RuntimeError):
        create_method(name, model, "features", FAST).attribute(images[:, :2])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_shape_and_layer_errors(model: TinyCNN, images: torch.Tensor) -> None:
    with pytest.raises(ShapeError):
        create_method("rise", model, None, FAST).attribute(images[0])
    with pytest.raises(ShapeError):
        create_method("occlusion", model, None, FAST).attribute(images, torch.tensor([0, 1]))
    with pytest.raises(ModelError):
        create_method("scorecam", model, None, FAST).attribute(images)


# ------------------------------------------------------------------------------------------------ Score-CAM


def naive_scorecam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Score-CAM one image and one channel at a time, as the paper and pytorch-grad-cam describe it."""
    maps = []
    with torch.no_grad():
        for i in range(len(x)):
            a = model.features(x[i : i + 1])[0]  # [C, h, w]
            channels = range(a.shape[0]) if keep is None else a.mean((1, 2)).topk(keep).indices.tolist()
            scores, used = [], []
            for k in channels:
                up = F.interpolate(a[None, k : k + 1], size=x.shape[-2:], mode="bilinear", align_corners=True)[0, 0]
                mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                scores.append(model(x[i : i + 1] * mask)[0, target[i]])
                used.append(a[k])
            weights = torch.softmax(torch.stack(scores), 0)
            low = torch.relu((weights[:, None, None] * torch.stack(used)).sum(0))
            maps.append(F.interpolate(low[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(maps)


def test_scorecam_equals_the_naive_loop(model: TinyCNN, images: torch.Tensor) -> None:
    result = create_method("scorecam", model, "features").attribute(images)
    torch.testing.assert_close(result.maps, naive_scorecam(model, images, result.targets), atol=1e-6, rtol=1e-5)


def test_scorecam_channel_budget(model: TinyCNN, images: torch.Tensor) -> None:
    full = create_method("scorecam", model, "features").attribute(images)
    every = create_method("scorecam", model, "features", SaliencyOptions(scorecam_channels=8)).attribute(images)
    torch.testing.assert_close(every.maps, full.maps)
    with BatchRecorder(model) as recorder:
        budget = create_method("scorecam", model, "features", SaliencyOptions(scorecam_channels=3)).attribute(images)
    assert sum(recorder.sizes) == 3 + 3 * 3  # the clean pass plus k masked inputs per image
    torch.testing.assert_close(budget.maps, naive_scorecam(model, images, budget.targets, keep=3), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(budget.maps, full.maps)
    agreement = scorecam_agreement(full.maps, budget.maps)
    assert agreement.shape == (3,) and ((agreement > -1) & (agreement <= 1)).all()
    with pytest.raises(ConfigError):
        create_method("scorecam", model, "features", SaliencyOptions(scorecam_channels=0)).attribute(images)


def test_scorecam_agreement_is_spearman_with_average_ranks() -> None:
    a = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 5.0, 5.0, 6.0, 9.0], [5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    # Row 0 by hand: ranks a = [0.5, 0.5, 2, 3, 4], b = [0, 1.5, 1.5, 3, 4]; centred (mean 2): a = [-1.5, -1.5, 0, 1,
    # 2], b = [-2, -0.5, -0.5, 1, 2]; covariance 3 + 0.75 + 0 + 1 + 4 = 8.75, norms √9.5 and √9.5 → 8.75 / 9.5.
    result = scorecam_agreement(a, b)
    torch.testing.assert_close(result[:2], torch.tensor([8.75 / 9.5, -1.0]))
    assert torch.isnan(result[2])  # a constant map has no ranking
    stats = pytest.importorskip("scipy.stats")
    x = torch.randn(4, 6, 7, generator=torch.Generator().manual_seed(0)).relu()  # many ties at zero
    y = (x + 0.3 * torch.randn(4, 6, 7, generator=torch.Generator().manual_seed(1))).relu()
    expected = [stats.spearmanr(x[i].flatten().numpy(), y[i].flatten().numpy()).statistic for i in range(4)]
    torch.testing.assert_close(scorecam_agreement(x, y), torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ShapeError):
        scorecam_agreement(x, y[:, :5])


# ------------------------------------------------------------------------------------------------ RISE


def test_rise_equals_its_formula_on_the_same_masks(model: TinyCNN, images: torch.Tensor) -> None:
    options = SaliencyOptions(rise_masks=40, rise_grid=3, rise_probability=0.3, seed=5)
    result = create_method("rise", model, None, options).attribute(images)
    masks = RiseMasks(40, 3, 0.3, (12, 12), seed=5).build(0, 40, images.device)
    with torch.no_grad():
        probability = torch.stack(
            [torch.softmax(model(images * m), 1)[torch.arange(3), result.targets] for m in masks], 1
        )  # [B, N]
    expected = torch.einsum("bn,nhw->bhw", probability, masks) / (40 * 0.3)
    torch.testing.assert_close(result.maps, expected, atol=1e-6, rtol=1e-5)


def test_rise_masks_follow_the_paper_and_are_reproducible() -> None:
    masks = RiseMasks(3000, 4, 0.25, (10, 13), seed=3)
    assert masks.cell == (3, 4)  # ⌈H/s⌉, ⌈W/s⌉
    built = masks.build(0, 3000, torch.device("cpu"))
    assert built.shape == (3000, 10, 13) and built.min() >= 0 and built.max() <= 1
    # Bilinear interpolation of Bernoulli(p) cells is a convex combination: every pixel has expectation p.
    assert abs(float(built.mean()) - 0.25) < 0.01
    assert (built.mean(0) - 0.25).abs().max() < 0.05
    torch.testing.assert_close(
        RiseMasks(3000, 4, 0.25, (10, 13), seed=3).build(7, 20, torch.device("cpu")), built[7:20]
    )  # chunking never changes a mask
    assert not torch.equal(RiseMasks(3000, 4, 0.25, (10, 13), seed=4).build(0, 20, torch.device("cpu")), built[:20])
    shifts = torch.stack([masks.shift_y, masks.shift_x], 1)
    assert shifts.amin(0).tolist() == [0, 0] and shifts.amax(0).tolist() == [2, 3]  # random shift in [0, cell)


# ------------------------------------------------------------------------------------------------ occlusion


def test_occlusion_of_a_linear_score_is_exact() -> None:
    """Window 1: the drop is v(u)·Σ_c x_c(u) (gradient × input); window 2 stride 1: the mean of window sums."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(5, 6, generator=generator)
    x = torch.randn(2, 3, 5, 6, generator=generator)
    model = LinearScore(weights)
    target = torch.zeros(2, dtype=torch.long)
    one = create_method("occlusion", model, None, SaliencyOptions(occlusion_window=1, occlusion_stride=1))
    torch.testing.assert_close(one.attribute(x, target).maps, weights * x.sum(1), atol=1e-5, rtol=1e-5)
    two = create_method("occlusion", model, None, SaliencyOptions(occlusion_window=2, occlusion_stride=1))
    contribution = weights * x.sum(1)
    window_sums = F.avg_pool2d(contribution[:, None], 2, stride=1)[:, 0] * 4  # [2, 4, 5]
    covering = F.pad(window_sums, (1, 1, 1, 1)).unfold(1, 2, 1).unfold(2, 2, 1).sum((-1, -2))
    count = F.pad(torch.ones(4, 5), (1, 1, 1, 1)).unfold(0, 2, 1).unfold(1, 2, 1).sum((-1, -2))
    torch.testing.assert_close(two.attribute(x, target).maps, covering / count, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_occlusion_windows_follow_captum() -> None:
    cover = occlusion_cover(11, 4, 3, torch.device("cpu"))  # ⌈(11 − 4)/3⌉ + 1 = 4 starts: 0, 3, 6, 9 (clipped)
    assert cover.sum(1).tolist() == [4, 4, 4, 2] and cover[3, 9:].all()
    assert occlusion_cover(10, 4, 3, torch.device("cpu")).shape == (3, 10)  # 0, 3, 6: the last one ends at 10
    assert occlusion_cover(5, 16, 8, torch.device("cpu")).tolist() == [[True] * 5]  # window clipped to the image
    with pytest.raises(ConfigError):
        occlusion_cover(32, 4, 8, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ I-GOS


def test_blur_baseline_matches_cv2() -> None:
    cv2 = pytest.importorskip("cv2")
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = cv2.GaussianBlur(image[0].permute(1, 2, 0).numpy(), (51, 51), sigmaX=50)
    torch.testing.assert_close(
        blur_baseline(image)[0], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-5, rtol=1e-4
    )
    small = torch.rand(2, 1, 4, 5)
    assert blur_baseline(small).shape == small.shape


def test_total_variation_by_hand() -> None:
    mask = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    # vertical diffs: (1-0)², (1-1)² → mean 0.5; horizontal: (1-0)², (1-1)² → mean 0.5.
    torch.testing.assert_close(total_variation(mask), torch.tensor([1.0]))
    assert total_variation(torch.ones(1, 1, 5)).item() == 0


def test_igos_without_iterations_explains_nothing(model: TinyCNN, images: torch.Tensor) -> None:
    options = SaliencyOptions(igos_iterations=0)
    for name in ("igos", "igos++"):
        result = create_method(name, model, None, options).attribute(images)
        assert result.maps.abs().max() == 0 and result.raw_sum.abs().max() == 0
