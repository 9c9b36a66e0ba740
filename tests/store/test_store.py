"""Tests of the store: atomic Parquet parts, the DuckDB catalog, and read-only user queries."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from audit.errors import QueryError
from audit.store.catalog import CATALOG_NAME, build_catalog, query
from audit.store.parquet import read_table, rows_to_table, table_dir, write_part
from audit.store.schemas import TABLES


def _image_row(i: int, label: str = "covid") -> dict:
    return {
        "image_id": f"{i:032x}",
        "path": f"{label}/{i}.png",
        "label": label,
        "label_index": int(label == "covid"),
        "split": None,
        "group": f"p{i}",
        "width": 64,
        "height": 48,
        "channels": 1,
        "fold": i % 2,
        "prediction": label,
        "prediction_index": 1,
        "confidence": 0.75,
        "label_probability": 0.75,
        "correct": True,
        "shard": 0,
    }


def _attribution_row(i: int) -> dict:
    present = i % 2 == 0
    nan = math.nan
    return {
        "image_id": f"{i:032x}",
        "method": "gradcam",
        "region_kind": "text",
        "target": 1,
        "present": present,
        "mass_fraction": 0.5 if present else nan,
        "area_fraction": 0.25 if present else nan,
        "enrichment": 2.0 if present else nan,
        "pointing_hit": 1.0 if present else nan,
        "rank_accuracy": 0.5 if present else nan,
    }


def _nan_safe(rows: list[dict]) -> list[dict]:
    return [{k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A finished audit: one images part of 3 rows, one attributions part, the other tables empty."""
    out = tmp_path / "audit"
    out.mkdir()
    write_part(out, "images", rows_to_table("images", [_image_row(i) for i in range(3)]), "0000")
    write_part(out, "attributions", rows_to_table("attributions", [_attribution_row(i) for i in range(4)]), "0000")
    build_catalog(out)
    return out


def test_rows_to_table_uses_the_schema() -> None:
    table = rows_to_table("images", [_image_row(0), _image_row(1, "normal")])
    assert table.schema == TABLES["images"]
    assert table.num_rows == 2
    assert table.column("label").to_pylist() == ["covid", "normal"]
    assert table.column("channels").type == pa.int8()


def test_rows_to_table_from_columns() -> None:
    rows = [
        {"path": "a.png", "stage": "decode", "message": "empty"},
        {"path": "b.png", "stage": "decode", "message": "truncated"},
    ]
    columns = {"message": ["empty", "truncated"], "path": ["a.png", "b.png"], "stage": ["decode", "decode"]}
    assert rows_to_table("errors", columns).equals(rows_to_table("errors", rows))


def test_write_part_is_atomic_and_reads_back(tmp_path: Path) -> None:
    table = rows_to_table("attributions", [_attribution_row(i) for i in range(5)])
    final = write_part(tmp_path, "attributions", table, "0003")
    assert final == table_dir(tmp_path, "attributions") / "part-0003.parquet"
    assert sorted(p.name for p in table_dir(tmp_path, "attributions").iterdir()) == ["part-0003.parquet"]
    back = read_table(tmp_path, "attributions")
    assert back.schema == TABLES["attributions"]
    assert _nan_safe(back.to_pylist()) == _nan_safe(table.to_pylist())  # NaN != NaN defeats Table.equals
    assert math.isnan(back.column("mass_fraction")[1].as_py())


def test_write_part_casts_and_replaces(tmp_path: Path) -> None:
    loose = pa.table({"path": ["a.png"], "stage": ["decode"], "message": ["first"]})
    write_part(tmp_path, "errors", loose, "k")
    write_part(
        tmp_path, "errors", rows_to_table("errors", [{"path": "a.png", "stage": "decode", "message": "second"}]), "k"
    )
    back = read_table(tmp_path, "errors")
    assert back.column("message").to_pylist() == ["second"]  # same key: replaced, not duplicated


def test_read_table_concatenates_parts_in_order(tmp_path: Path) -> None:
    write_part(tmp_path, "images", rows_to_table("images", [_image_row(2), _image_row(3)]), "0001")
    write_part(tmp_path, "images", rows_to_table("images", [_image_row(0), _image_row(1)]), "0000")
    (table_dir(tmp_path, "images") / ".part-0002.123.tmp").write_bytes(b"half written")  # ignored
    back = read_table(tmp_path, "images")
    assert back.column("image_id").to_pylist() == [f"{i:032x}" for i in range(4)]


@pytest.mark.parametrize("table", sorted(TABLES))
def test_read_missing_table_is_empty_with_schema(tmp_path: Path, table: str) -> None:
    back = read_table(tmp_path, table)
    assert back.num_rows == 0
    assert back.schema == TABLES[table]


def test_catalog_has_every_table(out: Path) -> None:
    assert (out / CATALOG_NAME).is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    columns, rows = query(out, "SELECT table_name FROM information_schema.tables ORDER BY table_name")
    assert columns == ["table_name"]
    assert [r[0] for r in rows] == sorted(TABLES)
    for table, schema in TABLES.items():
        names, _ = query(out, f'SELECT * FROM "{table}" LIMIT 0')
        assert names == schema.names, table
    assert query(out, "SELECT count(*) FROM findings")[1] == [(0,)]


def test_select(out: Path) -> None:
    columns, rows = query(out, "SELECT path, width FROM images ORDER BY path")
    assert columns == ["path", "width"]
    assert rows == [("covid/0.png", 64), ("covid/1.png", 64), ("covid/2.png", 64)]
    columns, rows = query(out, "SELECT count(*) AS n, sum(present::INT) AS p FROM attributions")
    assert columns == ["n", "p"]
    assert rows == [(4, 2)]


def test_rebuild_sees_new_parts(out: Path) -> None:
    write_part(out, "images", rows_to_table("images", [_image_row(9, "normal")]), "0001")
    build_catalog(out)
    assert query(out, "SELECT count(*) FROM images")[1] == [(4,)]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO images (image_id) VALUES ('x')",
        "DROP TABLE images",
        "DELETE FROM images",
        "COPY images TO '{out}/leak.csv'",
        "ATTACH '{out}/other.duckdb' AS other",
        "SELECT 1; DROP TABLE images",
        "SELECT 1; SELECT 2",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('{out}/tables/images/*.parquet')",
        "SET enable_external_access = true",
    ],
)
def test_write_or_file_access_refused(out: Path, sql: str) -> None:
    before = query(out, "SELECT count(*) FROM images")[1]
    with pytest.raises(QueryError):
        query(out, sql.format(out=out))
    assert query(out, "SELECT count(*) FROM images")[1] == before == [(3,)]
    assert not (out / "leak.csv").exists()
    assert not (out / "other.duckdb").exists()


def test_refusal_messages_say_why(out: Path) -> None:
    with pytest.raises(QueryError, match="only read-only queries"):
        query(out, "DROP TABLE images")
    with pytest.raises(QueryError, match="exactly one SQL statement, found 2"):
        query(out, "SELECT 1; SELECT 2")
    with pytest.raises(QueryError, match="could not parse"):
        query(out, "SELEKT 1")
    with pytest.raises(QueryError, match="query failed"):
        query(out, "SELECT no_such_column FROM images")


def test_missing_catalog(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match=r"does not exist; run `audit run --out"):
        query(tmp_path, "SELECT 1")
