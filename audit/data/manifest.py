"""Building the manifest: which files make up the dataset, and their labels.

Two inputs are accepted:

* a folder of class subfolders (``DATA/<label>/**/<image>``), as torchvision's ``ImageFolder`` reads it;
* a CSV or Parquet manifest with a ``path`` and a ``label`` column (optional ``split`` and ``group``), whose
  paths are relative to the dataset root (``--data``).

The manifest lists files only; reading, hashing and decoding happen per shard later, so that one bad file
costs one row in ``errors`` and nothing else.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from audit.errors import DataError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})


@dataclass(frozen=True)
class ManifestEntry:
    """One input file. ``path`` is relative to the dataset root, with forward slashes."""

    path: str
    label: str
    split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The dataset's files and the label vocabulary (sorted, so label indices are stable)."""

    root: Path
    entries: tuple[ManifestEntry, ...]
    labels: tuple[str, ...]

    def label_index(self, label: str) -> int:
        return self.labels.index(label)

    def shards(self, shard_size: int) -> list[tuple[ManifestEntry, ...]]:
        """Consecutive slices of ``shard_size`` entries: the unit of parallel work and of atomic output."""
        return [self.entries[i : i + shard_size] for i in range(0, len(self.entries), shard_size)]


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative``, refusing a path that leaves the dataset root (absolute, ``..``, or a symlink out)."""
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"manifest path {relative!r} leaves the dataset root {root}; use paths relative to it")
    full = (root / pure).resolve()
    if not full.is_relative_to(root.resolve()):
        raise DataError(f"manifest path {relative!r} resolves outside the dataset root {root}")
    return full


def _from_folder(root: Path) -> list[ManifestEntry]:
    entries = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.rglob("*")):
            relative = file.relative_to(root)
            # Hidden files and folders (.ipynb_checkpoints, .DS_Store, ...) are not part of the dataset.
            if any(part.startswith(".") for part in relative.parts):
                continue
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                safe_join(root, relative.as_posix())  # a symlink out of the root is refused, as in a manifest
                entries.append(ManifestEntry(path=relative.as_posix(), label=class_dir.name))
    return entries


def _read_table(manifest: Path) -> pa.Table:
    try:
        if manifest.suffix.lower() == ".parquet":
            return pq.read_table(manifest)
        if manifest.suffix.lower() in (".csv", ".tsv"):
            delimiter = "\t" if manifest.suffix.lower() == ".tsv" else ","
            with manifest.open(newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle, delimiter=delimiter), [])
            # Every column as a string: labels "01"/"1" and patient ids "007"/"7" stay distinct, not numbers.
            return pacsv.read_csv(
                manifest,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header}, strings_can_be_null=True
                ),
            )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"manifest {manifest} could not be read: {exc}") from exc
    raise DataError(f"manifest {manifest}: expected a .csv, .tsv or .parquet file")


def _from_manifest(root: Path, manifest: Path) -> list[ManifestEntry]:
    table = _read_table(manifest)
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise DataError(
            f"manifest {manifest} lacks the column(s) {sorted(missing)}; expected at least 'path' and 'label' "
            f"(found {table.column_names})"
        )
    columns = {name: table.column(name).cast(pa.string()).to_pylist() for name in table.column_names}
    n = table.num_rows
    split = columns.get("split", [None] * n)
    group = columns.get("group", [None] * n)
    entries = []
    for i, (path, label) in enumerate(zip(columns["path"], columns["label"], strict=True)):
        if not path or label is None or label == "":
            raise DataError(f"manifest {manifest}, row {i + 2}: 'path' and 'label' must not be empty")
        safe_join(root, path)  # raises for a path outside the root
        entries.append(
            ManifestEntry(
                path=PurePosixPath(path.replace("\\", "/")).as_posix(), label=label, split=split[i], group=group[i]
            )
        )
    return entries


def build_manifest(data: Path, manifest: Path | None = None) -> Manifest:
    """List the dataset's image files and labels.

    Args:
        data: the dataset root: a folder of class subfolders, or the folder manifest paths are relative to.
        manifest: optional CSV/TSV/Parquet file with ``path`` and ``label`` columns (``split``, ``group`` optional).

    Raises:
        DataError: the root does not exist, the manifest is malformed, or no image was found.
    """
    root = Path(data)
    if not root.is_dir():
        raise DataError(
            f"dataset path {root} does not exist or is not a folder; pass --data DIR, a folder of class "
            "subfolders or the root that the manifest's paths are relative to"
        )
    if manifest is not None:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise DataError(f"manifest {manifest} does not exist; pass a CSV or Parquet file with path and label")
        entries = _from_manifest(root, manifest)
        where = f"manifest {manifest}"
    else:
        entries = _from_folder(root)
        where = f"{root} (expected class subfolders such as {root}/<label>/<image>.png)"
    if not entries:
        raise DataError(f"no images found in {where}; supported file types: {', '.join(sorted(IMAGE_SUFFIXES))}")
    labels = tuple(sorted({e.label for e in entries}))
    if len(labels) < 2:
        raise DataError(f"found only one label ({labels[0]!r}) in {where}; an audit needs at least two classes")
    return Manifest(root=root.resolve(), entries=tuple(entries), labels=labels)
