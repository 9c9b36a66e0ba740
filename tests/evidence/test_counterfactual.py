"""Tests of the counterfactual evidence: control placement, region removal, the paired model runs, the statistics."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from audit.errors import ConfigError, ShapeError
from audit.evidence.counterfactual import (
    CONTROL_MARGIN,
    FILLS,
    control_masks,
    counterfactual_batch,
    dependence_stats,
    remove,
)

SIZE = 32
BACKGROUND = 40
MODEL_BOX = (4, 12, 4, 12)  # rows y0:y1, columns x0:x1 that the box-reading model looks at


def _box_masks(boxes: list[list[tuple[int, int, int, int] | None]], size: int = SIZE) -> torch.Tensor:
    """bool [B, K, size, size] from per image, per kind (y0, y1, x0, x1) boxes (None = kind absent)."""
    masks = torch.zeros(len(boxes), len(boxes[0]), size, size, dtype=torch.bool)
    for image, kinds in enumerate(boxes):
        for kind, box in enumerate(kinds):
            if box is not None:
                y0, y1, x0, x1 = box
                masks[image, kind, y0:y1, x0:x1] = True
    return masks


def _random_masks(seed: int, batch: int = 8, kinds: int = 3, size: int = SIZE) -> torch.Tensor:
    """Random small boxes, about a third of the (image, kind) pairs absent."""
    rng = np.random.default_rng(seed)
    boxes: list[list[tuple[int, int, int, int] | None]] = []
    for _ in range(batch):
        row: list[tuple[int, int, int, int] | None] = []
        for _ in range(kinds):
            if rng.random() < 0.33:
                row.append(None)
                continue
            height, width = rng.integers(2, 8, size=2)
            y0, x0 = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
            row.append((int(y0), int(y0 + height), int(x0), int(x0 + width)))
        boxes.append(row)
    return _box_masks(boxes, size)


def _dilated_union(masks: np.ndarray, margin: int) -> np.ndarray:
    """bool [B, H, W]: every region of the image, dilated with OpenCV (an implementation independent of ours)."""
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return np.stack([cv2.dilate(image.any(0).astype(np.uint8), kernel) > 0 for image in masks])


def _assert_valid_controls(masks: torch.Tensor, controls: torch.Tensor, found: torch.Tensor) -> None:
    masks_np, controls_np, found_np = masks.cpu().numpy(), controls.cpu().numpy(), found.cpu().numpy()
    forbidden = _dilated_union(masks_np, CONTROL_MARGIN)
    for image, kind in zip(*np.nonzero(found_np), strict=True):
        control, region = controls_np[image, kind], masks_np[image, kind]
        assert control.sum() == region.sum() > 0
        assert not (control & forbidden[image]).any(), f"control of ({image}, {kind}) touches a region"
        # The control is the region moved as a block: same shape inside its bounding box, up to mirroring.
        rows, cols = np.nonzero(control)
        crop = control[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        rows, cols = np.nonzero(region)
        original = region[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert any(np.array_equal(crop, np.flip(original, axes)) for axes in [(), (0,), (1,), (0, 1)])
    assert not controls_np[~found_np].any(), "a control without found=True"


# --- control masks --------------------------------------------------------------------------------------------


def test_control_is_horizontal_mirror_when_it_fits() -> None:
    masks = _box_masks([[(10, 20, 0, 4), None]])  # an edge marker on the left
    controls, found = control_masks(masks)
    assert found.tolist() == [[True, False]]
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected[10:20, SIZE - 4 : SIZE] = True  # same rows, same distance to the right edge
    assert torch.equal(controls[0, 0], expected)
    assert not controls[0, 1].any()


def test_control_avoids_other_kinds_and_falls_back_to_vertical_mirror() -> None:
    # Kind 1 sits exactly on kind 0's horizontal mirror (and vice versa): both must take the vertical mirror.
    masks = _box_masks([[(2, 8, 2, 8), (2, 8, 24, 30)]])
    controls, found = control_masks(masks)
    assert found.all()
    assert torch.equal(controls[0, 0], _box_masks([[(24, 30, 2, 8)]])[0, 0])
    assert torch.equal(controls[0, 1], _box_masks([[(24, 30, 24, 30)]])[0, 0])
    _assert_valid_controls(masks, controls, found)


@pytest.mark.parametrize("box", [(12, 20, 12, 20), (13, 19, 0, SIZE), (0, SIZE, 13, 19)])
def test_control_random_translation_when_mirrors_overlap(box: tuple[int, int, int, int]) -> None:
    # Centred: every mirror lands on the region itself. The full-width (full-height) band can only move
    # vertically (horizontally).
    masks = _box_masks([[box]])
    controls, found = control_masks(masks, seed=0)
    assert found.all()
    for flipped in (masks.flip(-1), masks.flip(-2), masks.flip((-2, -1))):
        assert not torch.equal(controls, flipped)
    _assert_valid_controls(masks, controls, found)
    # Different seeds place the control differently; the same seed always the same way.
    placements = {control_masks(masks, seed=seed)[0].numpy().tobytes() for seed in range(6)}
    assert len(placements) > 1
    assert torch.equal(control_masks(masks, seed=3)[0], control_masks(masks, seed=3)[0])


def test_control_not_found_for_large_or_absent_region() -> None:
    # A band covering 18 of 32 rows: no equal-area placement can avoid it.
    masks = _box_masks([[(0, 18, 0, SIZE), None], [(0, 4, 0, 4), None]])
    controls, found = control_masks(masks)
    assert found.tolist() == [[False, False], [True, False]]
    assert not controls[0].any()
    assert not controls[1, 1].any()


def test_control_masks_random_batch(device: torch.device) -> None:
    masks = _random_masks(seed=1).to(device)
    controls, found = control_masks(masks, seed=5)
    assert controls.device.type == device.type and found.device.type == device.type
    present = masks.flatten(2).any(2)
    assert bool((found <= present).all())
    assert found.sum() >= 0.8 * present.sum()  # small boxes in a 32 px image nearly always find a place
    _assert_valid_controls(masks, controls, found)
    again = control_masks(masks, seed=5)
    assert torch.equal(controls, again[0]) and torch.equal(found, again[1])


def test_control_masks_batch_equals_per_image() -> None:
    masks = torch.cat([_random_masks(seed=2), _box_masks([[(12, 20, 12, 20), None, (0, 3, 0, 32)]])])
    controls, found = control_masks(masks, seed=7)
    for image in range(len(masks)):
        single_controls, single_found = control_masks(masks[image : image + 1], seed=7)
        assert torch.equal(single_controls[0], controls[image])
        assert torch.equal(single_found[0], found[image])


def test_control_masks_rejects_bad_shape() -> None:
    with pytest.raises(ShapeError):
        control_masks(torch.zeros(2, SIZE, SIZE, dtype=torch.bool))


# --- remove ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", FILLS)
def test_remove_keeps_pixels_outside_the_mask(fill: str, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (3, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    masks = _random_masks(seed=3, batch=3, kinds=2).any(1)
    masks[2] = False  # an image with nothing to remove
    inputs, masks = inputs.to(device), masks.to(device)
    removed = remove(inputs, masks, fill)
    assert removed.dtype == torch.uint8 and removed.shape == inputs.shape and removed.device == inputs.device
    outside = ~masks[:, None].expand_as(inputs)
    assert torch.equal(removed[outside], inputs[outside])
    assert torch.equal(removed[2], inputs[2])
    assert not torch.equal(removed[masks[:, None].expand_as(inputs)], inputs[masks[:, None].expand_as(inputs)])


def test_remove_mean_fill_is_unmasked_mean() -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    masks = _box_masks([[(0, 16, 0, 32)], [(5, 9, 20, 30)]]).any(1)
    removed = remove(inputs, masks, "mean").numpy()
    for image in range(2):
        keep = ~masks[image].numpy()
        for channel in range(3):
            expected = np.round(inputs[image, channel].numpy()[keep].astype(np.float64).mean())
            values = removed[image, channel][~keep]
            assert np.all(np.abs(values.astype(np.float64) - expected) <= 0.5 + 1e-9)


def test_remove_mean_fill_of_fully_masked_image_is_grey() -> None:
    inputs = torch.full((1, 1, 8, 8), 250, dtype=torch.uint8)
    assert torch.equal(remove(inputs, torch.ones(1, 8, 8, dtype=torch.bool), "mean"), torch.full_like(inputs, 128))


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_remove_inpaint_restores_flat_background(channels: int) -> None:
    inputs = torch.full((2, channels, SIZE, SIZE), 100, dtype=torch.uint8)
    inputs[0, :, 12:20, 12:20] = 255  # a bright square on a flat background
    masks = _box_masks([[(12, 20, 12, 20)], [None]]).any(1)
    removed = remove(inputs, masks, "inpaint")
    assert (removed[0, :, 12:20, 12:20].int() - 100).abs().max() <= 2
    assert torch.equal(removed[1], inputs[1])


def test_remove_rejects_unknown_fill_and_bad_masks() -> None:
    inputs = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="'inpaint', 'mean'"):
        remove(inputs, torch.zeros(1, 8, 8, dtype=torch.bool), "blur")
    with pytest.raises(ShapeError):
        remove(inputs, torch.zeros(1, 1, 8, 8, dtype=torch.bool), "mean")


# --- counterfactual_batch -------------------------------------------------------------------------------------


class BoxReader(torch.nn.Module):
    """Reads only MODEL_BOX: logit of class 1 = 10 × mean brightness (0..1) inside it, class 0 = 5.

    Records the size of every forward call and whether it ran under inference mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.inference: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        self.inference.append(torch.is_inference_mode_enabled())
        y0, y1, x0, x1 = MODEL_BOX
        inside = x[:, :, y0:y1, x0:x1].mean((1, 2, 3))
        return torch.stack([torch.full_like(inside, 5.0), 10 * inside], 1)


def _normalise(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 255.0


def _scene(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Three images, two kinds. Kind 0 = a bright square exactly on the model's box (images 0 and 1); kind 1 = a
    grey marker the model never looks at (images 1 and 2)."""
    boxes = [[MODEL_BOX, None], [MODEL_BOX, (24, 28, 14, 18)], [None, (20, 24, 2, 6)]]
    masks = _box_masks(boxes)
    inputs = torch.full((3, 3, SIZE, SIZE), BACKGROUND, dtype=torch.uint8)
    inputs[masks[:, 0, None].expand_as(inputs)] = 255
    inputs[masks[:, 1, None].expand_as(inputs)] = 200
    return inputs.to(device), masks.to(device)


def test_counterfactual_batch_finds_the_region_the_model_reads(device: torch.device) -> None:
    inputs, masks = _scene(device)
    model = BoxReader().to(device)
    logits = model(_normalise(inputs))
    targets = logits.argmax(1)
    assert targets.tolist() == [1, 1, 0]
    model.calls.clear()
    model.inference.clear()

    result = counterfactual_batch(model, inputs, _normalise, masks, targets, logits, max_batch=3)

    pairs = [(0, 0), (1, 0), (1, 1), (2, 1)]
    assert list(zip(result.image_index.tolist(), result.kind_index.tolist(), strict=True)) == pairs * len(FILLS)
    assert result.fill.tolist() == [fill for fill in FILLS for _ in pairs]
    assert result.control_found.all()
    reads = result.kind_index == 0
    # Removing the square the model reads flips the decision and drops the probability by almost all of it ...
    assert result.flip_removed[reads].all()
    assert (result.prob_clean[reads] - result.prob_removed[reads] > 0.9).all()
    # ... while the control, and the region the model ignores, change nothing.
    np.testing.assert_allclose(result.prob_control, result.prob_clean, atol=1e-6)
    assert not result.flip_control.any()
    np.testing.assert_allclose(result.prob_removed[~reads], result.prob_clean[~reads], atol=1e-6)
    assert not result.flip_removed[~reads].any()
    np.testing.assert_allclose(result.area_fraction, [64 / 1024, 64 / 1024, 16 / 1024, 16 / 1024] * len(FILLS))

    # Per fill: 4 removed + 4 control images in chunks of at most 3, all under inference mode.
    assert model.calls == [3, 3, 2] * len(FILLS)
    assert all(model.inference)

    stats = dependence_stats(
        result.prob_clean[reads],
        result.prob_removed[reads],
        result.prob_control[reads],
        result.flip_removed[reads],
        result.flip_control[reads],
        result.control_found[reads],
        n_boot=200,
    )
    assert stats["flip_difference"] == 1.0 and stats["difference_ci_low"] > 0.9


def test_counterfactual_batch_without_control_or_regions() -> None:
    model = BoxReader()
    # Kind 0 covers more than half of image 0: it is evaluated, but has no control.
    masks = _box_masks([[(0, 20, 0, SIZE), None], [None, None]])
    inputs = torch.full((2, 1, SIZE, SIZE), BACKGROUND, dtype=torch.uint8)
    logits = model(_normalise(inputs))
    model.calls.clear()
    result = counterfactual_batch(model, inputs, _normalise, masks, logits.argmax(1), logits, fills=("mean",))
    assert result.image_index.tolist() == [0] and result.kind_index.tolist() == [0]
    assert not result.control_found[0] and math.isnan(result.prob_control[0]) and not result.flip_control[0]
    assert model.calls == [1]  # the removed image only: no forward pass for a missing control

    model.calls.clear()
    empty = torch.zeros_like(masks)
    none = counterfactual_batch(model, inputs, _normalise, empty, logits.argmax(1), logits)
    assert len(none.image_index) == len(none.prob_removed) == len(none.fill) == 0
    assert model.calls == []


def test_counterfactual_batch_rejects_bad_arguments() -> None:
    inputs, masks = _scene(torch.device("cpu"))
    model = BoxReader()
    logits = model(_normalise(inputs))
    targets = logits.argmax(1)
    with pytest.raises(ConfigError, match="'inpaint', 'mean'"):
        counterfactual_batch(model, inputs, _normalise, masks, targets, logits, fills=("zero",))
    with pytest.raises(ConfigError):
        counterfactual_batch(model, inputs, _normalise, masks, targets, logits, max_batch=0)
    with pytest.raises(ShapeError):
        counterfactual_batch(model, inputs, _normalise, masks[:, 0], targets, logits)


# --- dependence_stats -----------------------------------------------------------------------------------------


def _stats(clean, removed, control, flip, flip_control, found, **kwargs) -> dict:
    arrays = [np.asarray(values) for values in (clean, removed, control, flip, flip_control, found)]
    return dependence_stats(*arrays, **kwargs)


def test_dependence_stats_all_flip_no_control_flip() -> None:
    n = 40
    stats = _stats(
        np.full(n, 0.9), np.full(n, 0.1), np.full(n, 0.9), np.ones(n, bool), np.zeros(n, bool), np.ones(n, bool)
    )
    assert stats["n"] == stats["n_control"] == n
    assert stats["flip_rate"] == 1.0 and stats["flip_rate_control"] == 0.0
    assert stats["flip_difference"] == stats["flip_difference_ci_low"] == stats["flip_difference_ci_high"] == 1.0
    assert stats["effect"] == pytest.approx(0.8) and stats["effect_control"] == pytest.approx(0.0)
    assert stats["difference"] == pytest.approx(0.8)
    assert stats["difference_ci_low"] == pytest.approx(0.8) and stats["difference_ci_high"] == pytest.approx(0.8)


def test_dependence_stats_identical_drops_give_zero_difference() -> None:
    rng = np.random.default_rng(0)
    n = 60
    clean = rng.uniform(0.5, 1.0, n)
    removed = clean - rng.uniform(0.0, 0.4, n)
    flips = rng.random(n) < 0.3
    stats = _stats(clean, removed, removed.copy(), flips, flips.copy(), np.ones(n, bool), n_boot=500)
    assert stats["difference"] == pytest.approx(0.0, abs=1e-12)
    assert stats["difference_ci_low"] <= 0.0 <= stats["difference_ci_high"]
    assert stats["flip_difference"] == 0.0
    assert stats["effect"] == pytest.approx(stats["effect_control"])
    assert stats["effect_ci_low"] < stats["effect"] < stats["effect_ci_high"]


def test_dependence_stats_pairing_uses_only_rows_with_control() -> None:
    rng = np.random.default_rng(1)
    n = 80
    clean = np.full(n, 0.9)
    control = clean - rng.uniform(0.0, 0.1, n)
    removed = control - 0.3 + rng.normal(0.0, 0.02, n)  # 0.3 more drop than the control, row by row
    found = np.ones(n, bool)
    # Ten rows without a control, with a much larger drop: they count in the effect, not in the difference.
    found[:10] = False
    control[:10] = math.nan
    removed[:10] = 0.0
    stats = _stats(clean, removed, control, np.zeros(n, bool), np.zeros(n, bool), found, n_boot=500)
    assert stats["n"] == n and stats["n_control"] == 70
    assert stats["difference"] == pytest.approx(0.3, abs=0.01)
    assert 0.28 < stats["difference_ci_low"] < stats["difference"] < stats["difference_ci_high"] < 0.32
    assert stats["effect"] > stats["effect_control"] + stats["difference"]  # the unpaired rows raise the effect
    assert stats == _stats(clean, removed, control, np.zeros(n, bool), np.zeros(n, bool), found, n_boot=500)


def test_dependence_stats_nan_when_undefined() -> None:
    empty = _stats([], [], [], np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, bool))
    assert empty["n"] == empty["n_control"] == 0
    assert all(math.isnan(value) for key, value in empty.items() if key not in ("n", "n_control"))

    n = 5
    no_control = _stats(
        np.full(n, 0.8), np.full(n, 0.3), np.full(n, math.nan), np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    )
    assert no_control["n"] == n and no_control["n_control"] == 0
    assert no_control["effect"] == pytest.approx(0.5) and no_control["flip_rate"] == 1.0
    for key in ("flip_rate_control", "effect_control", "difference", "flip_difference", "difference_ci_low"):
        assert math.isnan(no_control[key]), key
    with pytest.raises(ConfigError):
        _stats([0.5], [0.4], [0.5], [False], [False], [True], n_boot=0)
