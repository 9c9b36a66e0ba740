"""``make bench-report``: the report of a 2,000-image demo audit: its size against the budget and its render time in
Chromium, and the screenshot the README shows.

The audit runs the demo (256 px images, planted shortcut at R = 0.9) with a quick probe (96 px, 15 epochs): the
report's size depends on the number of classes, region kinds, methods and gallery images, not on the probe. The
page is then loaded from disk by Debian's Chromium (Playwright), five times in fresh pages; the time to the
``load`` event (everything decoded and laid out) and to the first contentful paint are reported, median and
maximum. Writes ``reports/bench/report.json`` and ``docs/report.png``.

Usage::

    python -m benchmarks.report [--images 2000] [--keep DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, "Benchmarks"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from audit.config import build_config  # noqa: E402
from audit.data.demo import write_demo  # noqa: E402
from audit.pipeline import run_pipeline  # noqa: E402
from audit.report.html import SIZE_BUDGET_BYTES  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]


def render_times(page_path: Path, screenshot: Path | None, rounds: int = 5) -> dict:
    """Seconds to the load event and to the first contentful paint, each load in a fresh page."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("Debian's chromium is not installed (make browser)")
    loads, paints = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        for round_index in range(rounds):
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            start = time.perf_counter()
            page.goto(page_path.as_uri(), wait_until="load")
            loads.append(time.perf_counter() - start)
            paint = page.evaluate(
                "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || null"
            )
            paints.append(None if paint is None else paint / 1000.0)
            if screenshot is not None and round_index == 0:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=False)
            page.close()
        browser.close()
    measured = [p for p in paints if p is not None]
    return {
        "load_seconds": loads,
        "load_median": statistics.median(loads),
        "load_max": max(loads),
        "first_paint_median": statistics.median(measured) if measured else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--keep", type=Path, help="keep the demo data and audit in this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "report.json")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "report.png")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-report-"))
    try:
        start = time.perf_counter()
        write_demo(work / "data", n=args.images, shortcut_rate=0.9, seed=0)
        config = build_config(
            None, data=work / "data", out=work / "out", **{"probe.image_size": 96, "probe.epochs": 15}
        )
        summary = run_pipeline(config)
        audit_seconds = time.perf_counter() - start
        page = work / "out" / "index.html"
        size = page.stat().st_size
        times = render_times(page, args.screenshot)
        results = {
            "images": summary["counts"]["images"],
            "findings": summary["counts"]["findings"],
            "verdict": summary["verdict"],
            "report_bytes": size,
            "budget_bytes": SIZE_BUDGET_BYTES,
            "within_budget": size <= SIZE_BUDGET_BYTES,
            "audit_seconds": audit_seconds,
            **times,
            "load_average": os.getloadavg(),
        }
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(
        f"report of a {results['images']}-image demo audit: {size / 1e6:.2f} MB (budget {SIZE_BUDGET_BYTES / 1e6:.0f} "
        f"MB: {'within' if results['within_budget'] else 'OVER'}); load event {results['load_median']:.2f} s median, "
        f"{results['load_max']:.2f} s max of 5; first paint {results['first_paint_median'] or float('nan'):.2f} s; "
        f"screenshot {args.screenshot}"
    )
    return 0 if results["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
