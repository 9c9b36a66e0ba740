"""Building the report's content from a finished audit's tables (the report module itself only formats)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import duckdb
import numpy as np

from audit.config import VERDICT_LEVELS
from audit.data.decode import decode_image
from audit.data.manifest import safe_join
from audit.errors import AuditError
from audit.report.content import ClassMap, ClusterMap, GalleryItem, ReportContent
from audit.report.distributions import distribution_data, region_coverage_from_catalog
from audit.store.catalog import CATALOG_NAME

if TYPE_CHECKING:
    from audit.pipeline import Plan

DISPLAY_SIZE = 256
COUNTERFACTUAL_FIELDS = ("fill", "prob_clean", "prob_removed", "prob_control", "flip_removed", "flip_control")
ERRORS_SHOWN = 100


def build_report_content(p: Plan, summary: dict, settings: dict[str, Any]) -> ReportContent:
    """Assemble :class:`ReportContent` from ``OUT/audit.duckdb`` and the shards' mean images."""
    out = p.config.out
    con = duckdb.connect(str(out / CATALOG_NAME), read_only=True)
    try:
        class_maps = _class_maps(p)
        clusters = _clusters(con, p)
        gallery = _gallery(con, p, summary["findings"])
        errors = [
            dict(zip(("path", "stage", "message"), row, strict=True))
            for row in con.execute(
                f"SELECT path, stage, message FROM errors ORDER BY path LIMIT {ERRORS_SHOWN}"
            ).fetchall()
        ]
        method = p.config.methods[0]
        attention = [{**row, "method": method} for row in distribution_data(con, method, p.region_kinds, p.labels)]
        # The kinds a shortcut hides in; the complement of an expected region would cover most of every image.
        coverage_kinds = tuple(k for k in p.region_kinds if not k.startswith("outside_"))
        coverage, coverage_images = region_coverage_from_catalog(con, coverage_kinds, p.labels)
    finally:
        con.close()
    return ReportContent(
        title=f"Shortcut audit of {p.config.data}",
        verdict=summary["verdict"],
        gate=summary["gate"],
        findings=summary["findings"],
        counts={k: v for k, v in summary["counts"].items() if not isinstance(v, dict)},
        model=summary["model"],
        class_maps=class_maps,
        gallery=gallery,
        errors=errors,
        settings=settings,
        versions=summary["versions"],
        clusters=tuple(clusters),
        changes=summary.get("changes"),
        attention=attention,
        coverage=coverage,
        coverage_images=coverage_images,
        coverage_kinds=coverage_kinds,
        audited=_audited(p, summary),
        errors_by_stage=dict(sorted(summary["counts"].get("errors_by_stage", {}).items())),
        burned_in=summary.get("burned_in_annotation") or [],
    )


def _audited(p: Plan, summary: dict) -> dict[str, str]:
    """The facts a reader checks first: which data, which model settings, how long, which versions."""
    dataset = summary.get("dataset") or {}
    versions = summary.get("versions") or {}
    facts = {"dataset": str(dataset.get("data") or p.config.data)}
    if dataset.get("manifest"):
        facts["manifest"] = str(dataset["manifest"])
    if p.config.finding:
        facts["finding"] = p.config.finding
    facts["labels"] = ", ".join(p.labels)
    facts["methods"] = ", ".join(p.config.methods)
    facts["region kinds"] = ", ".join(p.region_kinds)
    if summary.get("duration_seconds") is not None:
        facts["duration"] = f"{float(summary['duration_seconds']):,.0f} s"
    facts["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("shortcut-audit", "torch", "python"))
    return facts


def _shard_sums(p: Plan) -> dict[str, np.ndarray]:
    """The explain stage's per-shard sums (``work/means-<shard>.npz``: image ``sums``, ``map_sums``, ``counts``),
    added over the shards; empty when no shard wrote any."""
    total: dict[str, np.ndarray] = {}
    for index in p.shard_ids:
        path = p.config.out / "work" / f"means-{index:05d}.npz"
        if not path.exists():
            continue
        with np.load(path) as data:
            for name in ("sums", "map_sums", "counts"):
                total[name] = data[name] + total[name] if name in total else data[name]
    return total


def _mean_images(p: Plan) -> dict[str, np.ndarray]:
    total = _shard_sums(p)
    if not total:
        return {}
    sums, counts = total["sums"], total["counts"]
    return {
        label: (sums[i] / counts[i]).clip(0, 255).astype(np.uint8) for i, label in enumerate(p.labels) if counts[i] > 0
    }


def _class_maps(p: Plan) -> list[ClassMap]:
    """Mean of the per-image maps, each scaled to its own maximum (so every image counts equally), per class,
    from the per-shard sums written by the explain stage (no map is read)."""
    means = _mean_images(p)
    total = _shard_sums(p)
    sums, counts = total.get("map_sums"), total.get("counts")
    out = []
    if sums is None:
        return out
    for m, method in enumerate(p.config.methods):
        for i, label in enumerate(p.labels):
            if counts[i] == 0:
                continue
            out.append(
                ClassMap(
                    label=label,
                    method=method,
                    n_images=int(counts[i]),
                    mean_saliency=(sums[m, i] / counts[i]).astype(np.float32),
                    mean_image=means.get(label),
                )
            )
    return out


def _clusters(con: duckdb.DuckDBPyConnection, p: Plan) -> list[ClusterMap]:
    """The discovery step's clusters, suspicious first, then by size; example paths instead of hashes."""
    means = _mean_images(p)
    rows = con.execute(
        """SELECT label, method, cluster, size, share, purity, peak_x, peak_y, concentration, suspicious, reason,
                  mean_map_u8, map_size, examples
           FROM clusters ORDER BY suspicious DESC, label, cluster"""
    ).fetchall()
    examples = sorted({i for row in rows for i in (row[-1] or [])})
    path_of = (
        dict(con.execute("SELECT image_id, path FROM images WHERE list_contains(?, image_id)", [examples]).fetchall())
        if examples
        else {}
    )
    out = []
    for label, method, index, size, share, purity, px, py, concentration, suspicious, reason, u8, side, ex in rows:
        out.append(
            ClusterMap(
                label=label,
                method=method,
                index=int(index),
                size=int(size),
                share=float(share),
                purity=float(purity),
                peak=(float(px), float(py)),
                concentration=float(concentration),
                suspicious=bool(suspicious),
                reason=str(reason),
                mean_saliency=np.array(u8, dtype=np.float32).reshape(side, side) / 255.0,
                mean_image=means.get(label),
                examples=[path_of.get(i, i) for i in (ex or [])],
            )
        )
    return out


def _gallery(con: duckdb.DuckDBPyConnection, p: Plan, findings: list[dict]) -> list[GalleryItem]:
    """The images with the most attention on suspicious regions, the most serious region kinds first."""
    budget = p.config.gallery_size
    if budget == 0:
        return []
    method = p.config.methods[0]
    severity: dict[str, tuple[int, float]] = {}
    for f in findings:
        if f["method"] != method:
            continue
        score = (VERDICT_LEVELS[f["verdict"]], f["enrichment"] or 0.0)
        severity[f["region_kind"]] = max(severity.get(f["region_kind"], (0, 0.0)), score)
    kinds = sorted(severity, key=severity.__getitem__, reverse=True)
    per_kind = budget  # images per region kind: the report's size stays bounded whatever the dataset's size
    fill = p.config.counterfactual.fills[0] if p.config.counterfactual.fills else None
    items: list[GalleryItem] = []
    for kind in kinds:
        rows = con.execute(
            """SELECT a.image_id, i.path, i.label, i.prediction, i.confidence, a.mass_fraction, a.enrichment,
                      m.map_u8, m.map_size, i.width, i.height
               FROM attributions a JOIN images i USING (image_id)
               JOIN maps m ON m.image_id = a.image_id AND m.method = a.method
               WHERE a.method = ? AND a.region_kind = ? AND a.present
               ORDER BY a.mass_fraction DESC, a.image_id LIMIT ?""",
            [method, kind, per_kind],
        ).fetchall()
        for image_id, path, label, prediction, confidence, mass, enrichment, map_u8, map_size, width, height in rows:
            try:
                image = decode_image(safe_join(p.root, path).read_bytes(), path)
            except (AuditError, OSError):
                continue  # the file changed since ingest; the gallery simply skips it
            scale = min(1.0, DISPLAY_SIZE / max(width, height))
            shown = (
                cv2.resize(
                    image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
                )
                if scale < 1
                else image
            )
            boxes = [
                (k, round(x0 * scale), round(y0 * scale), round(x1 * scale), round(y1 * scale))
                for k, x0, y0, x1, y1 in con.execute(
                    "SELECT kind, x0, y0, x1, y1 FROM regions WHERE image_id = ?", [image_id]
                ).fetchall()
            ]
            saliency = np.array(map_u8, dtype=np.float32).reshape(map_size, map_size) / 255.0
            test = con.execute(
                """SELECT fill, prob_clean, prob_removed, prob_control, flip_removed, flip_control
                   FROM counterfactuals WHERE image_id = ? AND region_kind = ? AND fill = ?""",
                [image_id, kind, fill],
            ).fetchone()
            counterfactual = dict(zip(COUNTERFACTUAL_FIELDS, test, strict=True)) if test else None
            items.append(
                GalleryItem(
                    image_id=image_id,
                    path=path,
                    label=label,
                    prediction=prediction,
                    confidence=float(confidence),
                    region_kind=kind,
                    method=method,
                    mass_fraction=float(mass),
                    enrichment=float(enrichment),
                    image=shown,
                    saliency=saliency,
                    boxes=boxes,
                    counterfactual=counterfactual,
                )
            )
    return items
