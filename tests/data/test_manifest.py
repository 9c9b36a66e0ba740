"""Tests of manifest building: class folders, CSV/Parquet manifests, and paths that leave the dataset root."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data.manifest import ManifestEntry, build_manifest, safe_join
from audit.errors import DataError


def _touch(path: Path) -> Path:
    # The manifest lists files only; it never decodes them, so any bytes will do.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _touch(root / "pneumonia" / "p2.png")
    _touch(root / "pneumonia" / "p1.JPG")
    _touch(root / "pneumonia" / "sub" / "p3.tif")
    _touch(root / "normal" / "n1.png")
    _touch(root / "normal" / ".hidden.png")  # hidden file
    _touch(root / "normal" / "notes.txt")  # not an image
    _touch(root / "normal" / "n2.jpeg.bak")
    _touch(root / ".cache" / "c.png")  # hidden class folder
    _touch(root / "stray.png")  # a file at the root is not a class
    return root


def test_class_folders(folder: Path) -> None:
    manifest = build_manifest(folder)
    assert manifest.labels == ("normal", "pneumonia")
    assert manifest.root == folder.resolve()
    assert [(e.path, e.label) for e in manifest.entries] == [
        ("normal/n1.png", "normal"),
        ("pneumonia/p1.JPG", "pneumonia"),
        ("pneumonia/p2.png", "pneumonia"),
        ("pneumonia/sub/p3.tif", "pneumonia"),
    ]
    assert all(e.split is None and e.group is None for e in manifest.entries)
    assert manifest.label_index("pneumonia") == 1


def test_hidden_folder_inside_class_skipped(folder: Path) -> None:
    _touch(folder / "normal" / ".ipynb_checkpoints" / "n1-checkpoint.png")
    paths = [e.path for e in build_manifest(folder).entries]
    assert "normal/.ipynb_checkpoints/n1-checkpoint.png" not in paths


def test_csv_manifest_keeps_labels_as_strings(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    csv = tmp_path / "manifest.csv"
    csv.write_text("path,label,split,group\nimg/a.png,0,train,p1\nimg/b.png,1,test,p2\nimg\\c.png,1,,\n")
    manifest = build_manifest(root, csv)
    assert manifest.labels == ("0", "1")
    assert manifest.entries == (
        ManifestEntry("img/a.png", "0", "train", "p1"),
        ManifestEntry("img/b.png", "1", "test", "p2"),
        ManifestEntry("img/c.png", "1", None, None),
    )
    assert all(isinstance(e.label, str) for e in manifest.entries)


def test_csv_labels_and_groups_keep_leading_zeros(tmp_path: Path) -> None:
    csv = tmp_path / "manifest.csv"
    csv.write_text("path,label,group\na.png,01,007\nb.png,02,7\n")
    manifest = build_manifest(tmp_path, csv)
    assert manifest.labels == ("01", "02")
    assert [e.group for e in manifest.entries] == ["007", "7"]  # two different patients


def test_tsv_manifest(tmp_path: Path) -> None:
    tsv = tmp_path / "manifest.tsv"
    tsv.write_text("path\tlabel\na.png\tcat\nb.png\tdog\n")
    assert build_manifest(tmp_path, tsv).labels == ("cat", "dog")


def test_parquet_manifest(tmp_path: Path) -> None:
    table = pa.table(
        {
            "path": ["x/a.png", "x/b.png", "x/c.png"],
            "label": ["yes", "no", "yes"],
            "group": ["g1", None, "g2"],
        }
    )
    file = tmp_path / "manifest.parquet"
    pq.write_table(table, file)
    manifest = build_manifest(tmp_path, file)
    assert manifest.labels == ("no", "yes")
    assert [e.path for e in manifest.entries] == ["x/a.png", "x/b.png", "x/c.png"]
    assert [e.group for e in manifest.entries] == ["g1", None, "g2"]
    assert all(e.split is None for e in manifest.entries)


def test_parquet_integer_labels_become_strings(tmp_path: Path) -> None:
    file = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": pa.array([0, 1], pa.int64())}), file)
    assert build_manifest(tmp_path, file).labels == ("0", "1")


def test_missing_columns_named(tmp_path: Path) -> None:
    csv = tmp_path / "manifest.csv"
    csv.write_text("file,class\na.png,0\nb.png,1\n")
    with pytest.raises(DataError, match=r"\['label', 'path'\]"):
        build_manifest(tmp_path, csv)


def test_empty_label_rejected_with_row(tmp_path: Path) -> None:
    csv = tmp_path / "manifest.csv"
    csv.write_text("path,label\na.png,0\nb.png,\n")
    with pytest.raises(DataError, match="row 3"):
        build_manifest(tmp_path, csv)


def test_unsupported_manifest_suffix(tmp_path: Path) -> None:
    file = tmp_path / "manifest.json"
    file.write_text("{}")
    with pytest.raises(DataError, match=r"\.csv"):
        build_manifest(tmp_path, file)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_manifest(tmp_path, tmp_path / "nope.csv")


@pytest.mark.parametrize("bad", ["../x.png", "a/../../x.png", "/etc/passwd", "..\\x.png"])
def test_manifest_path_leaving_root_refused_and_listed(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"path,label\nok.png,0\n{bad},1\nfine.png,1\n")
    manifest = build_manifest(root, csv)
    # The row is refused, with the reason, and the other rows stay in the dataset.
    assert [e.path for e in manifest.entries] == ["ok.png", "fine.png"]
    assert [path for path, _ in manifest.refused] == [bad]
    assert "dataset root" in manifest.refused[0][1]


def test_manifest_symlink_leaving_root_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    secret = _touch(tmp_path / "outside" / "secret.png")
    os.symlink(secret, root / "link.png")
    csv = tmp_path / "manifest.csv"
    csv.write_text("path,label\nok.png,0\nlink.png,1\nb.png,1\n")
    manifest = build_manifest(root, csv)
    assert [e.path for e in manifest.entries] == ["ok.png", "b.png"]
    assert manifest.refused[0][0] == "link.png"
    assert "outside the dataset root" in manifest.refused[0][1]


def test_manifest_whose_every_path_is_refused(tmp_path: Path) -> None:
    csv = tmp_path / "manifest.csv"
    csv.write_text("path,label\n../a.png,0\n../b.png,1\n")
    with pytest.raises(DataError, match="every path .* was refused"):
        build_manifest(tmp_path / ".", csv)


def test_patient_id_column(tmp_path: Path) -> None:
    csv = tmp_path / "manifest.csv"
    csv.write_text("path,label,patient_id\na.png,x,007\nb.png,y,\n")
    manifest = build_manifest(tmp_path, csv)
    assert [e.patient_id for e in manifest.entries] == ["007", None]


def test_chexpert_style_finding_columns(tmp_path: Path) -> None:
    # CheXpert: one column per finding, 1 / 0 / -1 (uncertain) / blank (not mentioned).
    csv = tmp_path / "train.csv"
    csv.write_text(
        "Path,Sex,Age,Cardiomegaly,Pleural Effusion\n"
        "p1/a.jpg,F,60,1.0,0.0\n"
        "p1/b.jpg,F,60,0.0,-1.0\n"
        "p2/c.jpg,M,70,-1.0,1.0\n"
        "p3/d.jpg,M,50,,1.0\n"
    )
    cardio = build_manifest(tmp_path, csv, finding="Cardiomegaly")
    assert [(e.path, e.label) for e in cardio.entries] == [
        ("p1/a.jpg", "Cardiomegaly"),
        ("p1/b.jpg", "no Cardiomegaly"),
    ]
    assert cardio.labels == ("Cardiomegaly", "no Cardiomegaly")
    effusion = build_manifest(tmp_path, csv, finding="Pleural Effusion")
    assert [e.label for e in effusion.entries] == ["no Pleural Effusion", "Pleural Effusion", "Pleural Effusion"]


def test_chestxray14_style_joined_labels(tmp_path: Path) -> None:
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID\n"
        "00000001_000.png,Cardiomegaly,0,1\n"
        "00000001_001.png,Cardiomegaly|Emphysema,1,1\n"
        "00000002_000.png,No Finding,0,2\n"
    )
    manifest = build_manifest(tmp_path, csv, finding="Emphysema")
    assert [e.label for e in manifest.entries] == ["no Emphysema", "Emphysema", "no Emphysema"]
    assert [e.patient_id for e in manifest.entries] == ["1", "1", "2"]
    # Without a finding, the joined labels are the labels as written.
    assert "Cardiomegaly|Emphysema" in build_manifest(tmp_path, csv).labels


def test_unknown_finding_and_bad_values_named(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,Edema\na.png,1\nb.png,maybe\n")
    with pytest.raises(DataError, match=r"row 3.*'maybe'.*expected"):
        build_manifest(tmp_path, csv, finding="Edema")
    with pytest.raises(DataError, match="no column 'Mass'"):
        build_manifest(tmp_path, csv, finding="Mass")


def test_finding_needs_a_manifest(folder: Path) -> None:
    with pytest.raises(DataError, match="--finding"):
        build_manifest(folder, finding="pneumonia")


def test_safe_join_inside_root(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/./b.png") == (tmp_path / "a" / "b.png").resolve()
    with pytest.raises(DataError):
        safe_join(tmp_path, "/tmp/x.png")


def test_folder_symlink_leaving_root_not_listed(folder: Path, tmp_path: Path) -> None:
    secret = _touch(tmp_path / "outside" / "secret.png")
    os.symlink(secret, folder / "normal" / "link.png")
    manifest = build_manifest(folder)
    assert "normal/link.png" not in [e.path for e in manifest.entries]
    assert [path for path, _ in manifest.refused] == ["normal/link.png"]


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist or is not a folder.*--data"):
        build_manifest(tmp_path / "nope")


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _touch(tmp_path / "b" / "readme.txt")
    with pytest.raises(DataError, match=r"no images found.*class subfolders.*\.png"):
        build_manifest(tmp_path)


def test_single_label_dataset(tmp_path: Path) -> None:
    _touch(tmp_path / "only" / "a.png")
    _touch(tmp_path / "only" / "b.png")
    with pytest.raises(DataError, match=r"only one label \('only'\).*at least two classes"):
        build_manifest(tmp_path)


def test_shards_slice_in_order(tmp_path: Path) -> None:
    for i in range(7):
        _touch(tmp_path / ("a" if i % 2 else "b") / f"{i}.png")
    manifest = build_manifest(tmp_path)
    shards = manifest.shards(3)
    assert [len(s) for s in shards] == [3, 3, 1]
    assert tuple(e for shard in shards for e in shard) == manifest.entries
    assert manifest.shards(100) == [manifest.entries]
    assert [len(s) for s in manifest.shards(1)] == [1] * 7
