"""The report in a real browser: Debian's Chromium, driven by Playwright (README, "The report").

A small demo audit with a planted shortcut, whose 'opacity' class is renamed to a hostile label, is opened from
disk. The test reads the verdict, sorts the findings by enrichment both ways, filters them, pages and opens the
gallery, takes a screenshot, and checks that the page logged no console error, raised no script error, opened
no alert (the hostile label stays text) and requested nothing but its own file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from audit.config import build_config
from audit.data.demo import write_demo
from audit.pipeline import run_pipeline

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is a test dependency (pip install -e .[test])"
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed: `make browser` (as root) or apt-get install chromium"
)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
EVIL = '<img src=x onerror="alert(1)">'


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("browser")
    write_demo(root / "data", n=160, size=96, shortcut_rate=0.9, seed=2)
    rows = list(csv.DictReader((root / "data" / "manifest.csv").open()))
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([(r["path"], EVIL if r["label"] == "opacity" else r["label"]) for r in rows])
    config = build_config(
        None,
        data=root / "data",
        manifest=root / "manifest.csv",
        out=root / "out",
        gallery_size=10,  # more than one page of 8 per region kind
        workers=1,
        **{"probe.image_size": 64, "probe.epochs": 12, "counterfactual.max_images_per_class": 40},
    )
    summary = run_pipeline(config)
    return root / "out" / "index.html", summary


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        instance.close()


def _numbers(page, column: str) -> list[float | None]:
    cells = page.query_selector_all(f"#findings tbody tr:not([hidden]) td:nth-child({column})")
    return [None if c.get_attribute("data-sort") == "" else float(c.get_attribute("data-sort")) for c in cells]


def test_report_in_chromium(report: tuple[Path, dict], browser, tmp_path: Path) -> None:
    path, summary = report
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console, errors, alerts, requests = [], [], [], []
    page.on("console", lambda message: console.append((message.type, message.text)))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (alerts.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.as_uri())

    # At a glance: the verdict word, the same as summary.json's.
    banner = page.locator("#verdict .banner .word")
    assert banner.is_visible()
    assert banner.inner_text().strip().lower() == summary["verdict"]
    assert page.locator("#verdict .sentences li").count() >= 1  # one line per finding at watch or above

    # The findings table: visible, sortable by enrichment (largest first, then smallest first, missing last).
    table = page.locator("#findings")
    assert table.is_visible()
    n_rows = page.locator("#findings tbody tr").count()
    assert n_rows == len(summary["findings"])
    enrichment = "8"  # the column's position
    page.click("#findings th[data-key=enrichment] button")
    assert page.get_attribute("#findings th[data-key=enrichment]", "aria-sort") == "descending"
    values = _numbers(page, enrichment)
    present = [v for v in values if v is not None]
    assert present == sorted(present, reverse=True) and len(present) >= 2
    assert values[: len(present)] == present  # missing values last
    page.click("#findings th[data-key=enrichment] button")
    present = [v for v in _numbers(page, enrichment) if v is not None]
    assert present == sorted(present)

    # Filtering by a class name shows only that class's rows, and says how many.
    page.fill("#findings-filter", "normal")
    labels = [c.inner_text() for c in page.query_selector_all("#findings tbody tr:not([hidden]) td:nth-child(1)")]
    assert labels and set(labels) == {"normal"}
    assert f"of {n_rows} findings" in page.inner_text("#findings-count")
    page.fill("#findings-filter", "")

    # The gallery: paged per region kind, and an item opens in a dialog with its counterfactual result.
    group = page.locator(".gallery-group").first
    visible = group.locator(".gallery-item:not([hidden])")
    assert 1 <= visible.count() <= 8
    if group.get_attribute("data-pages") != "1":
        first = visible.first.locator("dd.path").first.inner_text()
        group.locator(".pager .next").click()
        assert group.locator(".gallery-item:not([hidden])").first.locator("dd.path").first.inner_text() != first
        group.locator(".pager .prev").click()
    visible.first.locator("button.open").click()
    dialog = page.locator("#gallery-dialog")
    assert dialog.is_visible()
    assert "counterfactual" in dialog.inner_text()
    assert dialog.locator(".large img").evaluate("img => img.complete && img.naturalWidth > 0")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    page.keyboard.press("Escape")
    assert not dialog.is_visible()

    # The hostile label is shown as text and ran nothing.
    assert EVIL in page.inner_text("#findings")
    assert alerts == []
    assert errors == [], errors
    assert [m for m in console if m[0] == "error"] == [], console
    assert requests == [path.as_uri()]  # nothing but the page itself: no CDN, no font, no image fetched
    page.close()


def test_print_shows_every_gallery_image(report: tuple[Path, dict], browser) -> None:
    path, _ = report
    page = browser.new_page()
    page.goto(path.as_uri())
    page.emulate_media(media="print")
    items = page.locator(".gallery-item")
    assert items.count() > 8
    assert all(items.nth(i).is_visible() for i in range(items.count()))
    assert not page.locator(".toolbar").is_visible()
    page.close()


def test_summary_json_matches_the_page(report: tuple[Path, dict]) -> None:
    path, summary = report
    written = json.loads((path.parent / "summary.json").read_text())
    assert written["verdict"] == summary["verdict"]
    assert any(f["label"] == EVIL for f in written["findings"])
