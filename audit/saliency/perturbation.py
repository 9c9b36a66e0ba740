"""The perturbation family: Score-CAM, RISE, occlusion, I-GOS and iGOS++.

Each method scores the model on many perturbed copies of every image. The copies are never materialised all at
once: (image, perturbation) pairs are enumerated perturbation-major and evaluated in chunks built on the device,
so one forward pass mixes images and perturbations and the expanded batch stays under the memory budget
(:func:`chunk_size`). Score-CAM, RISE and occlusion run entirely under ``torch.no_grad()``; I-GOS and iGOS++ take
``torch.autograd.grad`` with respect to their mask only, so no parameter gradient is ever accumulated.

Conventions are those of :mod:`audit.saliency.base`: inputs [B, C, H, W] normalised on the model's device, maps
[B, H, W] on the same device, ``target=None`` explains the class predicted on the clean input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from audit.errors import ConfigError, ModelError
from audit.models.layers import as_target_layer, get_module
from audit.models.loading import is_scripted
from audit.saliency.base import (
    METHODS,
    SaliencyMethod,
    SaliencyOptions,
    SaliencyResult,
    capture_layer,
    check_inputs,
    raw_sum,
    resolve_target,
    target_scores,
)
from audit.saliency.ranking import spearman

# ----------------------------------------------------------------------------------------------------------------
# Memory budget and chunking, shared by every method of the family.
# ----------------------------------------------------------------------------------------------------------------

MEBIBYTE = 2**20


def _tensor_bytes(value: object) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


@contextmanager
def measure_forward_bytes(model: nn.Module) -> Iterator[list[int]]:
    """Measure the leaf-module outputs of the forward passes run inside the block.

    Yields a list ``[total, largest]``: the summed output bytes of every leaf module (what autograd roughly saves for
    a backward pass) and the bytes of the largest single output (what bounds a no-grad forward, whose intermediates
    are freed once consumed). Hooks are removed even after an error.
    """
    footprint = [0, 0]

    def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
        size = _tensor_bytes(output)
        footprint[0] += size
        footprint[1] = max(footprint[1], size)

    # TorchScript modules take no hooks: their outputs go unmeasured (the caller then assumes a wide network).
    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if next(m.children(), None) is None and not isinstance(m, torch.jit.ScriptModule)
    ]
    try:
        yield footprint
    finally:
        for handle in handles:
            handle.remove()


# When a TorchScript model's activations cannot be measured: assume each sample's largest activation is this many
# input-sized tensors, and its summed activations 16 times that (a ResNet-50 at 224 px: about 4 and 60).
UNMEASURED_LARGEST_INPUTS = 8


# A no-grad forward holds a few activations at once: a residual block's input, its branch's intermediates and the
# sum. Four of the largest covers the chain-like and residual networks we audit; the benchmark's memory table
# (README, "Benchmarks") checks the measured peak against the budget.
NO_GRAD_LIVE_ACTIVATIONS = 4


def sample_bytes(
    forward_bytes: int, input_bytes: int, input_copies: int, backward: bool = False, largest_output: int | None = None
) -> int:
    """Conservative bytes one expanded sample costs.

    Args:
        forward_bytes: one sample's summed leaf-module output bytes (:func:`measure_forward_bytes`, per sample).
        input_bytes: one input sample's bytes (C·H·W·element size).
        input_copies: input-sized tensors the method builds per sample (perturbed input, mask, baseline, ...).
        backward: whether a graph is recorded for a backward pass (I-GOS).
        largest_output: one sample's largest leaf output in bytes; used without a backward pass when given.

    Returns:
        with a backward pass, 3× the summed outputs (saved activations plus their gradients); without one,
        ``NO_GRAD_LIVE_ACTIVATIONS`` × the largest output (or 2× the sum when it is not known); plus the copies.
    """
    if backward:
        activations = 3 * forward_bytes
    elif largest_output is not None:
        activations = NO_GRAD_LIVE_ACTIVATIONS * largest_output
    else:
        activations = 2 * forward_bytes
    return activations + input_copies * input_bytes


def chunk_size(bytes_per_sample: int, options: SaliencyOptions) -> int:
    """Expanded samples per forward pass: as many as fit in ``options.memory_budget_mb``, at most
    ``options.samples_per_batch`` when set, at least 1."""
    if options.memory_budget_mb < 1:
        raise ConfigError(f"memory_budget_mb must be at least 1, got {options.memory_budget_mb}")
    if options.samples_per_batch is not None and options.samples_per_batch < 1:
        raise ConfigError(f"samples_per_batch must be at least 1 (or None), got {options.samples_per_batch}")
    size = max(1, options.memory_budget_mb * MEBIBYTE // max(1, bytes_per_sample))
    if options.samples_per_batch is not None:
        size = min(size, options.samples_per_batch)
    return int(size)


def pair_chunks(
    images: int, perturbations: int, chunk: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image index, perturbation index) pairs, perturbation-major, ``chunk`` pairs at a time.

    Perturbation-major order keeps each chunk's perturbations a contiguous range (a mask is built once per chunk
    and shared by all images), and mixes images and perturbations in one forward pass.

    Yields:
        image index int [n] and perturbation index int [n], on ``device``.
    """
    total = images * perturbations
    for start in range(0, total, chunk):
        flat = torch.arange(start, min(start + chunk, total), device=device)
        yield flat % images, flat // images


def _clean_forward(
    model: nn.Module, inputs: torch.Tensor, options: SaliencyOptions, input_copies: int, backward: bool = False
) -> tuple[torch.Tensor, int]:
    """The unperturbed forward pass (no graph), and the chunk size its activation footprint allows."""
    with torch.no_grad(), measure_forward_bytes(model) as footprint:
        logits = model(inputs)
    per_image_input = inputs[0].numel() * inputs.element_size()
    batch = inputs.shape[0]
    total, largest = footprint[0] // batch, footprint[1] // batch
    if is_scripted(model):
        largest = max(largest, UNMEASURED_LARGEST_INPUTS * per_image_input)
        total = max(total, 16 * largest)
    per_sample = sample_bytes(total, per_image_input, input_copies, backward, largest)
    return logits.detach(), chunk_size(per_sample, options)


def _upsample(maps: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """[N, h, w] → [N, H, W], bilinear."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=align_corners)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# Score-CAM
# ----------------------------------------------------------------------------------------------------------------

SCORECAM_EPSILON = 1e-8  # pytorch-grad-cam 1.5.7 score_cam.py: (A - min) / (max - min + 1e-8)


def scorecam_channel_masks(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Score-CAM's masks H_k (Wang et al. 2020): each channel upsampled to the input and
    min–max normalised on its own.

    Upsampling is bilinear with ``align_corners=True`` (``nn.UpsamplingBilinear2d``, as pytorch-grad-cam), and the
    normalisation adds pytorch-grad-cam's 1e-8 to the range, so a constant channel gives an all-zero mask.

    Args:
        activations: float [N, h, w], one channel per row.
        size: (H, W) of the input.

    Returns:
        float [N, H, W] in [0, 1].
    """
    up = _upsample(activations, size, align_corners=True)
    flat = up.flatten(1)
    low = flat.amin(1)[:, None, None]
    high = flat.amax(1)[:, None, None]
    return (up - low) / (high - low + SCORECAM_EPSILON)


def select_channels(activations: torch.Tensor, budget: int | None) -> torch.Tensor:
    """The channels Score-CAM scores: all of them, or the ``budget`` with the largest mean activation.

    The mean activation is the channel's entry in the globally pooled feature vector that a GAP head reads, it
    costs nothing (no gradient, no extra forward), and a channel that is nearly zero everywhere masks out nearly
    the whole image, whose score the softmax over channels then weighs the least; so the dropped channels are the
    ones whose weight is likely to be small. Ties are broken by ``torch.topk``.

    Args:
        activations: float [B, C, h, w].
        budget: k, or None for all channels.

    Returns:
        int [B, k] channel indices per image (k = C without a budget).
    """
    b, c = activations.shape[:2]
    if budget is None or budget >= c:
        return torch.arange(c, device=activations.device).expand(b, c)
    if budget < 1:
        raise ConfigError(f"scorecam_channels must be at least 1 (or None for all channels), got {budget}")
    return activations.mean(dim=(2, 3)).topk(budget, dim=1).indices


def scorecam_weights(
    model: nn.Module,
    inputs: torch.Tensor,
    activations: torch.Tensor,
    target: torch.Tensor,
    channels: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Score-CAM's channel weights: softmax over the scored channels of the target logit of x ⊙ H_k.

    Wang et al. define the score as the increase of confidence over a baseline input; a constant per image does
    not change a softmax, so the target logit of the masked input is used directly, as pytorch-grad-cam does.

    Args:
        model: the classifier.
        inputs: float [B, C, H, W].
        activations: float [B, K, h, w] of the target layer.
        target: int [B].
        channels: int [B, k] the channels to score (:func:`select_channels`).
        chunk: masked inputs per forward pass.

    Returns:
        float [B, K]: softmax weights on the scored channels, 0 elsewhere.
    """
    b, k = channels.shape
    size = (inputs.shape[-2], inputs.shape[-1])
    scores = torch.empty(k * b, device=inputs.device, dtype=torch.float32)
    start = 0
    for image, slot in pair_chunks(b, k, chunk, inputs.device):
        masks = scorecam_channel_masks(activations[image, channels[image, slot]], size)  # [n, H, W]
        logits = model(inputs[image] * masks[:, None].to(inputs.dtype))
        scores[start : start + len(image)] = target_scores(logits, target[image]).float()
        start += len(image)
    weights = torch.softmax(scores.view(k, b).t(), dim=1)
    full = torch.zeros(activations.shape[:2], device=inputs.device, dtype=torch.float32)
    return full.scatter_(1, channels, weights)


@METHODS.register("scorecam")
class ScoreCAM(SaliencyMethod):
    """Score-CAM: map = ReLU(Σ_k w_k A_k), w = softmax_k(y_t(x ⊙ H_k)) (Wang et al. 2020).

    Cost: 1 forward plus one masked forward per scored channel and image (C, or ``options.scorecam_channels``).
    The map is computed at the layer's resolution and upsampled bilinearly (``align_corners=False``), as the CAM
    family. ``raw_sum`` is the sum of the ReLU'd map at layer resolution.
    """

    name: ClassVar[str] = "scorecam"
    family: ClassVar[str] = "perturbation"
    signed: ClassVar[bool] = False
    needs_layer: ClassVar[bool] = True
    reference: ClassVar[str] = "Wang et al., Score-CAM, CVPR Workshops 2020"

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        check_inputs(inputs, target)
        spec = as_target_layer(self.target_layer)
        if spec is None:
            raise ModelError("scorecam needs a target layer; set model.target_layer or let it be found automatically")
        module = get_module(self.model, spec.name)
        with torch.no_grad():
            with capture_layer(module) as captured:
                # Copies per masked sample: the indexed input, the mask and their product.
                logits, chunk = _clean_forward(self.model, inputs, self.options, input_copies=3)
            target = resolve_target(logits, target)
            activations = spec.to_spatial(captured["activation"].detach()).float()
            channels = select_channels(activations, self.options.scorecam_channels)
            weights = scorecam_weights(self.model, inputs, activations, target, channels, chunk)
            low = F.relu((weights[:, :, None, None] * activations).sum(1))  # [B, h, w]
            maps = _upsample(low, (inputs.shape[-2], inputs.shape[-1]), align_corners=False).clamp_min(0)
        return SaliencyResult(maps=maps, raw_sum=raw_sum(low), logits=logits, targets=target)


def scorecam_agreement(full_maps: torch.Tensor, budget_maps: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image between the full and the channel-budgeted Score-CAM maps.

    Ties (the ReLU's zeros) get their average rank, as ``scipy.stats.spearmanr``.

    Args:
        full_maps: float [B, ...] (maps at any resolution, the same for both).
        budget_maps: float [B, ...].

    Returns:
        float [B] in [-1, 1]; NaN where either map is constant (no ranking exists).
    """
    return spearman(full_maps, budget_maps)


# ----------------------------------------------------------------------------------------------------------------
# RISE
# ----------------------------------------------------------------------------------------------------------------


class RiseMasks:
    """RISE's random masks (Petsiuk et al. 2018, "mask generation"), drawn once on the CPU and built chunk by chunk.

    N binary grids of s × s cells, each cell kept with probability p, are upsampled bilinearly to
    (s + 1) · ⌈H/s⌉ × (s + 1) · ⌈W/s⌉ and cropped to H × W at a random shift in [0, cell) per axis. Only the grids
    and shifts are stored (N·s² booleans); the H × W masks are built for a range of indices on demand, so a chunk
    size never changes the masks. Upsampling is ``F.interpolate(bilinear, align_corners=False)`` as TorchRay's RISE;
    the authors' code used ``skimage.transform.resize(order=1, mode='reflect')``, which differs only in the
    half-pixel border of the upsampled grid (edge clamping vs reflection).

    Args:
        count: N.
        grid: s.
        probability: p.
        size: (H, W).
        seed: seed of the CPU generator.
    """

    def __init__(self, count: int, grid: int, probability: float, size: tuple[int, int], seed: int) -> None:
        if count < 1 or grid < 1 or not 0 < probability <= 1:
            raise ConfigError(
                f"RISE needs rise_masks ≥ 1, rise_grid ≥ 1 and 0 < rise_probability ≤ 1; got "
                f"{count}, {grid}, {probability}"
            )
        self.count, self.grid, self.probability, self.size = count, grid, probability, size
        self.cell = (math.ceil(size[0] / grid), math.ceil(size[1] / grid))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.grids = torch.rand(count, grid, grid, generator=generator) < probability
        self.shift_y = torch.randint(0, self.cell[0], (count,), generator=generator)
        self.shift_x = torch.randint(0, self.cell[1], (count,), generator=generator)

    def build(self, start: int, stop: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Masks ``start``..``stop - 1`` as float [stop - start, H, W] in [0, 1] on ``device``."""
        height, width = self.size
        grids = self.grids[start:stop].to(device=device, dtype=torch.float32)
        up_size = ((self.grid + 1) * self.cell[0], (self.grid + 1) * self.cell[1])
        up = _upsample(grids, up_size, align_corners=False).clamp(0, 1)  # rounding can overshoot 1 by an ulp
        rows = self.shift_y[start:stop].to(device)[:, None] + torch.arange(height, device=device)
        cols = self.shift_x[start:stop].to(device)[:, None] + torch.arange(width, device=device)
        index = torch.arange(stop - start, device=device)[:, None, None]
        return up[index, rows[:, :, None], cols[:, None, :]].to(dtype)


@METHODS.register("rise")
class RISE(SaliencyMethod):
    """RISE: S(u) = Σ_i P_t(x ⊙ M_i) · M_i(u) / (N · p) (Petsiuk et al. 2018), P_t the softmax probability.

    The same N masks (``options.rise_masks``, ``rise_grid``, ``rise_probability``, drawn from ``options.seed``)
    explain every image, so a result does not depend on the batch an image came in. Masked pixels become 0, the
    normalised mean. ``raw_sum`` is the map's sum (it is computed at the input resolution).
    """

    name: ClassVar[str] = "rise"
    family: ClassVar[str] = "perturbation"
    signed: ClassVar[bool] = False
    needs_layer: ClassVar[bool] = False
    reference: ClassVar[str] = "Petsiuk, Das & Saenko, RISE, BMVC 2018"

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        check_inputs(inputs, target)
        options = self.options
        b, _, height, width = inputs.shape
        with torch.no_grad():
            # Copies per sample: the indexed input, the mask, their product and the upsampled grid (≈ 1 + 1/s)².
            logits, chunk = _clean_forward(self.model, inputs, options, input_copies=4)
            target = resolve_target(logits, target)
            masks = RiseMasks(
                options.rise_masks, options.rise_grid, options.rise_probability, (height, width), options.seed
            )
            saliency = torch.zeros(b, height * width, device=inputs.device, dtype=torch.float32)
            for image, index in pair_chunks(b, masks.count, chunk, inputs.device):
                first, last = int(index[0]), int(index[-1]) + 1
                local = masks.build(first, last, inputs.device)  # [n, H, W], shared by the chunk's images
                logits_masked = self.model(inputs[image] * local[index - first][:, None].to(inputs.dtype))
                probability = torch.softmax(logits_masked.float(), dim=1).gather(1, target[image, None])[:, 0]
                weights = torch.zeros(b, last - first, device=inputs.device, dtype=torch.float32)
                weights[image, index - first] = probability
                saliency += weights @ local.flatten(1)
            maps = (saliency / (masks.count * masks.probability)).view(b, height, width)
        return SaliencyResult(maps=maps, raw_sum=raw_sum(maps), logits=logits, targets=target)


# ----------------------------------------------------------------------------------------------------------------
# Occlusion
# ----------------------------------------------------------------------------------------------------------------


def occlusion_cover(length: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """Which pixels each window position covers along one axis, as Captum's ``Occlusion``.

    Windows start at 0, s, 2s, ... for ⌈(L − w)/s⌉ + 1 positions; the last one may overhang the border and is
    clipped. A window longer than the axis is clipped to it (one position; Captum would refuse).

    Returns:
        bool [positions, L].
    """
    window = min(window, length)
    if window < 1 or stride < 1:
        raise ConfigError(f"occlusion_window and occlusion_stride must be at least 1, got {window}, {stride}")
    if window < length and stride > window:
        raise ConfigError(
            f"occlusion_stride ({stride}) exceeds occlusion_window ({window}): some pixels would never "
            "be occluded; use a stride no larger than the window"
        )
    positions = math.ceil((length - window) / stride) + 1
    starts = torch.arange(positions, device=device)[:, None] * stride
    pixel = torch.arange(length, device=device)[None, :]
    return (pixel >= starts) & (pixel < starts + window)


@METHODS.register("occlusion")
class Occlusion(SaliencyMethod):
    """Occlusion: attribution(u) = mean over the windows covering u of y_t(x) − y_t(x with the window set to 0).

    A square of ``options.occlusion_window`` pixels (all channels) slides with ``options.occlusion_stride`` and is
    filled with 0, the normalised mean (Zeiler & Fergus 2014, occlusion sensitivity). This equals Captum's
    ``Occlusion(model).attribute(x, sliding_window_shapes=(C, w, w), strides=(C, s, s), baselines=0)`` summed over
    channels and divided by C. Signed; ``raw_sum`` is the map's sum.
    """

    name: ClassVar[str] = "occlusion"
    family: ClassVar[str] = "perturbation"
    signed: ClassVar[bool] = True
    needs_layer: ClassVar[bool] = False
    reference: ClassVar[str] = "Zeiler & Fergus, ECCV 2014"

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        check_inputs(inputs, target)
        options = self.options
        b, _, height, width = inputs.shape
        with torch.no_grad():
            logits, chunk = _clean_forward(self.model, inputs, options, input_copies=3)
            target = resolve_target(logits, target)
            clean = target_scores(logits, target).float()
            rows = occlusion_cover(height, options.occlusion_window, options.occlusion_stride, inputs.device)
            cols = occlusion_cover(width, options.occlusion_window, options.occlusion_stride, inputs.device)
            windows = rows.shape[0] * cols.shape[0]
            drops = torch.empty(windows * b, device=inputs.device, dtype=torch.float32)
            start = 0
            for image, window in pair_chunks(b, windows, chunk, inputs.device):
                occluded = rows[window // cols.shape[0], :, None] & cols[window % cols.shape[0], None, :]
                masked = inputs[image] * (~occluded)[:, None].to(inputs.dtype)
                drops[start : start + len(image)] = clean[image] - target_scores(self.model(masked), target[image])
                start += len(image)
            drops = drops.view(rows.shape[0], cols.shape[0], b).permute(2, 0, 1)  # [B, rows, cols]
            rows_f, cols_f = rows.float(), cols.float()
            total = torch.einsum("bij,ih,jw->bhw", drops, rows_f, cols_f)
            count = rows_f.sum(0)[:, None] * cols_f.sum(0)[None, :]  # windows covering each pixel, ≥ 1
            maps = total / count
        return SaliencyResult(maps=maps, raw_sum=raw_sum(maps), logits=logits, targets=target)


# ----------------------------------------------------------------------------------------------------------------
# I-GOS and iGOS++
# ----------------------------------------------------------------------------------------------------------------


def _blur_matrix(length: int, kernel: torch.Tensor) -> torch.Tensor:
    """The 1-D convolution with ``kernel`` and reflect-101 borders as a [length, length] matrix."""
    size = kernel.numel()
    source = (torch.arange(length)[:, None] + torch.arange(size)[None, :] - size // 2).abs()
    source = torch.where(source > length - 1, 2 * (length - 1) - source, source)  # reflect-101: … 2 1 | 0 1 2 …
    matrix = torch.zeros(length, length, dtype=kernel.dtype)
    return matrix.scatter_add_(1, source, kernel.expand(length, size).contiguous())


def blur_baseline(inputs: torch.Tensor) -> torch.Tensor:
    """I-GOS's baseline: a strongly blurred copy of each image.

    The reference code (khorrams/IGOS_pp, ``utils.ImageSet``) blurs the 224-px image with
    ``cv2.GaussianBlur(ksize=51, sigmaX=50)`` before normalising; normalisation is a per-channel affine map and the
    kernel sums to 1, so blurring the normalised input is the same. The kernel scales with the shorter side
    (51 · min(H, W) / 224, odd, σ = ksize − 1 as the reference) and uses cv2's default border (reflect-101), capped
    so the reflection stays inside the image. The separable blur is applied as two small matrix products
    K_H · x · K_Wᵀ, which (unlike a grouped convolution) gives each image bit-identical results whatever the batch.

    Args:
        inputs: float [B, C, H, W].

    Returns:
        float [B, C, H, W].
    """
    height, width = inputs.shape[-2:]
    shorter = min(height, width)
    size = round(51 * shorter / 224)
    size = max(3, size - 1 + size % 2)  # odd, as cv2 requires
    size = min(size, 2 * (shorter - 1) + 1)  # the reflection must stay inside the image
    if size < 3:
        return inputs.clone()
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * float(size - 1) ** 2))
    kernel = kernel / kernel.sum()
    rows = _blur_matrix(height, kernel).to(inputs.device, inputs.dtype)
    cols = _blur_matrix(width, kernel).to(inputs.device, inputs.dtype)
    return rows @ inputs @ cols.T


def total_variation(masks: torch.Tensor) -> torch.Tensor:
    """I-GOS's TV term with β = 2: mean squared difference of vertical plus horizontal neighbours.

    Args:
        masks: float [B, h, w].

    Returns:
        float [B] (an axis of length 1 contributes 0).
    """
    vertical = (masks[:, 1:, :] - masks[:, :-1, :]).square().flatten(1)
    horizontal = (masks[:, :, 1:] - masks[:, :, :-1]).square().flatten(1)
    zero = masks.new_zeros(masks.shape[0])
    return (vertical.mean(1) if vertical.shape[1] else zero) + (horizontal.mean(1) if horizontal.shape[1] else zero)


def bilateral_total_variation(
    masks: torch.Tensor, up_masks: torch.Tensor, images: torch.Tensor, sigma: float = 0.01
) -> torch.Tensor:
    """iGOS++'s bilateral TV: ½ (TV(M) + Σ_axes mean_uv exp(−ΔI²/σ) · (ΔM↑)²) with β = 2 and σ = 0.01.

    The second part penalises mask edges inside image regions of uniform colour only. ΔI² is the mean over
    channels of the squared neighbour difference of the (normalised) image; the reference code computes the
    vertical weight from the channel-mean difference and the horizontal one as a channel mean of weights, which we
    do not copy.

    Args:
        masks: float [B, h, w] low-resolution mask.
        up_masks: float [B, H, W] the same mask upsampled to the input.
        images: float [B, C, H, W].
        sigma: the colour bandwidth σ.

    Returns:
        float [B].
    """
    weight_v = torch.exp(-(images[:, :, 1:, :] - images[:, :, :-1, :]).square().mean(1) / sigma)
    weight_h = torch.exp(-(images[:, :, :, 1:] - images[:, :, :, :-1]).square().mean(1) / sigma)
    edges_v = (weight_v * (up_masks[:, 1:, :] - up_masks[:, :-1, :]).square()).flatten(1)
    edges_h = (weight_h * (up_masks[:, :, 1:] - up_masks[:, :, :-1]).square()).flatten(1)
    zero = masks.new_zeros(masks.shape[0])
    bilateral = (edges_v.mean(1) if edges_v.shape[1] else zero) + (edges_h.mean(1) if edges_h.shape[1] else zero)
    return 0.5 * (total_variation(masks) + bilateral)


@METHODS.register("igos")
class IGOS(SaliencyMethod):
    """I-GOS (Qi, Khorram & Li, AAAI 2020): a low-resolution mask M (1 = keep, 0 = replace by the blurred
    baseline) minimising the deletion objective

        L(M) = f_t(Φ(x, x̃, M↑)) + λ₁ mean|1 − M| + λ₂ TV(M),   Φ(x, x̃, m) = x ⊙ m + x̃ ⊙ (1 − m),

    where f_t is the softmax probability of the target, x̃ the blurred input (:func:`blur_baseline`) and M↑ the mask
    upsampled bilinearly (``align_corners=True``, as the reference's ``UpsamplingBilinear2d``) to the input. The
    descent direction replaces ∇f_t by its integrated gradient along the straight path from the unmasked image,
    IG(M) = ∇_M Σ_{i=1..S} f_t(Φ(x, x̃, (i/S) M↑) + ε_i) / S (S = ``options.igos_steps``, ε_i Gaussian noise
    σ = 0.2 as the reference code), plus the regularisers' exact gradient. Each of ``options.igos_iterations``
    iterations takes a backtracking (Armijo) line search step: α from 1000, times 0.2 until
    L(clip(M − α g)) ≤ L(M) − 10⁻⁴ α ‖g‖², or α < 10⁻⁵; then M ← clip(M − α g, 0, 1). λ₁ = 1, λ₂ = 20; M starts at 1;
    mask size 28 × 28 (min(28, H) × min(28, W) for smaller inputs). The map is 1 − M↑ (deleted = important);
    ``raw_sum`` is the sum of 1 − M at mask resolution.

    All images are optimised together; each keeps its own step size, and chunks of (image, path step) pairs stay
    under the memory budget. Gradients are ``torch.autograd.grad`` with respect to the mask only.

    Differences from the reference code (khorrams/IGOS_pp, ``methods.py``), all deliberate:

    * the noise ε_i is drawn from a CPU generator seeded by ``options.seed``, once per iteration, and shared by
      every image of the batch (so a result does not depend on the batch) and by the gradient and the line search
      of that iteration (common random numbers; the reference draws fresh noise for every loss evaluation, which
      makes its Armijo test noisy);
    * iGOS++'s line-search objective includes the same ½ that scales its integrated gradients (the reference halves
      the direction but not the objective it tests).
    """

    name: ClassVar[str] = "igos"
    family: ClassVar[str] = "perturbation"
    signed: ClassVar[bool] = False
    needs_layer: ClassVar[bool] = False
    reference: ClassVar[str] = "Qi, Khorram & Li, I-GOS, AAAI 2020"

    mask_side: ClassVar[int] = 28
    l1_weight: ClassVar[float] = 1.0
    tv_weight: ClassVar[float] = 20.0
    noise_std: ClassVar[float] = 0.2
    initial_step: ClassVar[float] = 1000.0
    armijo: ClassVar[float] = 1e-4
    step_decay: ClassVar[float] = 0.2
    smallest_step: ClassVar[float] = 1e-5

    # Path terms of the objective: (mask used, deletion path?, weight). I-GOS has one deletion term on M.
    terms: ClassVar[tuple[tuple[str, bool, float], ...]] = (("deletion", True, 1.0),)
    mask_count: ClassVar[int] = 1

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> SaliencyResult:
        check_inputs(inputs, target)
        options = self.options
        if options.igos_iterations < 0 or options.igos_steps < 1:
            raise ConfigError(
                f"igos_iterations must be ≥ 0 and igos_steps ≥ 1, got {options.igos_iterations}, {options.igos_steps}"
            )
        b, _, height, width = inputs.shape
        # Copies per sample: image, baseline, noise, the upsampled mask and its gradient, the path input.
        logits, chunk = _clean_forward(self.model, inputs, options, input_copies=6, backward=True)
        target = resolve_target(logits, target)
        inputs = inputs.detach()
        baseline = blur_baseline(inputs)
        side = (min(self.mask_side, height), min(self.mask_side, width))
        masks = torch.ones(b, self.mask_count, *side, device=inputs.device, dtype=torch.float32)
        generator = torch.Generator(device="cpu").manual_seed(options.seed)
        problem = _MaskProblem(self, inputs, baseline, target, chunk)
        for _ in range(options.igos_iterations):
            noise = torch.randn(options.igos_steps, *inputs.shape[1:], generator=generator) * self.noise_std
            problem.noise = noise.to(inputs.device, inputs.dtype)
            direction = problem.direction(masks)
            step_sizes = problem.line_search(masks, direction)
            masks = (masks - step_sizes[:, None, None, None] * direction).clamp(0, 1)
        with torch.no_grad():
            combined = masks.prod(1)  # iGOS++ explains with M_del ⊙ M_ins
            saliency = 1 - combined
            maps = (1 - _upsample(combined, (height, width), align_corners=True)).clamp(0, 1)
        return SaliencyResult(maps=maps, raw_sum=raw_sum(saliency), logits=logits, targets=target)


@METHODS.register("igos++")
class IGOSPlusPlus(IGOS):
    """iGOS++ (Khorram et al., CHIL 2021): a deletion mask M_d and an insertion mask M_i optimised together.

    The objective adds insertion terms, −f_t on the path from the blurred baseline towards Φ(x̃, x, m) (the image
    revealed where m = 0), and applies both to the product mask and to each mask alone:

        L = ½ [del(M_d↑ M_i↑) + ins(M_d↑ M_i↑) + del(M_d↑) + ins(M_i↑)] + λ₁ mean|1 − M_d M_i| + λ₂ BTV(M_d M_i),

    each path term by its integrated gradient as in I-GOS, with the bilateral TV (:func:`bilateral_total_variation`,
    σ = 0.01) replacing TV. The same line search, step sizes and noise as :class:`IGOS`; the map is 1 − (M_d M_i)↑.
    """

    name: ClassVar[str] = "igos++"
    reference: ClassVar[str] = "Khorram, Lawson & Fuxin, iGOS++, ACM CHIL 2021"
    terms: ClassVar[tuple[tuple[str, bool, float], ...]] = (
        ("product", True, 0.5),
        ("product", False, 0.5),
        ("deletion", True, 0.5),
        ("insertion", False, 0.5),
    )
    mask_count: ClassVar[int] = 2


class _MaskProblem:
    """The objective of one I-GOS / iGOS++ run over a batch: its integrated-gradient direction and line search.

    Masks are float [n, K, h, w] (K = 1 for I-GOS, 2 for iGOS++: deletion, insertion); ``images`` int [n] says
    which batch images they belong to, so the line search can evaluate only the images still searching.
    """

    def __init__(
        self, method: IGOS, inputs: torch.Tensor, baseline: torch.Tensor, target: torch.Tensor, chunk: int
    ) -> None:
        self.method = method
        self.model = method.model
        self.inputs = inputs
        self.baseline = baseline
        self.target = target
        self.chunk = chunk
        self.steps = method.options.igos_steps
        self.size = (inputs.shape[-2], inputs.shape[-1])
        self.noise = torch.zeros(self.steps, *inputs.shape[1:], device=inputs.device, dtype=inputs.dtype)
        device = inputs.device
        choice = {"deletion": 0, "insertion": 1, "product": 2}
        self.term_mask = torch.tensor([choice[t[0]] for t in method.terms], device=device)
        self.term_deletion = torch.tensor([t[1] for t in method.terms], device=device)
        # Path terms enter the objective as +f_t (deletion) or −f_t (insertion), weighted, averaged over the steps.
        self.term_weight = torch.tensor(
            [(1.0 if t[1] else -1.0) * t[2] / self.steps for t in method.terms], device=device
        )
        self.pairs_per_image = len(method.terms) * self.steps

    def _path_chunk(
        self, masks: torch.Tensor, images: torch.Tensor, local: torch.Tensor, pair: torch.Tensor
    ) -> torch.Tensor:
        """Weighted target probabilities of one chunk of (image, term × step) pairs: [m]."""
        term, step = pair // self.steps, pair % self.steps
        batch_index = images[local]
        up = F.interpolate(masks[local], size=self.size, mode="bilinear", align_corners=True)  # [m, K, H, W]
        choices = torch.stack([up[:, 0], up[:, -1], up.prod(1)], 1)  # deletion, insertion, product
        mask = choices[torch.arange(len(local), device=masks.device), self.term_mask[term]]
        # Path point i/S of the straight line from the unperturbed input (I-GOS's integrated gradient).
        mask = (mask * ((step + 1).to(mask.dtype) / self.steps)[:, None, None]).to(self.inputs.dtype)[:, None]
        deletion = self.term_deletion[term][:, None, None, None]
        image, baseline = self.inputs[batch_index], self.baseline[batch_index]
        source = torch.where(deletion, image, baseline)  # deletion: Φ(x, x̃, m); insertion: Φ(x̃, x, m)
        destination = torch.where(deletion, baseline, image)
        path = source * mask + destination * (1 - mask) + self.noise[step]
        probability = torch.softmax(self.model(path).float(), dim=1).gather(1, self.target[batch_index, None])
        return self.term_weight[term] * probability[:, 0]

    def _regulariser(self, masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """λ₁ mean|1 − M| + λ₂ TV(M) (BTV for iGOS++) of the combined mask, per image: [n]."""
        method = self.method
        combined = masks.prod(1)
        l1 = (1 - combined).abs().flatten(1).mean(1)
        if method.mask_count == 1:
            smooth = total_variation(combined)
        else:
            up = F.interpolate(combined[:, None], size=self.size, mode="bilinear", align_corners=True)[:, 0]
            smooth = bilateral_total_variation(combined, up, self.inputs[images])
        return method.l1_weight * l1 + method.tv_weight * smooth

    def objective(self, masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """L(M) per image, float [n], with the current noise (no graph)."""
        with torch.no_grad():
            total = self._regulariser(masks, images)
            for local, pair in pair_chunks(len(images), self.pairs_per_image, self.chunk, masks.device):
                total = total.index_add(0, local, self._path_chunk(masks, images, local, pair))
        return total

    def direction(self, masks: torch.Tensor) -> torch.Tensor:
        """The descent direction [B, K, h, w]: integrated gradient of the path terms plus the regularisers' gradient.

        Each chunk's graph is freed before the next is built; the gradient is taken with respect to the mask only.
        """
        images = torch.arange(masks.shape[0], device=masks.device)
        with torch.enable_grad():
            leaf = masks.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self._regulariser(leaf, images).sum(), leaf)
            for local, pair in pair_chunks(len(images), self.pairs_per_image, self.chunk, masks.device):
                (part,) = torch.autograd.grad(self._path_chunk(leaf, images, local, pair).sum(), leaf)
                gradient = gradient + part
        return gradient

    def line_search(self, masks: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Backtracking line search per image (the reference's ``line_search``): the step sizes α, float [B]."""
        method = self.method
        count = masks.shape[0]
        images = torch.arange(count, device=masks.device)
        base = self.objective(masks, images)
        decrease = -method.armijo * direction.square().flatten(1).sum(1)
        step_sizes = torch.full((count,), method.initial_step, device=masks.device)
        searching = torch.ones(count, dtype=torch.bool, device=masks.device)
        while bool(searching.any()):
            active = searching.nonzero()[:, 0]
            trial = (masks[active] - step_sizes[active, None, None, None] * direction[active]).clamp(0, 1)
            failed = self.objective(trial, active) > base[active] + step_sizes[active] * decrease[active]
            failed &= step_sizes[active] >= method.smallest_step
            searching[active] = failed
            step_sizes[active[failed]] *= method.step_decay
        return step_sizes
