"""Tests of SpRAy discovery on synthetic saliency maps whose clusters are known by construction.

The maps imitate the stored form (uint8 [32, 32], min-max scaled per image): a Gaussian blob whose position is
jittered and whose width varies from image to image, plus clipped noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit.errors import ConfigError, ShapeError
from audit.evidence.discovery import Cluster, _concentration, cluster_rows, discover, eigengap

SIZE = 32
CENTRE = (0.5, 0.5)
CORNER = (0.8, 0.2)  # (x, y): the planted off-centre attention
GRID = 16
CLASSES = ["normal", "opacity"]


def _blobs(
    centres: list[tuple[float, float]],
    rng: np.random.Generator,
    jitter: float = 0.03,
    sigma: float = 0.08,
    noise: float = 0.05,
) -> np.ndarray:
    """uint8 [n, SIZE, SIZE]: one blob per (x, y) centre (normalised), jittered, of varying width, with noise."""
    points = np.asarray(centres, dtype=np.float64) + rng.normal(0.0, jitter, size=(len(centres), 2))
    widths = sigma * rng.uniform(0.8, 1.2, size=len(centres))
    coords = (np.arange(SIZE) + 0.5) / SIZE
    dx = coords[None, None, :] - points[:, 0, None, None]
    dy = coords[None, :, None] - points[:, 1, None, None]
    maps = np.exp(-(dx**2 + dy**2) / (2.0 * widths[:, None, None] ** 2))
    maps = np.clip(maps + rng.normal(0.0, noise, maps.shape), 0.0, None)
    maps -= maps.min(axis=(1, 2), keepdims=True)
    maps /= maps.max(axis=(1, 2), keepdims=True)
    return np.round(maps * 255).astype(np.uint8)


def _two_groups(n: int = 200, corner_share: float = 0.3, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Maps of class 0 only: centre blobs and corner blobs, shuffled so that member indices must be mapped back.

    The corner images are all truly of class 1 (the model explains class 0 on images of the other class: the
    Clever-Hans pattern), the centre images truly of class 0.

    Returns:
        maps uint8 [n, SIZE, SIZE], targets int [n] (all 0), labels int [n], is_corner bool [n].
    """
    rng = np.random.default_rng(seed)
    n_corner = round(n * corner_share)
    is_corner = np.zeros(n, dtype=bool)
    is_corner[:n_corner] = True
    rng.shuffle(is_corner)
    maps = _blobs([CORNER if corner else CENTRE for corner in is_corner], rng)
    return maps, np.zeros(n, dtype=np.int64), is_corner.astype(np.int64), is_corner


def _centre_mask() -> np.ndarray:
    """bool [SIZE, SIZE]: the expected content (like the lungs), the central half of the image in each direction."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = True
    return mask


def test_eigengap_picks_the_largest_gap() -> None:
    assert eigengap(np.array([0.0, 0.0, 0.9, 1.0, 1.05, 1.1]), max_clusters=4) == 2
    assert eigengap(np.array([0.0, 0.8, 0.9, 1.0]), max_clusters=3) == 1
    assert eigengap(np.array([0.0, 0.01, 0.02, 0.7, 0.8]), max_clusters=4) == 3
    # Only the first max_clusters + 1 eigenvalues count: the jump after the 3rd is out of reach of max_clusters=2.
    assert eigengap(np.array([0.0, 0.1, 0.15, 0.9]), max_clusters=2) == 1
    assert eigengap(np.array([0.0]), max_clusters=8) == 1


def test_eigengap_min_ratio_ignores_the_smooth_spectrum_of_a_continuum() -> None:
    # A path graph's spectrum grows like (k − 1)²: its largest absolute gap is deep in the spectrum, not a cluster.
    path = 0.03 * np.arange(9, dtype=np.float64) ** 2
    assert eigengap(path, max_clusters=8) == 8
    assert eigengap(path, max_clusters=8, min_ratio=5.0) == 1
    # Two nearly disconnected groups: λ_2 ≈ 0 and λ_3 many times larger, a clear gap.
    assert eigengap(np.array([0.0, 0.004, 0.3, 0.5, 0.9]), max_clusters=4, min_ratio=5.0) == 2


def test_concentration_of_uniform_and_point_maps() -> None:
    assert _concentration(np.ones((SIZE, SIZE))) == pytest.approx(0.05)
    point = np.zeros((SIZE, SIZE))
    point[3, 7] = 2.0
    assert _concentration(point) == pytest.approx(1.0)


def test_two_groups_are_found_and_the_corner_cluster_is_suspicious() -> None:
    maps, targets, labels, is_corner = _two_groups()
    clusters = discover(maps, targets, labels, CLASSES, grid=GRID)
    assert [c.cls for c in clusters] == ["normal", "normal"]
    centre, corner = clusters
    assert (centre.index, corner.index) == (0, 1)
    # The partition is the constructed one, in indices of the (shuffled) inputs.
    np.testing.assert_array_equal(corner.members, np.flatnonzero(is_corner))
    np.testing.assert_array_equal(centre.members, np.flatnonzero(~is_corner))
    assert (centre.size, corner.size) == (140, 60)
    assert corner.share == pytest.approx(0.3)
    cell = 1.0 / GRID
    assert abs(corner.peak[0] - CORNER[0]) <= 1.5 * cell and abs(corner.peak[1] - CORNER[1]) <= 1.5 * cell
    assert abs(centre.peak[0] - CENTRE[0]) <= 1.5 * cell and abs(centre.peak[1] - CENTRE[1]) <= 1.5 * cell
    # Purity: every corner image is truly of the other class; every centre image of the explained class.
    assert corner.purity == 0.0 and centre.purity == 1.0
    assert corner.concentration >= 0.25 and centre.concentration >= 0.25
    assert corner.distinct >= 0.3 > 0.15 >= centre.distinct
    assert math.isnan(corner.outside_expected) and math.isnan(centre.outside_expected)
    assert corner.suspicious and not centre.suspicious
    assert "suspicious" in corner.reason and "(0.80, 0.20)" in corner.reason
    assert "not suspicious" in centre.reason
    for cluster in clusters:
        assert cluster.mean_map.dtype == np.float32 and cluster.mean_map.shape == (SIZE, SIZE)
        assert cluster.mean_map.max() == pytest.approx(1.0)
        assert 1 <= len(cluster.examples) <= 6 and set(cluster.examples) <= set(cluster.members.tolist())


@pytest.mark.parametrize("per_image", [False, True], ids=["one-mask", "mask-per-image"])
def test_expected_mask_separates_attention_inside_from_outside(per_image: bool) -> None:
    maps, targets, labels, _ = _two_groups()
    mask = _centre_mask()
    expected = np.broadcast_to(mask, maps.shape).copy() if per_image else mask
    centre, corner = discover(maps, targets, labels, CLASSES, expected=expected)
    assert corner.outside_expected >= 0.8
    assert centre.outside_expected <= 0.35
    assert corner.suspicious and not centre.suspicious
    assert "outside the expected region" in corner.reason


def test_expected_mask_decides_even_for_a_whole_class() -> None:
    """A class whose every map looks at the corner is one cluster: only the expected mask can call it suspicious."""
    rng = np.random.default_rng(3)
    maps = _blobs([CORNER] * 80, rng)
    targets = labels = np.zeros(80, dtype=np.int64)
    (alone,) = discover(maps, targets, labels, CLASSES)
    assert alone.distinct == pytest.approx(0.0, abs=1e-6) and not alone.suspicious
    (masked,) = discover(maps, targets, labels, CLASSES, expected=_centre_mask())
    assert masked.outside_expected >= 0.8 and masked.suspicious


def test_homogeneous_class_is_one_cluster_and_not_suspicious() -> None:
    rng = np.random.default_rng(1)
    maps = _blobs([CENTRE] * 300, rng, jitter=0.05)
    targets = labels = np.zeros(300, dtype=np.int64)
    for expected in (None, _centre_mask()):
        clusters = discover(maps, targets, labels, CLASSES, expected=expected)
        assert len(clusters) == 1
        (cluster,) = clusters
        assert cluster.size == 300 and cluster.share == 1.0 and not cluster.suspicious


def test_plain_eigengap_splits_the_continuum() -> None:
    """Why gap_ratio exists: with the plain eigengap the same homogeneous class falls into several clusters."""
    rng = np.random.default_rng(1)
    maps = _blobs([CENTRE] * 300, rng, jitter=0.05)
    targets = labels = np.zeros(300, dtype=np.int64)
    assert len(discover(maps, targets, labels, CLASSES, gap_ratio=1.0, min_cluster=1)) > 1


def test_deterministic_for_a_seed() -> None:
    maps, targets, labels, _ = _two_groups(n=240, seed=4)
    first = discover(maps, targets, labels, CLASSES, max_images=150, seed=7)
    second = discover(maps, targets, labels, CLASSES, max_images=150, seed=7)
    assert cluster_rows(first) == cluster_rows(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.members, b.members)
        np.testing.assert_array_equal(a.mean_map, b.mean_map)
    # Another seed draws another sample of 150 out of 240.
    other = discover(maps, targets, labels, CLASSES, max_images=150, seed=8)
    assert {int(i) for c in other for i in c.members} != {int(i) for c in first for i in c.members}


def test_max_images_caps_the_sample_and_members_come_from_it() -> None:
    maps, _, labels, _ = _two_groups(n=300, seed=5)
    # Class 1 gets every third map, so members must be mapped back to input indices of class 1 only.
    targets = (np.arange(300) % 3 == 0).astype(np.int64)
    clusters = discover(maps, targets, labels, CLASSES, max_images=100, min_cluster=1)
    for cls, class_index in (("normal", 0), ("opacity", 1)):
        mine = [c for c in clusters if c.cls == cls]
        members = np.concatenate([c.members for c in mine])
        n_class = int((targets == class_index).sum())
        assert members.size == min(100, n_class) == len(set(members.tolist()))
        assert np.all(targets[members] == class_index)
        assert sum(c.share for c in mine) == pytest.approx(1.0)
        assert all(c.share == pytest.approx(c.size / min(100, n_class)) for c in mine)


def test_small_classes_are_skipped_and_small_clusters_dropped() -> None:
    maps, targets, labels, _ = _two_groups()
    targets = targets.copy()
    targets[:9] = 1  # class 1 has 9 maps: fewer than 2 × min_cluster = 10
    assert {c.cls for c in discover(maps, targets, labels, CLASSES, min_cluster=5)} == {"normal"}
    targets[9] = 1  # exactly 10: clustered
    assert {c.cls for c in discover(maps, targets, labels, CLASSES, min_cluster=5)} == {"normal", "opacity"}
    # The corner cluster (60 maps) is below min_cluster=61 and is not reported; the centre one (140) is.
    maps, targets, labels, is_corner = _two_groups()
    (centre,) = discover(maps, targets, labels, CLASSES, min_cluster=61)
    assert centre.size == 140 and not is_corner[centre.members].any()


def test_cluster_rows_are_flat() -> None:
    maps, targets, labels, _ = _two_groups()
    clusters = discover(maps, targets, labels, CLASSES, expected=_centre_mask(), examples=3)
    rows = cluster_rows(clusters)
    assert [r["index"] for r in rows] == [0, 1]
    assert set(rows[0]) == {
        "cls",
        "index",
        "size",
        "share",
        "purity",
        "peak_x",
        "peak_y",
        "concentration",
        "outside_expected",
        "distinct",
        "suspicious",
        "reason",
        "examples",
    }
    corner = rows[1]
    assert corner["suspicious"] is True and corner["peak_x"] == clusters[1].peak[0]
    assert len(corner["examples"]) == 3 and all(type(i) is int for i in corner["examples"])
    assert all(not isinstance(v, np.ndarray) for r in rows for v in r.values())
    assert isinstance(clusters[1], Cluster)


def test_bad_inputs_raise_errors_that_say_what_was_expected() -> None:
    maps, targets, labels, _ = _two_groups(n=40)
    with pytest.raises(ShapeError, match="maps"):
        discover(maps[0], targets, labels, CLASSES)
    with pytest.raises(ShapeError, match="targets"):
        discover(maps, targets[:-1], labels, CLASSES)
    with pytest.raises(ShapeError, match="targets"):
        discover(maps, targets + 2, labels, CLASSES)
    with pytest.raises(ShapeError, match="expected"):
        discover(maps, targets, labels, CLASSES, expected=np.ones((16, 16), dtype=bool))
    with pytest.raises(ConfigError, match="max_clusters"):
        discover(maps, targets, labels, CLASSES, max_clusters=0)
    with pytest.raises(ConfigError, match="gap_ratio"):
        discover(maps, targets, labels, CLASSES, gap_ratio=0.5)
