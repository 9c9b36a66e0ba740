"""The report's size budget (README, "The report"): the largest page the default settings allow stays under it.

The page's size does not grow with the number of images: the gallery holds ``gallery_size`` images per region
kind, the class maps one per class and method, the discovery step at most ``max_clusters`` per class, the error
list 100 rows. This test fills every one of those to its default maximum for 4 classes, 6 region kinds, 2 methods
and 3 groups, with 256-px radiograph-like images (the demo's) and noisy saliency, and renders the page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from audit.config import AuditConfig, DiscoveryConfig
from audit.data.demo import write_demo
from audit.report import ClassMap, GalleryItem, ReportContent, render_report
from audit.report.content import ClusterMap
from audit.report.html import SIZE_BUDGET_BYTES

CLASSES = ("normal", "opacity", "effusion", "nodule")
KINDS = ("text", "marker", "border", "watermark", "square", "outside_lung")
METHODS = ("gradcam", "integrated_gradients")
GROUPS = (None, "site-a", "site-b", "site-c")


def _finding(label: str, kind: str, method: str, group: str | None, rng: np.random.Generator) -> dict:
    return {
        "label": label, "group": group, "region_kind": kind, "method": method, "n_images": 500,
        "mean_mass_fraction": rng.random(), "mean_area_fraction": rng.random() / 10, "enrichment": 10 * rng.random(),
        "ci_low": 1.0, "ci_high": 12.0, "pointing_hit_rate": 0.5, "presence_rate": 0.9, "presence_rate_other": 0.1,
        "flip_rate": 0.5, "flip_rate_control": 0.05, "flip_difference": 0.45, "effect_difference_ci_low": 0.1,
        "effect_difference_ci_high": 0.3, "leakage_auc": 0.8, "attention": True, "dependence": True,
        "leakage": True, "evidence": 3, "verdict": "shortcut",
        "reason": "enrichment CI above 2 and the region alone predicts the class; " * 3,
    }  # fmt: skip


def test_largest_default_report_is_within_the_budget(tmp_path: Path) -> None:
    defaults = AuditConfig(data=tmp_path)
    rng = np.random.default_rng(0)
    demo = write_demo(tmp_path / "demo", n=40, size=256, seed=1)
    images = [np.asarray(Image.open(path).convert("L")) for path in sorted((tmp_path / "demo").rglob("*.png"))]
    assert images[0].shape == (256, 256) and demo is not None

    def saliency() -> np.ndarray:
        return rng.random((defaults.map_size, defaults.map_size)).astype(np.float32)

    gallery = [
        GalleryItem(
            image_id=f"{kind}{i:04d}" * 4, path=f"class/{kind}/image_{i:05d}.png", label=CLASSES[i % 4],
            prediction=CLASSES[(i + 1) % 4], confidence=0.9, region_kind=kind, method=METHODS[0],
            mass_fraction=0.5, enrichment=7.5, image=images[i % len(images)], saliency=saliency(),
            boxes=[(kind, 10, 10, 80, 40), ("border", 0, 0, 256, 12)],
            counterfactual={"fill": "inpaint", "prob_clean": 0.9, "prob_removed": 0.2, "prob_control": 0.88,
                            "flip_removed": True, "flip_control": False},
        )
        for kind in KINDS
        for i in range(defaults.gallery_size)
    ]  # fmt: skip
    mean_image = np.asarray(Image.fromarray(images[0]).resize((64, 64)))
    class_maps = [ClassMap(c, m, 500, saliency(), mean_image) for c in CLASSES for m in METHODS]
    clusters = tuple(
        ClusterMap(
            label=c, method=METHODS[0], index=k, size=50, share=0.1, purity=0.9, peak=(0.2, 0.8), concentration=0.3,
            suspicious=k == 0, reason="concentrated away from the class's mean map", mean_saliency=saliency(),
            mean_image=mean_image, examples=tuple(f"class/x/image_{j:05d}.png" for j in range(5)),
        )
        for c in CLASSES
        for k in range(DiscoveryConfig().max_clusters)
    )  # fmt: skip
    content = ReportContent(
        title="Shortcut audit of /data/a/dataset/with/a/long/path",
        verdict="shortcut",
        gate={"fail_on": "shortcut", "failed": True},
        findings=[_finding(c, k, m, g, rng) for c in CLASSES for k in KINDS for m in METHODS for g in GROUPS],
        counts={"images": 1_000_000, "errors": 5000, "classes": 4, "regions": 2_000_000},
        model={"kind": "user", "arch": "resnet50", "heldout_accuracy": 0.9},
        class_maps=class_maps,
        gallery=gallery,
        errors=[
            {"path": f"bad/{i:06d}.png", "stage": "decode", "message": "could not decode " * 4} for i in range(100)
        ],
        settings={f"setting.{i}": "value" for i in range(60)},
        versions={"python": "3.11", "torch": "2.14"},
        clusters=clusters,
    )
    size = len(render_report(content).encode("utf-8"))
    print(f"largest default report: {size:,} bytes")
    assert size <= SIZE_BUDGET_BYTES, f"{size:,} bytes > budget {SIZE_BUDGET_BYTES:,}"
    # And the budget is not slack by an order of magnitude: it would not catch a regression.
    assert size >= SIZE_BUDGET_BYTES / 10, f"{size:,} bytes: the test no longer fills the page"
