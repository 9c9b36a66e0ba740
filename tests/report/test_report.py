"""Tests of the HTML report: escaping, self-containment, order of content, figures."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from audit.errors import DataError, ShapeError
from audit.report import ClassMap, GalleryItem, ReportContent, figures, render_report, write_report

EVIL_LABEL = "<script>alert(1)</script>"
EVIL_PATH = '"><img src=x onerror=alert(1)>'
DATA_URI = re.compile(r"^data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)$")


class _ImageCollector(HTMLParser):
    """Collects the attributes of every <img> and every src/href value in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        self.links.extend(value or "" for name, value in attrs if name in ("src", "href"))


def _parse(html: str) -> _ImageCollector:
    collector = _ImageCollector()
    collector.feed(html)
    return collector


def _decode(uri: str) -> np.ndarray:
    match = DATA_URI.match(uri)
    assert match, uri[:60]
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(match.group(1)), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    return decoded


def _finding(label: str, verdict: str, enrichment: float = 13.2) -> dict:
    return {
        "label": label,
        "region_kind": "text",
        "method": "gradcam",
        "n_images": 300,
        "mean_mass_fraction": 0.41,
        "mean_area_fraction": 0.03,
        "enrichment": enrichment,
        "ci_low": 11.0,
        "ci_high": 15.1,
        "pointing_hit_rate": 0.6,
        "presence_rate": 0.9,
        "presence_rate_other": 0.1,
        "verdict": verdict,
        "reason": "ci_low above 4",
    }


def _gallery_item(label: str = "opacity", path: str = "opacity/a.png", size: int = 64) -> GalleryItem:
    image = np.full((size, size), 90, np.uint8)
    saliency = np.zeros((8, 8), np.float32)
    saliency[0, 0] = 1.0
    return GalleryItem(
        image_id="abc123",
        path=path,
        label=label,
        prediction="opacity",
        confidence=0.93,
        region_kind="text",
        method="gradcam",
        mass_fraction=0.41,
        enrichment=13.2,
        image=image,
        saliency=saliency,
        boxes=[("text", 2, 2, 20, 10), ("border", 0, 0, size, 4)],
    )


def _content(**changes: object) -> ReportContent:
    fields: dict = {
        "title": "Shortcut audit: demo",
        "verdict": "shortcut",
        "gate": {"fail_on": "shortcut", "failed": True},
        "findings": [_finding("normal", "none", 1.1), _finding("opacity", "shortcut")],
        "counts": {"images": 600, "errors": 1, "classes": 2, "regions": 640},
        "model": {"kind": "probe", "arch": "probe-cnn", "heldout_accuracy": 0.91},
        "class_maps": [
            ClassMap(
                label="opacity",
                method="gradcam",
                n_images=300,
                mean_saliency=np.random.default_rng(0).random((7, 7)).astype(np.float32),
                mean_image=np.full((64, 48), 120, np.uint8),
            ),
            ClassMap(label="normal", method="gradcam", n_images=300, mean_saliency=np.ones((7, 7)), mean_image=None),
        ],
        "gallery": [_gallery_item()],
        "errors": [{"path": "bad/1.png", "stage": "decode", "message": "not an image"}],
        "settings": {"methods": "gradcam", "probe.epochs": 40},
        "versions": {"python": "3.11", "torch": "2.4"},
    }
    fields.update(changes)
    return ReportContent(**fields)


def test_data_strings_are_escaped_everywhere(tmp_path: Path) -> None:
    content = _content(
        findings=[_finding(EVIL_LABEL, "shortcut")],
        gallery=[_gallery_item(label=EVIL_LABEL, path=EVIL_PATH)],
        errors=[{"path": EVIL_PATH, "stage": "decode", "message": EVIL_LABEL}],
        settings={"data": EVIL_PATH, EVIL_LABEL: "x"},
    )
    html = write_report(content, tmp_path / "index.html").read_text(encoding="utf-8")

    assert "<script>alert" not in html
    assert "<img src=x" not in html
    escaped_label = "&lt;script&gt;alert(1)&lt;/script&gt;"
    escaped_path = "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"
    sections = {name: _section(html, name) for name in ("findings-section", "gallery", "errors", "settings")}
    assert escaped_label in sections["findings-section"]
    assert escaped_label in sections["gallery"] and escaped_path in sections["gallery"]
    assert escaped_label in sections["errors"] and escaped_path in sections["errors"]
    assert escaped_path in sections["settings"]
    # The parser sees only the images the renderer made (colour bar, 2 class maps, 1 mean image, the gallery item's
    # overlay and its plain image): the path did not open an <img> of its own.
    images = _parse(html).images
    assert len(images) == 6 and all((image["src"] or "").startswith("data:") for image in images)


def _section(html: str, section_id: str) -> str:
    start = html.index(f'<section id="{section_id}"')
    return html[start : html.index("</section>", start)]


def test_page_is_self_contained_and_every_image_has_alt_and_data_uri() -> None:
    html = render_report(_content())
    page = _parse(html)

    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*https?://""", html, flags=re.IGNORECASE)
    assert not [link for link in page.links if not link.startswith("data:")]
    assert "@import" not in html and "url(" not in html
    # colour bar + class map heatmaps (2) + one mean image + one gallery overlay and its plain image
    assert len(page.images) == 6
    for image in page.images:
        assert (image.get("alt") or "").strip()
        _decode(image["src"] or "")


def test_verdict_and_gate_failure_come_before_the_findings_table() -> None:
    html = render_report(_content())
    table = html.index('<table id="findings"')
    banner = re.search(r'<span class="word">\s*shortcut\s*</span>', html)
    assert banner and banner.start() < table
    assert 'class="banner verdict-shortcut"' in html
    gate = html.index("Release gate FAILED")
    assert gate < table
    # The plain-language sentence for the shortcut finding, none for the "none" finding.
    sentence = "class opacity: 41% of gradcam attention on text regions that cover 3.0% of the image"
    assert html.index(sentence) < table
    assert "class normal: " not in html[:table]


def test_gate_passed_and_no_gate() -> None:
    passed = render_report(_content(verdict="watch", gate={"fail_on": "shortcut", "failed": False}))
    assert "Release gate passed" in passed and "Release gate FAILED" not in passed
    assert "Release gate" not in render_report(_content(gate=None))


def test_findings_are_sorted_most_serious_first_and_formatted() -> None:
    html = render_report(_content())
    table = _section(html, "findings-section")
    assert table.index("opacity") < table.index("normal")
    assert "41.0%" in table and "13.2" in table and "11.0–15.1" in table
    assert 'class="verdict verdict-shortcut"' in table and 'class="verdict verdict-none"' in table


def test_weak_probe_is_warned_about() -> None:
    weak = render_report(_content(model={"kind": "probe", "arch": "cnn", "heldout_accuracy": 0.52}))
    assert "a probe that learned nothing cannot show a shortcut" in weak
    strong = render_report(_content())
    assert "a probe that learned nothing cannot show a shortcut" not in strong


def test_empty_content_renders(tmp_path: Path) -> None:
    content = _content(
        verdict="none", gate=None, findings=[], class_maps=[], gallery=[], errors=[], settings={}, versions={}
    )
    content = ReportContent(**{**content.__dict__, "counts": {"images": 0, "errors": 0}})
    html = write_report(content, tmp_path / "sub" / "index.html").read_text(encoding="utf-8")
    assert 'class="banner verdict-none"' in html
    assert "Errors (0)" in html and "Every input was processed." in html
    assert "No findings" in html and "No images to show." in html
    assert "<img" not in html
    assert not list((tmp_path / "sub").glob(".*.tmp"))


def test_errors_are_capped_with_the_total_shown() -> None:
    errors = [{"path": f"bad/{index}.png", "stage": "decode", "message": "broken"} for index in range(150)]
    html = render_report(_content(errors=errors, counts={"images": 10, "errors": 150}))
    assert "Errors (150)" in html
    assert "bad/99.png" in html and "bad/100.png" not in html
    assert "first 100 of 150" in html


def test_unknown_verdicts_are_rejected() -> None:
    with pytest.raises(DataError, match="verdict"):
        _content(verdict="bad")
    with pytest.raises(DataError, match=r"findings\[0\]"):
        render_report(_content(findings=[_finding("a", "maybe")]))


def test_overlay_decodes_to_the_image_shape_and_downsizes_large_images() -> None:
    gray = np.zeros((100, 80), np.uint8)
    decoded = _decode(figures.to_data_uri(figures.overlay_png(gray, np.ones((7, 7), np.float32), [])))
    assert decoded.shape == (100, 80, 3)

    large = np.zeros((512, 384, 3), np.uint8)
    decoded = _decode(figures.to_data_uri(figures.overlay_png(large, np.ones((7, 7)), [("text", 0, 0, 512, 512)])))
    assert decoded.shape == (256, 192, 3)


def test_overlay_with_zero_or_nan_saliency_shows_the_image_unchanged() -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 255  # pure red in RGB
    for saliency in (np.zeros((5, 5), np.float32), np.full((5, 5), np.nan, np.float32)):
        decoded = _decode(figures.to_data_uri(figures.overlay_png(rgb, saliency, [])))
        # Decoded as BGR: red is the last channel; no heatmap where there is no attention.
        assert np.array_equal(decoded, np.broadcast_to(np.array([0, 0, 255], np.uint8), (40, 60, 3)))


def test_overlay_draws_boxes_in_the_colour_of_their_kind() -> None:
    gray = np.zeros((64, 64), np.uint8)
    decoded = _decode(figures.to_data_uri(figures.overlay_png(gray, np.zeros((4, 4)), [("text", 10, 20, 30, 40)])))
    vermillion_bgr = [0x00, 0x5E, 0xD5]
    assert decoded[20, 10].tolist() == vermillion_bgr  # top-left corner
    assert decoded[39, 29].tolist() == vermillion_bgr  # x1/y1 are exclusive: last pixel inside
    assert decoded[30, 30].tolist() == [0, 0, 0]  # just right of the box
    assert decoded[40, 20].tolist() == [0, 0, 0]  # just below the box
    assert decoded[30, 20].tolist() == [0, 0, 0]  # inside the box: untouched


def test_heatmap_of_zero_saliency_is_uniform_and_resized() -> None:
    decoded = _decode(figures.to_data_uri(figures.heatmap_png(np.zeros((7, 7), np.float32), (64, 48))))
    assert decoded.shape == (64, 48, 3)
    assert (decoded == decoded[0, 0]).all()

    peaked = np.zeros((7, 7), np.float32)
    peaked[3, 3] = 5.0  # not normalised: the figure normalises
    decoded = _decode(figures.to_data_uri(figures.heatmap_png(peaked)))
    assert decoded.shape == (figures.DEFAULT_MAP_SIDE, figures.DEFAULT_MAP_SIDE, 3)
    assert len(np.unique(decoded.reshape(-1, 3), axis=0)) > 1


def test_figures_reject_unusable_shapes() -> None:
    with pytest.raises(ShapeError):
        figures.overlay_png(np.zeros((8, 8, 4), np.uint8), np.zeros((4, 4)), [])
    with pytest.raises(ShapeError):
        figures.heatmap_png(np.zeros((2, 3, 4), np.float32))
