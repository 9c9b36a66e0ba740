"""Input-gradient methods, and SmoothGrad as a wrapper around any method.

Every method here costs one forward pass plus one *input-only* backward pass per gradient it needs
(../shared/notes/saliency-baselines.md): gradients are taken with ``torch.autograd.grad`` with respect to the input,
so no weight gradient is computed and no parameter ``.grad`` is ever written. Integrated Gradients and SmoothGrad
expand each image into many samples; the samples of all the images in the batch go through the model together, in
chunks of at most ``samples_per_batch`` samples (or as many as ``memory_budget_mb`` allows, see
:class:`ChunkPlanner`).

Sign policy (``signed``, base module docstring):

* unsigned, max |·| over channels (Simonyan et al. 2014, Sec. 3.1): ``gradient``, ``guided_backprop``,
  ``deconvnet``. Guided Backprop and DeconvNet attributions can be negative at the input (the first layer's
  weights are not rectified), and their maps are the magnitude, as Captum's attributions reduced with ``abs``;
* signed, channel sum: ``gradient_x_input``, ``integrated_gradients``, ``guided_gradcam``;
* ``smoothgrad`` follows the method it wraps.

Results agree with Captum 0.9.0 after per-map normalisation (tests/saliency/test_gradient_agreement.py).
"""

from __future__ import annotations

import functools
import types
import warnings
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn

from audit.errors import ConfigError
from audit.models.layers import TargetLayer
from audit.saliency.base import (
    METHODS,
    SaliencyMethod,
    SaliencyOptions,
    SaliencyResult,
    check_inputs,
    raw_sum,
    reduce_channels,
    resolve_target,
    target_scores,
)
from audit.saliency.cam import GradCAM, cam_maps

Attribution = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (attribution [B, C, H, W], logits [B, K], targets [B])


def input_gradient(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | None) -> Attribution:
    """∂y_t/∂x of each sample's target score: one forward and one input-only backward.

    Args:
        model: the classifier in eval mode (samples independent, so the gradient of the summed scores gives each
            sample its own gradient).
        inputs: float [B, C, H, W].
        target: int [B] or None for the prediction.

    Returns:
        gradient [B, C, H, W], logits [B, K] (detached) and targets [B].
    """
    with torch.enable_grad():
        x = inputs.detach().requires_grad_(True)
        logits = model(x)
        target = resolve_target(logits, target)
        (gradient,) = torch.autograd.grad(target_scores(logits, target).sum(), x)
    return gradient, logits.detach(), target


class ChunkPlanner:
    """How many expanded samples (IG path points, SmoothGrad noisy copies) go through the model at once.

    ``options.samples_per_batch`` when set; otherwise ``memory_budget_mb`` divided by the memory one sample needs,
    estimated once per input shape from one forward pass of one sample in grad mode: the bytes autograd saves for
    the backward pass (parameters and buffers excluded, shared tensors counted once), doubled for the gradients of
    those activations during the backward pass, plus the sample and its input gradient.
    """

    def __init__(self, model: nn.Module, options: SaliencyOptions) -> None:
        if options.samples_per_batch is not None and options.samples_per_batch < 1:
            raise ConfigError(f"samples_per_batch must be ≥ 1 or None, found {options.samples_per_batch}")
        if options.memory_budget_mb < 1:
            raise ConfigError(f"memory_budget_mb must be ≥ 1, found {options.memory_budget_mb}")
        self.model = model
        self.options = options
        self._bytes: dict[tuple, int] = {}

    def bytes_per_sample(self, inputs: torch.Tensor) -> int:
        """Estimated peak memory of one sample's forward and input-gradient backward pass, in bytes."""
        key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key not in self._bytes:
            shared = {t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
            saved: dict[tuple[int, int, torch.dtype], int] = {}

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                if tensor.data_ptr() not in shared:
                    saved[(tensor.data_ptr(), tensor.numel(), tensor.dtype)] = tensor.numel() * tensor.element_size()
                return tensor

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                self.model(inputs[:1].detach().requires_grad_(True))
            sample = inputs[0].numel() * inputs.element_size()
            self._bytes[key] = 2 * sum(saved.values()) + 2 * sample
        return self._bytes[key]

    def chunk_size(self, inputs: torch.Tensor, count: int) -> int:
        """The number of samples per forward pass, in [1, count], for ``count`` samples shaped like ``inputs``."""
        if self.options.samples_per_batch is not None:
            return max(1, min(count, self.options.samples_per_batch))
        budget = self.options.memory_budget_mb * 2**20
        return max(1, min(count, budget // max(1, self.bytes_per_sample(inputs))))


class InputAttributionMethod(SaliencyMethod):
    """A method whose attribution lives in input space [B, C, H, W] and is reduced over channels.

    Subclasses implement :meth:`input_attribution`; :meth:`attribute` reduces it with the sign policy.
    """

    family = "gradient"

    @abstractmethod
    def input_attribution(self, inputs: torch.Tensor, target: torch.Tensor | None) -> Attribution:
        """The attribution [B, C, H, W] before the channel reduction, the clean logits [B, K] and targets [B]."""

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        check_inputs(inputs, target)
        attribution, logits, targets = self.input_attribution(inputs, target)
        with torch.no_grad():
            maps = reduce_channels(attribution, self.signed)
        return SaliencyResult(maps=maps, raw_sum=raw_sum(maps), logits=logits, targets=targets)


@METHODS.register("gradient")
class Gradient(InputAttributionMethod):
    """Vanilla gradient (Simonyan et al. 2014, Sec. 3.1): map_ij = max_c |∂y_t/∂x_cij|."""

    name = "gradient"
    signed = False
    reference = "Simonyan et al., ICLR Workshop 2014"

    def input_attribution(self, inputs: torch.Tensor, target: torch.Tensor | None) -> Attribution:
        return input_gradient(self.model, inputs, target)


@METHODS.register("gradient_x_input")
class GradientXInput(InputAttributionMethod):
    """Gradient × Input (Shrikumar et al. 2016): map_ij = Σ_c x_cij · ∂y_t/∂x_cij."""

    name = "gradient_x_input"
    signed = True
    reference = "Shrikumar et al., arXiv 1605.01713, 2016"

    def input_attribution(self, inputs: torch.Tensor, target: torch.Tensor | None) -> Attribution:
        gradient, logits, targets = input_gradient(self.model, inputs, target)
        return inputs.detach() * gradient, logits, targets


ReluRule = Literal["guided", "deconvnet"]


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward pass is Guided Backprop's (Springenberg et al. 2015, Fig. 1): the ReLU's own gradient
    (masked by the forward activation) is rectified again, so only positive signals pass:
    R_l = 1[z > 0] · 1[R_{l+1} > 0] · R_{l+1}."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        if inplace:  # as the module would: the model's memory use and aliasing stay as they were
            out = x.clamp_min_(0)
            ctx.mark_dirty(x)
        else:
            out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        # threshold_backward is ReLU's own backward kernel (grad where out > 0, else 0), fed the rectified signal.
        return torch.ops.aten.threshold_backward(grad.clamp_min(0), out, 0), None


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward pass is DeconvNet's (Zeiler & Fergus 2014, Sec. 2.1, "rectification"): the signal going
    down is rectified and the forward activation's mask is ignored: R_l = 1[R_{l+1} > 0] · R_{l+1}. Nothing is
    saved for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        if inplace:
            out = x.clamp_min_(0)
            ctx.mark_dirty(x)
            return out
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.clamp_min(0), None


_RULES: dict[str, type[torch.autograd.Function]] = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}


def _rule_forward(rule: type[torch.autograd.Function]):  # noqa: ANN202 - a bound-method factory
    def forward(self: nn.ReLU, x: torch.Tensor) -> torch.Tensor:
        return rule.apply(x, self.inplace)

    return forward


@contextmanager
def modified_relu_backward(model: nn.Module, rule: ReluRule) -> Iterator[int]:
    """Replace the backward pass of every ``nn.ReLU`` module of ``model`` by Guided Backprop's or DeconvNet's rule.

    Only ReLU *modules* are modified: a functional ``F.relu`` / ``torch.relu`` in a ``forward`` keeps its plain
    gradient (as in Captum). Each module's ``forward`` is shadowed, while the context is open, by a custom autograd
    function whose forward is the ReLU (in place when the module is) and whose backward applies the rule. Unlike
    full backward hooks (Captum's and our first version's way), this adds no identity views around every module and
    costs what a plain ReLU costs: measured 1.04× vs 0.88× of the forward + input-backward floor on ResNet-50
    (benchmarks/saliency.py). Every call of a module is modified (torchvision's BasicBlock calls its ``relu``
    twice). The shadowing is removed on exit, even after an error.

    Yields:
        the number of ReLU modules modified.
    """
    forward = _rule_forward(_RULES[rule])
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    # A module that already shadows its forward (rare: a user's patch) gets that attribute back on exit.
    shadowed = {id(m): m.__dict__["forward"] for m in relus if "forward" in m.__dict__}
    try:
        for module in relus:
            module.forward = types.MethodType(forward, module)
        yield len(relus)
    finally:
        for module in relus:
            if id(module) in shadowed:
                module.forward = shadowed[id(module)]
            else:
                module.__dict__.pop("forward", None)


class _ModifiedReluMethod(InputAttributionMethod):
    rule: ReluRule
    signed = False

    def input_attribution(self, inputs: torch.Tensor, target: torch.Tensor | None) -> Attribution:
        with modified_relu_backward(self.model, self.rule) as count:
            if count == 0:
                warnings.warn(
                    f"{self.name}: the model has no nn.ReLU module, so its maps equal the plain gradient's "
                    "(functional ReLUs are not modified)",
                    stacklevel=3,
                )
            return input_gradient(self.model, inputs, target)


@METHODS.register("guided_backprop")
class GuidedBackprop(_ModifiedReluMethod):
    """Guided Backpropagation (Springenberg et al. 2015): at every ReLU module, grad_in ← ReLU(grad_in).
    Unsigned map: max |·| over channels."""

    name = "guided_backprop"
    rule = "guided"
    reference = "Springenberg et al., ICLR Workshop 2015"


@METHODS.register("deconvnet")
class DeconvNet(_ModifiedReluMethod):
    """DeconvNet (Zeiler & Fergus 2014): at every ReLU module, grad_in ← ReLU(grad_out). Unsigned map: max |·|
    over channels."""

    name = "deconvnet"
    rule = "deconvnet"
    reference = "Zeiler & Fergus, ECCV 2014"


@METHODS.register("guided_gradcam")
class GuidedGradCAM(InputAttributionMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017, Sec. 3.1): the Guided Backprop attribution [B, C, H, W] times the
    Grad-CAM map of the target layer's output, upsampled bilinearly to the input (as the paper and our ``gradcam``
    maps; Captum's ``GuidedGradCam`` defaults to ``interpolate_mode="nearest"`` and agrees with ``"bilinear"``).
    Signed, channel sum. Two passes: Grad-CAM's head-only pass, then Guided Backprop's input pass."""

    name = "guided_gradcam"
    signed = True
    needs_layer = True
    reference = "Selvaraju et al., ICCV 2017"

    def __init__(
        self, model: nn.Module, target_layer: TargetLayer | str | None = None, options: SaliencyOptions | None = None
    ) -> None:
        super().__init__(model, target_layer, options)
        self._gradcam = GradCAM(model, target_layer, self.options)
        self._guided = GuidedBackprop(model, target_layer, self.options)

    def input_attribution(self, inputs: torch.Tensor, target: torch.Tensor | None) -> Attribution:
        cam = cam_maps(self.model, self.target_layer, inputs, [self._gradcam], target)[self._gradcam.name]
        guided, _, _ = self._guided.input_attribution(inputs, cam.targets)
        return guided * cam.maps[:, None].to(guided.dtype), cam.logits, cam.targets


@functools.lru_cache(maxsize=16)
def _gauss_legendre(steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Captum's default "gausslegendre" (captum/attr/_utils/approximation_methods.py): numpy's nodes on [−1, 1]
    # mapped to α ∈ (0, 1), and the weights halved so that they sum to 1.
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return tuple((0.5 * (1 + nodes)).tolist()), tuple((0.5 * weights).tolist())


def gauss_legendre(steps: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Path points α [steps] in (0, 1) and quadrature weights [steps] summing to 1 (exact for polynomials of
    degree ≤ 2·steps − 1)."""
    alphas, weights = _gauss_legendre(steps)
    return torch.tensor(alphas, device=device, dtype=dtype), torch.tensor(weights, device=device, dtype=dtype)


@METHODS.register("integrated_gradients")
class IntegratedGradients(InputAttributionMethod):
    """Integrated Gradients (Sundararajan et al. 2017, eq. 1): (x − x') ⊙ ∫_0^1 ∇f(x' + α (x − x')) dα with the
    zero baseline x' (in normalised input space, Captum's default), by ``options.ig_steps``-point Gauss–Legendre
    quadrature: (x − x') ⊙ Σ_i w_i ∇f(x' + α_i (x − x')). Signed, channel sum.

    The B · steps path points of a batch are chunked (:class:`ChunkPlanner`); the map does not depend on the chunks.
    """

    name = "integrated_gradients"
    signed = True
    reference = "Sundararajan et al., ICML 2017"

    def __init__(
        self, model: nn.Module, target_layer: TargetLayer | str | None = None, options: SaliencyOptions | None = None
    ) -> None:
        super().__init__(model, target_layer, options)
        if self.options.ig_steps < 1:
            raise ConfigError(f"ig_steps must be ≥ 1, found {self.options.ig_steps}")
        self.planner = ChunkPlanner(model, self.options)

    def input_attribution(self, inputs: torch.Tensor, target: torch.Tensor | None) -> Attribution:
        steps = self.options.ig_steps
        inputs = inputs.detach()
        with torch.no_grad():
            logits = self.model(inputs)
        target = resolve_target(logits, target)
        alphas, weights = gauss_legendre(steps, inputs.device, inputs.dtype)
        baseline = torch.zeros_like(inputs)
        delta = inputs - baseline
        total = torch.zeros_like(inputs)  # Σ_i w_i ∇f(path_i), per image
        count = inputs.shape[0] * steps
        chunk = self.planner.chunk_size(inputs, count)
        for start in range(0, count, chunk):
            # Flat index over (image, step), image-major, so a chunk may hold the steps of several images.
            index = torch.arange(start, min(start + chunk, count), device=inputs.device)
            image, step = index // steps, index % steps
            path = baseline[image] + alphas[step, None, None, None] * delta[image]
            gradient, _, _ = input_gradient(self.model, path, target[image])
            total.index_add_(0, image, gradient * weights[step, None, None, None])
        return delta * total, logits, target


@METHODS.register("smoothgrad")
class SmoothGrad(SaliencyMethod):
    """SmoothGrad (Smilkov et al. 2017) around any method (as Captum's ``NoiseTunnel``): the mean of the maps of
    ``options.smoothgrad_samples`` noisy copies x + ε, ε ~ N(0, σ²), σ = ``smoothgrad_noise`` · (max x − min x) of
    each image.

    Every map explains the class resolved on the *clean* input (the prediction when ``target`` is None), and the
    logits are the clean input's. The noise is one standard-normal draw [samples, C, H, W] (float32) from a CPU
    ``torch.Generator`` seeded with ``options.seed``, moved to the device and scaled by each image's σ: the same
    draws for every image and every device, so a map does not depend on the batch it was computed in, nor on the
    chunking (:class:`ChunkPlanner`) of the B · samples noisy copies. ``raw_sum`` is the mean of the base method's.

    Args:
        model, target_layer, options: as every method.
        base: the method whose maps are averaged (bound to the same model); default the vanilla ``gradient``.
    """

    name = "smoothgrad"
    family = "gradient"
    signed = False  # the default base's; an instance follows its base
    reference = "Smilkov et al., arXiv 1706.03825, 2017"

    def __init__(
        self,
        model: nn.Module,
        target_layer: TargetLayer | str | None = None,
        options: SaliencyOptions | None = None,
        base: SaliencyMethod | None = None,
    ) -> None:
        super().__init__(model, target_layer, options)
        if self.options.smoothgrad_samples < 1:
            raise ConfigError(f"smoothgrad_samples must be ≥ 1, found {self.options.smoothgrad_samples}")
        if self.options.smoothgrad_noise < 0:
            raise ConfigError(f"smoothgrad_noise must be ≥ 0, found {self.options.smoothgrad_noise}")
        self.base = base if base is not None else Gradient(model, target_layer, self.options)
        if self.base.model is not model:
            raise ConfigError(
                f"smoothgrad: the base method {self.base.name!r} is bound to another model; build it for the same model"
            )
        self.signed = self.base.signed
        self.needs_layer = self.base.needs_layer
        self.planner = ChunkPlanner(model, self.options)
        self._noise: tuple[tuple, torch.Tensor] | None = None

    def noise(self, inputs: torch.Tensor) -> torch.Tensor:
        """The standard-normal draws [samples, C, H, W] on the inputs' device (cached for the last shape)."""
        key = (self.options.smoothgrad_samples, tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if self._noise is None or self._noise[0] != key:
            generator = torch.Generator().manual_seed(self.options.seed)
            draws = torch.randn((self.options.smoothgrad_samples, *inputs.shape[1:]), generator=generator)
            self._noise = (key, draws.to(inputs.device, inputs.dtype))
        return self._noise[1]

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        check_inputs(inputs, target)
        inputs = inputs.detach()
        samples = self.options.smoothgrad_samples
        with torch.no_grad():
            logits = self.model(inputs)
        target = resolve_target(logits, target)
        flat = inputs.flatten(1)
        sigma = self.options.smoothgrad_noise * (flat.amax(1) - flat.amin(1))  # [B]
        noise = self.noise(inputs)
        count = inputs.shape[0] * samples
        chunk = self.planner.chunk_size(inputs, count)
        maps: torch.Tensor | None = None
        sums: torch.Tensor | None = None
        for start in range(0, count, chunk):
            index = torch.arange(start, min(start + chunk, count), device=inputs.device)
            image, sample = index // samples, index % samples
            noisy = inputs[image] + sigma[image, None, None, None] * noise[sample]
            result = self.base.attribute(noisy, target[image])
            if maps is None or sums is None:
                maps = result.maps.new_zeros((inputs.shape[0], *result.maps.shape[1:]))
                sums = result.raw_sum.new_zeros(inputs.shape[0])
            maps.index_add_(0, image, result.maps.detach())
            sums.index_add_(0, image, result.raw_sum.detach())
        assert maps is not None and sums is not None  # count ≥ 1
        return SaliencyResult(maps=maps / samples, raw_sum=sums / samples, logits=logits, targets=target)
