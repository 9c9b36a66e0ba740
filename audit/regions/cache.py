"""A cache of detections by image content: detection depends only on the image, so it never runs twice.

Results are keyed by (detector name, detector version, ``image_id``), where ``image_id`` is the hash of the
image's bytes: a renamed copy hits the cache, an edited image misses it, and a new detector version invalidates
everything it found before. Each shard's new results are one Parquet part written atomically (temporary name,
then ``os.replace``), so concurrent shards and audits can share one cache folder. An image with no detection is
stored as one row with ``found = false``, so "nothing found" is remembered too.

The default folder is ``$XDG_CACHE_HOME/shortcut-audit/regions`` (``~/.cache/...``), shared by every audit of the
machine, so a second audit of the same data with another model reuses the first one's regions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from audit.regions.base import Detection

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


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shortcut-audit" / "regions"


class RegionCache:
    """Cached detections under ``directory/<detector>/<version>/part-*.parquet``.

    Args:
        directory: the cache folder; created on first write.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _folder(self, detector: str, version: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in version)
        return self.directory / detector / safe

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
        table = ds.dataset(parts, schema=SCHEMA, format="parquet").to_table(filter=ds.field("image_id").isin(wanted))
        out: dict[str, list[Detection]] = {}
        for row in table.to_pylist():
            found = out.setdefault(row["image_id"], [])
            if row["found"]:
                found.append(
                    Detection(row["kind"], row["x0"], row["y0"], row["x1"], row["y1"], row["score"], detector, version)
                )
        return out

    def store(self, detector: str, version: str, results: Mapping[str, Sequence[Detection]]) -> None:
        """Add the detections of newly processed images (``image_id`` → its detections, possibly none)."""
        if not results:
            return
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
        folder = self._folder(detector, version)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}"
        temporary = folder / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), temporary, compression="zstd")
        os.replace(temporary, folder / f"{name}.parquet")
