"""The local runner: results in the order of the items, and each reported as it arrives (the progress bar)."""

from __future__ import annotations

import io
import time

import pytest

from audit.pipeline import LocalRunner
from audit.progress import ShardProgress


def _shard(index: int, images: int) -> dict:
    time.sleep(0.02 * (3 - index))  # later items tend to finish first
    return {"shard": index, "images": images}


@pytest.mark.parametrize("workers", [1, 3])
def test_map_returns_results_in_item_order_and_reports_each_once(workers: int) -> None:
    seen: list[int] = []
    results = LocalRunner(workers).map(_shard, [(0, 5), (1, 6), (2, 7)], on_result=lambda r: seen.append(r["shard"]))
    assert [r["shard"] for r in results] == [0, 1, 2]
    assert sorted(seen) == [0, 1, 2]


def test_a_failing_shard_fails_the_map() -> None:
    def boom(index: int) -> dict:
        raise OSError(f"disk gone at {index}")

    with pytest.raises(OSError, match="disk gone"):
        LocalRunner(2).map(boom, [(0,), (1,)])


def test_progress_counts_images_of_finished_shards() -> None:
    screen = io.StringIO()
    progress = ShardProgress("explain", total=18, count="images", enabled=True, file=screen)
    for result in ({"images": 5}, {"images": 6}, "not a dict"):
        progress(result)
    assert progress.bar.n == 11
    progress.close()
    assert "11/18" in screen.getvalue() and "img/s" in screen.getvalue()
    quiet = ShardProgress("explain", total=18, count="images", enabled=False)
    assert quiet.bar.disable
