"""Tests of box rasterisation and per-image region metrics on hand-made maps with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from audit.errors import ShapeError
from audit.metrics.regions import RegionMetrics, boxes_to_masks, downsample_maps, region_metrics

FIELDS = ("mass_fraction", "area_fraction", "enrichment", "pointing_hit", "rank_accuracy")


def _mask(height: int, width: int, *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """bool [H, W] with the given (x0, y0, x1, y1) boxes set, built by slicing (the reference)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def _one(maps: torch.Tensor, *masks: torch.Tensor) -> RegionMetrics:
    """Metrics of one [H, W] map against K [H, W] masks."""
    return region_metrics(maps[None].float(), torch.stack(masks)[None])


# --- boxes_to_masks -------------------------------------------------------------------------------------------


def test_box_covers_exact_pixels_end_exclusive() -> None:
    boxes = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    masks = boxes_to_masks(boxes, torch.tensor([[0]]), num_kinds=1, height=5, width=6)
    assert masks.shape == (1, 1, 5, 6)
    assert masks.dtype == torch.bool
    torch.testing.assert_close(masks[0, 0], _mask(5, 6, (1, 2, 3, 4)))
    assert int(masks.sum()) == 4


def test_fractional_boxes_use_pixel_centres() -> None:
    boxes = torch.tensor(
        [
            [
                [0.5, 0.5, 2.5, 1.5],  # centres 0.5 and 1.5 inside in x (2.5 excluded), only row 0 in y
                [3.6, 0.0, 4.4, 4.0],  # no pixel centre (3.5 or 4.5) inside in x: empty
            ]
        ]
    )
    masks = boxes_to_masks(boxes, torch.tensor([[0, 1]]), num_kinds=2, height=4, width=6)
    torch.testing.assert_close(masks[0, 0], _mask(4, 6, (0, 0, 2, 1)))
    assert not masks[0, 1].any()


def test_union_per_kind_and_padding_ignored() -> None:
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 6.0, 6.0], [0.0, 0.0, 6.0, 6.0]],
            [[5.0, 0.0, 6.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 6.0, 6.0], [0.0, 0.0, 6.0, 6.0]],
        ]
    )
    kinds = torch.tensor([[0, 0, 1, -1], [1, -1, -1, -1]])
    masks = boxes_to_masks(boxes, kinds, num_kinds=2, height=6, width=6)
    torch.testing.assert_close(masks[0, 0], _mask(6, 6, (0, 0, 2, 2), (1, 1, 3, 3)))
    torch.testing.assert_close(masks[0, 1], _mask(6, 6, (4, 4, 6, 6)))
    assert not masks[1, 0].any()  # padding rows (kind -1) cover the whole image but count for nothing
    torch.testing.assert_close(masks[1, 1], _mask(6, 6, (5, 0, 6, 1)))
    assert int(masks[0, 0].sum()) == 7  # overlap counted once


def test_zero_boxes() -> None:
    masks = boxes_to_masks(torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.long), 2, 5, 7)
    assert masks.shape == (3, 2, 5, 7)
    assert masks.dtype == torch.bool
    assert not masks.any()


def test_box_clipped_to_image() -> None:
    masks = boxes_to_masks(torch.tensor([[[-3.0, -3.0, 2.0, 100.0]]]), torch.tensor([[0]]), 1, 4, 4)
    torch.testing.assert_close(masks[0, 0], _mask(4, 4, (0, 0, 2, 4)))


def test_boxes_to_masks_shape_errors() -> None:
    with pytest.raises(ShapeError, match=r"boxes: expected shape \[B, N, 4\], found \(1, 2, 3\)"):
        boxes_to_masks(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 1, 4, 4)
    with pytest.raises(ShapeError, match="kinds"):
        boxes_to_masks(torch.zeros(1, 2, 4), torch.zeros(1, 3, dtype=torch.long), 1, 4, 4)


# --- region_metrics -------------------------------------------------------------------------------------------


def test_all_saliency_inside_the_box() -> None:
    box = _mask(4, 4, (0, 0, 2, 2))
    maps = torch.zeros(4, 4)
    maps[0, 0], maps[1, 1] = 3.0, 1.0
    result = _one(maps, box)
    assert result.mass_fraction.item() == pytest.approx(1.0)
    assert result.area_fraction.item() == pytest.approx(0.25)
    assert result.enrichment.item() == pytest.approx(1 / 0.25)
    assert result.pointing_hit.item() == 1.0


def test_uniform_map_gives_enrichment_one() -> None:
    box = _mask(8, 8, (1, 2, 4, 7))
    result = _one(torch.full((8, 8), 0.3), box)
    assert result.mass_fraction.item() == pytest.approx(15 / 64, abs=1e-6)
    assert result.enrichment.item() == pytest.approx(1.0, abs=1e-5)


def test_negative_values_ignored() -> None:
    box = _mask(4, 4, (2, 2, 4, 4))
    maps = torch.full((4, 4), -5.0)
    maps[3, 3] = 2.0
    maps[2, 2] = 2.0
    result = _one(maps, box)
    assert result.mass_fraction.item() == pytest.approx(1.0)
    assert result.enrichment.item() == pytest.approx(4.0)
    # Half positive inside, half outside, large negatives everywhere else: 0.5 of the positive part.
    maps[0, 0] = 4.0
    assert _one(maps, box).mass_fraction.item() == pytest.approx(0.5)


def test_all_zero_map_gives_zero_mass_not_nan() -> None:
    result = _one(torch.zeros(4, 4), _mask(4, 4, (1, 1, 3, 3)))
    assert result.mass_fraction.item() == 0.0
    assert result.enrichment.item() == 0.0
    assert result.pointing_hit.item() == 0.0
    assert result.area_fraction.item() == pytest.approx(0.25)


def test_all_negative_map_gives_zero_mass() -> None:
    result = _one(torch.full((4, 4), -1.0), _mask(4, 4, (1, 1, 3, 3)))
    assert result.mass_fraction.item() == 0.0
    assert result.pointing_hit.item() == 0.0


def test_all_zero_map_gives_zero_rank_accuracy() -> None:
    result = _one(torch.zeros(4, 4), _mask(4, 4, (0, 0, 4, 1)))  # top row, like a burned-in text banner
    assert result.rank_accuracy.item() == 0.0


def test_absent_kind_is_nan_in_every_metric() -> None:
    maps = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    result = _one(maps, _mask(6, 6, (0, 0, 3, 3)), _mask(6, 6))
    for field in FIELDS:
        values = getattr(result, field)
        assert values.shape == (1, 2), field
        assert not math.isnan(values[0, 0].item()), field
        assert math.isnan(values[0, 1].item()), field


def test_pointing_hit_with_ties() -> None:
    box = _mask(4, 4, (0, 0, 1, 1))
    maps = torch.zeros(4, 4)
    maps[0, 0] = maps[3, 3] = 1.0  # the peak is tied between inside and outside
    assert _one(maps, box).pointing_hit.item() == 1.0
    maps[0, 0] = 0.999  # now the only peak is outside
    assert _one(maps, box).pointing_hit.item() == 0.0


def test_rank_accuracy_exact() -> None:
    box = _mask(3, 3, (0, 0, 2, 2))  # |M| = 4: pixels (0,0), (0,1), (1,0), (1,1)
    maps = torch.tensor(
        [
            [9.0, 8.0, 1.0],
            [2.0, 7.0, 6.0],  # top 4: 9, 8, 7 inside, 6 outside
            [3.0, 4.0, 5.0],
        ]
    )
    assert _one(maps, box).rank_accuracy.item() == pytest.approx(0.75)
    maps[1, 0] = 10.0  # now the top 4 are exactly the box
    assert _one(maps, box).rank_accuracy.item() == pytest.approx(1.0)


def test_batch_equals_per_image() -> None:
    generator = torch.Generator().manual_seed(3)
    maps = torch.randn(3, 10, 12, generator=generator)
    boxes = torch.tensor(
        [
            [[1.0, 1.0, 5.0, 4.0], [6.0, 2.0, 12.0, 10.0], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 12.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
            [[3.0, 3.0, 4.0, 4.0], [2.0, 8.0, 9.0, 10.0], [9.0, 0.0, 12.0, 3.0]],
        ]
    )
    kinds = torch.tensor([[0, 1, -1], [1, -1, -1], [0, 0, 1]])
    masks = boxes_to_masks(boxes, kinds, num_kinds=3, height=10, width=12)
    batch = region_metrics(maps, masks)
    for i in range(3):
        single = region_metrics(maps[i : i + 1], masks[i : i + 1])
        single_masks = boxes_to_masks(boxes[i : i + 1], kinds[i : i + 1], 3, 10, 12)
        torch.testing.assert_close(single_masks, masks[i : i + 1])
        for field in FIELDS:
            torch.testing.assert_close(getattr(batch, field)[i : i + 1], getattr(single, field), equal_nan=True)
    assert math.isnan(batch.mass_fraction[0, 2].item())  # kind 2 absent from image 0


def test_float64_maps() -> None:
    box = _mask(4, 4, (0, 0, 2, 2))
    result = region_metrics(torch.ones(1, 4, 4, dtype=torch.float64), box[None, None])
    assert result.enrichment.item() == pytest.approx(1.0)


def test_region_metrics_shape_errors() -> None:
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ShapeError, match="maps"):
        region_metrics(torch.zeros(4, 4), masks)
    with pytest.raises(ShapeError, match=r"masks: expected shape \[3, K, 4, 4\]"):
        region_metrics(torch.zeros(3, 4, 4), masks)
    with pytest.raises(ShapeError, match="masks"):
        region_metrics(torch.zeros(2, 4, 5), masks)
    with pytest.raises(ShapeError, match="masks"):
        region_metrics(torch.zeros(2, 4, 4), masks[:, 0])


# --- downsample_maps ------------------------------------------------------------------------------------------


def test_downsample_round_trip() -> None:
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(5)) * torch.tensor([1.0, 40.0]).view(2, 1, 1)
    maps[0, 0, 0] = -10.0  # negative part dropped before pooling
    small, scale = downsample_maps(maps, 4)
    assert small.shape == (2, 4, 4)
    assert small.dtype == torch.uint8
    assert scale.shape == (2,)
    assert small.flatten(1).amax(1).tolist() == [255, 255]  # each map uses the full range
    expected = torch.nn.functional.avg_pool2d(maps.clamp_min(0)[:, None], 4)[:, 0]
    torch.testing.assert_close(scale, expected.flatten(1).amax(1))
    restored = small.float() / 255 * scale.view(-1, 1, 1)
    assert (restored - expected).abs().max() <= scale.max() / 255 / 2 + 1e-6


def test_downsample_zero_map() -> None:
    small, scale = downsample_maps(torch.zeros(1, 8, 8), 4)
    assert not small.any()
    assert scale.item() == 0.0
