"""Audits at once, and readers during an audit.

Two audits writing into different output folders at the same time (sharing the region cache, and with Prefect one
``PREFECT_HOME``) each end with exactly the tables of that audit run alone; readers querying ``OUT/audit.duckdb``
while an audit rewrites it always get a complete, consistent answer; the region cache keeps every entry, once,
under many writers and readers at once, and tolerates parts that vanish or are damaged.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data.decode import MAX_SIDE
from audit.data.demo import write_demo
from audit.regions.base import Detection
from audit.regions.cache import RegionCache
from audit.store.catalog import CATALOG_NAME, build_catalog, query
from audit.store.parquet import read_table
from audit.store.schemas import TABLES

SIDE = f"side-{MAX_SIDE}"  # the cache's folder level for the decoding scale (regions/cache.py)

# Tiny and fast: 60 images of 64 px, shards of 10 (six shards, two at a time), a 2-epoch probe at 64 px, Grad-CAM
# only, no counterfactual test and no discovery (each run takes about 9 s on a 2-core machine).
CONFIG = """\
shard_size = 10
gallery_size = 2
workers = 2
methods = ["gradcam"]
[probe]
image_size = 64
epochs = 2
[counterfactual]
enabled = false
[discovery]
enabled = false
[regions]
cache_dir = "{cache}"
"""
DETECTORS = ("text", "border")
# One snapshot of three tables: a catalog half replaced, or tables from two different runs, would not agree.
CONSISTENCY = (
    "SELECT (SELECT count(*) FROM images) AS images, (SELECT count(DISTINCT image_id) FROM attributions) AS explained, "
    "(SELECT count(DISTINCT image_id) FROM maps) AS maps, "
    "(SELECT max(mass_fraction) FROM attributions WHERE isfinite(mass_fraction)) AS mass"
)


def _config(folder: Path, cache: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "audit.toml"
    path.write_text(CONFIG.format(cache=cache.as_posix()), encoding="utf-8")
    return path


def _audit(data: Path, out: Path, config: Path, *, prefect: bool = False) -> list[str]:
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--data", str(data)]
    return command + ["--out", str(out), "--quiet"] + ([] if prefect else ["--no-prefect"])


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115  (closed by _finish)
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    process.log_handle = handle  # type: ignore[attr-defined]
    return process


def _finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.log_handle.close()  # type: ignore[attr-defined]
    assert code == 0, f"{' '.join(process.args)} exited {code}:\n{log.read_text(errors='replace')[-4000:]}"


def _sorted_rows(out: Path, table: str) -> list[tuple]:
    """Every row of ``table`` as a tuple of exact reprs (floats to the last bit, NaN included), sorted."""
    rows = read_table(out, table).to_pylist()
    return sorted(tuple(repr(row[name]) for name in TABLES[table].names) for row in rows)


def _tables(out: Path) -> dict[str, list[tuple]]:
    return {table: _sorted_rows(out, table) for table in TABLES}


def _assert_same_tables(out: Path, reference: dict[str, list[tuple]]) -> None:
    tables = _tables(out)
    for table in TABLES:
        assert tables[table] == reference[table], f"{out}: table {table} differs from the audit run alone"
    assert reference["images"] and reference["regions"] and reference["attributions"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data") / "demo"
    write_demo(data, n=60, shortcut_rate=0.9, seed=1, size=64)
    return data


@pytest.fixture(scope="module")
def alone(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple]]]:
    """The audit of ``dataset`` run alone (without Prefect, with a region cache of its own): output and tables."""
    folder = tmp_path_factory.mktemp("alone")
    out = folder / "out"
    _finish(_start(_audit(dataset, out, _config(folder, folder / "cache")), folder / "log.txt"), folder / "log.txt")
    return out, _tables(out)


def _cached_ids(cache: Path, detector: str) -> Counter:
    """image id → in how many cache parts it is stored."""
    counts: Counter = Counter()
    for part in (cache / detector).glob(f"*/{SIDE}/part-*.parquet"):
        counts.update(set(pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()))
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Two audits at once


@pytest.mark.slow
def test_two_audits_at_once_sharing_the_region_cache_equal_each_run_alone(
    dataset: Path, alone: tuple[Path, dict], tmp_path: Path
) -> None:
    _, reference = alone
    cache = tmp_path / "shared-cache"
    config = _config(tmp_path, cache)
    outs = [tmp_path / "first", tmp_path / "second"]
    # The same data into two folders: both miss the cache on the same images and store them at the same time.
    processes = [_start(_audit(dataset, out, config), tmp_path / f"{out.name}.log") for out in outs]
    for process, out in zip(processes, outs, strict=True):
        _finish(process, tmp_path / f"{out.name}.log")
    for out in outs:
        _assert_same_tables(out, reference)
        assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".wal"))]

    # No entry lost: every image is in the shared cache for both detectors, and no writer left a temporary part.
    image_ids = set(read_table(outs[0], "images").column("image_id").to_pylist())
    stored = {detector: _cached_ids(cache, detector) for detector in DETECTORS}
    for detector in DETECTORS:
        assert set(stored[detector]) == image_ids, detector
    assert not list(cache.rglob("*.tmp"))

    # A third audit reads what the two stored at once (images stored twice included): still the same tables,
    # with every detection once.
    _finish(_start(_audit(dataset, tmp_path / "third", config), tmp_path / "third.log"), tmp_path / "third.log")
    _assert_same_tables(tmp_path / "third", reference)
    twice = sum(n > 1 for counts in stored.values() for n in counts.values())
    print(f"images stored by both audits at once (entries per detector): {twice}")


@pytest.mark.slow
@pytest.mark.prefect
def test_two_audits_through_prefect_at_once_share_one_prefect_home(
    dataset: Path, alone: tuple[Path, dict], tmp_path: Path
) -> None:
    """Two ``audit run`` without ``--no-prefect``: each starts a temporary Prefect server, both on one new
    ``PREFECT_HOME`` (its SQLite database migrated by both at once)."""
    _, reference = alone
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    config = _config(tmp_path, tmp_path / "cache")
    outs = [tmp_path / "first", tmp_path / "second"]
    processes = [_start(_audit(dataset, o, config, prefect=True), tmp_path / f"{o.name}.log", env) for o in outs]
    for process, out in zip(processes, outs, strict=True):
        _finish(process, tmp_path / f"{out.name}.log")
    for out in outs:
        _assert_same_tables(out, reference)
    with sqlite3.connect(home / "prefect.db") as db:
        states = db.execute("SELECT state_type FROM flow_run").fetchall()
    assert sorted(states) == [("COMPLETED",), ("COMPLETED",)]


# ----------------------------------------------------------------------------------------------------------------
# Readers while an audit writes


def _answer(out: Path) -> tuple:
    columns, rows = query(out, CONSISTENCY)
    assert columns == ["images", "explained", "maps", "mass"] and len(rows) == 1
    return rows[0]


@pytest.mark.slow
def test_readers_query_the_catalog_while_an_audit_rewrites_it(
    dataset: Path, alone: tuple[Path, dict], tmp_path: Path
) -> None:
    finished, _ = alone
    out = tmp_path / "out"
    shutil.copytree(finished, out)  # the first run, done
    before = _answer(out)
    assert before[:3] == (60, 60, 60)

    # The second run: the same folder, a dataset that grew by 20 images.
    data = tmp_path / "data"
    shutil.copytree(dataset, data, ignore=shutil.ignore_patterns("*.csv", "*.json"))
    extra = tmp_path / "extra"
    write_demo(extra, n=20, shortcut_rate=0.9, seed=2, size=64)
    for path in extra.glob("*/*.png"):
        shutil.copy(path, data / path.parent.name / f"extra_{path.name}")
    log = tmp_path / "second.log"
    process = _start(_audit(data, out, _config(tmp_path, tmp_path / "cache")), log)

    cli_answers: list[tuple[bool, int, str]] = []  # (started while the audit ran, exit code, output)

    def cli_reader() -> None:
        while True:
            running = process.poll() is None
            done = subprocess.run(
                [sys.executable, "-m", "flows.cli", "sql", str(out), CONSISTENCY, "--format", "json"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            cli_answers.append((running, done.returncode, done.stdout + done.stderr))
            if not running:
                return

    cli = threading.Thread(target=cli_reader)
    cli.start()
    answers: Counter = Counter()
    errors: list[str] = []
    during = 0
    while True:
        running = process.poll() is None
        try:
            answers[_answer(out)] += 1
        except Exception as exc:  # any failure is a finding: collected, then reported all at once
            errors.append(f"{type(exc).__name__}: {exc}")
        during += running
        if not running:
            break
    cli.join(timeout=180)
    _finish(process, log)

    after = _answer(out)
    assert after[:3] == (80, 80, 80)  # the final answer is the second run's
    assert not errors, f"{len(errors)} of {sum(answers.values()) + len(errors)} queries failed, e.g. {errors[:3]}"
    assert set(answers) <= {before, after}, f"inconsistent answers: {set(answers) - {before, after}}"
    assert during > 0
    assert any(running for running, _, _ in cli_answers), "no `audit sql` ran while the audit wrote"
    for _, code, output in cli_answers:
        assert code == 0, output
        row = json.loads(output)[0]
        assert (row["images"], row["explained"], row["maps"]) in {before[:3], after[:3]}
    print(
        f"{during} queries while the audit ran ({answers[after]} of all saw the new catalog), "
        f"{sum(r for r, _, _ in cli_answers)} `audit sql` calls while it ran"
    )


WRITER = """
import sys
from pathlib import Path
from audit.store.catalog import build_catalog

out, first, second, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(n):
    link = out / "tables.next"
    link.unlink(missing_ok=True)
    link.symlink_to(second if i % 2 == 0 else first, target_is_directory=True)
    link.replace(out / "tables")
    build_catalog(out)
print("built", n)
"""


def test_catalog_rebuilt_again_and_again_while_threads_query_it(alone: tuple[Path, dict], tmp_path: Path) -> None:
    """Another process replaces the catalog 30 times, alternating between two versions of the tables, while two
    threads of this process query it: every answer is one whole version, never an error."""
    finished, _ = alone
    first, second = tmp_path / "tables-first", tmp_path / "tables-second"
    shutil.copytree(finished / "tables", first)
    shutil.copytree(first, second)
    for table in ("images", "attributions", "maps", "regions"):
        (second / table / "part-00000.parquet").unlink()  # the second version lacks the first shard
    out = tmp_path / "out"
    out.mkdir()
    (out / "tables").symlink_to(first, target_is_directory=True)
    shutil.copy(finished / CATALOG_NAME, out / CATALOG_NAME)
    version_one = _answer(out)

    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), str(first), str(second), "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    answers: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def reader() -> None:
        while writer.poll() is None:
            try:
                answer = _answer(out)
            except Exception as exc:
                answer = f"{type(exc).__name__}: {exc}"
            with lock:
                if isinstance(answer, tuple):
                    answers[answer] += 1
                else:
                    errors.append(answer)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    output, _ = writer.communicate(timeout=300)
    for thread in threads:
        thread.join()
    assert writer.returncode == 0 and "built 30" in output, output

    # The last build (i = 29) was of the first version: build the second one to know its answer.
    (out / "tables").unlink()
    (out / "tables").symlink_to(second, target_is_directory=True)
    build_catalog(out)
    version_two = _answer(out)
    assert version_one[0] == 60 and version_two[:3] == (50, 50, 50)
    assert not errors, f"{len(errors)} of {sum(answers.values()) + len(errors)} queries failed, e.g. {errors[:3]}"
    assert set(answers) <= {version_one, version_two}, set(answers) - {version_one, version_two}
    assert sum(answers.values()) > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary catalog left behind


# ----------------------------------------------------------------------------------------------------------------
# The region cache under many writers and readers


def _detections(image_id: str, detector: str = "text", version: str = "v1") -> list[Detection]:
    """A fixed set of detections per image id (none for every third), with scores that need all 64 bits."""
    n = int(image_id[-2:], 16) % 3
    return [
        Detection("text", 1 + k, 2, 30 + k, 12, 1 / (3 + k + int(image_id[-4:], 16)), detector, version)
        for k in range(n)
    ]


def _batch(writer: int, batch: int) -> dict[str, list[Detection]]:
    """Writer ``writer``'s batch ``batch``: 20 images of its own and 5 that every writer stores at the same time."""
    own = [f"{writer:02x}{batch:04x}{i:026x}" for i in range(20)]
    shared = [f"ff{batch:04x}{i:026x}" for i in range(5)]
    return {image_id: _detections(image_id) for image_id in own + shared}


CACHE_WRITER = """
import importlib.util, sys
from pathlib import Path
from audit.regions.cache import RegionCache

spec = importlib.util.spec_from_file_location("concurrency_test_module", sys.argv[4])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cache = RegionCache(Path(sys.argv[1]))
writer, batches = int(sys.argv[2]), int(sys.argv[3])
for b in range(batches):
    assert cache.store("text", "v1", module._batch(writer, b)) is not False
print("stored", batches)
"""


def test_region_cache_under_concurrent_writers_and_readers(tmp_path: Path) -> None:
    """Three writer processes and two writer threads store 40 batches each (5 images of every batch stored by all
    five at the same time) while two reader threads look up everything: no exception, no lost entry, no
    detection doubled, and a reader sees an image's detections whole or not at all."""
    directory = tmp_path / "cache"
    batches = 40
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CACHE_WRITER, str(directory), str(w), str(batches), __file__],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in range(3)
    ]
    cache = RegionCache(directory)
    everything: dict[str, list[Detection]] = {}
    for w in range(5):
        for b in range(batches):
            everything |= _batch(w, b)
    all_ids = sorted(everything)
    problems: list[str] = []
    lookups = [0]
    stop = threading.Event()

    def thread_writer(w: int) -> None:
        try:
            for b in range(batches):
                assert RegionCache(directory).store("text", "v1", _batch(w, b)) is not False
        except Exception as exc:
            problems.append(f"writer {w}: {type(exc).__name__}: {exc}")

    def reader() -> None:
        while not stop.is_set():
            try:
                found = RegionCache(directory).lookup("text", "v1", all_ids)
            except Exception as exc:
                problems.append(f"reader: {type(exc).__name__}: {exc}")
                continue
            lookups[0] += 1
            for image_id, detections in found.items():
                if detections != everything[image_id]:
                    problems.append(f"{image_id}: {detections} != {everything[image_id]}")

    threads = [threading.Thread(target=thread_writer, args=(w,)) for w in (3, 4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads + readers:
        thread.start()
    for thread in threads:
        thread.join()
    outputs = [p.communicate(timeout=300)[0] for p in writers]
    stop.set()
    for thread in readers:
        thread.join()

    assert [p.returncode for p in writers] == [0, 0, 0], outputs
    assert not problems, problems[:5]
    assert lookups[0] > 0
    final = cache.lookup("text", "v1", all_ids)
    assert final == everything  # every entry of every writer, each detection once
    parts = list((directory / "text" / "v1" / SIDE).iterdir())
    assert len(parts) == 5 * batches and all(p.name.startswith("part-") and p.suffix == ".parquet" for p in parts)


def test_region_cache_reader_tolerates_damaged_and_vanished_parts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = RegionCache(tmp_path / "cache")
    entries = {f"{i:032x}": _detections(f"{i:032x}") for i in range(1, 40)}
    first = dict(list(entries.items())[:20])
    assert cache.store("text", "v1", first)
    assert cache.store("text", "v1", dict(list(entries.items())[20:]))
    folder = tmp_path / "cache" / "text" / "v1" / SIDE
    parts = sorted(folder.glob("part-*.parquet"))
    # A part cut short (a crash of a file system that lost the end of a file), and one that vanished after listing.
    damaged = folder / "part-0-damaged.parquet"
    damaged.write_bytes(parts[0].read_bytes()[:100])
    listed = [*parts, damaged, folder / "part-1-vanished.parquet"]
    monkeypatch.setattr(RegionCache, "_parts", lambda self, detector, version: listed)
    with caplog.at_level("WARNING", logger="audit.regions.cache"):
        assert cache.lookup("text", "v1", list(entries)) == entries
    assert "part-0-damaged.parquet" in caplog.text and "part-1-vanished.parquet" in caplog.text

    # A half-written temporary part is never listed, and an old one (its writer was killed) is removed.
    temporary = folder / ".part-abandoned.tmp"
    temporary.write_bytes(b"PAR1 half")
    monkeypatch.undo()
    assert cache.lookup("text", "v1", list(first)) == first
    old = time.time() - 2 * 3600
    os.utime(temporary, (old, old))
    fresh = folder / ".part-being-written.tmp"
    fresh.write_bytes(b"PAR1 half")
    assert cache.store("text", "v1", {"f" * 32: []})
    assert not temporary.exists() and fresh.exists()


def test_region_cache_store_failure_does_not_stop_the_audit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    cache = RegionCache(blocker)  # the cache folder cannot be created
    with caplog.at_level("WARNING", logger="audit.regions.cache"):
        assert cache.store("text", "v1", {"a" * 32: []}) is False
    assert "could not store 1 detections" in caplog.text
    assert cache.lookup("text", "v1", ["a" * 32]) == {}


def test_cache_rows_round_trip_exactly(tmp_path: Path) -> None:
    """The consistency checks above compare detections with ==: scores must survive the cache bit for bit."""
    cache = RegionCache(tmp_path)
    entries = {f"{i:032x}": _detections(f"{i:032x}") for i in range(1, 10)}
    cache.store("text", "v1", entries)
    assert cache.lookup("text", "v1", list(entries)) == entries
    assert any(entries.values()) and not all(entries.values())
    table = pq.read_table(next((tmp_path / "text" / "v1" / SIDE).glob("part-*.parquet")))
    assert table.schema.field("score").type == pa.float64()


def test_query_works_beside_another_connection_of_this_process(alone: tuple[Path, dict]) -> None:
    """A connection this process already holds on the catalog (the report builder's, a notebook's), with other
    settings, neither blocks a query nor is disturbed by it."""
    import duckdb

    finished, _ = alone
    held = duckdb.connect(str(finished / CATALOG_NAME), read_only=True)
    try:
        assert query(finished, "SELECT count(*) FROM images")[1] == [(60,)]
        assert held.execute("SELECT count(*) FROM images").fetchall() == [(60,)]
    finally:
        held.close()


def test_catalog_build_uses_its_own_temporary_file_and_removes_abandoned_ones(
    alone: tuple[Path, dict], tmp_path: Path
) -> None:
    finished, _ = alone
    out = tmp_path / "out"
    shutil.copytree(finished / "tables", out / "tables")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has ended: its temporary catalog was abandoned
    abandoned = [out / f".{CATALOG_NAME}.{dead}.tmp", out / f".{CATALOG_NAME}.{dead}.0a1b2c.tmp.wal"]
    live = out / f".{CATALOG_NAME}.{os.getpid()}.tmp"  # a writer that is still running (this process)
    for path in [*abandoned, live]:
        path.write_bytes(b"half a catalog")
    build_catalog(out)
    assert _answer(out)[:3] == (60, 60, 60)
    assert not any(p.exists() for p in abandoned)
    assert live.read_bytes() == b"half a catalog"  # neither removed nor reused
    assert sorted(p.name for p in out.iterdir()) == sorted([CATALOG_NAME, "tables", live.name])
