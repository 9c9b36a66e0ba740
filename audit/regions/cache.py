"""A cache of detections by image content: detection depends only on the image, so it never runs twice.

Results are keyed by (detector name, detector version, ``image_id``), where ``image_id`` is the hash of the
image's bytes: a renamed copy hits the cache, an edited image misses it, and a new detector version invalidates
everything it found before. An image with no detection is stored as one row with ``found = false``, so "nothing
found" is remembered too.

The default folder is ``$XDG_CACHE_HOME/shortcut-audit/regions`` (``~/.cache/...``), shared by every audit of the
machine, so a second audit of the same data with another model reuses the first one's regions. Many writers
(the shards of one audit, several audits at once) and readers share it safely:

* each :meth:`RegionCache.store` writes one new part under a name no other writer uses (a random one), first to a
  temporary name that lookups never list, flushed to disk, then moved into place with ``os.replace``; parts are
  never rewritten, so a reader sees a part whole or not at all and no writer can lose another's entries;
* two writers that missed the same image at once both store it: a lookup takes each image's detections from one
  part only, so they are never doubled;
* a part that cannot be read (removed while listed, or damaged on disk) is skipped with a warning: its images are
  misses and are detected again. A failed store is a warning too: the cache only saves time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from audit.data.decode import MAX_SIDE
from audit.regions.base import Detection

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("found", pa.bool_()),
        ("kind", pa.string()),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("x1", pa.int32()),
        ("y1", pa.int32()),
        ("score", pa.float64()),  # exact round trip of the detector's score
    ]
)
# Temporary parts older than this were left by a writer that was killed (writing one takes milliseconds).
ABANDONED_AFTER_SECONDS = 3600.0


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shortcut-audit" / "regions"


class RegionCache:
    """Cached detections under ``directory/<detector>/<version>/side-<MAX_SIDE>/part-*.parquet``.

    Args:
        directory: the cache folder; created on first write.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _folder(self, detector: str, version: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in version)
        # Detections are in the pixels the detector saw: images larger than MAX_SIDE are downscaled first (since
        # 0.3), so entries made at another MAX_SIDE are in other coordinates and must not be found.
        return self.directory / detector / safe / f"side-{MAX_SIDE}"

    def _parts(self, detector: str, version: str) -> list[Path]:
        folder = self._folder(detector, version)
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def has_entries(self, detector: str, version: str) -> bool:
        """Whether this detector version has cached anything at all (a first audit skips the lookup)."""
        return bool(self._parts(detector, version))

    def lookup(self, detector: str, version: str, image_ids: Sequence[str]) -> dict[str, list[Detection]]:
        """The cached detections of those ``image_ids`` that this detector version has already processed."""
        parts = self._parts(detector, version)
        if not parts or not image_ids:
            return {}
        wanted = pa.array(sorted(set(image_ids)), pa.string())
        rows = self._read(parts, wanted)
        # Each image from one part only (the first by name): two writers that missed it at once both stored it.
        source: dict[str, str] = {}
        for row in rows:
            first = source.setdefault(row["image_id"], row["part"])
            if row["part"] < first:
                source[row["image_id"]] = row["part"]
        out: dict[str, list[Detection]] = {image_id: [] for image_id in source}
        for row in rows:
            if row["found"] and row["part"] == source[row["image_id"]]:
                out[row["image_id"]].append(
                    Detection(row["kind"], row["x0"], row["y0"], row["x1"], row["y1"], row["score"], detector, version)
                )
        return out

    @staticmethod
    def _read(parts: list[Path], wanted: pa.Array) -> list[dict]:
        """The rows of ``wanted`` images in ``parts`` (in part order, each part's rows in stored order), each with
        its part's name; all parts at once, or part by part, skipping unreadable ones, when that fails."""
        where = ds.field("image_id").isin(wanted)
        try:
            return _rows(ds.dataset(parts, schema=SCHEMA, format="parquet"), where)
        except (OSError, pa.ArrowException):
            pass
        rows: list[dict] = []
        for part in parts:
            try:
                rows.extend(_rows(ds.dataset([part], schema=SCHEMA, format="parquet"), where))
            except (OSError, pa.ArrowException) as exc:
                log.warning("skipping unreadable region cache part %s (its images are detected again): %s", part, exc)
        return rows

    def store(self, detector: str, version: str, results: Mapping[str, Sequence[Detection]]) -> bool:
        """Add the detections of newly processed images (``image_id`` → its detections, possibly none).

        Returns whether they were stored; a failure (a full disk, a folder that is not writable) is logged and
        the audit goes on without caching them.
        """
        if not results:
            return True
        rows = []
        for image_id in sorted(results):  # sorted: row-group statistics let lookups skip parts
            detections = results[image_id]
            if not detections:
                rows.append({"image_id": image_id, "found": False})
            for d in detections:
                rows.append(
                    {
                        "image_id": image_id,
                        "found": True,
                        "kind": d.kind,
                        "x0": d.x0,
                        "y0": d.y0,
                        "x1": d.x1,
                        "y1": d.y1,
                        "score": d.score,
                    }
                )
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        folder = self._folder(detector, version)
        name = f"part-{uuid.uuid4().hex}"
        temporary = folder / f".{name}.tmp"  # not part-*.parquet: lookups never list it
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(folder)
            pq.write_table(table, temporary, compression="zstd")
            with open(temporary, "rb+") as handle:  # on disk before its name makes it visible
                os.fsync(handle.fileno())
            os.replace(temporary, folder / f"{name}.parquet")
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            log.warning("could not store %d detections in the region cache %s: %s", len(results), folder, exc)
            return False
        return True


def _rows(dataset: ds.Dataset, where: ds.Expression) -> list[dict]:
    table = dataset.to_table(filter=where, columns=[*SCHEMA.names, "__filename"])
    rows = table.to_pylist()
    for row in rows:
        row["part"] = Path(row.pop("__filename")).name
    return rows


def _remove_abandoned(folder: Path) -> None:
    """Temporary parts of writers that were killed (old enough that no live writer can still own them)."""
    cutoff = time.time() - ABANDONED_AFTER_SECONDS
    for path in folder.glob(".part-*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:  # removed by another writer meanwhile
            pass
