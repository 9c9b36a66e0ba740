"""Parquet parts, written atomically: a reader never sees a half-written file.

Each table lives in ``OUT/tables/<table>/part-<key>.parquet``. A part is written to a temporary name that does
not end in ``.parquet`` (DuckDB's ``*.parquet`` glob matches dot-files too), flushed, then moved into place with
``os.replace``, which is atomic on one file system.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from audit.store.schemas import TABLES


def table_dir(out: Path, table: str) -> Path:
    return Path(out) / "tables" / table


def rows_to_table(table: str, rows: Sequence[dict] | dict[str, Sequence]) -> pa.Table:
    """Rows (a list of dicts, or a dict of columns) → an Arrow table with the table's schema."""
    schema = TABLES[table]
    if isinstance(rows, dict):
        return pa.Table.from_pydict({f.name: rows[f.name] for f in schema}, schema=schema)
    return pa.Table.from_pylist(list(rows), schema=schema)


def write_part(out: Path, table: str, data: pa.Table, key: str) -> Path:
    """Write ``data`` as part ``key`` of ``table`` atomically; returns the final path."""
    directory = table_dir(out, table)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"part-{key}.parquet"
    temporary = directory / f".part-{key}.{os.getpid()}.tmp"
    pq.write_table(data.cast(TABLES[table]), temporary, compression="zstd")
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    return final


def read_table(out: Path, table: str) -> pa.Table:
    """All parts of ``table`` (an empty table with the schema when there are none)."""
    directory = table_dir(out, table)
    parts = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    if not parts:
        return TABLES[table].empty_table()
    return pa.concat_tables([pq.read_table(p).cast(TABLES[table]) for p in parts])


def read_rows(
    out: Path, table: str, columns: Sequence[str] | None = None, where: ds.Expression | None = None
) -> pa.Table:
    """Some columns and rows of ``table``, read without loading the rest (Parquet column projection and row-group
    statistics), for large tables such as ``maps``."""
    directory = table_dir(out, table)
    parts = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    schema = TABLES[table]
    if not parts:
        empty = schema.empty_table()
        return empty.select(list(columns)) if columns is not None else empty
    return ds.dataset(parts, schema=schema, format="parquet").to_table(
        columns=list(columns) if columns is not None else None, filter=where
    )
