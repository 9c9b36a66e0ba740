"""What an output folder has already done, so a run that was killed, or a re-run after a change, redoes only the
work whose inputs changed (README, "Resume and incremental audits").

Every stage that writes outputs for a shard (or for the whole dataset) finishes by writing a *marker*,
``OUT/work/done/<stage>-<name>.json``, holding the fingerprint of everything the outputs depend on (the shard's
files and their sizes and modification times, the settings, the detector versions, the model) and the list of
the files it wrote. The marker is written atomically after the outputs, so a marker means the outputs are
complete; a run killed before the marker leaves outputs that the next run overwrites under the same names (no
duplicate rows). A stage is skipped when its marker exists, its fingerprint equals the one computed now, and all
its outputs are still there.

The plan (``OUT/work/plan.json``) remembers which files form which shard, so that a dataset that grew keeps its
old shards (and their results) and gets new shards for its new files only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from audit.data.manifest import ManifestEntry


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (paths and other objects through ``str``)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def file_fingerprint(path: Path) -> str:
    """The content hash of a (model) file, read in 1 MiB blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stat(path: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, or None when it cannot be read: the cheap change check.

    As in git, a file whose size and time are unchanged is taken as unchanged; a changed file is read again and
    gets its new content hash as its ``image_id``.
    """
    try:
        s = os.stat(path)
    except OSError:
        return None
    return s.st_size, s.st_mtime_ns


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name in the same folder, flush it to disk, then move it into place: a reader
    sees the old file or the new one, whole. A plain open (not mkstemp), so the file gets the umask's permissions;
    the temporary name (``.<name>.<pid>.tmp``) is removed on failure, and by the next run if the process died."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any, indent: int | None = None) -> None:
    """:func:`write_text_atomic` of ``value`` as JSON (values JSON does not know are written as strings)."""
    write_text_atomic(path, json.dumps(value, default=str, indent=indent))


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (a marker half-written by an old version)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunState:
    """Stage markers of one output folder (``OUT/work/done``)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.directory = self.out / "work" / "done"

    def _marker(self, stage: str, name: str) -> Path:
        return self.directory / f"{stage}-{name}.json"

    def done(self, stage: str, name: str, key: str) -> dict | None:
        """The marker of ``stage``/``name`` if it was written with this ``key`` and all its outputs exist."""
        marker = read_json(self._marker(stage, name))
        if not isinstance(marker, dict) or marker.get("key") != key:
            return None
        if not all((self.out / relative).exists() for relative in marker.get("outputs", [])):
            return None
        return marker

    def mark(self, stage: str, name: str, key: str, outputs: Iterable[Path], **info: Any) -> dict:
        """Record that ``stage``/``name`` finished with ``key``, having written ``outputs`` (under OUT)."""
        marker = {
            "key": key,
            "outputs": sorted(str(Path(p).relative_to(self.out)) for p in outputs),
            **info,
        }
        write_json_atomic(self._marker(stage, name), marker)
        return marker

    def read(self, stage: str, name: str) -> dict | None:
        """The marker as written, whatever its key (None when there is none)."""
        marker = read_json(self._marker(stage, name))
        return marker if isinstance(marker, dict) else None

    def forget(self, stage: str, name: str) -> None:
        self._marker(stage, name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Shards that survive a growing dataset


def entry_key(entry: ManifestEntry) -> tuple[str, str, str | None, str | None, str | None]:
    return (entry.path, entry.label, entry.split, entry.group, entry.patient_id)


def assign_shards(
    entries: Sequence[ManifestEntry],
    previous: Sequence[Sequence[Sequence[Any]]] | None,
    shard_size: int,
) -> list[tuple[int, tuple[ManifestEntry, ...]]]:
    """Cut the dataset into shards, keeping every shard of the previous plan whose files are all still listed.

    Args:
        entries: the manifest's entries, in manifest order.
        previous: the previous plan's shards, each a list of ``[path, label, split, group, patient_id]`` (index =
            position; ``None`` marks a shard index that is no longer used), or None for a first run.
        shard_size: images per new shard.

    Returns:
        (shard index, entries) pairs: the surviving previous shards at their old indices, then the other entries
        in manifest order, cut into new shards numbered after the highest old index. A shard that lost a file,
        or one whose label, split or group changed, is dissolved and its remaining files join the new shards, so
        no file is ever in two shards and the outputs of a kept shard stay valid.
    """
    listed = {entry_key(e): e for e in entries}
    kept: list[tuple[int, tuple[ManifestEntry, ...]]] = []
    taken: set[tuple] = set()
    for index, members in enumerate(previous or ()):
        if not members:
            continue
        keys = [tuple(m) for m in members]
        if all(k in listed and k not in taken for k in keys):
            kept.append((index, tuple(listed[k] for k in keys)))
            taken.update(keys)
    rest = [e for e in entries if entry_key(e) not in taken]
    start = len(previous or ())
    new = [(start + j, tuple(rest[i : i + shard_size])) for j, i in enumerate(range(0, len(rest), shard_size))]
    return kept + new


def plan_record(shards: Sequence[tuple[int, Sequence[ManifestEntry]]]) -> list[list[list[Any]] | None]:
    """The plan as JSON: position = shard index, ``None`` where an index is unused."""
    size = max((index for index, _ in shards), default=-1) + 1
    record: list[list[list[Any]] | None] = [None] * size
    for index, members in shards:
        record[index] = [list(entry_key(e)) for e in members]
    return record
