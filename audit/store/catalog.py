"""The DuckDB catalog (``OUT/audit.duckdb``) and read-only queries for users.

The catalog holds real tables copied from the Parquet parts, so the file is self-contained: it can be moved or
mailed, and it does not depend on the reader's working directory. Parquet under ``OUT/tables`` stays the
source of truth; the catalog is rebuilt from it at the end of every run, into a temporary file of its own (a name
no other writer uses) that replaces the old one atomically: a reader that has the old file open keeps a
consistent view, a reader that opens it afterwards sees the new one, and no reader ever waits for a lock or sees a
half-built catalog.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

import duckdb

from audit.errors import QueryError
from audit.store.parquet import table_dir
from audit.store.schemas import TABLES

CATALOG_NAME = "audit.duckdb"
READ_ONLY_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})
# ``.audit.duckdb.<pid>[.<token>].tmp`` and its write-ahead log ``….tmp.wal``.
_TEMPORARY = re.compile(re.escape(f".{CATALOG_NAME}.") + r"(\d+)(\.[0-9a-f]+)?\.tmp(\.wal)?")


def build_catalog(out: Path) -> Path:
    """(Re)build ``OUT/audit.duckdb`` with one table per Parquet table."""
    out = Path(out)
    final = out / CATALOG_NAME
    _remove_abandoned_temporaries(out)
    temporary = out / f".{CATALOG_NAME}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
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
        with open(temporary, "rb+") as handle:  # on disk before it replaces the old catalog
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        _remove_companions(temporary)
    return final


def _remove_companions(temporary: Path) -> None:
    """The temporary catalog (when it was not moved into place) and the files DuckDB kept beside it."""
    for path in (temporary, temporary.with_name(temporary.name + ".wal")):
        path.unlink(missing_ok=True)


def _remove_abandoned_temporaries(out: Path) -> None:
    """Temporary catalogs of builds killed on this machine (their process is gone); a live writer's are kept."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: keep every file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or cannot be asked: keep its file
        return True
    return True


def query(out: Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement against a finished audit.

    The catalog is attached read-only to a private in-memory database, with file-system access disabled and the
    configuration locked, and only ``SELECT``/``EXPLAIN`` statements are accepted, so a query can neither change
    the audit nor read or write other files. Each call opens the catalog afresh (never a database instance that
    another connection of this process holds), so it is safe from several threads at once, sees the newest
    catalog, and works while an audit rebuilds it.

    Returns:
        (column names, rows).
    """
    catalog = Path(out) / CATALOG_NAME
    if not catalog.is_file():
        raise QueryError(f"no audit found at {out}: {catalog} does not exist; run `audit run --out {out}` first")
    with tempfile.TemporaryDirectory(prefix="audit-sql-") as spill:
        con = duckdb.connect(":memory:")
        try:
            try:
                con.execute(f"ATTACH {_literal(catalog.resolve())} AS audit (READ_ONLY)")
            except duckdb.Error as exc:
                raise QueryError(f"could not open the catalog {catalog}: {exc}") from None
            con.execute("USE audit")
            con.execute(f"SET temp_directory = {_literal(Path(spill))}")  # a large sort spills here, not in the CWD
            con.execute("SET enable_external_access = false")
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


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"
