"""Input-gradient methods and SmoothGrad: exact values on hand-weighted models, chunking, hooks, the contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audit.errors import ConfigError, ModelError
from audit.saliency import METHODS, SaliencyOptions, SaliencyResult, build_methods, create_method
from audit.saliency.gradient import (
    ChunkPlanner,
    Gradient,
    GradientXInput,
    GuidedBackprop,
    IntegratedGradients,
    SmoothGrad,
    gauss_legendre,
    modified_relu_backward,
)

GRADIENT_METHODS = [
    "gradient",
    "gradient_x_input",
    "guided_backprop",
    "deconvnet",
    "guided_gradcam",
    "integrated_gradients",
    "smoothgrad",
]
FAST = SaliencyOptions(ig_steps=4, smoothgrad_samples=3)


class HandReLU(nn.Module):
    """z = U x (1×1 convolution, 2 → 3 channels), h = ReLU(z), logit_t = Σ_k W_tk mean_p h_k(p); no biases.

    With the mask m_k(p) = 1[z_k(p) > 0] and P pixels, at every pixel p:
      gradient_c       = Σ_k W_tk U_kc m_k / P
      guided backprop  = Σ_k U_kc ReLU(W_tk) m_k / P   (the ReLU's gradient W_tk m_k / P, rectified)
      deconvnet        = Σ_k U_kc ReLU(W_tk) / P       (the signal W_tk / P rectified, the mask ignored)
    The model is positively homogeneous of degree 1, so its gradient is constant along the ray αx and Integrated
    Gradients from the zero baseline equals Gradient × Input exactly.
    """

    U = torch.tensor([[1.0, -2.0], [-1.0, 0.5], [2.0, 1.0]])
    W = torch.tensor([[1.0, -3.0, 0.5], [-2.0, 1.0, 1.5]])

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(self.U[:, :, None, None])
            self.fc.weight.copy_(self.W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))

    @classmethod
    def expected(cls, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Input-space attributions [B, 2, H, W] by the formulas above."""
        pixels = x.shape[2] * x.shape[3]
        u, w = cls.U.to(x), cls.W.to(x)[target]  # [3, 2], [B, 3]
        mask = (torch.einsum("kc,bchw->bkhw", u, x) > 0).to(x)
        gradient = torch.einsum("bk,kc,bkhw->bchw", w, u, mask) / pixels
        guided = torch.einsum("bk,kc,bkhw->bchw", w.clamp_min(0), u, mask) / pixels
        deconv = torch.einsum("bk,kc->bc", w.clamp_min(0), u)[:, :, None, None].expand_as(x) / pixels
        return {"gradient": gradient, "guided_backprop": guided, "deconvnet": deconv}


class TwoLayerCNN(nn.Module):
    """Two convolutions sharing ONE ReLU module (called twice per forward), max and average pooling, a linear head."""

    def __init__(self, activation: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act = activation if activation is not None else nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.squeeze = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.squeeze(self.act(self.conv2(x)))
        return self.fc(x.flatten(1))


class _RuleReLU(torch.autograd.Function):
    """Reference rules written as an autograd Function, independent of the hook machinery."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.rule = rule
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if ctx.rule == "guided":
            return (grad * (x > 0)).clamp_min(0), None
        return grad.clamp_min(0), None


class RuleActivation(nn.Module):
    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RuleReLU.apply(x, self.rule)


class FunctionalReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


def _inputs(batch: int = 3, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cnn() -> TwoLayerCNN:
    return TwoLayerCNN().eval()


def _forward_batch_sizes(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


# --- exact values on the hand-weighted model -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [0, 1])
def test_gradient_guided_and_deconvnet_equal_the_hand_formulas(cls: int, device: torch.device) -> None:
    x = _inputs(channels=2, size=5).to(device)
    target = torch.full((3,), cls, device=device)
    expected = HandReLU.expected(x, target)
    # The three rules must differ on this model, or the test could not tell them apart.
    assert not torch.allclose(expected["gradient"].abs(), expected["guided_backprop"].abs())
    assert not torch.allclose(expected["guided_backprop"].abs(), expected["deconvnet"].abs())
    model = HandReLU().eval().to(device)
    for name, attribution in expected.items():
        result = create_method(name, model).attribute(x, target)
        assert result.maps.device.type == device.type
        torch.testing.assert_close(result.maps, attribution.abs().amax(1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.raw_sum, result.maps.flatten(1).sum(1))
        assert (result.targets == cls).all()


def test_gradient_x_input_and_integrated_gradients_on_a_homogeneous_model() -> None:
    x = _inputs(channels=2, size=5)
    target = torch.tensor([0, 1, 1])
    model = HandReLU().eval()
    expected = (x * HandReLU.expected(x, target)["gradient"]).sum(1)
    gxi = create_method("gradient_x_input", model).attribute(x, target)
    torch.testing.assert_close(gxi.maps, expected, atol=1e-6, rtol=1e-5)
    assert (gxi.maps < 0).any(), "signed: negative evidence is kept"
    ig = create_method("integrated_gradients", model, options=SaliencyOptions(ig_steps=5)).attribute(x, target)
    torch.testing.assert_close(ig.maps, expected, atol=1e-6, rtol=1e-5)


class Cubic(nn.Module):
    """logits = [s³, −s²] with s = Σ v ⊙ x: along the path αx, ∂f/∂α = 3α²s³ is a degree-2 polynomial."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.linspace(-0.5, 1.0, 12).view(1, 3, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (self.v * x).sum((1, 2, 3))
        return torch.stack([s**3, -(s**2)], 1)


def test_integrated_gradients_uses_gauss_legendre_quadrature() -> None:
    # Two Gauss–Legendre points integrate degree ≤ 3 exactly, so completeness (Σ IG = f(x) − f(0)) holds exactly;
    # a one-point rule (the midpoint) gives 3/4 of it, and a 2-step left Riemann sum would give 3/8.
    model = Cubic()
    x = _inputs(batch=2, size=2, seed=3)
    target = torch.zeros(2, dtype=torch.long)
    f = model(x)[:, 0].detach()
    exact = create_method("integrated_gradients", model, options=SaliencyOptions(ig_steps=2)).attribute(x, target)
    torch.testing.assert_close(exact.raw_sum, f, atol=1e-5, rtol=1e-5)
    midpoint = create_method("integrated_gradients", model, options=SaliencyOptions(ig_steps=1)).attribute(x, target)
    torch.testing.assert_close(midpoint.raw_sum, 0.75 * f, atol=1e-5, rtol=1e-5)
    alphas, weights = gauss_legendre(3, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(alphas, torch.tensor([0.5 - 0.15**0.5, 0.5, 0.5 + 0.15**0.5], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([5 / 18, 8 / 18, 5 / 18], dtype=torch.float64))


def test_integrated_gradients_completeness_on_a_relu_cnn(cnn: TwoLayerCNN) -> None:
    x = _inputs(batch=2)
    target = torch.tensor([1, 3])
    result = create_method("integrated_gradients", cnn, options=SaliencyOptions(ig_steps=64)).attribute(x, target)
    with torch.no_grad():
        gap = (cnn(x) - cnn(torch.zeros_like(x))).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(result.raw_sum, gap, atol=2e-2 * gap.abs().max().item(), rtol=0)


# --- guided backprop and deconvnet: hooks ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rule"), [("guided_backprop", "guided"), ("deconvnet", "deconvnet")])
def test_modified_relu_matches_a_reference_autograd_function(name: str, rule: str) -> None:
    """The shared ReLU module is called twice per forward; each call must get its own rule."""
    model = TwoLayerCNN().eval()
    reference = TwoLayerCNN(RuleActivation(rule)).eval()
    reference.load_state_dict(model.state_dict())
    x = _inputs()
    target = torch.tensor([0, 2, 4])
    ours, _, _ = create_method(name, model).input_attribution(x, target)
    x_ref = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(x_ref).gather(1, target[:, None]).sum(), x_ref)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    plain, _, _ = Gradient(model).input_attribution(x, target)
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_relu_forwards_and_inplace_flags_are_restored_even_after_an_error() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    ).eval()
    model(_inputs(batch=1))  # materialise the lazy layer
    relus = [model[1], model[3]]
    with modified_relu_backward(model, "guided") as count:
        assert count == 2
        assert all("forward" in m.__dict__ for m in relus)
        assert [m.inplace for m in relus] == [True, False]  # in-place ReLUs stay in place
    assert [m.inplace for m in relus] == [True, False]
    assert all("forward" not in m.__dict__ for m in relus)
    with pytest.raises(KeyError), modified_relu_backward(model, "deconvnet"):
        raise KeyError("boom")
    assert [m.inplace for m in relus] == [True, False]
    for name in ("guided_backprop", "deconvnet", "guided_gradcam"):
        with pytest.raises(RuntimeError):  # class 7 does not exist: gather fails after the forward pass
            create_method(name, model, "2").attribute(_inputs(batch=2), torch.tensor([0, 7]))
        assert [m.inplace for m in relus] == [True, False]
        assert all(not m._backward_hooks and not m._forward_hooks for m in model.modules())
        assert all("forward" not in m.__dict__ for m in relus)


def test_a_user_patched_relu_forward_is_given_back() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    model(_inputs(batch=1))
    calls = []

    def patched(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.relu(x)

    model[1].forward = patched
    with modified_relu_backward(model, "guided"):
        model(_inputs(batch=1))
    assert calls == []  # the rule's forward ran, not the user's
    assert model[1].forward is patched


def test_inplace_and_out_of_place_relus_give_the_same_guided_maps() -> None:
    torch.manual_seed(0)
    inplace = TwoLayerCNN(nn.ReLU(inplace=True)).eval()
    plain = TwoLayerCNN(nn.ReLU()).eval()
    plain.load_state_dict(inplace.state_dict())
    x = _inputs()
    for name in ("guided_backprop", "deconvnet"):
        a, _, _ = create_method(name, inplace).input_attribution(x, torch.tensor([0, 1, 2]))
        b, _, _ = create_method(name, plain).input_attribution(x, torch.tensor([0, 1, 2]))
        torch.testing.assert_close(a, b)


def test_functional_relu_is_not_modified_and_a_warning_says_so() -> None:
    model = TwoLayerCNN(FunctionalReLU()).eval()
    x = _inputs()
    with pytest.warns(UserWarning, match="no nn.ReLU module"):
        guided = create_method("guided_backprop", model).attribute(x)
    torch.testing.assert_close(guided.maps, create_method("gradient", model).attribute(x).maps)


def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam(cnn: TwoLayerCNN) -> None:
    x = _inputs()
    result = create_method("guided_gradcam", cnn, "conv2").attribute(x)
    cam = create_method("gradcam", cnn, "conv2").attribute(x, result.targets)
    guided, _, _ = GuidedBackprop(cnn).input_attribution(x, result.targets)
    torch.testing.assert_close(result.maps, (guided * cam.maps[:, None]).sum(1), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(result.targets, cnn(x).argmax(1))
    assert (result.maps < 0).any() and (result.maps > 0).any()
    with pytest.raises(ModelError, match="target layer"):
        create_method("guided_gradcam", cnn).attribute(x)


# --- chunking -----------------------------------------------------------------------------------------------------


def test_integrated_gradients_chunks_bound_the_forward_batch_and_do_not_change_the_map(cnn: TwoLayerCNN) -> None:
    x = _inputs(batch=2)
    sizes, handle = _forward_batch_sizes(cnn)
    try:
        chunked = create_method("integrated_gradients", cnn, options=SaliencyOptions(ig_steps=4, samples_per_batch=3))
        small = chunked.attribute(x)
    finally:
        handle.remove()
    assert sizes == [2, 3, 3, 2]  # the clean forward, then 8 path points in chunks of ≤ 3
    whole = create_method("integrated_gradients", cnn, options=SaliencyOptions(ig_steps=4)).attribute(x)
    torch.testing.assert_close(small.maps, whole.maps, atol=1e-6, rtol=1e-5)


def test_chunk_size_follows_the_measured_activation_memory(cnn: TwoLayerCNN) -> None:
    planner = ChunkPlanner(cnn, SaliencyOptions(memory_budget_mb=1))
    small, large = planner.bytes_per_sample(_inputs(size=16)), planner.bytes_per_sample(_inputs(size=32))
    assert 3.0 < large / small < 5.0  # activations scale with the pixel count
    # Each ReLU call saves its output: at 16 px a sample saves ≥ 6·16·16 + 8·8·8 floats, and the estimate is at
    # least twice that (activations and their gradients).
    assert small >= 2 * 4 * (6 * 16 * 16 + 8 * 8 * 8)
    assert planner.chunk_size(_inputs(size=16), 10_000) == 2**20 // small
    assert planner.chunk_size(_inputs(size=16), 3) == 3
    assert ChunkPlanner(cnn, SaliencyOptions(samples_per_batch=5)).chunk_size(_inputs(), 100) == 5


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (IntegratedGradients, SaliencyOptions(ig_steps=0)),
        (SmoothGrad, SaliencyOptions(smoothgrad_samples=0)),
        (SmoothGrad, SaliencyOptions(smoothgrad_noise=-0.1)),
        (IntegratedGradients, SaliencyOptions(samples_per_batch=0)),
        (SmoothGrad, SaliencyOptions(memory_budget_mb=0)),
    ],
)
def test_invalid_options_are_rejected(cls: type, options: SaliencyOptions, cnn: TwoLayerCNN) -> None:
    with pytest.raises(ConfigError):
        cls(cnn, options=options)


# --- SmoothGrad -----------------------------------------------------------------------------------------------------


class SpyBase(Gradient):
    """The vanilla gradient, recording each call's batch size and targets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.calls: list[tuple[int, torch.Tensor]] = []

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        self.calls.append((inputs.shape[0], target))
        return super().attribute(inputs, target)


def test_smoothgrad_chunk_of_one_equals_one_chunk_and_targets_come_from_the_clean_input(cnn: TwoLayerCNN) -> None:
    x = _inputs()
    one = SpyBase(cnn)
    by_one = SmoothGrad(cnn, options=SaliencyOptions(smoothgrad_samples=4, samples_per_batch=1), base=one)
    every = SpyBase(cnn)
    at_once = SmoothGrad(cnn, options=SaliencyOptions(smoothgrad_samples=4), base=every)
    a, b = by_one.attribute(x), at_once.attribute(x)
    assert [size for size, _ in one.calls] == [1] * 12 and [size for size, _ in every.calls] == [12]
    torch.testing.assert_close(a.maps, b.maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.raw_sum, b.raw_sum, atol=1e-5, rtol=1e-5)
    clean = cnn(x).argmax(1)
    torch.testing.assert_close(a.targets, clean)
    torch.testing.assert_close(every.calls[0][1], clean.repeat_interleave(4))
    torch.testing.assert_close(a.logits, cnn(x))


def test_smoothgrad_is_reproducible_and_seeded(cnn: TwoLayerCNN) -> None:
    x = _inputs()
    first = create_method("smoothgrad", cnn, options=FAST).attribute(x).maps
    again = create_method("smoothgrad", cnn, options=FAST).attribute(x).maps
    other = create_method("smoothgrad", cnn, options=SaliencyOptions(smoothgrad_samples=3, seed=1)).attribute(x).maps
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)


def test_smoothgrad_without_noise_is_its_base(cnn: TwoLayerCNN) -> None:
    x = _inputs()
    options = SaliencyOptions(smoothgrad_samples=3, smoothgrad_noise=0.0)
    for base in (Gradient(cnn, options=options), GradientXInput(cnn, options=options)):
        smooth = SmoothGrad(cnn, options=options, base=base)
        assert smooth.signed == base.signed
        torch.testing.assert_close(smooth.attribute(x).maps, base.attribute(x).maps, atol=1e-6, rtol=1e-5)


def test_smoothgrad_noise_scales_with_each_images_range() -> None:
    # HandReLU's gradient is invariant to scaling its input (degree-1 homogeneous model), so with σ proportional to
    # each image's range, SmoothGrad(10 x) = SmoothGrad(x); an absolute σ would smooth 10 x ten times less.
    model = HandReLU().eval()
    x = _inputs(batch=2, channels=2, size=5)
    method = create_method("smoothgrad", model, options=SaliencyOptions(smoothgrad_samples=8, smoothgrad_noise=0.5))
    plain = method.attribute(x).maps
    torch.testing.assert_close(method.attribute(10 * x).maps, plain, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(plain, create_method("gradient", model).attribute(x).maps, atol=1e-4)


def test_smoothgrad_wraps_any_method_through_the_engine(cnn: TwoLayerCNN) -> None:
    methods = build_methods(["smoothgrad:gradient_x_input", "smoothgrad:guided_gradcam"], cnn, "conv2", FAST)
    gxi, ggc = methods["smoothgrad:gradient_x_input"], methods["smoothgrad:guided_gradcam"]
    assert isinstance(gxi, SmoothGrad) and isinstance(gxi.base, GradientXInput) and gxi.signed
    assert isinstance(ggc, SmoothGrad) and ggc.needs_layer and ggc.signed
    assert ggc.attribute(_inputs()).maps.shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="another model"):
        SmoothGrad(cnn, base=Gradient(TwoLayerCNN()))


# --- the contract, for every method of this file -------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_contract(name: str, device: torch.device) -> None:
    """Shape, device, sign, batch = per image, default target, no parameter gradient, no hook left behind."""
    model = TwoLayerCNN().eval().to(device)  # parameters deliberately left requiring grad
    assert all(p.requires_grad for p in model.parameters())
    x = _inputs(batch=3).to(device)
    method = create_method(name, model, "conv2", FAST)
    assert method.family == "gradient" and METHODS.get(name).reference
    batch = method.attribute(x)
    singles = torch.cat([method.attribute(x[i : i + 1]).maps for i in range(3)])
    torch.testing.assert_close(batch.maps, singles, atol=1e-6, rtol=1e-4)
    assert batch.maps.shape == (3, 16, 16) and batch.maps.device.type == device.type
    assert batch.raw_sum.shape == (3,) and batch.targets.shape == (3,)
    if not method.signed:
        assert (batch.maps >= 0).all()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(batch.logits, logits)
    torch.testing.assert_close(batch.targets, logits.argmax(1))
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.act.inplace
