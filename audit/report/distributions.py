"""The report's distribution figures, as inline SVG: attention against area, dependence against a control, and
where the regions lie in each class.

Three figures, each a pure function from numbers to a complete ``<svg>`` string (``width``/``height`` attributes
and a ``viewBox``; a ``<title>`` and an ``aria-label``; no script, no ``href``, no ``id``, so several can sit in
one page and under its Content-Security-Policy), plus the DuckDB queries that feed them:

* :func:`attention_svg` (data from :func:`distribution_data`): per region kind and class, the distribution over the
  images that carry the region of ``mass_fraction`` against ``area_fraction``, as a pair of horizontal box plots;
* :func:`dependence_svg` (data: the ``findings`` rows): per class and region kind, how often removing the region
  flips the prediction against removing an equal-area control, the paired difference with its 95% interval, and
  the probability drops with theirs;
* :func:`coverage_svg` (data from :func:`region_coverage` or :func:`region_coverage_from_catalog`): per class, the
  share of its images whose pixel lies inside a region, as a small heatmap.

Readable in print and for colour-blind readers: the two series of a pair use Okabe-Ito blue ``#0072B2`` (the
region's share of saliency; removing the region) and orange ``#E69F00`` (the region's share of the image; removing
the control), and colour is never the only cue: the blue series is drawn with solid lines and round markers, the
orange one with dashed lines and square or diamond markers, and every row says in words which is which. The
heatmaps use ten steps of viridis, reversed, so that luminance grows with the share (white = no image), which stays
readable in grey print. Every label and region kind comes from users' data: it is escaped (``html.escape``), its
characters that XML forbids are replaced, and it is shortened for the layout (in full in the row's tooltip).

Queries aggregate inside DuckDB (quantiles, counts, a bounded sample per class), so their cost in Python does not
grow with the number of images. Everything is deterministic: the same numbers give the same bytes.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import duckdb
import numpy as np

from audit.errors import ShapeError
from audit.report.content import as_number

QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
REGION_COLOUR = "#0072B2"  # Okabe-Ito blue: mass fraction; removing the region
CONTROL_COLOUR = "#E69F00"  # Okabe-Ito orange: area fraction; removing the equal-area control
INK = "#222222"
MUTED = "#666666"
GRID_COLOUR = "#DDDDDD"
FONT = "system-ui, Helvetica, Arial, sans-serif"
# Viridis in ten steps, reversed: light yellow for a few images, dark purple for all of them (luminance monotone).
COVERAGE_COLOURS: tuple[str, ...] = (
    "#FDE725",
    "#B4DE2C",
    "#6DCD59",
    "#35B779",
    "#1F9E89",
    "#26828E",
    "#31688E",
    "#3E4A89",
    "#482878",
    "#440154",
)
# Upper edges of the coverage map's steps (share of the class's images): finer near 0, where spread-out regions
# (text anywhere in the image) sit, so that they do not all fall into one step; 0 itself is white.
COVERAGE_EDGES: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
LABEL_CHARS = 26  # longest label drawn in full; longer ones end in "…" (in full in the tooltip)
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


# ---------------------------------------------------------------------------------------------------------------
# Data access (DuckDB catalog)


def distribution_data(
    con: duckdb.DuckDBPyConnection, method: str, kinds: Sequence[str], labels: Sequence[str]
) -> list[dict[str, Any]]:
    """Per region kind and class, the quantiles of mass and area fraction over the images that carry the region.

    Aggregated in DuckDB (``quantile_cont``, the linear interpolation numpy's ``quantile`` uses by default) over
    the ``attributions`` rows of ``method`` that are ``present`` with a finite mass and area fraction, joined with
    ``images`` for the label; only ``len(kinds) * len(labels)`` rows come back to Python.

    Args:
        con: a connection to the catalog (``OUT/audit.duckdb``; read-only is enough).
        method: the saliency method whose attributions are summarised.
        kinds: region kinds, in the order of the figure.
        labels: classes, in the order of the figure.

    Returns:
        One dict per (kind, label), kinds outer, in the given orders, with keys ``region_kind``, ``label``, ``n``
        (images of the class that carry the region), ``mass_fraction`` and ``area_fraction`` (tuples of the 5th,
        25th, 50th, 75th and 95th percentiles, see :data:`QUANTILES`; ``None`` when ``n`` is 0) and
        ``mean_mass_fraction`` and ``mean_area_fraction`` (their means, whose ratio is the finding's enrichment;
        ``None`` when ``n`` is 0).
    """
    kinds, labels = list(dict.fromkeys(kinds)), list(dict.fromkeys(labels))
    if not kinds or not labels:
        return []
    probabilities = "[" + ", ".join(repr(q) for q in QUANTILES) + "]"
    rows = con.execute(
        f"""SELECT a.region_kind, i.label, count(*) AS n,
                   quantile_cont(a.mass_fraction::DOUBLE, {probabilities}) AS mass,
                   quantile_cont(a.area_fraction::DOUBLE, {probabilities}) AS area,
                   avg(a.mass_fraction::DOUBLE) AS mean_mass, avg(a.area_fraction::DOUBLE) AS mean_area
            FROM attributions a JOIN images i USING (image_id)
            WHERE a.method = ? AND a.present AND list_contains(?, a.region_kind) AND list_contains(?, i.label)
              AND isfinite(a.mass_fraction) AND isfinite(a.area_fraction)
            GROUP BY a.region_kind, i.label""",
        [method, kinds, labels],
    ).fetchall()
    found = {
        (kind, label): (n, mass, area, mean_mass, mean_area)
        for kind, label, n, mass, area, mean_mass, mean_area in rows
    }
    result: list[dict[str, Any]] = []
    for kind in kinds:
        for label in labels:
            n, mass, area, mean_mass, mean_area = found.get((kind, label), (0, None, None, None, None))
            result.append(
                {
                    "region_kind": kind,
                    "label": label,
                    "n": int(n),
                    "mass_fraction": tuple(float(v) for v in mass) if n else None,
                    "area_fraction": tuple(float(v) for v in area) if n else None,
                    "mean_mass_fraction": float(mean_mass) if n else None,
                    "mean_area_fraction": float(mean_area) if n else None,
                }
            )
    return result


def region_coverage_from_catalog(
    con: duckdb.DuckDBPyConnection,
    kinds: Sequence[str],
    labels: Sequence[str],
    grid: int = 64,
    max_images_per_class: int = 5000,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """:func:`region_coverage` of the regions of ``kinds`` over a bounded, deterministic sample of each class.

    Per class, the first ``max_images_per_class`` images (with a positive width and height) in the order of
    DuckDB's ``hash(image_id)`` (ties by ``image_id``), chosen with a window function inside DuckDB; then their
    boxes of the given kinds (``regions`` joined on ``image_id``). At most ``len(labels) * max_images_per_class``
    images and their boxes reach Python, whatever the size of the dataset. The sample is the same on every run of
    the same DuckDB version (its hash function is not promised to stay the same across versions).

    Args:
        con: a connection to the catalog (``OUT/audit.duckdb``; read-only is enough).
        kinds: the region kinds whose union is mapped.
        labels: the classes; a class without images maps to zeros.
        grid: the side of each map.
        max_images_per_class: the sample's size per class.

    Returns:
        (class → float64 [grid, grid] share of the sampled images covered at each point, see
        :func:`region_coverage`; class → number of images sampled), both keyed in the order of ``labels``.
    """
    labels = list(dict.fromkeys(labels))
    kinds = list(dict.fromkeys(kinds))
    if not labels:
        return {}, {}
    sample = """
        WITH sample AS (
            SELECT image_id, width, height, label,
                   row_number() OVER (ORDER BY label, hash(image_id), image_id) - 1 AS row_index
            FROM (
                SELECT image_id, width, height, label FROM images
                WHERE list_contains(?, label) AND width > 0 AND height > 0
                QUALIFY row_number() OVER (PARTITION BY label ORDER BY hash(image_id), image_id) <= ?
            )
        )"""
    limit = max(0, int(max_images_per_class))
    images = con.execute(
        sample + " SELECT width, height, label FROM sample ORDER BY row_index", [labels, limit]
    ).fetchnumpy()
    columns = ("row_index", "x0", "y0", "x1", "y1")
    boxes = {name: np.zeros(0, np.int64) for name in columns}
    if kinds:
        boxes = con.execute(
            sample
            + """ SELECT s.row_index, r.x0, r.y0, r.x1, r.y1
              FROM regions r JOIN sample s USING (image_id)
              WHERE list_contains(?, r.kind)
                AND r.x0 IS NOT NULL AND r.y0 IS NOT NULL AND r.x1 IS NOT NULL AND r.y1 IS NOT NULL""",
            [labels, limit, kinds],
        ).fetchnumpy()
    coverage = region_coverage(
        np.stack([boxes[k].astype(np.float64) for k in ("x0", "y0", "x1", "y1")], axis=1).reshape(-1, 4),
        boxes["row_index"].astype(np.int64),
        images["width"],
        images["height"],
        images["label"],
        grid=grid,
        classes=labels,
    )
    counted = dict(zip(*np.unique(images["label"].astype(str), return_counts=True), strict=True))
    return coverage, {label: int(counted.get(label, 0)) for label in labels}


# ---------------------------------------------------------------------------------------------------------------
# Region coverage


def region_coverage(
    boxes: np.ndarray,
    image_ids: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    grid: int = 64,
    classes: Sequence[str] | None = None,
    *,
    chunk: int = 256,
) -> dict[str, np.ndarray]:
    """Per class, the share of its images that have a region at each point of the image.

    The image is mapped to the unit square (coordinates in image fractions, whatever its aspect ratio) and
    sampled at the centres of a ``grid × grid`` lattice: the cell (i, j) of an image is covered when its centre
    ((j + 0.5) / grid, (i + 0.5) / grid) lies inside one of the image's boxes (x0 / width <= x < x1 / width,
    likewise for y; x1/y1 exclusive, as everywhere in the audit). A box smaller than a cell can cover no centre.

    Overlapping boxes of one image count once: each image's union is exact. It is computed without a Python loop
    per box: for a chunk of images at a time, a difference array per image ([chunk, grid + 1, grid + 1], filled for
    all boxes of the chunk by one ``np.bincount`` of their corners), two cumulative sums give how many of the
    image's boxes cover each cell, and "> 0" turns that into the union, which is then added to its class. (One
    difference array per class would count an image twice where two of its boxes overlap.) Memory is bounded by
    the chunk, not the dataset: ~120 KB per image of the chunk at grid 64, 30 MB at the default chunk. Images
    without a box cost nothing but count in their class's denominator.

    Args:
        boxes: [B, 4] (x0, y0, x1, y1) in pixels of their image, x1/y1 exclusive; may extend past the image.
        image_ids: int [B], the row of each box's image in ``widths``, ``heights`` and ``labels``.
        widths, heights: [N] each image's size in pixels; an image with a size <= 0 counts as uncovered.
        labels: [N] each image's class (compared as ``str``; None belongs to no class).
        grid: the side of the lattice (>= 1).
        classes: the classes to return, in this order; a class with no image maps to zeros. Default: the sorted
            distinct labels. Images of other classes are ignored.
        chunk: images rasterised at a time.

    Returns:
        class → float64 [grid, grid] in [0, 1], row 0 at the top of the image.

    Raises:
        ShapeError: the arrays' shapes do not match, or an ``image_ids`` entry is not a row of the image arrays.
    """
    grid = int(grid)
    if grid < 1:
        raise ShapeError("grid", ">= 1", grid)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ShapeError("boxes", "[B, 4]", tuple(boxes.shape))
    owner = np.asarray(image_ids).reshape(-1) if np.size(image_ids) else np.zeros(0, np.int64)
    if owner.shape != (len(boxes),) or (owner.size and not np.issubdtype(owner.dtype, np.integer)):
        raise ShapeError("image_ids", f"int [{len(boxes)}]", (str(owner.dtype), tuple(owner.shape)))
    widths = np.asarray(widths, dtype=np.float64).reshape(-1)
    heights = np.asarray(heights, dtype=np.float64).reshape(-1)
    label_list = [None if v is None else str(v) for v in np.asarray(labels, dtype=object).reshape(-1)]
    n_images = len(label_list)
    if widths.shape != (n_images,) or heights.shape != (n_images,):
        raise ShapeError("widths, heights", f"[{n_images}] each", (tuple(widths.shape), tuple(heights.shape)))
    if owner.size and (owner.min() < 0 or owner.max() >= n_images):
        raise ShapeError("image_ids", f"rows in [0, {n_images})", (int(owner.min()), int(owner.max())))
    if classes is None:
        classes = sorted({label for label in label_list if label is not None})
    classes = list(dict.fromkeys(str(name) for name in classes))
    lookup = {name: index for index, name in enumerate(classes)}
    class_of = np.array([lookup.get(label, -1) for label in label_list], dtype=np.int64)  # [N], -1 = not shown
    counts = np.bincount(class_of[class_of >= 0], minlength=len(classes))  # [C]
    sums = np.zeros((len(classes), grid, grid), dtype=np.int64)  # covered images

    # Cell bounds of every box: cells j with x0/W <= (j + 0.5)/grid < x1/W, i.e. ceil((2·x0·grid − W) / 2W) <= j <
    # ceil((2·x1·grid − W) / 2W); exact for integer boxes (the division is correctly rounded).
    owner = owner.astype(np.int64)
    width_of, height_of = widths[owner], heights[owner]
    sized = (width_of > 0) & (height_of > 0) & (class_of[owner] >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_start, x_end = (np.ceil((2 * boxes[:, k] * grid - width_of) / (2 * width_of)) for k in (0, 2))
        y_start, y_end = (np.ceil((2 * boxes[:, k] * grid - height_of) / (2 * height_of)) for k in (1, 3))
    bounds = [np.clip(np.nan_to_num(v), 0, grid).astype(np.int64) for v in (x_start, x_end, y_start, y_end)]
    x_start, x_end, y_start, y_end = bounds
    keep = sized & (x_end > x_start) & (y_end > y_start) & np.isfinite(boxes).all(axis=1)
    owner, x_start, x_end, y_start, y_end = (v[keep] for v in (owner, x_start, x_end, y_start, y_end))

    covered_images, local = np.unique(owner, return_inverse=True)  # [M] images with a box, [B'] their position
    order = np.argsort(local, kind="stable")
    local, x_start, x_end, y_start, y_end = (v[order] for v in (local, x_start, x_end, y_start, y_end))
    step = max(1, int(chunk))
    for first in range(0, len(covered_images), step):
        last = min(first + step, len(covered_images))
        a, b = np.searchsorted(local, [first, last])
        row = local[a:b] - first
        # Difference array of each image: +1 at (y0, x0) and (y1, x1), -1 at (y0, x1) and (y1, x0), all boxes of
        # the chunk at once (flat indices into [m, grid + 1, grid + 1]).
        side = grid + 1
        base = row * side * side
        size = (last - first) * side * side
        plus = np.concatenate([base + y_start[a:b] * side + x_start[a:b], base + y_end[a:b] * side + x_end[a:b]])
        minus = np.concatenate([base + y_start[a:b] * side + x_end[a:b], base + y_end[a:b] * side + x_start[a:b]])
        difference = np.bincount(plus, minlength=size) - np.bincount(minus, minlength=size)
        difference = difference.astype(np.int32).reshape(last - first, side, side)
        np.cumsum(difference, axis=2, out=difference)
        np.cumsum(difference, axis=1, out=difference)
        union = (difference[:, :grid, :grid] > 0).reshape(last - first, grid * grid)  # [m, grid²]
        chunk_classes = class_of[covered_images[first:last]]
        for index in np.unique(chunk_classes):  # a loop over classes, not boxes
            sums[index] += union[chunk_classes == index].sum(axis=0).reshape(grid, grid)
    return {
        name: sums[index] / counts[index] if counts[index] else np.zeros((grid, grid), dtype=np.float64)
        for index, name in enumerate(classes)
    }


# ---------------------------------------------------------------------------------------------------------------
# Figures


def attention_svg(
    data: Sequence[Mapping[str, Any]],
    *,
    scale: Literal["log", "linear"] = "log",
    title: str = "Attention against area: mass and area fraction per region kind and class",
    width: int = 720,
) -> str:
    """Grouped horizontal box plots of mass fraction against area fraction, one group per region kind.

    Per (kind, class) with data, two boxes one above the other, labelled in words: ``mass`` (blue, solid, round
    median marker) and ``area`` (orange, dashed, diamond median marker); box = quartiles, thick line = median,
    whiskers = 5th to 95th percentile; ``n`` on the right; the numbers in each pair's tooltip. A pair without
    data says so in words. Each pair is a ``<g class="pair">``.

    The x axis is logarithmic by default, from the decade below the smallest positive value (at least 1e-4, at
    most 0.1) to 1: regions are often small (a text box covers 1–3% of the image, a border band 20%), so on a
    linear 0–1 axis every area box would be squeezed against 0; on a log axis each is as readable, and the gap
    between the two medians is their ratio (one decade: ten times more attention than the area explains), the kind
    of number the verdict reads (the finding's enrichment, the ratio of the means, is in each pair's tooltip).
    Values below the axis' start (a mass fraction of 0) are drawn at its start, which
    is labelled "≤". ``scale="linear"`` draws 0–1 instead.

    Args:
        data: rows of :func:`distribution_data`; groups in order of first appearance of their kind.
        scale: ``"log"`` or ``"linear"``.
        title: the SVG's ``<title>`` and ``aria-label``.
        width: width in pixels; the height follows from the rows.

    Returns:
        A complete ``<svg>`` element.
    """
    if scale not in ("log", "linear"):
        raise ValueError(f"scale: expected 'log' or 'linear', found {scale!r}")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in data:
        groups.setdefault(str(row.get("region_kind")), []).append(row)
    if not groups:
        return _empty_svg(title, "No region of the audited kinds was found in any image.", width)

    plot_left, plot_right = 190.0, float(width) - 64.0
    values = [
        v
        for row in data
        if _quantiles(row, "mass_fraction") and _quantiles(row, "area_fraction")
        for key in ("mass_fraction", "area_fraction")
        for v in _quantiles(row, key) or ()
    ]
    if scale == "log":
        positive = [v for v in values if v > 0]
        start = min(-1, max(-4, math.floor(math.log10(min(positive))))) if positive else -3
        ticks = [10.0**e for e in range(start, 1)]

        def x_of(value: float) -> float:
            exponent = math.log10(min(1.0, max(value, 10.0**start)))
            return plot_left + (exponent - start) / (0 - start) * (plot_right - plot_left)

        tick_labels = [("≤" if i == 0 else "") + _decimal(t) for i, t in enumerate(ticks)]
    else:
        ticks = [0.0, 0.25, 0.5, 0.75, 1.0]

        def x_of(value: float) -> float:
            return plot_left + min(1.0, max(0.0, value)) * (plot_right - plot_left)

        tick_labels = [_decimal(t) for t in ticks]

    body: list[str] = []
    # Legend: two glyphs in words, then how to read a box.
    body += _box_glyph((0.2, 0.35, 0.5, 0.65, 0.8), 14.0, lambda v: 8 + v * 60, REGION_COLOUR, dashed=False)
    body.append(_text(84, 18, "mass: share of the saliency inside the region"))
    body += _box_glyph((0.2, 0.35, 0.5, 0.65, 0.8), 32.0, lambda v: 8 + v * 60, CONTROL_COLOUR, dashed=True)
    body.append(_text(84, 36, "area: share of the image the region covers"))
    axis = "log scale: the gap between the medians is their ratio" if scale == "log" else "linear scale"
    body.append(_text(8, 54, f"box: quartiles · thick line: median · whiskers: 5th–95th percentile · {axis}", MUTED))
    y = 64.0
    body += _axis_labels(ticks, tick_labels, x_of, y + 10)
    y += 18
    for kind, rows in groups.items():
        top = y
        y += 20
        rows_svg: list[str] = []
        for row in rows:
            label = str(row.get("label"))
            mass, area = _quantiles(row, "mass_fraction"), _quantiles(row, "area_fraction")
            n = _count(row.get("n"))
            if not mass or not area or not n:
                rows_svg.append(_text(8, y + 13, label, limit=LABEL_CHARS))
                rows_svg.append(_text(plot_left, y + 13, "no image of this class carries the region", MUTED))
                y += 20
                continue
            tooltip = (
                f"{label} · {kind}: mass fraction {_summary(mass, row.get('mean_mass_fraction'))}; "
                f"area fraction {_summary(area, row.get('mean_area_fraction'))}; n = {n:,} images"
            )
            mean_mass, mean_area = as_number(row.get("mean_mass_fraction")), as_number(row.get("mean_area_fraction"))
            if mean_mass is not None and mean_area:
                tooltip += f"; enrichment (ratio of the means) {mean_mass / mean_area:.2f}"
            pair = [
                f'<g class="pair" data-kind="{_esc(kind)}" data-label="{_esc(label)}">',
                f"<title>{_esc(tooltip)}</title>",
            ]
            pair.append(_text(8, y + 18, label, limit=LABEL_CHARS))
            pair.append(_text(plot_left - 8, y + 11, "mass", MUTED, anchor="end"))
            pair += _box_glyph(mass, y + 7, x_of, REGION_COLOUR, dashed=False)
            pair.append(_text(plot_left - 8, y + 27, "area", MUTED, anchor="end"))
            pair += _box_glyph(area, y + 23, x_of, CONTROL_COLOUR, dashed=True)
            pair.append(_text(width - 8, y + 18, f"n = {n:,}", anchor="end"))
            pair.append("</g>")
            rows_svg += pair
            y += 38
        body += [_line(x_of(t), top + 20, x_of(t), y, GRID_COLOUR) for t in ticks]
        body.append(_text(8, top + 14, f"region kind: {kind}", weight="bold", limit=60))
        body += rows_svg
        y += 8
    body += _axis_labels(ticks, tick_labels, x_of, y + 6)
    return _svg(width, round(y + 16), title, body)


def dependence_svg(
    findings: Sequence[Mapping[str, Any]],
    *,
    bar: float | None = 0.10,
    title: str = "Dependence: removing the region against removing an equal-area control",
    width: int = 740,
) -> str:
    """Dot-and-interval rows of the counterfactual test, one per (class, region kind).

    Uses the rows with ``group`` None (all images) of one method, the first met (the counterfactual numbers are the
    same for every method), in their given order; a (class, kind) met again is skipped, and so is a row whose
    ``flip_rate`` or ``flip_rate_control`` is None or NaN (the test did not run). Panels, left to right:

    * flip rate: removing the region (blue filled circle) and removing the control (orange hollow square), joined;
      the findings hold no interval of each rate alone, so none is drawn;
    * flip difference (region − control, paired) with its bootstrap 95% interval (black diamond, filled when the
      interval's lower bound is above ``bar``, the dependence bar, drawn dashed);
    * probability drop, when any row has one: ``effect`` (blue circle, solid interval) above ``effect_control``
      (orange square, dashed interval), each with its 95% interval when given.

    Args:
        findings: rows of the ``findings`` table (keys ``label``, ``region_kind``, ``method``, ``group``,
            ``flip_rate``, ``flip_rate_control``, ``flip_difference_ci_low``/``_high``, ``effect``,
            ``effect_ci_low``/``_high``, ``effect_control``, ``effect_control_ci_low``/``_high``,
            ``n_counterfactual``; missing keys count as None).
        bar: the ``dependence_bar`` of the configuration, drawn on the difference panel; None draws none.
        title: the SVG's ``<title>`` and ``aria-label``.
        width: width in pixels; the height follows from the rows.

    Returns:
        A complete ``<svg>`` element; each drawn row is a ``<g class="dependence">``.
    """
    rows: list[Mapping[str, Any]] = []
    method: object = None
    seen: set[tuple[str, str]] = set()
    for row in findings:
        if row.get("group") is not None:
            continue
        if method is None:
            method = row.get("method")
        key = (str(row.get("label")), str(row.get("region_kind")))
        if row.get("method") != method or key in seen:
            continue
        if as_number(row.get("flip_rate")) is None or as_number(row.get("flip_rate_control")) is None:
            continue
        seen.add(key)
        rows.append(row)
    if not rows:
        return _empty_svg(title, "The counterfactual test did not run for any class and region kind.", width)

    effect_keys = ("effect", "effect_ci_low", "effect_ci_high", "effect_control")
    effect_keys += ("effect_control_ci_low", "effect_control_ci_high")
    has_effect = any(as_number(row.get(k)) is not None for row in rows for k in ("effect", "effect_control"))
    difference_values = [0.0] + [
        v
        for row in rows
        for v in (
            as_number(row.get("flip_difference_ci_low")),
            as_number(row.get("flip_difference_ci_high")),
            _difference(row),
        )
        if v is not None
    ]
    if bar is not None and math.isfinite(bar):
        difference_values.append(float(bar))
    effect_values = [0.0] + [v for row in rows for k in effect_keys if (v := as_number(row.get(k))) is not None]

    label_width, n_width, gap = 170.0, 56.0, 36.0
    panels = 3 if has_effect else 2
    panel_width = (width - label_width - n_width - gap * (panels - 1)) / panels
    lefts = [label_width + i * (panel_width + gap) for i in range(panels)]
    flip_axis = _Axis(lefts[0], panel_width, 0.0, 1.0, [0.0, 0.25, 0.5, 0.75, 1.0], percent=True)
    difference_axis = _Axis.fitted(lefts[1], panel_width, difference_values)
    effect_axis = _Axis.fitted(lefts[2], panel_width, effect_values) if has_effect else None
    axes = [a for a in (flip_axis, difference_axis, effect_axis) if a is not None]

    body: list[str] = []
    headings = ["flip rate", "flip difference, 95% CI", "probability drop, 95% CI"]
    for axis, heading in zip(axes, headings, strict=False):
        body.append(_text(axis.left, 14, heading, weight="bold"))
    body.append(_circle(12, 30, REGION_COLOUR))
    body.append(_text(22, 34, "removing the region (solid)"))
    body.append(_square(200, 30, CONTROL_COLOUR, hollow=True))
    body.append(_text(210, 34, "removing an equal-area control (dashed)"))
    if bar is not None and math.isfinite(bar):
        body.append(_text(452, 34, f"◆ filled: interval above the bar {_decimal(bar)} (dashed)", MUTED))
    y = 44.0
    for axis in axes:
        body += _axis_labels(axis.ticks, axis.tick_labels, axis.x, y + 10)
    y += 16
    top = y
    rows_svg: list[str] = []
    for row in rows:
        label, kind = str(row.get("label")), str(row.get("region_kind"))
        flip, control = as_number(row.get("flip_rate")), as_number(row.get("flip_rate_control"))
        assert flip is not None and control is not None  # filtered above
        low, high = as_number(row.get("flip_difference_ci_low")), as_number(row.get("flip_difference_ci_high"))
        difference = _difference(row)
        n = _count(row.get("n_counterfactual"))
        centre = y + 11
        parts = [
            f"{label} · {kind}: removing the region flips {flip:.0%} of predictions vs {control:.0%} for the control"
        ]
        if low is not None and high is not None:
            parts.append(f"difference 95% CI {low:.2f}–{high:.2f}")
        effect, effect_control = as_number(row.get("effect")), as_number(row.get("effect_control"))
        if effect is not None or effect_control is not None:
            parts.append(
                f"probability drop {_estimate(row, 'effect')} vs {_estimate(row, 'effect_control')} for the control"
            )
        if n:
            parts.append(f"n = {n:,} images")
        group = [
            f'<g class="dependence" data-kind="{_esc(kind)}" data-label="{_esc(label)}">',
            f"<title>{_esc('; '.join(parts))}</title>",
            _text(8, centre + 4, f"{label} · {kind}", limit=LABEL_CHARS + 4),
        ]
        group.append(_line(flip_axis.x(flip), centre, flip_axis.x(control), centre, MUTED))
        group.append(_square(flip_axis.x(control), centre, CONTROL_COLOUR, hollow=True))
        group.append(_circle(flip_axis.x(flip), centre, REGION_COLOUR))
        if low is not None and high is not None:
            group.append(_line(difference_axis.x(low), centre, difference_axis.x(high), centre, INK, width=1.5))
        above = bar is not None and low is not None and low > bar
        group.append(_diamond(difference_axis.x(difference), centre, INK, hollow=not above))
        if effect_axis is not None:
            for key, offset, colour, dashed in (
                ("effect", -4, REGION_COLOUR, False),
                ("effect_control", 4, CONTROL_COLOUR, True),
            ):
                value = as_number(row.get(key))
                if value is None:
                    continue
                lo, hi = as_number(row.get(f"{key}_ci_low")), as_number(row.get(f"{key}_ci_high"))
                if lo is not None and hi is not None:
                    x0, x1 = effect_axis.x(lo), effect_axis.x(hi)
                    group.append(_line(x0, centre + offset, x1, centre + offset, colour, width=1.5, dashed=dashed))
                marker = _square if dashed else _circle
                group.append(marker(effect_axis.x(value), centre + offset, colour))
        if n:
            group.append(_text(width - 8, centre + 4, f"n = {n:,}", anchor="end"))
        group.append("</g>")
        rows_svg += group
        y += 22
    for axis in axes:
        body += [_line(axis.x(t), top, axis.x(t), y, GRID_COLOUR) for t in axis.ticks]
        if axis is not flip_axis and axis.low < 0 < axis.high:
            body.append(_line(axis.x(0.0), top, axis.x(0.0), y, MUTED))
    if bar is not None and math.isfinite(bar) and difference_axis.low <= bar <= difference_axis.high:
        body.append(_line(difference_axis.x(bar), top, difference_axis.x(bar), y, INK, dashed=True))
    body += rows_svg
    for axis in axes:
        body += _axis_labels(axis.ticks, axis.tick_labels, axis.x, y + 14)
    return _svg(width, round(y + 24), title, body)


def coverage_svg(
    coverage: Mapping[str, np.ndarray],
    n_images: Mapping[str, int] | None = None,
    *,
    kinds: Sequence[str] = (),
    title: str | None = None,
    panel: int = 128,
    columns: int = 5,
) -> str:
    """Small multiples of :func:`region_coverage`: per class, where in the image its regions lie.

    Each map is drawn in ten steps of reversed viridis (shares up to 1%, 2%, 5%, 10%, 20%, 30%, 50%, 70%, 90%,
    100% of the class's images, :data:`COVERAGE_EDGES`: finer near 0; white where no image has a region), as one
    ``<path>`` per step whose sub-paths are the runs of equal cells along each row, so a 64 × 64 map costs a few
    kilobytes instead of 4,096 rectangles. Images of any aspect ratio are drawn as the unit square, top at the top.

    Args:
        coverage: class → float [grid, grid] shares in [0, 1] (the grid may differ between classes).
        n_images: class → images the share is of, shown under the class name; optional.
        kinds: the region kinds mapped, named in the legend.
        title: the SVG's ``<title>`` and ``aria-label``; a default names the kinds.
        panel: side of each map in pixels.
        columns: maps per row.

    Returns:
        A complete ``<svg>`` element; each map is a ``<g class="coverage">``.
    """
    named = ", ".join(str(k) for k in kinds)
    if title is None:
        title = "Where the regions lie: share of each class's images with a region at each point" + (
            f" (kinds: {named})" if named else ""
        )
    if not coverage:
        return _empty_svg(title, "No class to map.", 360)
    columns = max(1, min(int(columns), len(coverage)))
    panel = max(16, int(panel))
    cell_width, cell_height = panel + 24, panel + 40
    width = max(16 + columns * cell_width, 480)
    rows = math.ceil(len(coverage) / columns)
    body: list[str] = []
    for index, (label, share) in enumerate(coverage.items()):
        share = np.asarray(share, dtype=np.float64)
        if share.ndim != 2 or share.shape[0] != share.shape[1] or share.size == 0:
            raise ShapeError(f"coverage[{label!r}]", "[grid, grid]", tuple(share.shape))
        share = np.clip(np.nan_to_num(share), 0.0, 1.0)
        left = 16 + (index % columns) * cell_width
        top = 8 + (index // columns) * cell_height
        count = _count((n_images or {}).get(label))
        caption = f"n = {count:,} images" if count is not None else ""
        tooltip = f"{label}: regions at up to {share.max():.0%} of the images at one point; mean {share.mean():.1%}"
        if count is not None:
            tooltip += f"; {caption}"
        body.append(f'<g class="coverage" data-label="{_esc(label)}"><title>{_esc(tooltip)}</title>')
        body.append(_text(left, top + 12, str(label), weight="bold", limit=max(8, panel // 7)))
        if caption:
            body.append(_text(left, top + 26, caption, MUTED))
        grid = share.shape[0]
        body.append(f'<rect x="{left}" y="{top + 32}" width="{panel}" height="{panel}" fill="#FFFFFF" stroke="none"/>')
        body.append(
            f'<g transform="translate({left} {top + 32}) scale({_number_text(panel / grid)})" '
            'shape-rendering="crispEdges">'
        )
        # 0 = no image; level k (1..10) = share in (COVERAGE_EDGES[k - 2], COVERAGE_EDGES[k - 1]].
        levels = np.where(share > 0, np.searchsorted(np.array(COVERAGE_EDGES), share - 1e-12) + 1, 0)
        for level, colour in enumerate(COVERAGE_COLOURS, start=1):
            path = _runs_path(levels == level)
            if path:
                body.append(f'<path fill="{colour}" d="{path}"/>')
        body.append("</g>")
        body.append(f'<rect x="{left}" y="{top + 32}" width="{panel}" height="{panel}" fill="none" stroke="{MUTED}"/>')
        body.append("</g>")
    y = 8 + rows * cell_height + 6
    body.append(f'<rect x="16" y="{y}" width="14" height="12" fill="#FFFFFF" stroke="{MUTED}"/>')
    body.append(_text(34, y + 10, "none"))
    swatch = 22
    for i, colour in enumerate(COVERAGE_COLOURS):
        body.append(f'<rect x="{72 + swatch * i}" y="{y}" width="{swatch}" height="12" fill="{colour}"/>')
    for i, edge in enumerate(COVERAGE_EDGES):
        if edge in (0.01, 0.1, 0.5, 1.0):
            body.append(_text(72 + swatch * (i + 1), y + 24, f"{edge:.0%}", MUTED, anchor="middle"))
    legend_end = 72 + swatch * len(COVERAGE_COLOURS)
    body.append(_text(legend_end + 12, y + 10, "share of the class's images", MUTED))
    if named:
        body.append(_text(16, y + 40, f"region kinds: {named}", MUTED, limit=(width - 32) // 6))
    return _svg(width, y + (48 if named else 32), title, body)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


class _Axis:
    """A horizontal value axis of a panel: ``x(value)`` in pixels, values clipped to [low, high]."""

    def __init__(
        self, left: float, width: float, low: float, high: float, ticks: list[float], *, percent: bool = False
    ) -> None:
        self.left, self.width, self.low, self.high, self.ticks = left, width, low, high, ticks
        # Every tick gets a grid line; labels only where they keep ~44 px apart, always at 0 and the halves.
        step = (ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
        spacing = width * step / (high - low) if high > low else width
        every = max(1, math.ceil(44.0 / max(spacing, 1e-9)))
        self.tick_labels = [
            (f"{t:.0%}" if percent else _decimal(t)) if round(t / step) % every == 0 else "" for t in ticks
        ]

    @classmethod
    def fitted(cls, left: float, width: float, values: Sequence[float]) -> _Axis:
        """An axis over [-1, 1] at most, in quarters, wide enough for ``values`` (and at least [0, 0.25])."""
        low = max(-1.0, min(0.0, math.floor(min(values) * 4) / 4))
        high = min(1.0, max(0.25, math.ceil(max(values) * 4) / 4))
        step = 0.25 if high - low <= 1.0 else 0.5
        first = math.ceil(low / step - 1e-9)
        ticks = [round(k * step, 2) for k in range(first, math.floor(high / step + 1e-9) + 1)]
        return cls(left, width, low, high, ticks)

    def x(self, value: float) -> float:
        value = min(self.high, max(self.low, value))
        return self.left + (value - self.low) / (self.high - self.low) * self.width


def _svg(width: float, height: float, title: str, body: Sequence[str]) -> str:
    label = _esc(title)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_number_text(width)}" height="{_number_text(height)}" '
        f'viewBox="0 0 {_number_text(width)} {_number_text(height)}" role="img" aria-label="{label}" '
        f'font-family="{FONT}" font-size="11" fill="{INK}"><title>{label}</title>' + "".join(body) + "</svg>"
    )


def _empty_svg(title: str, message: str, width: int) -> str:
    return _svg(width, 28, title, [_text(8, 18, message, MUTED)])


def _esc(value: object) -> str:
    """Text safe inside an SVG/HTML element or a double-quoted attribute."""
    return html.escape(_XML_FORBIDDEN.sub("\ufffd", str(value)), quote=True)


def _number_text(value: float) -> str:
    """A coordinate with at most one decimal, without "-0" or a trailing ".0"."""
    text = f"{round(float(value), 1) + 0.0:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _decimal(value: float) -> str:
    """A tick value: 0.001, 0.25, 1, -0.5."""
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != 0 else "0"


def _text(
    x: float,
    y: float,
    text: str,
    colour: str | None = None,
    *,
    anchor: str = "start",
    weight: str | None = None,
    limit: int | None = None,
) -> str:
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    attributes = f'x="{_number_text(x)}" y="{_number_text(y)}"'
    if anchor != "start":
        attributes += f' text-anchor="{anchor}"'
    if colour:
        attributes += f' fill="{colour}"'
    if weight:
        attributes += f' font-weight="{weight}"'
    return f"<text {attributes}>{_esc(text)}</text>"


def _line(x0: float, y0: float, x1: float, y1: float, colour: str, *, width: float = 1.0, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="4 2"' if dashed else ""
    return (
        f'<line x1="{_number_text(x0)}" y1="{_number_text(y0)}" x2="{_number_text(x1)}" y2="{_number_text(y1)}" '
        f'stroke="{colour}" stroke-width="{_number_text(width)}"{dash}/>'
    )


def _circle(x: float, y: float, colour: str, *, radius: float = 4.0) -> str:
    return (
        f'<circle cx="{_number_text(x)}" cy="{_number_text(y)}" r="{_number_text(radius)}" fill="{colour}" '
        f'stroke="{INK}" stroke-width="0.8"/>'
    )


def _square(x: float, y: float, colour: str, *, hollow: bool = False) -> str:
    fill = "#FFFFFF" if hollow else colour
    return (
        f'<rect x="{_number_text(x - 3.5)}" y="{_number_text(y - 3.5)}" width="7" height="7" fill="{fill}" '
        f'stroke="{colour if hollow else INK}" stroke-width="{1.6 if hollow else 0.8}"/>'
    )


def _diamond(x: float, y: float, colour: str, *, hollow: bool = False, size: float = 5.0) -> str:
    fill = "#FFFFFF" if hollow else colour
    return (
        f'<path d="M{_number_text(x)} {_number_text(y - size)}l{_number_text(size)} {_number_text(size)}'
        f'l{_number_text(-size)} {_number_text(size)}l{_number_text(-size)} {_number_text(-size)}z" '
        f'fill="{fill}" stroke="{colour}" stroke-width="1.2"/>'
    )


def _box_glyph(
    quantiles: Sequence[float], y: float, x_of: Any, colour: str, *, dashed: bool, height: float = 11.0
) -> list[str]:
    """A horizontal box plot centred on ``y``: whiskers q05–q95 with caps, box q25–q75, median line and marker."""
    q05, q25, q50, q75, q95 = (x_of(v) for v in quantiles)
    half = height / 2
    dash = ' stroke-dasharray="3 2"' if dashed else ""
    opacity = "0.15" if dashed else "0.3"
    marker = _diamond(q50, y, colour, size=3.5) if dashed else _circle(q50, y, colour, radius=3.0)
    return [
        _line(q05, y, q25, y, colour, width=1.2, dashed=dashed),
        _line(q75, y, q95, y, colour, width=1.2, dashed=dashed),
        _line(q05, y - 3, q05, y + 3, colour, width=1.2),
        _line(q95, y - 3, q95, y + 3, colour, width=1.2),
        f'<rect class="box" x="{_number_text(q25)}" y="{_number_text(y - half)}" '
        f'width="{_number_text(max(1.0, q75 - q25))}" height="{_number_text(height)}" fill="{colour}" '
        f'fill-opacity="{opacity}" stroke="{colour}" stroke-width="1.5"{dash}/>',
        _line(q50, y - half, q50, y + half, INK, width=2.0),
        marker,
    ]


def _axis_labels(ticks: Sequence[float], labels: Sequence[str], x_of: Any, y: float) -> list[str]:
    return [_text(x_of(t), y, label, MUTED, anchor="middle") for t, label in zip(ticks, labels, strict=True) if label]


def _runs_path(mask: np.ndarray) -> str:
    """SVG path data (cell units) of the runs of True along each row of a bool [rows, cols] mask."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    starts, ends = np.argwhere(steps == 1), np.argwhere(steps == -1)  # row-major: the i-th start meets the i-th end
    return "".join(
        f"M{c} {r}h{e - c}v1h{c - e}z" for (r, c), e in zip(starts.tolist(), ends[:, 1].tolist(), strict=True)
    )


def _count(value: object) -> int | None:
    number = as_number(value)
    return None if number is None else int(round(number))


def _quantiles(row: Mapping[str, Any], key: str) -> tuple[float, ...] | None:
    values = row.get(key)
    if values is None:
        return None
    numbers = tuple(as_number(v) for v in values)
    if len(numbers) != len(QUANTILES) or any(v is None for v in numbers):
        return None
    return numbers  # type: ignore[return-value]


def _summary(quantiles: Sequence[float], mean: object) -> str:
    q05, q25, q50, q75, q95 = quantiles
    text = f"median {q50:.3g} (quartiles {q25:.3g}–{q75:.3g}, 5th–95th percentile {q05:.3g}–{q95:.3g})"
    average = as_number(mean)
    return text + (f", mean {average:.3g}" if average is not None else "")


def _difference(row: Mapping[str, Any]) -> float:
    """The row's paired flip difference, else the difference of its two flip rates."""
    given = as_number(row.get("flip_difference"))
    if given is not None:
        return given
    return (as_number(row.get("flip_rate")) or 0.0) - (as_number(row.get("flip_rate_control")) or 0.0)


def _estimate(row: Mapping[str, Any], key: str) -> str:
    value = as_number(row.get(key))
    if value is None:
        return "n/a"
    low, high = as_number(row.get(f"{key}_ci_low")), as_number(row.get(f"{key}_ci_high"))
    return f"{value:.3f}" + (f" (95% CI {low:.3f}–{high:.3f})" if low is not None and high is not None else "")
