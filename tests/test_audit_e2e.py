"""End to end: the demo's planted shortcut is found, a balanced demo shows none, bad files are listed and skipped.

These train real (small) probe models, so they take a minute or two; they run in CI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit.config import build_config
from audit.data.demo import SQUARE_BOX, write_demo
from audit.errors import DataError
from audit.pipeline import run_pipeline
from audit.store.catalog import query
from flows.cli import EXIT_ERROR, EXIT_GATE, main

# Small but with margin: 240 images, 96 px probe, 40 epochs (see README, "Tests"). Fewer training steps leave the
# probe at chance on the balanced demo, and a model at chance flips on any perturbation.
DEMO = {"n": 240, "seed": 3}
PROBE = ["--probe-size", "96", "--probe-epochs", "40"]

pytestmark = pytest.mark.slow


def _finding(summary: dict, label: str, kind: str) -> dict:
    (row,) = [f for f in summary["findings"] if f["label"] == label and f["region_kind"] == kind and f["group"] is None]
    return row


@pytest.fixture(scope="module")
def shortcut_audit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("demo90")
    write_demo(root / "data", shortcut_rate=0.9, **DEMO)
    code = main(
        [
            "run",
            "--data",
            str(root / "data"),
            "--out",
            str(root / "out"),
            "--no-prefect",
            "--quiet",
            "--fail-on",
            "shortcut",
            *PROBE,
        ]
    )
    return root / "out", code


def test_planted_shortcut_is_found_and_gates_the_release(shortcut_audit: tuple[Path, int]) -> None:
    out, code = shortcut_audit
    summary = json.loads((out / "summary.json").read_text())
    token = _finding(summary, "opacity", "text")
    assert token["verdict"] == "shortcut", token
    # All three kinds of evidence: attention, decisions that depend on the token, and the token's own leakage.
    assert token["attention"] and token["dependence"] and token["leakage"], token
    assert token["ci_low"] > 2, token
    assert token["flip_rate"] > token["flip_rate_control"] + 0.3, token
    assert token["flip_difference_ci_low"] > 0.1 and token["leakage_auc_ci_low"] > 0.5, token
    assert token["n_counterfactual"] == token["n_with_region"], token  # every carrier was tested
    for label in ("normal", "opacity"):  # the marker is in every image: never a shortcut
        assert _finding(summary, label, "marker")["verdict"] != "shortcut"
    assert summary["verdict"] == "shortcut"
    assert code == EXIT_GATE and summary["gate"] == {"fail_on": "shortcut", "failed": True}
    assert summary["model"]["heldout_accuracy"] > 0.7  # the probe learned something, from held-out images


def test_outputs_and_tables_agree(shortcut_audit: tuple[Path, int]) -> None:
    out, _ = shortcut_audit
    for name in ("index.html", "summary.json", "audit.duckdb"):
        assert (out / name).is_file()
    _, rows = query(out, "SELECT count(*) FROM images")
    assert rows == [(DEMO["n"],)]
    # One attribution row per image × method × region kind (text, marker, border, watermark).
    _, rows = query(out, "SELECT count(*), count(DISTINCT region_kind) FROM attributions")
    assert rows == [(DEMO["n"] * 4, 4)]
    _, rows = query(out, "SELECT verdict FROM findings WHERE label = 'opacity' AND region_kind = 'text'")
    assert rows == [("shortcut",)]
    # Enrichment is mass / area wherever a region is present, NaN elsewhere.
    _, rows = query(out, "SELECT max(abs(enrichment - mass_fraction / area_fraction)) FROM attributions WHERE present")
    assert rows[0][0] < 1e-3
    html = (out / "index.html").read_text()
    assert "SHORTCUT" in html.upper() and "data:image/png;base64," in html


def test_balanced_demo_has_no_shortcut(tmp_path: Path) -> None:
    write_demo(tmp_path / "data", shortcut_rate=0.5, **DEMO)
    config = build_config(
        data=tmp_path / "data",
        out=tmp_path / "out",
        fail_on="shortcut",
        **{"probe.image_size": 96, "probe.epochs": 40},
    )
    summary = run_pipeline(config)
    assert summary["model"]["heldout_accuracy"] > 0.8  # the probe learned the real signal
    assert [f for f in summary["findings"] if f["verdict"] == "shortcut"] == []
    assert summary["gate"]["failed"] is False
    for label in ("normal", "opacity"):
        token = _finding(summary, label, "text")
        assert not token["leakage"] and not token["dependence"], token
        # Removing the token changes the explained class's probability about as much as removing an equal-area
        # control does: within the control's interval, give or take two percentage points.
        assert token["effect_control_ci_low"] - 0.02 <= token["effect"] <= token["effect_control_ci_high"] + 0.02
        assert token["flip_difference_ci_low"] < 0.1, token


def test_a_shortcut_no_detector_knows_is_discovered(tmp_path: Path) -> None:
    """A bright square at a fixed off-centre position in most opacity images (and never in normal ones): no
    detector looks for it (the watermark detector, which would, is off), so only the discovery step can show it."""
    write_demo(tmp_path / "data", n=200, seed=5, shortcut_rate=0.5, square_rate=0.5)
    config = build_config(
        data=tmp_path / "data",
        out=tmp_path / "out",
        **{"probe.image_size": 96, "probe.epochs": 40, "regions.watermark": False},
    )
    summary = run_pipeline(config)
    x0, y0, x1, y1 = SQUARE_BOX
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    found = [
        c
        for c in summary["clusters"]
        if c["label"] == "opacity" and abs(c["peak_x"] - centre[0]) <= 0.08 and abs(c["peak_y"] - centre[1]) <= 0.08
    ]
    assert found, summary["clusters"]
    # Half of the class carries the square, so it is the class's main cluster (not "suspicious" by distinctness,
    # which needs a minority pattern or an expected region; README, "Shortcuts nobody named").
    assert max(c["share"] for c in found) >= 0.3, found
    # No cluster of the normal class (which never has the square) peaks there.
    assert not [
        c
        for c in summary["clusters"]
        if c["label"] == "normal" and abs(c["peak_x"] - centre[0]) <= 0.08 and abs(c["peak_y"] - centre[1]) <= 0.08
    ]


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Good images of two classes plus a truncated JPEG, a text file named .png and an empty file."""
    demo = tmp_path / "demo"
    write_demo(demo, n=16, shortcut_rate=0.5, seed=1)
    data = tmp_path / "data"
    shutil.copytree(demo / "normal", data / "normal")
    shutil.copytree(demo / "opacity", data / "opacity")
    buffer = data / "normal" / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96), dtype=np.uint8)).save(buffer, quality=90)
    buffer.write_bytes(buffer.read_bytes()[: buffer.stat().st_size // 2])
    (data / "opacity" / "notes.png").write_text("this is not an image\n")
    (data / "opacity" / "empty.png").write_bytes(b"")
    return data


def test_bad_files_are_listed_and_the_rest_is_audited(messy_folder: Path, tmp_path: Path) -> None:
    code = main(
        [
            "run",
            "--data",
            str(messy_folder),
            "--out",
            str(tmp_path / "out"),
            "--no-prefect",
            "--quiet",
            "--probe-size",
            "64",
            "--probe-epochs",
            "1",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["images"] == 16 and summary["counts"]["errors"] == 3
    _, rows = query(tmp_path / "out", "SELECT path, stage, message FROM errors ORDER BY path")
    by_path = {path: (stage, message) for path, stage, message in rows}
    assert set(by_path) == {"normal/truncated.jpg", "opacity/notes.png", "opacity/empty.png"}
    assert "truncated" in by_path["normal/truncated.jpg"][1]
    assert "not a readable image" in by_path["opacity/notes.png"][1]
    assert "empty file" in by_path["opacity/empty.png"][1]
    assert all(stage == "decode" for stage, _ in by_path.values())
    assert "truncated.jpg" in (tmp_path / "out" / "index.html").read_text()


def test_missing_or_empty_dataset_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--no-prefect"])
    assert code == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        run_pipeline(build_config(data=tmp_path / "empty", out=tmp_path / "out"))
    assert not (tmp_path / "out" / "summary.json").exists()


def test_every_registered_method_runs_through_audit_run(tmp_path: Path) -> None:
    """`audit run --methods <every method>` on a tiny dataset: a row per image × method × region kind, a sanity
    verdict per method, and maps that are finite."""
    from audit.saliency import method_names

    write_demo(tmp_path / "data", n=8, shortcut_rate=0.5, seed=4, size=64)
    config = tmp_path / "audit.toml"
    config.write_text(
        "[saliency]\nig_steps = 4\nsmoothgrad_samples = 2\nrise_masks = 8\nocclusion_window = 16\n"
        "occlusion_stride = 16\nigos_iterations = 1\nigos_steps = 2\n"
    )
    methods = [*method_names(), "smoothgrad:gradient_x_input"]
    code = main(
        [
            "run",
            "--config",
            str(config),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
            "--methods",
            ",".join(methods),
            "--no-prefect",
            "--quiet",
            "--probe-size",
            "32",
            "--probe-epochs",
            "1",
        ]
    )
    assert code == 0
    _, rows = query(tmp_path / "out", "SELECT method, count(*) FROM attributions GROUP BY method")
    assert dict(rows) == {m: 8 * 4 for m in methods}  # 8 images × 4 region kinds
    _, rows = query(tmp_path / "out", "SELECT method FROM sanity")
    assert sorted(r[0] for r in rows) == sorted(methods)
    _, rows = query(tmp_path / "out", "SELECT count(*) FROM maps WHERE NOT isfinite(map_scale)")
    assert rows == [(0,)]
