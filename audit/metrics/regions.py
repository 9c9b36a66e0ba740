"""Per image × method × region kind: how much of the saliency falls inside the suspicious regions.

Definitions (../shared/notes/anchors.md §3, with the sign policy made explicit):

* ``mass_fraction`` = Σ a⁺·M / Σ a⁺: the share of positive saliency inside the region mask M.
* ``area_fraction`` = |M| / N: the share of the image the region covers.
* ``enrichment`` = mass_fraction / area_fraction: 1 means the region gets what its area explains; 10 means ten
  times more. Undefined (NaN) when the image has no region of that kind.
* ``pointing_hit``: the map's maximum lies inside M (Zhang et al. 2018's pointing game; ties count as a hit).
* ``rank_accuracy``: of the |M| most salient pixels, the share inside M (Quantus' relevance rank accuracy).

Everything is computed in one batched pass on the device; only [B, K] numbers leave it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from audit.errors import ShapeError


@dataclass
class RegionMetrics:
    """Each field is float [B, K] on the device (K = number of region kinds); NaN where a kind is absent."""

    mass_fraction: torch.Tensor
    area_fraction: torch.Tensor
    enrichment: torch.Tensor
    pointing_hit: torch.Tensor
    rank_accuracy: torch.Tensor


def boxes_to_masks(boxes: torch.Tensor, kinds: torch.Tensor, num_kinds: int, height: int, width: int) -> torch.Tensor:
    """Rasterise padded box lists into one mask per image and kind.

    Args:
        boxes: float [B, N, 4] as (x0, y0, x1, y1) in mask pixel coordinates, x1/y1 exclusive; padding rows
            have kind -1.
        kinds: int [B, N], the kind index of each box in [0, num_kinds), or -1 for padding.
        num_kinds: K.
        height, width: mask size.

    Returns:
        bool [B, K, height, width]: the union of each kind's boxes.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ShapeError("boxes", "[B, N, 4]", tuple(boxes.shape))
    if kinds.shape != boxes.shape[:2]:
        raise ShapeError("kinds", f"{tuple(boxes.shape[:2])}", tuple(kinds.shape))
    batch = boxes.shape[0]
    device = boxes.device
    masks = torch.zeros(batch, num_kinds, height, width, dtype=torch.bool, device=device)
    if boxes.shape[1] == 0:
        return masks
    # Pixel centres at +0.5, so a box [x0, x1) covers the pixels whose centre lies inside it.
    ys = torch.arange(height, device=device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(width, device=device, dtype=boxes.dtype) + 0.5
    inside_y = (ys.view(1, 1, -1) >= boxes[..., 1:2]) & (ys.view(1, 1, -1) < boxes[..., 3:4])  # [B, N, H]
    inside_x = (xs.view(1, 1, -1) >= boxes[..., 0:1]) & (xs.view(1, 1, -1) < boxes[..., 2:3])  # [B, N, W]
    box_masks = inside_y[..., :, None] & inside_x[..., None, :]  # [B, N, H, W]
    one_hot = kinds[..., None] == torch.arange(num_kinds, device=device).view(1, 1, -1)  # [B, N, K]
    # Union per kind: any box of that kind covers the pixel.
    masks = torch.einsum("bnk,bnhw->bkhw", one_hot.float(), box_masks.float()) > 0
    return masks


def region_metrics(maps: torch.Tensor, masks: torch.Tensor) -> RegionMetrics:
    """Metrics of saliency maps against region masks.

    Args:
        maps: float [B, H, W] saliency; only the positive part counts.
        masks: bool [B, K, H, W].
    """
    if maps.ndim != 3:
        raise ShapeError("maps", "[B, H, W]", tuple(maps.shape))
    if masks.ndim != 4 or masks.shape[0] != maps.shape[0] or masks.shape[-2:] != maps.shape[-2:]:
        raise ShapeError("masks", f"[{maps.shape[0]}, K, {maps.shape[1]}, {maps.shape[2]}]", tuple(masks.shape))
    batch, kinds = masks.shape[:2]
    positive = maps.clamp_min(0).flatten(1)  # [B, P]
    flat_masks = masks.flatten(2)  # [B, K, P]
    pixels = positive.shape[1]
    region_pixels = flat_masks.sum(2).float()  # [B, K]
    present = region_pixels > 0
    nan = torch.full((batch, kinds), float("nan"), device=maps.device)

    total = positive.sum(1, keepdim=True)  # [B, 1]
    inside = torch.einsum("bp,bkp->bk", positive, flat_masks.to(positive.dtype))
    # An all-zero map gives no attention anywhere: mass 0, not NaN, so such images count against the region.
    mass = torch.where(total > 0, inside / total.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(inside))
    area = region_pixels / pixels
    mass = torch.where(present, mass, nan)
    area_or_nan = torch.where(present, area, nan)
    enrichment = mass / area_or_nan

    peak = positive.max(1, keepdim=True).values  # [B, 1]
    is_peak = (positive >= peak) & (peak > 0)  # ties count
    hit = (flat_masks & is_peak[:, None, :]).any(2).float()
    hit = torch.where(present, hit, nan)

    # Rank of every pixel (0 = most salient); a pixel is in the top-|M| when its rank is below |M|.
    order = positive.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels, device=maps.device).expand(batch, -1))
    # Only salient pixels can be "top": ties among zeros would otherwise be broken in raster order, and an
    # all-zero map would score 1 for a box along the top rows.
    in_top = (ranks[:, None, :] < region_pixels[..., None]) & (positive > 0)[:, None, :]  # [B, K, P]
    rank_accuracy = (in_top & flat_masks).sum(2).float() / region_pixels.clamp_min(1)
    rank_accuracy = torch.where(present, rank_accuracy, nan)
    return RegionMetrics(mass, area_or_nan, enrichment, hit, rank_accuracy)


def downsample_maps(maps: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small maps to store: area-averaged to [B, size, size], scaled per map to 0..255 uint8.

    Returns:
        (uint8 [B, size, size], float [B] scale such that map ≈ uint8 / 255 * scale).
    """
    small = torch.nn.functional.adaptive_avg_pool2d(maps.clamp_min(0)[:, None], size)[:, 0]
    scale = small.flatten(1).amax(1)
    quantised = (small / scale.clamp_min(1e-12).view(-1, 1, 1) * 255).round().clamp(0, 255).to(torch.uint8)
    return quantised, scale
