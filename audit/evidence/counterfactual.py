"""Counterfactual evidence: does the decision *depend* on a suspicious region?

Attention (``audit.metrics.regions``) shows where the saliency falls, not that the model needs what is there. The
counterfactual test removes the region and looks at the decision (the "remove" half of ROAR/deletion tests, Hooker
et al. 2019; the region-ablation design of DeGrave et al. 2021 §"Saliency" and Zech et al. 2018):

* for every image and region kind k present in it, the pixels of k are replaced (``fill``: OpenCV inpainting or
  the image's mean) and the model is run again: the drop of the target class's probability and whether the
  predicted class flips are recorded;
* the same is done for an equal-area **control** region placed elsewhere in the same image, away from every
  detected region. Removing any patch perturbs a model a little (out-of-distribution fill, lost context); the
  control measures that baseline, so a region matters when its removal changes the decision clearly more than
  the control's does (a paired comparison with a bootstrap interval, :func:`dependence_stats`).

Controls (:func:`control_masks`) are the kind's whole mask moved as a block, so shape and area are kept exactly:
first its horizontal mirror (an edge marker gets an edge control at the same distance from the edge), then the
vertical mirror, both mirrors, then seeded random translations that keep the mask's bounding box inside the image
(no wrap-around, so a control is never split across the image's edges). A candidate must not touch any region of
any kind of the image, dilated by ``CONTROL_MARGIN`` pixels (a square, i.e. Chebyshev, distance).

Masks, removals and model outputs stay on the inputs' device; only inpainting (OpenCV, per image by nature) goes
through the CPU, and only the per-row numbers leave the device at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from audit.errors import ConfigError, ShapeError

FILLS = ("inpaint", "mean")
CONTROL_MARGIN = 2
INPAINT_RADIUS = 3
# Fill value of an image whose every pixel is masked (no unmasked pixel to average): mid-grey, so nothing of the
# removed content leaks into the fill.
_ALL_MASKED_FILL = 128.0
# Largest bootstrap index matrix built at once (int64 entries): 1,000 resamples of 100,000 rows would otherwise
# need 800 MB.
_BOOTSTRAP_CHUNK = 4_000_000


@dataclass
class CounterfactualBatch:
    """Per (image, kind, fill) row where the kind is present in the image (only those rows), fill-major.

    Row order: for each fill in the order given, the present (image, kind) pairs in raster order of [B, K].
    """

    image_index: np.ndarray  # int [P], index into the batch
    kind_index: np.ndarray  # int [P]
    fill: np.ndarray  # object (str) [P]
    prob_clean: np.ndarray  # float [P] probability of the target class on the clean image
    prob_removed: np.ndarray  # float [P] after removing the region
    prob_control: np.ndarray  # float [P] after removing the control region; NaN when no control was found
    flip_removed: np.ndarray  # bool [P] prediction (argmax) differs from the clean prediction
    flip_control: np.ndarray  # bool [P] (False where no control)
    control_found: np.ndarray  # bool [P]
    area_fraction: np.ndarray  # float [P] the removed area / image area


def _check_masks(masks: torch.Tensor) -> None:
    if masks.ndim != 4 or masks.dtype != torch.bool:
        raise ShapeError("masks", "bool [B, K, H, W]", f"{masks.dtype} {tuple(masks.shape)}")


def _dilate(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """bool [B, 1, H, W] → the same dilated by ``margin`` pixels (square structuring element)."""
    if margin <= 0:
        return masks
    # max_pool2d does not take bool; float32 is exact for 0/1.
    return F.max_pool2d(masks.float(), kernel_size=2 * margin + 1, stride=1, padding=margin) > 0


def _extent(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and exclusive end of the True entries along the last axis ([..., L] → [...], [...]).

    Garbage (0, L) for an all-False row; callers only use rows of present masks.
    """
    length = occupied.shape[-1]
    # argmax returns the first maximal index, so on 0/1 values it finds the first True.
    first = occupied.to(torch.uint8).argmax(-1)
    end = length - occupied.flip(-1).to(torch.uint8).argmax(-1)
    return first, end


def _translate(masks: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Move each [H, W] mask by its own integer shift, without wrap-around.

    Args:
        masks: bool [B, K, H, W].
        shift_y, shift_x: long [B, K]; output[y, x] = masks[y - shift_y, x - shift_x] (False outside the image).
    """
    batch, kinds, height, width = masks.shape
    source_y = torch.arange(height, device=masks.device).view(1, 1, -1) - shift_y[..., None]  # [B, K, H]
    source_x = torch.arange(width, device=masks.device).view(1, 1, -1) - shift_x[..., None]  # [B, K, W]
    valid_y = (source_y >= 0) & (source_y < height)
    valid_x = (source_x >= 0) & (source_x < width)
    rows = masks.gather(2, source_y.clamp(0, height - 1)[..., None].expand(batch, kinds, height, width))
    moved = rows.gather(3, source_x.clamp(0, width - 1)[..., None, :].expand(batch, kinds, height, width))
    # Clamped indices repeat an edge row or column; those positions lie outside the shifted image and are cleared.
    return moved & valid_y[..., :, None] & valid_x[..., None, :]


def _control_candidates(masks: torch.Tensor, seed: int, candidates: int) -> Iterator[torch.Tensor]:
    """The candidate controls in order of preference, each bool [B, K, H, W]: mirrors, then random translations."""
    yield masks.flip(-1)
    yield masks.flip(-2)
    yield masks.flip((-2, -1))
    if candidates <= 0:
        return
    height, width = masks.shape[-2:]
    top, bottom = _extent(masks.any(-1))  # [B, K]
    left, right = _extent(masks.any(-2))
    free_y = height - (bottom - top)  # number of in-bounds vertical positions of the bounding box, minus one
    free_x = width - (right - left)
    # One uniform draw per candidate, shared by every image and kind and scaled to each mask's free range: the
    # controls of an image then do not depend on what else is in the batch (batch result = per-image result).
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(candidates, 2, generator=generator).to(masks.device)  # float32: MPS has no float64
    for draw_y, draw_x in draws:
        new_top = torch.minimum((draw_y * (free_y + 1)).floor().long(), free_y)
        new_left = torch.minimum((draw_x * (free_x + 1)).floor().long(), free_x)
        yield _translate(masks, new_top - top, new_left - left)


def control_masks(
    masks: torch.Tensor, seed: int = 0, candidates: int = 16, margin: int = CONTROL_MARGIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-area control masks, one per image and kind.

    For each (image, kind) with a non-empty mask, the kind's whole mask is moved elsewhere so that it does not
    touch any region of any kind of that image (their union dilated by ``margin`` pixels). Candidates in order:
    the horizontal mirror (flip along W), the vertical mirror, both mirrors, then ``candidates`` seeded random
    translations that keep the mask's bounding box inside the image (no wrap-around). The first candidate that
    fits wins; shape and area are kept exactly.

    Args:
        masks: bool [B, K, H, W], the union of each kind's regions per image.
        seed: seed of the random translations (the same seed gives the same controls).
        candidates: number of random translations tried after the three mirrors.
        margin: pixels kept free around every region (square dilation).

    Returns:
        (controls bool [B, K, H, W], found bool [B, K]), on the masks' device. ``found`` is False, and the control
        all False, when the kind is absent from the image or no candidate fits (e.g. a region covering more than
        half of the image).
    """
    _check_masks(masks)
    present = masks.flatten(2).any(2)  # [B, K]
    forbidden = _dilate(masks.any(1, keepdim=True), margin)  # [B, 1, H, W]
    controls = torch.zeros_like(masks)
    found = torch.zeros_like(present)
    for candidate in _control_candidates(masks, seed, candidates):
        overlaps = (candidate & forbidden).flatten(2).any(2)  # [B, K]
        fits = present & ~found & ~overlaps
        controls = torch.where(fits[..., None, None], candidate, controls)
        found = found | fits
        if bool((found | ~present).all()):  # every present kind is placed: skip the remaining candidates
            break
    return controls, found


def _mean_fill(inputs_u8: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] filled everywhere with each image's per-channel mean over its unmasked pixels."""
    keep = (~masks)[:, None].to(torch.float32)  # [B, 1, H, W]
    sums = (inputs_u8.to(torch.float32) * keep).sum((2, 3))  # [B, C]
    counts = keep.sum((2, 3))  # [B, 1]
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, _ALL_MASKED_FILL))
    return means.round().clamp(0, 255).to(torch.uint8)[..., None, None].expand_as(inputs_u8)


def _inpaint_one(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Telea inpainting of one uint8 [H, W, C] image where ``mask`` (uint8 [H, W]) is non-zero."""
    channels = image.shape[2]
    if channels in (1, 3):  # what cv2.inpaint accepts as one image
        return cv2.inpaint(image, mask, INPAINT_RADIUS, cv2.INPAINT_TELEA).reshape(image.shape)
    planes = [
        cv2.inpaint(np.ascontiguousarray(image[..., channel]), mask, INPAINT_RADIUS, cv2.INPAINT_TELEA)
        for channel in range(channels)
    ]
    return np.stack(planes, axis=-1)


def _inpaint_fill(inputs_u8: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W]: cv2.inpaint (Telea) of each image on the CPU, moved back to the inputs' device."""
    images = inputs_u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [B, H, W, C]
    mask_arrays = masks.to(torch.uint8).cpu().numpy()  # [B, H, W]
    filled = images.copy()
    # OpenCV inpaints one image per call; images without any masked pixel are left as they are.
    for index in np.flatnonzero(mask_arrays.reshape(len(mask_arrays), -1).any(1)):
        filled[index] = _inpaint_one(images[index], mask_arrays[index])
    return torch.from_numpy(filled).to(inputs_u8.device).permute(0, 3, 1, 2)


def _check_fill(fill: str) -> None:
    if fill not in FILLS:
        valid = ", ".join(repr(name) for name in FILLS)
        raise ConfigError(f"fill: expected one of {valid}, found {fill!r}")


def remove(inputs_u8: torch.Tensor, masks: torch.Tensor, fill: str) -> torch.Tensor:
    """Replace the masked pixels of each image.

    Args:
        inputs_u8: uint8 [B, C, H, W] on any device.
        masks: bool [B, H, W] on the same device; True = remove.
        fill: ``"mean"``: each image's per-channel mean over its unmasked pixels (batched on the device; mid-grey
            when every pixel is masked); ``"inpaint"``: ``cv2.inpaint`` (Telea, radius 3) per image on a CPU copy.

    Returns:
        uint8 [B, C, H, W] on the inputs' device; pixels outside the mask are unchanged.

    Raises:
        ConfigError: an unknown fill (the message lists the valid ones).
        ShapeError: inputs or masks of the wrong shape, dtype or device.
    """
    _check_fill(fill)
    if inputs_u8.ndim != 4 or inputs_u8.dtype != torch.uint8:
        raise ShapeError("inputs_u8", "uint8 [B, C, H, W]", f"{inputs_u8.dtype} {tuple(inputs_u8.shape)}")
    batch, _, height, width = inputs_u8.shape
    if masks.dtype != torch.bool or tuple(masks.shape) != (batch, height, width):
        raise ShapeError("masks", f"bool [{batch}, {height}, {width}]", f"{masks.dtype} {tuple(masks.shape)}")
    if masks.device != inputs_u8.device:
        raise ShapeError("masks", f"a tensor on {inputs_u8.device}", f"a tensor on {masks.device}")
    filled = _mean_fill(inputs_u8, masks) if fill == "mean" else _inpaint_fill(inputs_u8, masks)
    # Only masked pixels change, whatever the fill did elsewhere.
    return torch.where(masks[:, None], filled, inputs_u8)


def _predict_removed(
    model: torch.nn.Module,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    inputs_u8: torch.Tensor,
    source: torch.Tensor,
    regions: torch.Tensor,
    targets: torch.Tensor,
    clean_prediction: torch.Tensor,
    fill: str,
    max_batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target probability and flip after removing ``regions`` from the images ``source``, in chunks.

    Args:
        source: long [N], the batch index of each counterfactual image.
        regions: bool [N, H, W], what to remove from it.
        targets, clean_prediction: long [B].

    Returns:
        (float [N] probability of the target class, bool [N] argmax differs from the clean one), on the device.
    """
    probabilities, flips = [], []
    for start in range(0, len(source), max_batch):
        chunk = source[start : start + max_batch]
        # Removal per chunk, so at most max_batch altered images exist at once.
        altered = remove(inputs_u8[chunk], regions[start : start + max_batch], fill)
        logits = model(normalise(altered))
        probabilities.append(logits.float().softmax(1).gather(1, targets[chunk][:, None])[:, 0])
        flips.append(logits.argmax(1) != clean_prediction[chunk])
    return torch.cat(probabilities), torch.cat(flips)


def counterfactual_batch(
    model: torch.nn.Module,
    inputs_u8: torch.Tensor,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    masks: torch.Tensor,
    targets: torch.Tensor,
    logits: torch.Tensor,
    fills: Sequence[str] = FILLS,
    seed: int = 0,
    max_batch: int = 64,
) -> CounterfactualBatch:
    """Remove each present region, and its equal-area control, and record what happens to the decision.

    Only (image, kind) pairs with a region are evaluated. For each fill, the removed and control images of all
    such pairs go through the model together, in chunks of at most ``max_batch``, under ``torch.inference_mode``.
    The model is used as it is: the caller puts it in eval mode (batch norm in training mode would make the
    outputs depend on the chunking).

    Args:
        model: maps ``normalise(x)`` to logits [N, classes].
        inputs_u8: uint8 [B, C, H, W] on the model's device.
        normalise: uint8 [N, C, H, W] → the model's float input, on the same device.
        masks: bool [B, K, H, W] on the same device, the union of each kind's regions per image.
        targets: long [B], the class each saliency map explains.
        logits: float [B, classes] of the clean inputs (computed by the caller, so no clean forward here).
        fills: fill methods, each one of :data:`FILLS`.
        seed: seed of the control placement (:func:`control_masks`).
        max_batch: largest number of images per forward call.

    Returns:
        A :class:`CounterfactualBatch` with P = (number of present pairs) × len(fills) rows.
    """
    for fill in fills:
        _check_fill(fill)
    if max_batch < 1:
        raise ConfigError(f"max_batch: expected a positive number of images per forward call, found {max_batch}")
    if inputs_u8.ndim != 4 or inputs_u8.dtype != torch.uint8:
        raise ShapeError("inputs_u8", "uint8 [B, C, H, W]", f"{inputs_u8.dtype} {tuple(inputs_u8.shape)}")
    _check_masks(masks)
    batch, _, height, width = inputs_u8.shape
    if masks.shape[0] != batch or masks.shape[-2:] != inputs_u8.shape[-2:] or masks.device != inputs_u8.device:
        raise ShapeError(
            "masks", f"[{batch}, K, {height}, {width}] on {inputs_u8.device}", f"{tuple(masks.shape)} on {masks.device}"
        )
    if targets.shape != (batch,):
        raise ShapeError("targets", f"[{batch}]", tuple(targets.shape))
    if logits.ndim != 2 or logits.shape[0] != batch:
        raise ShapeError("logits", f"[{batch}, classes]", tuple(logits.shape))

    targets = targets.to(device=inputs_u8.device, dtype=torch.long)
    logits = logits.to(inputs_u8.device)
    with torch.inference_mode():
        region_pixels = masks.flatten(2).sum(2)  # [B, K]
        image_index, kind_index = (region_pixels > 0).nonzero(as_tuple=True)  # [P0] each, raster order
        controls, found = control_masks(masks, seed=seed)
        has_control = found[image_index, kind_index]  # [P0]
        # Removed images first, then the controls of the pairs that have one: one list of counterfactuals per fill.
        source = torch.cat([image_index, image_index[has_control]])
        regions = torch.cat([masks[image_index, kind_index], controls[image_index, kind_index][has_control]])
        prob_clean = logits.float().softmax(1).gather(1, targets[:, None])[:, 0][image_index]
        clean_prediction = logits.argmax(1)
        pairs = len(image_index)
        prob_removed, prob_control, flip_removed, flip_control = [], [], [], []
        for fill in fills:
            if pairs == 0:
                break
            probabilities, flips = _predict_removed(
                model, normalise, inputs_u8, source, regions, targets, clean_prediction, fill, max_batch
            )
            prob_removed.append(probabilities[:pairs])
            flip_removed.append(flips[:pairs])
            # Scatter the controls back to their pairs: NaN probability and no flip where no control was found.
            control_probability = torch.full((pairs,), math.nan, device=probabilities.device)
            control_probability[has_control] = probabilities[pairs:]
            control_flip = torch.zeros(pairs, dtype=torch.bool, device=flips.device)
            control_flip[has_control] = flips[pairs:]
            prob_control.append(control_probability)
            flip_control.append(control_flip)

    repeats = len(fills) if pairs else 0

    def _host(parts: list[torch.Tensor], dtype: type) -> np.ndarray:
        return torch.cat(parts).cpu().numpy().astype(dtype) if parts else np.zeros(0, dtype=dtype)

    return CounterfactualBatch(
        image_index=np.tile(image_index.cpu().numpy().astype(np.int64), repeats),
        kind_index=np.tile(kind_index.cpu().numpy().astype(np.int64), repeats),
        fill=np.repeat(np.array(list(fills) if pairs else [], dtype=object), pairs),
        prob_clean=np.tile(prob_clean.cpu().numpy().astype(np.float64), repeats),
        prob_removed=_host(prob_removed, np.float64),
        prob_control=_host(prob_control, np.float64),
        flip_removed=_host(flip_removed, np.bool_),
        flip_control=_host(flip_control, np.bool_),
        control_found=np.tile(has_control.cpu().numpy(), repeats),
        area_fraction=np.tile(region_pixels[image_index, kind_index].cpu().numpy() / (height * width), repeats),
    )


def _bootstrap_mean(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (float [n], n ≥ 1), resampling rows."""
    n = len(values)
    means = np.empty(n_boot)
    step = max(1, _BOOTSTRAP_CHUNK // n)
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))  # [resamples, n]
        means[start:stop] = values[idx].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _mean_with_interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(mean, 95% bootstrap low, high) of float [n]; all NaN when n = 0."""
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    low, high = _bootstrap_mean(values, n_boot, np.random.default_rng(seed))
    return float(values.mean()), low, high


def dependence_stats(
    prob_clean: np.ndarray,
    prob_removed: np.ndarray,
    prob_control: np.ndarray,
    flip_removed: np.ndarray,
    flip_control: np.ndarray,
    control_found: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Summary of one group of rows (e.g. one class × region kind × fill) of a :class:`CounterfactualBatch`.

    Effect = drop of the target probability, ``prob_clean - prob_removed``; the control effect likewise with
    ``prob_control``. A row is *paired* when it has a control (``control_found`` and a finite ``prob_control``).

    Args:
        prob_clean, prob_removed, prob_control: float [n] (``prob_control`` NaN where no control).
        flip_removed, flip_control, control_found: bool [n].
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``n``, ``n_control`` (paired rows), ``flip_rate`` (all rows), ``flip_rate_control`` (paired rows),
        ``effect`` (mean drop, all rows) and ``effect_control`` (mean control drop, paired rows) each with
        ``_ci_low``/``_ci_high`` (95% percentile bootstrap of the mean); ``difference`` = mean of
        (drop − control drop) and ``flip_difference`` = flip rate − control flip rate, both over the paired rows,
        each with a paired bootstrap interval (rows resampled, pairs kept). NaN where undefined (no rows, no
        controls).
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot: expected a positive number of bootstrap resamples, found {n_boot}")
    prob_clean = np.asarray(prob_clean, dtype=np.float64)
    drop = prob_clean - np.asarray(prob_removed, dtype=np.float64)
    control_drop = prob_clean - np.asarray(prob_control, dtype=np.float64)
    flips = np.asarray(flip_removed, dtype=np.float64)
    control_flips = np.asarray(flip_control, dtype=np.float64)
    paired = np.asarray(control_found, dtype=bool) & np.isfinite(control_drop)

    # Each statistic gets its own seed, so adding or dropping one does not change the others' intervals.
    effect, effect_low, effect_high = _mean_with_interval(drop, n_boot, seed)
    control, control_low, control_high = _mean_with_interval(control_drop[paired], n_boot, seed + 1)
    # A paired bootstrap of a mean difference resamples rows and keeps each row's two values together, which is
    # resampling the per-row differences.
    difference, difference_low, difference_high = _mean_with_interval(
        drop[paired] - control_drop[paired], n_boot, seed + 2
    )
    flip_difference, flip_low, flip_high = _mean_with_interval(flips[paired] - control_flips[paired], n_boot, seed + 3)
    return {
        "n": len(drop),
        "n_control": int(paired.sum()),
        "flip_rate": float(flips.mean()) if len(flips) else math.nan,
        "flip_rate_control": float(control_flips[paired].mean()) if paired.any() else math.nan,
        "effect": effect,
        "effect_ci_low": effect_low,
        "effect_ci_high": effect_high,
        "effect_control": control,
        "effect_control_ci_low": control_low,
        "effect_control_ci_high": control_high,
        "difference": difference,
        "difference_ci_low": difference_low,
        "difference_ci_high": difference_high,
        "flip_difference": flip_difference,
        "flip_difference_ci_low": flip_low,
        "flip_difference_ci_high": flip_high,
    }
