"""Render :class:`~audit.report.content.ReportContent` to one self-contained HTML page.

Everything the page needs is inside the file: CSS in a ``<style>`` element, figures as PNG/JPEG data URIs, one
inline script (``templates/report.js``: sorting and filtering the findings, paging the gallery, opening an image)
and no external URL, so the page can be attached to a ticket or opened offline. A Content-Security-Policy allows
only that script (by its hash) and data-URI images: even a string that escaped escaping could neither run nor
fetch anything. Jinja2 autoescaping is on: labels, paths, messages and settings come from the user's data and are
never trusted as markup.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import numbers
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from audit import __version__
from audit.report import distributions, figures
from audit.report.content import (
    VERDICTS,
    ClassMap,
    ClusterMap,
    GalleryItem,
    ReportContent,
    as_number,
    check_verdict,
    finding_sentence,
    format_ci,
    format_number,
    format_percent,
)
from audit.store.state import write_text_atomic

# The report's size budget at the default settings (README, "The report"): held by tests/report/test_report_size.py
# for the largest content the defaults allow, and measured on a 2,000-image demo by `make bench-report`.
SIZE_BUDGET_BYTES = 8_000_000
# Gallery images per page of a region kind (the page script shows one page at a time; print shows all).
GALLERY_PAGE = 8
# The page lists at most this many errors; the full list is in the `errors` table of audit.duckdb.
MAX_ERRORS_SHOWN = 100
# Below this held-out accuracy the probe is too weak for a "none" verdict to mean anything.
MIN_PROBE_ACCURACY = 0.6
# Okabe-Ito colours, distinguishable with the common colour-vision deficiencies; the word is always written too.
VERDICT_COLOURS: dict[str, str] = {"none": "#009E73", "watch": "#E69F00", "shortcut": "#D55E00"}
VERDICT_HEADLINES: dict[str, str] = {
    "none": "no finding reached “watch”: no sign that the model relies on the audited regions",
    "watch": "the model puts more attention on suspicious regions than their area explains; look closer",
    "shortcut": "the model relies on suspicious regions instead of the content; do not release it as it is",
}
_MODEL_KEYS = ("kind", "arch", "heldout_accuracy")


def _environment() -> jinja2.Environment:
    # autoescape=True rather than select_autoescape: the template's name ends in .j2, which the latter would miss.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("audit.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _plain(value: Any) -> str:
    """A settings/versions value as display text, exactly as configured (no rounding: 1e-5 stays 1e-05)."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _count(value: Any) -> str:
    """A count as display text: integers with thousands separators, anything else as it is."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f"{int(value):,}"
    return _plain(value)


def _severity(verdict: str) -> int:
    return VERDICTS.index(verdict)


def _sorted_findings(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted most serious first, then by enrichment (highest first, missing last)."""
    for index, row in enumerate(findings):
        check_verdict(row.get("verdict"), f"findings[{index}].verdict")

    def key(row: dict[str, Any]) -> tuple[int, float]:
        enrichment = as_number(row.get("enrichment"))
        return -_severity(row["verdict"]), -enrichment if enrichment is not None else math.inf

    return sorted(findings, key=key)


def _finding_view(row: dict[str, Any]) -> dict[str, str]:
    return {
        "label": str(row.get("label", "")),
        "region_kind": str(row.get("region_kind", "")),
        "method": str(row.get("method", "")),
        "n_images": format_number(row.get("n_images")),
        "mass_fraction": format_percent(row.get("mean_mass_fraction")),
        "area_fraction": format_percent(row.get("mean_area_fraction")),
        "enrichment": format_number(row.get("enrichment"), digits=1),
        "ci": format_ci(row.get("ci_low"), row.get("ci_high")),
        "pointing_hit_rate": format_percent(row.get("pointing_hit_rate"), digits=0),
        "flips": _pair(row.get("flip_rate"), row.get("flip_rate_control")),
        "effect": format_ci(row.get("effect_difference_ci_low"), row.get("effect_difference_ci_high"), digits=2),
        "leakage_auc": format_number(row.get("leakage_auc"), digits=2),
        "evidence": " + ".join(k for k in ("attention", "dependence", "leakage") if row.get(k)) or "—",
        "group": "all" if row.get("group") is None else str(row.get("group")),
        "presence_rate": format_percent(row.get("presence_rate"), digits=0),
        "presence_rate_other": format_percent(row.get("presence_rate_other"), digits=0),
        "verdict": row["verdict"],
        "reason": str(row.get("reason") or ""),
        # Raw values for sorting in the page (data-sort): numbers, or "" where missing (sorted last).
        "sort": {
            key: _sort_key(row.get(field))
            for key, field in (
                ("n_images", "n_images"),
                ("mass_fraction", "mean_mass_fraction"),
                ("area_fraction", "mean_area_fraction"),
                ("enrichment", "enrichment"),
                ("ci", "ci_low"),
                ("pointing_hit_rate", "pointing_hit_rate"),
                ("flips", "flip_difference"),
                ("effect", "effect_difference"),
                ("leakage_auc", "leakage_auc"),
                ("presence_rate", "presence_rate"),
                ("presence_rate_other", "presence_rate_other"),
            )
        }
        | {"verdict": str(VERDICTS.index(row["verdict"])), "evidence": str(int(row.get("evidence") or 0))},
    }


def _dependence_svg(findings: list[dict[str, Any]]) -> markupsafe.Markup | str:
    """The counterfactual figure, or "" when no finding has a flip rate (the test was off)."""
    tested = [row for row in findings if as_number(row.get("flip_rate")) is not None]
    return markupsafe.Markup(distributions.dependence_svg(tested)) if tested else ""


def _sort_key(value: object) -> str:
    number = as_number(value)
    return "" if number is None else repr(float(number))


def _pair(value: object, control: object) -> str:
    """``"62% vs 4%"`` for a rate and its control's; ``"—"`` when either is missing."""
    if as_number(value) is None or as_number(control) is None:
        return "—"
    return f"{format_percent(value, 0)} vs {format_percent(control, 0)}"


def _image_view(data: bytes, alt: str, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """An <img>'s attributes: data URI, alt text and its (width, height), read back from a PNG's header when not
    given."""
    if size is None:  # PNG IHDR: width and height are big-endian 32-bit integers at bytes 16..24.
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    return {"src": figures.to_data_uri(data), "alt": alt, "width": size[0], "height": size[1]}


def _class_map_view(class_map: ClassMap) -> dict[str, Any]:
    mean_image = class_map.mean_image
    shape = None
    if mean_image is not None:
        shape = figures.fit_shape(*figures.to_bgr(mean_image).shape[:2])
    heatmap = _image_view(
        figures.heatmap_png(class_map.mean_saliency, shape),
        f"Mean {class_map.method} saliency of class {class_map.label} over {class_map.n_images} images, "
        "viridis colormap, normalised to its maximum",
    )
    image = None
    if mean_image is not None:
        image = _image_view(figures.image_png(mean_image), f"Mean image of class {class_map.label}")
    return {
        "label": class_map.label,
        "method": class_map.method,
        "n_images": format_number(class_map.n_images),
        "heatmap": heatmap,
        "image": image,
    }


def _cluster_view(cluster: ClusterMap) -> dict[str, Any]:
    shape = figures.fit_shape(*figures.to_bgr(cluster.mean_image).shape[:2]) if cluster.mean_image is not None else None
    heatmap = _image_view(
        figures.heatmap_png(cluster.mean_saliency, shape),
        f"Mean {cluster.method} saliency of cluster {cluster.index} of class {cluster.label} ({cluster.size} images), "
        f"peak at x {cluster.peak[0]:.2f}, y {cluster.peak[1]:.2f} of the image",
    )
    return {
        "label": cluster.label,
        "method": cluster.method,
        "index": cluster.index,
        "size": format_number(cluster.size),
        "share": format_percent(cluster.share, 0),
        "purity": format_percent(cluster.purity, 0),
        "peak": f"x {cluster.peak[0]:.2f}, y {cluster.peak[1]:.2f}",
        "concentration": format_percent(cluster.concentration, 0),
        "suspicious": cluster.suspicious,
        "reason": cluster.reason,
        "heatmap": heatmap,
        "examples": list(cluster.examples),
    }


def _gallery_view(item: GalleryItem) -> dict[str, Any]:
    kinds = sorted({box[0] for box in item.boxes})
    boxes_text = f"; boxes mark {', '.join(kinds)} regions" if kinds else ""
    height, width = figures.fit_shape(*item.image.shape[:2])
    overlay = _image_view(
        figures.overlay_jpeg(item.image, item.saliency, item.boxes),
        f"{item.path}: {item.method} saliency over the image, label {item.label}, "
        f"predicted {item.prediction}{boxes_text}",
        (width, height),
    )
    image = _image_view(
        figures.boxed_jpeg(item.image, item.boxes), f"{item.path}: the image as it is{boxes_text}", (width, height)
    )
    return {
        "figure": overlay,
        "image": image,
        "image_id": item.image_id,
        "path": item.path,
        "label": item.label,
        "prediction": item.prediction,
        "confidence": format_percent(item.confidence, digits=0),
        "region_kind": item.region_kind,
        "method": item.method,
        "mass_fraction": format_percent(item.mass_fraction),
        "enrichment": format_number(item.enrichment, digits=1),
        "counterfactual": _counterfactual_text(item.counterfactual, item.region_kind),
        "kinds": [{"kind": kind, "colour": figures.box_colour(kind)} for kind in kinds],
    }


def _counterfactual_text(test: dict[str, Any] | None, kind: str) -> str:
    """One sentence on what removing the region did to this image's prediction."""
    if not test:
        return "not in the counterfactual test's sample"
    flipped = "the prediction changed" if test.get("flip_removed") else "the prediction held"
    text = (
        f"removing the {kind} region ({test.get('fill')}): probability {format_percent(test.get('prob_clean'), 0)} → "
        f"{format_percent(test.get('prob_removed'), 0)}, {flipped}"
    )
    if as_number(test.get("prob_control")) is not None:
        control = "changed" if test.get("flip_control") else "held"
        text += f"; an equal-area control: → {format_percent(test.get('prob_control'), 0)}, {control}"
    return text


def _gallery_groups(items: list[GalleryItem]) -> list[dict[str, Any]]:
    """The gallery's items grouped by region kind, in the order the kinds first appear (most serious first)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item.region_kind, []).append(_gallery_view(item))
    return [
        {"kind": kind, "colour": figures.box_colour(kind), "items": views, "pages": -(-len(views) // GALLERY_PAGE)}
        for kind, views in groups.items()
    ]


def _model_view(model: dict[str, Any]) -> dict[str, Any]:
    accuracy = as_number(model.get("heldout_accuracy"))
    return {
        "kind": str(model.get("kind", "—")),
        "arch": str(model.get("arch", "—")),
        "heldout_accuracy": format_number(accuracy, digits=3) if accuracy is not None else "not measured",
        "weak": accuracy is not None and accuracy < MIN_PROBE_ACCURACY,
        "extra": [
            (str(key).replace("_", " "), _plain(value)) for key, value in model.items() if key not in _MODEL_KEYS
        ],
    }


def _gate_view(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    return {"fail_on": str(gate.get("fail_on", "—")), "failed": bool(gate["failed"])}


def _errors_view(content: ReportContent) -> dict[str, Any]:
    counted = as_number(content.counts.get("errors"))
    # The flow may count more errors than it passes rows for; never show fewer than the rows themselves.
    total = max(len(content.errors), int(counted) if counted is not None else 0)
    rows = [
        {"path": str(row.get("path", "")), "stage": str(row.get("stage", "")), "message": str(row.get("message", ""))}
        for row in content.errors[:MAX_ERRORS_SHOWN]
    ]
    stages = ", ".join(f"{n} at {stage}" for stage, n in content.errors_by_stage.items())
    return {"total": total, "rows": rows, "stages": stages}


def _burned_in_view(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "label": str(row["label"]),
            "n_dicom": _count(row["n_dicom"]),
            "yes": _count(row["flag_yes"]),
            "no": _count(row["flag_no"]),
            "absent": _count(row["flag_absent"]),
            "yes_rate": format_percent(row["yes_rate"]),
            "yes_rate_other": format_percent(row["yes_rate_other"]),
            "yes_detected": _count(row["yes_detected"]),
            "no_detected": _count(row["no_detected"]),
            "note": str(row.get("note") or ""),
        }
        for row in rows
    ]


# The "Since the previous run" section's per-finding table lists at most this many rows.
MAX_CHANGE_ROWS = 50


def _verdict_word(verdict: object) -> dict[str, Any]:
    """A verdict for display: the word, and whether it is on the scale (only then is it coloured)."""
    if verdict is None:
        return {"word": "absent", "known": False}
    return {"word": str(verdict), "known": verdict in VERDICTS}


def _change_row(row: dict[str, Any]) -> dict[str, Any]:
    before, now = row.get("before") or {}, row.get("now") or {}
    group = row.get("group")
    return {
        "where": f"class {row.get('label', '?')}" + (f" (group {group})" if group is not None else ""),
        "label": str(row.get("label", "")),
        "group": "all" if group is None else str(group),
        "region_kind": str(row.get("region_kind", "")),
        "method": str(row.get("method", "")),
        "before": _verdict_word(before.get("verdict") if row.get("before") is not None else None),
        "now": _verdict_word(now.get("verdict") if row.get("now") is not None else None),
        "enrichment": _arrow(format_number(before.get("enrichment"), 1), format_number(now.get("enrichment"), 1)),
        "flip_rate": _arrow(format_percent(before.get("flip_rate"), 0), format_percent(now.get("flip_rate"), 0)),
        "leakage_auc": _arrow(format_number(before.get("leakage_auc"), 2), format_number(now.get("leakage_auc"), 2)),
    }


def _arrow(before: str, now: str) -> str:
    return now if before == now else f"{before} → {now}"


def _trend_value(name: str, value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format_number(value, digits=3) if "accuracy" in name else format_number(value)


def _changes_view(changes: dict[str, Any] | None) -> dict[str, Any] | None:
    """The "Since the previous run" section, or None when there is nothing to compare with."""
    if not changes:
        return None
    previous = changes.get("previous") or {}
    trend = [
        {
            "name": str(item.get("name", "")),
            "before": _trend_value(str(item.get("name", "")), item.get("before")),
            "now": _trend_value(str(item.get("name", "")), item.get("now")),
        }
        for item in changes.get("trend") or ()
    ]
    for item in trend:
        item["changed"] = item["before"] != item["now"]

    def above_none(side: object) -> bool:
        return isinstance(side, dict) and side.get("verdict") in VERDICTS[1:]

    rows = [r for r in changes.get("findings") or () if above_none(r.get("before")) or above_none(r.get("now"))]
    return {
        "recorded_at": str(previous.get("recorded_at") or "an unknown time"),
        "folder": str(previous.get("id") or previous.get("folder") or ""),
        "verdict": _verdict_word(previous.get("verdict")),
        "new": [_change_row(r) for r in changes.get("new") or ()],
        "resolved": [_change_row(r) for r in changes.get("resolved") or ()],
        "verdict_changes": [_change_row(r) for r in changes.get("verdict_changes") or ()],
        "trend": trend,
        "rows": [_change_row(r) for r in rows[:MAX_CHANGE_ROWS]],
        "rows_hidden": max(0, len(rows) - MAX_CHANGE_ROWS),
        "rows_none": len(changes.get("findings") or ()) - len(rows),
    }


def render_report(content: ReportContent) -> str:
    """The report as an HTML string (see :func:`write_report`).

    Raises:
        DataError: a finding's verdict is not on the verdict scale.
        ShapeError: a gallery image or saliency map has an unusable shape.
    """
    findings = _sorted_findings(content.findings)
    context = {
        "title": content.title,
        "verdict": content.verdict,
        "verdict_headline": VERDICT_HEADLINES[content.verdict],
        "colours": VERDICT_COLOURS,
        "gate": _gate_view(content.gate),
        "sentences": [
            {"verdict": row["verdict"], "text": finding_sentence(row)} for row in findings if row["verdict"] != "none"
        ],
        "counts": [(str(key).replace("_", " "), _count(value)) for key, value in content.counts.items()],
        "audited": [(str(key), str(value)) for key, value in content.audited.items()],
        # Our own SVG, with every label escaped by the distributions module: inserted as markup.
        "attention_method": content.attention[0].get("method", "") if content.attention else "",
        "attention_svg": markupsafe.Markup(distributions.attention_svg(content.attention)) if content.attention else "",
        "dependence_svg": _dependence_svg(findings),
        "coverage_svg": markupsafe.Markup(
            distributions.coverage_svg(content.coverage, content.coverage_images, kinds=content.coverage_kinds)
        )
        if content.coverage
        else "",
        "model": _model_view(content.model),
        "min_accuracy": format_number(MIN_PROBE_ACCURACY, digits=1),
        "findings": [_finding_view(row) for row in findings],
        "class_maps": [_class_map_view(class_map) for class_map in content.class_maps],
        "colourbar": _image_view(figures.colourbar_png(), "Colour scale: low attention (dark purple) to high (yellow)"),
        "box_colours": [{"kind": kind, "colour": colour} for kind, colour in figures.BOX_COLOURS.items()],
        "gallery": _gallery_groups(content.gallery),
        "gallery_page": GALLERY_PAGE,
        "clusters": [_cluster_view(cluster) for cluster in content.clusters],
        "changes": _changes_view(content.changes),
        "errors": _errors_view(content),
        "burned_in": _burned_in_view(content.burned_in),
        "max_errors": MAX_ERRORS_SHOWN,
        "settings": [(str(key), _plain(value)) for key, value in content.settings.items()],
        "versions": [(str(key), _plain(value)) for key, value in content.versions.items()],
        "audit_version": __version__,
    }
    script = _script()
    context["script"] = markupsafe.Markup(script)  # our own file, never data: inserted as is
    context["script_hash"] = "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return _environment().get_template("report.html.j2").render(context)


def _script() -> str:
    text = resources.files("audit.report").joinpath("templates/report.js").read_text(encoding="utf-8")
    if "</script" in text.lower():  # would end the element early
        raise RuntimeError("report.js must not contain '</script'")
    return text


def write_report(content: ReportContent, path: Path) -> Path:
    """Write the report as one self-contained HTML file.

    The file is written to a temporary file beside ``path`` and then renamed, so a reader never sees half a page.

    Args:
        content: what to show.
        path: the HTML file to write (its folder is created if needed).

    Returns:
        ``path``.
    """
    path = Path(path)
    write_text_atomic(path, render_report(content))
    return path
