"""The detection cache: results by image content and detector version, reused by later audits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from audit.config import build_config
from audit.data.demo import write_demo
from audit.pipeline import ingest_shard, plan
from audit.regions import DETECTORS, Detection
from audit.regions.cache import RegionCache
from audit.store.parquet import read_table


def test_store_and_lookup_round_trip(tmp_path: Path) -> None:
    cache = RegionCache(tmp_path)
    box = Detection("text", 1, 2, 30, 12, 0.9, "text", "v1")
    cache.store("text", "v1", {"aaa": [box], "bbb": []})
    found = cache.lookup("text", "v1", ["aaa", "bbb", "ccc"])
    assert found == {"aaa": [box], "bbb": []}  # "nothing found" is remembered; unknown ids are absent
    assert cache.lookup("text", "v2", ["aaa"]) == {}  # a new detector version sees nothing
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count every call of every registered detector's ``detect``."""
    calls = {"n": 0}
    for name in DETECTORS.names():
        cls = DETECTORS.get(name)
        original = cls.detect

        def counting(self, image, original=original):  # noqa: ANN001, ANN202
            calls["n"] += 1
            return original(self, image)

        monkeypatch.setattr(cls, "detect", counting)
    return calls


def test_a_second_audit_of_the_same_data_runs_no_detector(tmp_path: Path, counted: dict[str, int]) -> None:
    write_demo(tmp_path / "data", n=12, shortcut_rate=0.9, seed=5, size=96)
    settings = {"data": tmp_path / "data", "shard_size": 5, "regions.cache_dir": tmp_path / "cache"}
    first = plan(build_config(out=tmp_path / "first", **settings))
    results = [ingest_shard(first, s) for s in first.shards]
    assert sum(r["detector_calls"] for r in results) == 12 * 2 == counted["n"]  # text and border, every image

    # Another model on the same data: a new output folder, the same cache.
    second = plan(build_config(out=tmp_path / "second", **{**settings, "probe.seed": 7}))
    results = [ingest_shard(second, s) for s in second.shards]
    assert sum(r["detector_calls"] for r in results) == 0 and counted["n"] == 24
    columns = ["image_id", "kind", "x0", "y0", "x1", "y1", "detector"]
    rows = [
        sorted(read_table(d, "regions").select(columns).to_pylist(), key=str)
        for d in (first.config.out, second.config.out)
    ]
    assert rows[0] == rows[1] and rows[0]

    # A renamed copy is the same content: still no detector call. An edited image is new content: detected.
    shutil.copy(tmp_path / "data" / "normal" / "normal_00000.png", tmp_path / "data" / "normal" / "copy.png")
    (tmp_path / "data" / "opacity" / "opacity_00011.png").write_bytes(
        (tmp_path / "data" / "normal" / "normal_00001.png").read_bytes()[:-1] + b"\0"
    )
    third = plan(build_config(out=tmp_path / "third", **settings))
    before = counted["n"]
    [ingest_shard(third, s) for s in third.shards]
    assert counted["n"] - before <= 2  # at most the edited file, if it still decodes (each detector once)


def test_cache_can_be_switched_off(tmp_path: Path, counted: dict[str, int]) -> None:
    write_demo(tmp_path / "data", n=4, shortcut_rate=0.5, seed=6, size=96)
    settings = {"data": tmp_path / "data", "regions.cache": False}
    for out in ("a", "b"):
        p = plan(build_config(out=tmp_path / out, **settings))
        [ingest_shard(p, s) for s in p.shards]
    assert counted["n"] == 2 * 4 * 2
