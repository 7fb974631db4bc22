"""PostgreSQL as the store's database: for several Herald nodes sharing one database.

SQLite (one file beside the node) stays the default; ``[storage] store =
"postgresql://..."`` puts the message log, outbox, audit trail, review queue,
care transitions and console on a PostgreSQL server instead (psycopg 3).

The store's jobs are written once, in the SQL both engines understand, and run
on either. A :class:`PgConnection` gives them the part of :mod:`sqlite3`'s
connection they use (``execute``, ``executemany``, rows read by name or
position, ``BEGIN``/``COMMIT``/``SAVEPOINT``) and rewrites what differs, once
per statement text (:func:`translate`):

- ``?`` placeholders become ``%s``;
- ``INSERT OR IGNORE`` becomes ``ON CONFLICT DO NOTHING`` and ``INSERT OR
  REPLACE`` an upsert on the table's key (:data:`UPSERT_KEYS`);
- in the schema: ``BLOB`` is ``BYTEA`` (and so are the columns of text that
  hold sealed values, :data:`SEALED_TEXT_COLUMNS`), ``REAL`` is ``DOUBLE PRECISION``,
  ``INTEGER`` is ``BIGINT`` (an ``INTEGER PRIMARY KEY`` takes its values from
  a sequence, as SQLite's rowid does), ``COLLATE NOCASE`` is a
  case-insensitive ICU collation, ``WITHOUT ROWID`` goes;
- ``CAST(x AS BLOB)`` casts to ``BYTEA``; SQLite's planner hints (``INDEXED
  BY``, ``CROSS JOIN ... ON`` for the join order) go, PostgreSQL's planner
  choosing.

Statements that have no common form (a SQLite ``PRAGMA``, reserving a
message's id, JSON functions) ask :func:`is_postgres` and say both forms where
they are. Errors come back as :mod:`sqlite3`'s exception classes (an
:class:`sqlite3.IntegrityError` for a broken constraint), so a job catches
one vocabulary whatever the engine.

Several nodes: every write transaction of a node's writer first takes one
transaction-level advisory lock (:data:`WRITE_LOCK`), so the audit chain has
one head and message ids stay in commit order, as with SQLite's single
writer; work (the pipeline's messages, the outbox's notifications) is
claimed row by row with ``FOR UPDATE SKIP LOCKED`` and a lease
(:mod:`gateway.store.claims`).
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.errors import StoreError
from gateway.store.keys import KeyRing

__all__ = [
    "SEALED_TEXT_COLUMNS",
    "UPSERT_KEYS",
    "WRITE_LOCK",
    "PgConnection",
    "PostgresDatabase",
    "connect",
    "is_postgres",
    "parse_store",
    "translate",
]

#: The transaction-level advisory lock every write transaction takes first (one writer at a time
#: across nodes: one chain head). Any 64-bit number no other application on the server uses.
WRITE_LOCK = 0x4845524C44  # "HERLD"

#: How long a session may sit idle inside a transaction before the server ends it.
IDLE_IN_TRANSACTION_SECONDS = 60
#: How long a node's writer waits for the nodes' writer lock (or a row) before its commit fails:
#: intake answers AE/CE and the sender sends again, rather than every ACK waiting without end.
LOCK_WAIT_SECONDS = 10

#: The conflict target of ``INSERT OR REPLACE`` per table (its primary key).
UPSERT_KEYS: dict[str, tuple[str, ...]] = {
    "matches": ("message_id",),
    "confirmed_links": ("mrn_hash", "mrn_authority", "aco_id"),
    "key_check": ("name",),
    "console_meta": ("name",),
    "roster_versions": ("version",),
}


class PostgresDatabase(os.PathLike):
    """Where the store is when it is on PostgreSQL: the server's URL, and the node's own folder.

    Passed wherever a SQLite database's path is (``Config.database``,
    :class:`~gateway.store.Store`, :func:`~gateway.store.schema.open_database`).
    As a path (``os.fspath``) it names ``<data_dir>/herald.pg``, which is never
    created: the files a node keeps beside its database (the roster it reads,
    its file drops) go in that folder, as they do beside ``herald.db``.
    """

    def __init__(self, url: str, folder: Path | str) -> None:
        self.url = url
        self.folder = Path(folder)

    def __fspath__(self) -> str:
        return str(self.folder / "herald.pg")

    def __str__(self) -> str:
        return redacted(self.url)

    def __repr__(self) -> str:
        return f"PostgresDatabase({redacted(self.url)!r}, {str(self.folder)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PostgresDatabase) and (self.url, self.folder) == (other.url, other.folder)

    def __hash__(self) -> int:
        return hash((self.url, self.folder))

    def __reduce__(self):  # crosses to the pipeline's worker processes
        return (PostgresDatabase, (self.url, str(self.folder)))

    @property
    def name(self) -> str:
        return "herald.pg"

    def with_name(self, name: str) -> Path:
        return self.folder / name

    def exists(self) -> bool:
        """Whether the server answers and holds a Herald schema."""
        try:
            conn = connect(self)
        except StoreError:
            return False
        try:
            return table_exists(conn, "migrations")
        finally:
            conn.close()


def redacted(url: str) -> str:
    """The URL without its password, in the address or the query string (for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc[-1]}")
    if "password" in parts.query.lower():
        parts = parts._replace(query=re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query))
    return urlunsplit(parts)


def parse_store(value: str, data_dir: Path) -> Path | PostgresDatabase:
    """``[storage] store``: ``sqlite:///path`` (relative to ``data_dir``), or ``postgresql://...``."""
    value = value.strip()
    if value.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(value, data_dir)
    if value.startswith("sqlite:///"):
        path = Path(value[len("sqlite:///") :]).expanduser()
        return path if path.is_absolute() else data_dir / path
    raise ValueError("must be sqlite:///<path> or postgresql://user@host:port/database")


def is_postgres(conn: Any) -> bool:
    """Whether ``conn`` is a PostgreSQL connection (:class:`PgConnection`)."""
    return isinstance(conn, PgConnection)


def table_exists(conn: Any, name: str) -> bool:
    """Whether the database has a table called ``name`` (either engine)."""
    if not is_postgres(conn):
        import sqlite_utils

        return sqlite_utils.Database(conn)[name].exists()
    sql = "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = ?"
    return conn.execute(sql, (name,)).fetchone() is not None


def column_names(conn: Any, table: str) -> list[str]:
    """The names of a table's columns (either engine)."""
    if not is_postgres(conn):
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    sql = "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?"
    return [r[0] for r in conn.execute(sql + " ORDER BY ordinal_position", (table,))]


# -- statements ----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\?")
_INSERT_OR = re.compile(r"^\s*INSERT\s+OR\s+(IGNORE|REPLACE)\s+INTO\s+(\w+)\s*(\(([^)]*)\))?", re.IGNORECASE)
_DDL = re.compile(r"^\s*(CREATE\s+TABLE|ALTER\s+TABLE\s+\w+\s+ADD\s+COLUMN)", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def translate(sql: str, has_params: bool = True) -> str:
    """A statement as the store writes it (SQLite's dialect), in PostgreSQL's."""
    text = sql
    upper = text.lstrip().upper()
    if upper.startswith("BEGIN"):
        return "BEGIN"
    match = _INSERT_OR.match(text)
    if match:
        action, table, _, columns = match.groups()
        text = "INSERT INTO " + table + (f" ({columns})" if columns else "") + text[match.end() :]
        if action.upper() == "IGNORE":
            text += " ON CONFLICT DO NOTHING"
        else:
            if columns is None or table not in UPSERT_KEYS:
                raise StoreError(f"INSERT OR REPLACE INTO {table} needs its columns and a key in UPSERT_KEYS")
            key = UPSERT_KEYS[table]
            names = [c.strip() for c in columns.split(",")]
            others = [c for c in names if c not in key]
            update = ", ".join(f"{c} = EXCLUDED.{c}" for c in others)
            text += f" ON CONFLICT ({', '.join(key)}) " + (f"DO UPDATE SET {update}" if update else "DO NOTHING")
    if _DDL.match(text):
        text = _ddl(text)
    text = re.sub(r"\bgroup_concat\(([^)]*)\)", r"string_agg(CAST(\1 AS TEXT), ',')", text, flags=re.IGNORECASE)
    text = re.sub(r"\bAS\s+BLOB\s*\)", "AS BYTEA)", text, flags=re.IGNORECASE)  # CAST(x AS BLOB)
    # SQLite's planner hints (an index; CROSS JOIN ... ON for the join order): PostgreSQL's planner chooses.
    text = re.sub(r"\s+INDEXED\s+BY\s+\w+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\bCROSS\s+JOIN(?=\s+\w+(?:\s+\w+)?\s+ON\b)", "JOIN", text, flags=re.IGNORECASE)
    if has_params:
        text = text.replace("%", "%%")
        text = _PLACEHOLDER.sub(lambda m: "%s" if m.group(0) == "?" else m.group(0), text)
    return text


#: The columns of text that hold sealed values (messages.fhir, notifications.payload, reviews.candidates):
#: sealed, a value is bytes, which SQLite keeps in a TEXT column as it is; here they are BYTEA, as the
#: other sealed columns (BLOB) are. A connection writes their text as bytes (``KeyRing.binary``).
SEALED_TEXT_COLUMNS = ("fhir", "payload", "candidates")
_SEALED_TEXT = re.compile(rf"\b({'|'.join(SEALED_TEXT_COLUMNS)})\s+TEXT\b", re.IGNORECASE)


def _ddl(text: str) -> str:
    text = _SEALED_TEXT.sub(r"\1 BYTEA", text)
    text = re.sub(r"\bINTEGER\s+PRIMARY\s+KEY\b", "BIGSERIAL PRIMARY KEY", text, flags=re.IGNORECASE)
    text = re.sub(r"\bINTEGER\b", "BIGINT", text, flags=re.IGNORECASE)
    text = re.sub(r"\bBLOB\b", "BYTEA", text, flags=re.IGNORECASE)
    text = re.sub(r"\bREAL\b", "DOUBLE PRECISION", text, flags=re.IGNORECASE)
    text = re.sub(r"\bCOLLATE\s+NOCASE\b", "COLLATE herald_nocase", text, flags=re.IGNORECASE)
    text = re.sub(r"\)\s*WITHOUT\s+ROWID\s*$", ")", text, flags=re.IGNORECASE)
    return text


# -- rows ----------------------------------------------------------------------------------


class Row(tuple):
    """A result row read by position or by column name, like :class:`sqlite3.Row`."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def _row_factory(cursor):
    description = cursor.description
    if description is None:
        return tuple
    cls = _row_class(tuple(d.name for d in description))
    return lambda values: cls(values)


# -- errors --------------------------------------------------------------------------------


def _as_sqlite_error(e: Exception) -> Exception:
    """psycopg's error as :mod:`sqlite3`'s class, its text without the server's DETAIL.

    The DETAIL of a broken constraint quotes the failing row ("Failing row
    contains (...)"): patient data, which must not reach a log, a message's
    ``reason`` or the audit trail. Kept: the class, the primary message and
    the table, column and constraint named. An error that is not psycopg's
    (a bug in a job) is raised as it is.
    """
    import psycopg

    if not isinstance(e, psycopg.Error):
        return e
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    first_line = (str(e).splitlines() or [""])[0]
    text = f"{type(e).__name__}: {primary or first_line}".strip()
    where = [
        f"{name} {value}"
        for name, value in (
            ("table", getattr(diag, "table_name", None)),
            ("column", getattr(diag, "column_name", None)),
            ("constraint", getattr(diag, "constraint_name", None)),
        )
        if value
    ]
    if where:
        text += f" ({', '.join(where)})"
    if isinstance(e, psycopg.errors.IntegrityError):
        return sqlite3.IntegrityError(text)
    if isinstance(e, psycopg.OperationalError | psycopg.errors.OperationalError):
        return sqlite3.OperationalError(text)
    if isinstance(e, psycopg.errors.ProgrammingError):
        return sqlite3.ProgrammingError(text)
    return sqlite3.DatabaseError(text)


def _nul_error() -> type[Exception]:
    import psycopg

    return psycopg.DataError


def _without_nul(params: tuple) -> tuple:
    """Text parameters with NUL replaced by U+FFFD: PostgreSQL's text cannot hold NUL, SQLite's can.

    Only header fields can carry one (a frame's body is stored sealed, as bytes, whole); the message
    is stored, its header columns readable, rather than refused for ever.
    """
    return tuple(p.replace("\x00", "\ufffd") if isinstance(p, str) else p for p in params)


# -- the connection ------------------------------------------------------------------------


class PgConnection:
    """A psycopg connection that runs the store's statements (:func:`translate`) and returns :class:`Row`\\ s.

    In autocommit mode: the store's jobs say ``BEGIN`` and ``COMMIT``
    themselves, as they do on SQLite. ``keys`` is the key ring PHI is sealed
    and opened with (``open_database(keys=...)``).
    """

    dialect = "postgresql"

    def __init__(self, raw, location: PostgresDatabase, keys: KeyRing | None = None) -> None:
        self.raw = raw
        self.location = location
        # The columns that hold sealed values are BYTEA here: text written with encryption off goes as bytes.
        self.keys = (keys or KeyRing.disabled()).binary()

    # sqlite3.Connection's row_factory: rows here are always Row.
    row_factory = None

    #: A savepoint said outside a transaction, which began one (as SQLite does); its release commits.
    _implicit: str | None = None

    def execute(self, sql: str, params: Any = None):
        has = bool(params)
        if sql[:3] in ("SAV", "REL"):
            return self._savepoint(sql)
        text = translate(sql, has)
        args = tuple(params) if has else None
        try:
            try:
                return self.raw.execute(text, args)
            except _nul_error() as e:  # raised before sending: the transaction is not aborted
                if "NUL" not in str(e) or args is None:
                    raise
                return self.raw.execute(text, _without_nul(args))
        except Exception as e:
            raise _as_sqlite_error(e) from e

    def executemany(self, sql: str, seq):
        rows = [tuple(p) for p in seq]
        if not rows:
            return None
        text = translate(sql, True)
        try:
            with self.raw.cursor() as cur:
                try:
                    cur.executemany(text, rows)
                except _nul_error() as e:
                    if "NUL" not in str(e):
                        raise
                    cur.executemany(text, [_without_nul(r) for r in rows])
        except Exception as e:
            raise _as_sqlite_error(e) from e
        return None

    def _savepoint(self, sql: str):
        words = sql.split()
        try:
            if words[0].upper() == "SAVEPOINT" and not self.in_transaction:
                self.raw.execute("BEGIN")
                self._implicit = words[1]
            result = self.raw.execute(sql)
            if words[0].upper() == "RELEASE" and words[-1] == self._implicit:
                self._implicit = None
                self.raw.execute("COMMIT")
            return result
        except Exception as e:
            raise _as_sqlite_error(e) from e

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def commit(self) -> None:
        if self.in_transaction:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()

    def take_write_lock(self) -> None:
        """The one-writer-at-a-time lock (:data:`WRITE_LOCK`), held to the transaction's end."""
        self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bool_as_int(conn) -> None:
    """Python's True and False as 1 and 0, as SQLite stores them (the schema's flags are integers)."""
    import psycopg
    from psycopg.adapt import Dumper

    class BoolAsInt(Dumper):
        oid = psycopg.adapters.types["int8"].oid

        def dump(self, obj):
            return b"1" if obj else b"0"

    conn.adapters.register_dumper(bool, BoolAsInt)


def connect(location: PostgresDatabase, *, keys: KeyRing | None = None, readonly: bool = False) -> PgConnection:
    """A connection to the store's PostgreSQL database (a read-only session when ``readonly``)."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is an install requirement
        raise StoreError("the PostgreSQL store needs psycopg: pip install 'psycopg[binary]'") from None
    try:
        raw = psycopg.connect(
            location.url, autocommit=True, row_factory=_row_factory, connect_timeout=10, application_name="herald"
        )
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to {location}: {str(e).strip()}") from None
    _bool_as_int(raw)
    raw.execute("SET synchronous_commit = on")
    # A node frozen inside a transaction (a paused VM, a partition) must not hold the nodes' one writer
    # lock, or rows, until the server notices the dead peer: its session ends after this long idle in one.
    raw.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_SECONDS}s'")
    if readonly:
        raw.execute("SET default_transaction_read_only = on")
    return PgConnection(raw, location, keys)


def prepare_database(conn: PgConnection) -> None:
    """What the schema needs that SQLite has built in: a case-insensitive collation (``COLLATE NOCASE``)."""
    import psycopg

    try:
        _make_collation(conn)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
        pass  # another node starting at the same moment made it


def _make_collation(conn: PgConnection) -> None:
    conn.raw.execute(
        "DO $$ BEGIN "
        "IF NOT EXISTS (SELECT 1 FROM pg_collation WHERE collname = 'herald_nocase') THEN "
        "CREATE COLLATION herald_nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false); "
        "END IF; END $$"
    )
