"""What the report shows: plain data, built by the flow and rendered by :func:`audit.report.html.write_report`.

The report module computes nothing about the audit itself; it only formats what it is given. Keeping the content
in small frozen dataclasses means the report can be rendered from a test (or a notebook) without running an audit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audit.errors import DataError

# The verdict scale, from harmless to serious; the order is used to sort findings and to compare with a gate.
VERDICTS: tuple[str, ...] = ("none", "watch", "shortcut")


def check_verdict(verdict: object, where: str) -> str:
    """Return ``verdict`` if it is one of :data:`VERDICTS`, else raise.

    Args:
        verdict: the value to check.
        where: what holds the value, for the error message (e.g. ``"ReportContent.verdict"``).

    Raises:
        DataError: the value is not on the verdict scale.
    """
    if not isinstance(verdict, str) or verdict not in VERDICTS:
        raise DataError(f"{where}: expected one of {', '.join(VERDICTS)}, found {verdict!r}")
    return verdict


# eq=False: the fields hold numpy arrays, whose == is elementwise, so a generated __eq__ would raise on use.
@dataclass(frozen=True, eq=False)
class GalleryItem:
    """One image shown in the gallery: an image with its saliency overlaid and its suspicious regions boxed.

    Attributes:
        image_id: content hash of the image.
        path: the image's path as given in the manifest.
        label: the true class name.
        prediction: the predicted class name.
        confidence: the model's probability for ``prediction``, in [0, 1].
        region_kind: the region kind this item was chosen for ("text", "marker", "border", ...).
        method: the saliency method's registry name.
        mass_fraction: share of positive saliency inside regions of ``region_kind``, in [0, 1].
        enrichment: mass fraction divided by area fraction.
        image: uint8 [H, W] (gray) or [H, W, 3] (RGB), at display size (<= 256 px; larger is downsized).
        saliency: float32 [h, w] in [0, 1], any size; resized to the image for the overlay.
        boxes: ``(kind, x0, y0, x1, y1)`` in ``image`` pixel coordinates, x1/y1 exclusive.
        counterfactual: the dependence test on this image and region kind (keys ``fill``, ``prob_clean``,
            ``prob_removed``, ``prob_control``, ``flip_removed``, ``flip_control``), or None when the image was not
            in the test's sample.
    """

    image_id: str
    path: str
    label: str
    prediction: str
    confidence: float
    region_kind: str
    method: str
    mass_fraction: float
    enrichment: float
    image: np.ndarray
    saliency: np.ndarray
    boxes: list[tuple[str, int, int, int, int]]
    counterfactual: dict[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class ClassMap:
    """The mean saliency map of one class for one method, with the class's mean image when available.

    Attributes:
        label: class name.
        method: saliency method's registry name.
        n_images: number of images averaged.
        mean_saliency: float32 [h, w], >= 0, not normalised (the figure normalises for display).
        mean_image: uint8 [h, w], the class's mean image at the same size, or None.
    """

    label: str
    method: str
    n_images: int
    mean_saliency: np.ndarray
    mean_image: np.ndarray | None


@dataclass(frozen=True, eq=False)
class ClusterMap:
    """One cluster of a class's saliency maps found by the discovery step (SpRAy).

    Attributes:
        label: the explained class whose maps were clustered.
        method: saliency method's registry name.
        index: cluster number within the class (0 = largest).
        size: maps in the cluster; ``share`` of the class's clustered maps.
        purity: share of the cluster's images whose true label is ``label``.
        peak: (x, y) of the mean map's maximum, image fractions.
        concentration: share of the mean map's mass in its top 5% pixels.
        suspicious: concentrated attention away from the expected content; ``reason`` says why.
        mean_saliency: float32 [g, g], the cluster's mean map.
        mean_image: uint8 [h, w], the class's mean image, or None.
        examples: paths of typical members.
    """

    label: str
    method: str
    index: int
    size: int
    share: float
    purity: float
    peak: tuple[float, float]
    concentration: float
    suspicious: bool
    reason: str
    mean_saliency: np.ndarray
    mean_image: np.ndarray | None
    examples: list[str]


@dataclass(frozen=True, eq=False)
class ReportContent:
    """Everything the HTML report shows.

    Attributes:
        title: page title.
        verdict: overall verdict, one of :data:`VERDICTS`.
        gate: ``{"fail_on": "shortcut", "failed": bool}``, or None when no release gate was set.
        findings: rows with keys label, region_kind, method, n_images, mean_mass_fraction, mean_area_fraction,
            enrichment, ci_low, ci_high, pointing_hit_rate, presence_rate, presence_rate_other, verdict, reason.
        counts: ``{"images": int, "errors": int, "classes": int, "regions": int, ...}``.
        model: ``{"kind": "probe" | "user", "arch": str, "heldout_accuracy": float | None, ...}``.
        class_maps: mean saliency per class and method.
        gallery: the images with the most attention on suspicious regions, in display order.
        errors: rows ``{"path", "stage", "message"}`` (the report shows at most 100).
        settings: the run's configuration, flattened to str/number values.
        versions: package versions, python, device.
        clusters: the discovery step's clusters, suspicious first.
        changes: what changed since the previous run of the same dataset (:func:`audit.history.compare_runs`),
            or None (no previous run, or another dataset): the report then has no "Since the previous run" section.
        attention: per (region kind, class), quantiles of mass and area fraction
            (:func:`audit.report.distributions.distribution_data`); empty: no distribution figure.
        coverage: per class, float [g, g] share of the class's images with a suspicious region at each point, and
            ``coverage_images`` the images each share is of (:func:`~audit.report.distributions.region_coverage`).
        coverage_kinds: the region kinds the coverage maps show.
        audited: what was audited, shown first under "What was audited": dataset, manifest, methods, duration,
            versions (name → display string).
        errors_by_stage: error count per stage (manifest, read, decode, ingest, regions, ...).
        burned_in: per class, DICOM's Burned In Annotation flag against the detectors
            (:func:`audit.evidence.header.burned_in_by_class`); empty without DICOM images.
    """

    title: str
    verdict: str
    gate: dict[str, Any] | None
    findings: list[dict[str, Any]]
    counts: dict[str, Any]
    model: dict[str, Any]
    class_maps: list[ClassMap]
    gallery: list[GalleryItem]
    errors: list[dict[str, Any]]
    settings: dict[str, Any]
    versions: dict[str, Any]
    clusters: tuple[ClusterMap, ...] = ()
    changes: dict[str, Any] | None = None
    attention: list[dict[str, Any]] = field(default_factory=list)
    coverage: dict[str, np.ndarray] = field(default_factory=dict)
    coverage_images: dict[str, int] = field(default_factory=dict)
    coverage_kinds: tuple[str, ...] = ()
    audited: dict[str, str] = field(default_factory=dict)
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    burned_in: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_verdict(self.verdict, "ReportContent.verdict")
        if self.gate is not None and "failed" not in self.gate:
            raise DataError(f"ReportContent.gate: expected keys 'fail_on' and 'failed', found {sorted(self.gate)}")


def as_number(value: object) -> float | None:
    """``value`` as a finite float, or None when it is missing, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_percent(value: object, digits: int = 1) -> str:
    """Format a fraction in [0, 1] as a percentage (``0.412 -> "41.2%"``); missing values give ``"—"``."""
    number = as_number(value)
    return "—" if number is None else f"{100.0 * number:.{digits}f}%"


def format_number(value: object, digits: int = 2) -> str:
    """Format a number with ``digits`` decimals; integers stay integers; missing values give ``"—"``."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return f"{int(value):,}"
    number = as_number(value)
    return "—" if number is None else f"{number:.{digits}f}"


def format_ci(low: object, high: object, digits: int = 1) -> str:
    """Format a confidence interval as ``"11.0–15.1"``; ``"—"`` when either end is missing."""
    low_number, high_number = as_number(low), as_number(high)
    if low_number is None or high_number is None:
        return "—"
    return f"{low_number:.{digits}f}–{high_number:.{digits}f}"


def finding_sentence(row: dict[str, Any]) -> str:
    """One plain-language sentence for a finding row.

    Example: ``"class opacity: 41% of gradcam attention on text regions that cover 3.0% of the image
    (enrichment 13.2x, 95% CI 11.0–15.1)"``.
    """
    mass = format_percent(row.get("mean_mass_fraction"), digits=0)
    area = format_percent(row.get("mean_area_fraction"), digits=1)
    enrichment = as_number(row.get("enrichment"))
    details = f"enrichment {enrichment:.1f}x" if enrichment is not None else "enrichment —"
    ci = format_ci(row.get("ci_low"), row.get("ci_high"))
    if ci != "—":
        details += f", 95% CI {ci}"
    group = row.get("group")
    where = f"class {row.get('label', '?')}" + (f" (group {group})" if group is not None else "")
    sentence = (
        f"{where}: {mass} of {row.get('method', '?')} attention on "
        f"{row.get('region_kind', '?')} regions that cover {area} of the image ({details})"
    )
    flips, control = as_number(row.get("flip_rate")), as_number(row.get("flip_rate_control"))
    if flips is not None and control is not None:
        sentence += (
            f"; removing them flips {format_percent(flips, 0)} of predictions vs {format_percent(control, 0)} "
            "for equal-area controls"
        )
    auc = as_number(row.get("leakage_auc"))
    if auc is not None:
        sentence += f"; the region alone predicts the class with AUC {auc:.2f}"
    return sentence
