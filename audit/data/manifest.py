"""Building the manifest: which files make up the dataset, and their labels.

Two inputs are accepted:

* a folder of class subfolders (``DATA/<label>/**/<image>``), as torchvision's ``ImageFolder`` reads it;
* a CSV, TSV or Parquet manifest with a ``path`` and a ``label`` column (optional ``split``, ``group`` and
  ``patient_id``), whose paths are relative to the dataset root (``--data``). The published column names of
  ChestX-ray14 (``Image Index``, ``Finding Labels``, ``Patient ID``) and CheXpert (``Path``) are understood.
* a multi-label manifest (one 0/1 column per finding, as CheXpert publishes it, or ChestX-ray14's ``|``-joined
  ``Finding Labels``): with ``finding=NAME`` it becomes the binary dataset "NAME" vs "no NAME"; uncertain
  values (``-1``) and blanks in a finding column are left out of that finding's audit.

A row whose path leaves the dataset root is refused: it is listed in ``Manifest.refused`` (and then in the
``errors`` table), and the other rows are audited.

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

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom"}
)
# Accepted spellings of each manifest column (matched case-insensitively), the first being ours.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("path", "image index"),
    "label": ("label", "finding labels"),
    "split": ("split",),
    "group": ("group", "site"),
    "patient_id": ("patient_id", "patient id"),
}
POSITIVE = frozenset({"1", "1.0", "true", "yes", "y", "present", "positive"})
NEGATIVE = frozenset({"0", "0.0", "false", "no", "n", "absent", "negative"})
UNCERTAIN = frozenset({"-1", "-1.0", "uncertain"})


@dataclass(frozen=True)
class ManifestEntry:
    """One input file. ``path`` is relative to the dataset root, with forward slashes."""

    path: str
    label: str
    split: str | None = None
    group: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The dataset's files and the label vocabulary (sorted, so label indices are stable)."""

    root: Path
    entries: tuple[ManifestEntry, ...]
    labels: tuple[str, ...]
    refused: tuple[tuple[str, str], ...] = ()  # (path as written, why): rows left out, for the errors table

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
    try:
        full = (root / pure).resolve()
    except (ValueError, OSError) as exc:  # an embedded NUL byte, a symlink loop, a name too long
        raise DataError(f"manifest path {relative!r} is not a usable path ({exc})") from None
    if not full.is_relative_to(root.resolve()):
        raise DataError(f"manifest path {relative!r} resolves outside the dataset root {root}")
    return full


def _from_folder(root: Path) -> tuple[list[ManifestEntry], list[tuple[str, str]]]:
    entries, refused = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.rglob("*")):
            relative = file.relative_to(root)
            # Hidden files and folders (.ipynb_checkpoints, .DS_Store, ...) are not part of the dataset.
            if any(part.startswith(".") for part in relative.parts):
                continue
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    safe_join(root, relative.as_posix())  # a symlink out of the root is refused, as in a manifest
                except DataError as exc:
                    refused.append((relative.as_posix(), str(exc)))
                    continue
                entries.append(ManifestEntry(path=relative.as_posix(), label=class_dir.name))
    return entries, refused


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


def _columns(table: pa.Table) -> dict[str, str]:
    """Our column name → the manifest's, for the columns it has (first alias found wins)."""
    lower = {name.lower().strip(): name for name in table.column_names}
    found = {}
    for ours, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in lower:
                found[ours] = lower[alias]
                break
    return found


def _finding_labels(manifest: Path, table: pa.Table, columns: dict[str, str], finding: str) -> list[str | None]:
    """Per row: the binary label (``finding`` / ``no <finding>``), or None to leave the row out (uncertain)."""
    absent = f"no {finding}"
    if finding in table.column_names:
        values = table.column(finding).cast(pa.string()).to_pylist()
        labels: list[str | None] = []
        for i, value in enumerate(values):
            text = "" if value is None else value.strip().lower()
            if text in POSITIVE:
                labels.append(finding)
            elif text in NEGATIVE:
                labels.append(absent)
            elif text in UNCERTAIN or text == "":
                labels.append(None)  # CheXpert's -1 (uncertain) and blank (not mentioned): left out, as U-Ignore
            else:
                raise DataError(
                    f"manifest {manifest}, row {i + 2}: finding column {finding!r} holds {value!r}; expected "
                    "1/0 (or true/false, yes/no; -1 or blank = uncertain, left out)"
                )
        return labels
    if "label" in columns:  # ChestX-ray14: "Cardiomegaly|Effusion", "No Finding"
        rows = [
            None if v is None else {n.strip() for n in v.split("|")}
            for v in table.column(columns["label"]).cast(pa.string()).to_pylist()
        ]
        names = set().union(*(r for r in rows if r is not None))
        if finding not in names:
            raise DataError(
                f"manifest {manifest}: finding {finding!r} is neither a column nor a value of "
                f"{columns['label']!r} (found {', '.join(sorted(names)[:20])})"
            )
        return [None if r is None else finding if finding in r else absent for r in rows]
    raise DataError(f"manifest {manifest}: no column {finding!r}; the finding columns are {table.column_names}")


def _from_manifest(
    root: Path, manifest: Path, finding: str | None = None
) -> tuple[list[ManifestEntry], list[tuple[str, str]]]:
    table = _read_table(manifest)
    columns = _columns(table)
    needed = {"path"} if finding is not None else {"path", "label"}
    missing = needed - set(columns)
    if missing:
        raise DataError(
            f"manifest {manifest} lacks the column(s) {sorted(missing)}; expected at least 'path' and 'label' "
            f"(or a finding column with --findings), found {table.column_names}"
        )

    def column(name: str) -> list[str | None]:
        if name not in columns:
            return [None] * table.num_rows
        return [None if v is None or v == "" else v for v in table.column(columns[name]).cast(pa.string()).to_pylist()]

    paths = column("path")
    labels = _finding_labels(manifest, table, columns, finding) if finding is not None else column("label")
    split, group, patient = column("split"), column("group"), column("patient_id")
    entries, refused = [], []
    for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
        if finding is not None and label is None and path:
            continue  # uncertain for this finding
        if not path or label is None:
            raise DataError(
                f"manifest {manifest}, row {i + 2}: 'path' and 'label' must not be empty "
                f"(found path={path!r}, label={label!r})"
            )
        try:
            safe_join(root, path)
        except DataError as exc:  # this row only: the rest of the dataset is audited
            refused.append((path, str(exc)))
            continue
        entries.append(
            ManifestEntry(
                path=PurePosixPath(path.replace("\\", "/")).as_posix(),
                label=label,
                split=split[i],
                group=group[i],
                patient_id=patient[i],
            )
        )
    return entries, refused


def build_manifest(data: Path, manifest: Path | None = None, finding: str | None = None) -> Manifest:
    """List the dataset's image files and labels.

    Args:
        data: the dataset root: a folder of class subfolders, or the folder manifest paths are relative to.
        manifest: optional CSV/TSV/Parquet file with ``path`` and ``label`` columns (``split``, ``group``,
            ``patient_id`` optional).
        finding: for a multi-label manifest, the finding to audit: its column (1/0) or its name in a
            ``|``-joined label column; the labels become ``finding`` and ``no <finding>``.

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
        entries, refused = _from_manifest(root, manifest, finding)
        where = f"manifest {manifest}"
    else:
        if finding is not None:
            raise DataError("--findings needs a multi-label --manifest (one column per finding)")
        entries, refused = _from_folder(root)
        where = f"{root} (expected class subfolders such as {root}/<label>/<image>.png)"
    if not entries and refused:
        raise DataError(f"every path in {where} was refused; the first: {refused[0][1]}")
    if not entries:
        raise DataError(f"no images found in {where}; supported file types: {', '.join(sorted(IMAGE_SUFFIXES))}")
    labels = tuple(sorted({e.label for e in entries}))
    if len(labels) < 2:
        raise DataError(f"found only one label ({labels[0]!r}) in {where}; an audit needs at least two classes")
    return Manifest(root=root.resolve(), entries=tuple(entries), labels=labels, refused=tuple(refused))
