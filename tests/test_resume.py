"""Resume and incremental audits (README, "Resume and incremental audits").

A run killed with SIGKILL at any point and started again ends with exactly the rows of an uninterrupted run,
recomputing only the unfinished shards; a finished audit re-run with no change does no model work; a dataset that
grew is audited only for its new files; a changed file is found by its content.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from audit.config import build_config
from audit.data.demo import write_demo
from audit.data.manifest import ManifestEntry
from audit.pipeline import run_pipeline
from audit.store.parquet import read_table
from audit.store.schemas import TABLES
from audit.store.state import assign_shards, plan_record

pytestmark = pytest.mark.slow

SETTINGS = {"shard_size": 10, "gallery_size": 2, "probe.image_size": 64, "probe.epochs": 3, "workers": 1}


def _sorted_rows(table: pa.Table, drop: tuple[str, ...] = ()) -> list[tuple]:
    names = [n for n in table.column_names if n not in drop]
    rows = [tuple(repr(row[n]) for n in names) for row in table.select(names).to_pylist()]
    return sorted(rows)


def _tables(out: Path, drop: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    return {name: _sorted_rows(read_table(out, name), drop) for name in TABLES}


def _markers(out: Path, stage: str) -> dict[str, int]:
    """Marker file → its modification time (ns): a marker rewritten by a later run gets a new time."""
    return {p.name: p.stat().st_mtime_ns for p in (out / "work" / "done").glob(f"{stage}-*.json")}


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.toml"
    path.write_text(
        "shard_size = 10\ngallery_size = 2\nworkers = 1\n"
        'methods = ["gradcam", "integrated_gradients"]\n'
        "[probe]\nimage_size = 64\nepochs = 3\n",
        encoding="utf-8",
    )
    return path


def _audit_command(data: Path, out: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--no-prefect", "--config", str(config)] + [
        "--data",
        str(data),
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("stage", ["ingest", "explain"])
def test_a_run_killed_mid_way_and_restarted_equals_an_uninterrupted_run(tmp_path: Path, stage: str) -> None:
    data = tmp_path / "data"
    write_demo(data, n=60, shortcut_rate=0.9, seed=4)
    config = _config_file(tmp_path)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _audit_command(data, killed, config), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    # SIGKILL as soon as the stage has finished its first shard (of 6): mid-way through the stage.
    deadline = time.monotonic() + 600
    while not _markers(killed, stage) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0].decode(errors="replace")
    assert process.returncode == -signal.SIGKILL, output  # it was still running: killed, not finished
    done_before = _markers(killed, stage)
    assert 1 <= len(done_before) < 6, done_before

    restarted = subprocess.run(
        _audit_command(data, killed, config), env=env, capture_output=True, text=True, timeout=900
    )
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    # Only the unfinished shards were computed again: the finished ones kept their markers untouched.
    after = _markers(killed, stage)
    assert len(after) == 6
    assert all(after[name] == mtime for name, mtime in done_before.items())
    log = restarted.stdout + restarted.stderr
    redone = 6 - len(done_before)
    if stage == "explain":
        assert f"explained {redone} " in log, log
    else:
        assert f"ingested {redone}," in log, log

    clean = tmp_path / "clean"
    uninterrupted = subprocess.run(
        _audit_command(data, clean, config),
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache-clean")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr
    expected, got = _tables(clean), _tables(killed)
    for name in TABLES:
        assert got[name] == expected[name], f"table {name} differs after the restart"
    assert len(got["images"]) == 60
    # No stray temporary file is left behind.
    assert not list(killed.rglob("*.tmp")) and not list(killed.rglob("*.tmp.npz"))


def test_a_finished_audit_rerun_does_no_model_work_and_a_changed_file_is_found(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_demo(data, n=40, shortcut_rate=0.9, seed=5)
    config = build_config(data=data, out=tmp_path / "out", **SETTINGS)
    first = run_pipeline(config)
    assert first["work"]["explained"] == 4 and first["work"]["ingested"] == 4
    tables = _tables(config.out)

    again = run_pipeline(config)
    assert again["work"] == {
        "shards": 4,
        "ingested": 0,
        "explained": 0,
        "images_explained": 0,
        "detector_calls": 0,
    }
    assert _tables(config.out) == tables
    assert again["findings"] == first["findings"]

    # Overwrite one image with other pixels: its shard is read again and gets the new content's id.
    victim = sorted((data / "opacity").glob("*.png"))[0]
    old_id = read_table(config.out, "images").to_pylist()
    old_id = next(r["image_id"] for r in old_id if r["path"].endswith(victim.name))
    import cv2

    image = cv2.imread(str(victim), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(victim), 255 - image)
    changed = run_pipeline(config)
    assert changed["work"]["ingested"] == 1
    ids = set(read_table(config.out, "images").column("image_id").to_pylist())
    assert old_id not in ids and len(ids) == 40

    # A file removed from the dataset: its shard is dissolved, its rows leave every table, nothing is duplicated.
    gone = sorted((data / "normal").glob("*.png"))[3]
    gone.unlink()
    shrunk = run_pipeline(config)
    images = read_table(config.out, "images")
    assert images.num_rows == 39 and len(set(images.column("image_id").to_pylist())) == 39
    assert not any(p.endswith(gone.name) for p in images.column("path").to_pylist())
    # Only the other 9 files of that shard are read again, in a new shard; the probe's training sample changed,
    # so it is retrained and every shard is explained again (README: incremental audits need a fixed model).
    assert shrunk["work"]["ingested"] == 1 and shrunk["work"]["shards"] == 4
    assert shrunk["work"]["explained"] == 4
    attributions = read_table(config.out, "attributions")
    assert set(attributions.column("image_id").to_pylist()) == set(images.column("image_id").to_pylist())


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "label": r["label"]} for r in rows)


def test_a_grown_dataset_is_audited_only_for_its_new_images(tmp_path: Path) -> None:
    import timm

    data = tmp_path / "data"
    write_demo(data, n=60, shortcut_rate=0.9, seed=6)
    with (data / "manifest.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    settings = {
        "shard_size": 10,
        "gallery_size": 2,
        "workers": 1,
        "model.path": checkpoint,
        "model.arch": "resnet10t",
        "model.image_size": 64,
    }
    # The first audit sees 20 images of each class; the dataset then grows by 10 of each.
    _write_manifest(tmp_path / "old.csv", rows[:20] + rows[30:50])
    _write_manifest(tmp_path / "all.csv", rows)
    grown_out = tmp_path / "grown"
    run_pipeline(build_config(data=data, manifest=tmp_path / "old.csv", out=grown_out, **settings))
    grown = run_pipeline(build_config(data=data, manifest=tmp_path / "all.csv", out=grown_out, **settings))
    assert grown["work"]["shards"] == 6
    assert grown["work"]["explained"] == 2 and grown["work"]["images_explained"] == 20
    assert grown["counts"]["images"] == 60

    scratch = tmp_path / "scratch"
    run_pipeline(build_config(data=data, manifest=tmp_path / "all.csv", out=scratch, **settings))
    # The same rows as auditing the grown dataset from scratch (which cuts its shards differently).
    for name in ("images", "attributions", "maps", "regions", "counterfactuals"):
        assert _tables(grown_out, drop=("shard",))[name] == _tables(scratch, drop=("shard",))[name], name
    assert (
        grown["findings"]
        == run_pipeline(build_config(data=data, manifest=tmp_path / "all.csv", out=scratch, **settings))["findings"]
    )


def test_shards_of_the_previous_plan_survive_growth_and_a_changed_shard_is_dissolved() -> None:
    entries = [ManifestEntry(f"a/{i}.png", "a") for i in range(7)]
    first = assign_shards(entries, None, 3)
    assert [i for i, _ in first] == [0, 1, 2] and [len(e) for _, e in first] == [3, 3, 1]
    record = plan_record(first)

    # Two new files and one removed (a/4.png, in shard 1): shard 1 is dissolved, its others join the new shards.
    grown = [e for e in entries if e.path != "a/4.png"] + [ManifestEntry("a/7.png", "a"), ManifestEntry("a/8.png", "a")]
    second = assign_shards(grown, record, 3)
    indices = [i for i, _ in second]
    assert indices[:2] == [0, 2]  # kept at their old indices
    assert all(i >= 3 for i in indices[2:])  # new shards never reuse an index
    paths = [e.path for _, members in second for e in members]
    assert sorted(paths) == sorted(e.path for e in grown) and len(paths) == len(set(paths))
    assert dict(second)[0] == first[0][1]

    # A changed label dissolves the shard too: its outputs were made with the old label.
    relabelled = [ManifestEntry(e.path, "b") if e.path == "a/0.png" else e for e in entries]
    third = assign_shards(relabelled, record, 3)
    assert 0 not in dict(third)
    assert np.sum([len(m) for _, m in third]) == 7
