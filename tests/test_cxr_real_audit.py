"""The audit on real radiographs: a probe told to separate Hannover from Kermany images (shared/data/cxr-real,
attribution in its README). The report must say, with numbers, whether the probe's attention and its decisions
depend on markers, text and borders."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from audit.config import build_config
from audit.data.cxr_real import write_source_manifest
from audit.pipeline import run_pipeline

CXR_REAL = Path(os.environ.get("CXR_REAL", Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-real"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CXR_REAL / "regions.csv").is_file(), reason="shared/data/cxr-real is not available"),
]


def test_source_probe_on_real_radiographs_reports_attention_dependence_and_leakage(tmp_path: Path) -> None:
    manifest = write_source_manifest(CXR_REAL, tmp_path / "manifest.csv", kermany_per_class=40)
    config = build_config(
        data=CXR_REAL,
        manifest=manifest,
        out=tmp_path / "out",
        **{"probe.image_size": 96, "probe.epochs": 30, "regions.cache_dir": tmp_path / "cache"},
    )
    summary = run_pipeline(config)
    assert summary["counts"]["images"] == 120 + 80 and summary["counts"]["errors"] == 0
    assert summary["model"]["heldout_accuracy"] > 0.9  # adult vs child radiographs: an easy task
    rows = {(f["label"], f["region_kind"]): f for f in summary["findings"] if f["group"] is None}
    # Hannover carries grey-box markers on almost every bedside image: measured with every kind of evidence.
    for kind in ("marker", "text", "border"):
        row = rows[("hannover", kind)]
        assert row["n_with_region"] > 0, row
        for number in ("enrichment", "ci_low", "flip_rate", "flip_rate_control", "leakage_auc"):
            assert row[number] is not None and math.isfinite(row[number]), (kind, number, row)
        assert row["verdict"] in ("none", "watch", "shortcut")
    # Markers are on both sources (Kermany's small "R"), so their presence alone predicts the source less well
    # than the grey-box style would; the leakage AUC is a number in [0, 1] with its interval around it.
    marker = rows[("hannover", "marker")]
    assert marker["leakage_auc_ci_low"] <= marker["leakage_auc"] <= marker["leakage_auc_ci_high"]
    html = (tmp_path / "out" / "index.html").read_text()
    assert "flips: region vs control" in html and "leakage AUC" in html
    assert f"{marker['flip_rate']:.0%} vs {marker['flip_rate_control']:.0%}" in html
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["schema_version"] == 3 and saved["leakage"]
