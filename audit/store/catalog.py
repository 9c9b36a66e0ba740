"""The DuckDB catalog (``OUT/audit.duckdb``) and read-only queries for users.

The catalog holds real tables copied from the Parquet parts, so the file is self-contained: it can be moved or
mailed, and it does not depend on the reader's working directory. Parquet under ``OUT/tables`` stays the
source of truth; the catalog is rebuilt from it at the end of every run, into a temporary file that replaces the
old one atomically (a reader that has the old file open keeps a consistent view).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from audit.errors import QueryError
from audit.store.parquet import table_dir
from audit.store.schemas import TABLES

CATALOG_NAME = "audit.duckdb"
READ_ONLY_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})


def build_catalog(out: Path) -> Path:
    """(Re)build ``OUT/audit.duckdb`` with one table per Parquet table."""
    out = Path(out)
    final = out / CATALOG_NAME
    temporary = out / f".{CATALOG_NAME}.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    con = duckdb.connect(str(temporary))
    try:
        for table, schema in TABLES.items():
            parts = sorted(table_dir(out, table).glob("part-*.parquet"))
            if parts:
                files = ", ".join("'" + str(p.resolve()).replace("'", "''") + "'" for p in parts)
                con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM read_parquet([{files}], union_by_name=true)')
            else:
                con.register("empty_arrow", schema.empty_table())
                con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM empty_arrow')
                con.unregister("empty_arrow")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(temporary, final)
    return final


def query(out: Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement against a finished audit.

    The catalog is opened read-only, with file-system access disabled and the configuration locked, and only
    ``SELECT``/``EXPLAIN`` statements are accepted, so a query can neither change the audit nor read or write
    other files.

    Returns:
        (column names, rows).
    """
    catalog = Path(out) / CATALOG_NAME
    if not catalog.is_file():
        raise QueryError(f"no audit found at {out}: {catalog} does not exist; run `audit run --out {out}` first")
    con = duckdb.connect(str(catalog), read_only=True, config={"enable_external_access": False})
    try:
        con.execute("SET lock_configuration = true")
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as exc:
            raise QueryError(f"could not parse the query: {exc}") from None
        if len(statements) != 1:
            raise QueryError(f"expected exactly one SQL statement, found {len(statements)}")
        kind = statements[0].type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise QueryError(f"only read-only queries (SELECT) are allowed; found a statement of type {kind}")
        try:
            relation = con.execute(sql)
            columns = [d[0] for d in relation.description or []]
            return columns, relation.fetchall()
        except duckdb.Error as exc:
            raise QueryError(f"query failed: {exc}") from None
    finally:
        con.close()
