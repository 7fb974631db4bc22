"""The main database's schema: its tables, the migrations that build them, and how it is opened.

One SQLite file (``herald.db``) in WAL mode with ``synchronous=FULL``.
Migrations run in order, once each, recorded in the ``migrations`` table; a
database written by a newer Herald is refused rather than guessed at.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import StoreError
from gateway.store.files import create_private_file, private_file, private_folder
from gateway.store.keys import KeyRing, KeyRingError
from gateway.store.postgres import PostgresDatabase, is_postgres, prepare_database, table_exists
from gateway.store.sealing import keys_of, link_context, mrn_hash

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "HeraldConnection",
    "check_keys",
    "iso",
    "migrate",
    "open_database",
    "schema_version",
    "utc_now",
]

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS migrations (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
)
"""

# Version 1: the first schema.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    peer TEXT,
    sending_application TEXT,
    sending_facility TEXT,
    message_type TEXT,
    trigger_event TEXT,
    control_id TEXT,
    version TEXT,
    processing_id TEXT,
    accept_ack_type TEXT,
    application_ack_type TEXT,
    charset TEXT,
    sha256 TEXT NOT NULL,
    raw BLOB NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    flag TEXT,
    ack_code TEXT,
    fhir TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_sender_control
    ON messages (sending_facility, sending_application, control_id);
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    message_id INTEGER,
    notification_id TEXT,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_message ON events (message_id, id);
CREATE TABLE IF NOT EXISTS roster_members (
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    mbi TEXT,
    mrn TEXT,
    mrn_authority TEXT,
    last_name TEXT NOT NULL,
    first_name TEXT NOT NULL,
    birth_date TEXT NOT NULL,
    sex TEXT NOT NULL,
    pcp_npi TEXT,
    pcp_name TEXT,
    care_manager TEXT,
    effective_start TEXT,
    effective_end TEXT,
    name_key TEXT NOT NULL,
    imported_at TEXT NOT NULL,
    PRIMARY KEY (aco_id, member_id)
);
CREATE INDEX IF NOT EXISTS roster_mbi ON roster_members (mbi);
CREATE INDEX IF NOT EXISTS roster_mrn ON roster_members (mrn, mrn_authority);
CREATE INDEX IF NOT EXISTS roster_name_key ON roster_members (name_key);
CREATE TABLE IF NOT EXISTS matches (
    message_id INTEGER PRIMARY KEY,
    aco_id TEXT,
    member_id TEXT,
    method TEXT,
    grade TEXT,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS notifications (
    id TEXT PRIMARY KEY,
    message_id INTEGER NOT NULL,
    recipient_role TEXT NOT NULL,
    recipient TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    event_code TEXT NOT NULL,
    summary TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS notifications_message ON notifications (message_id);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    id INTEGER PRIMARY KEY,
    notification_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS delivery_attempts_notification ON delivery_attempts (notification_id, id);
"""


# Version 2: a notification's Bundle is no longer stored per recipient (it is
# built from messages.fhir when sent), so notifications.payload may be NULL.
# SQLite cannot drop a NOT NULL constraint in place: the table is rebuilt.
# Rows written before keep their stored payload and are sent from it.
_SCHEMA_V2 = """
CREATE TABLE notifications_v2 (
    id TEXT PRIMARY KEY,
    message_id INTEGER NOT NULL,
    recipient_role TEXT NOT NULL,
    recipient TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    event_code TEXT NOT NULL,
    summary TEXT NOT NULL,
    payload TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT INTO notifications_v2 (id, message_id, recipient_role, recipient, channel, target, event_code, summary,
    payload, state, attempts, next_attempt_at, last_error, created_at, updated_at)
    SELECT id, message_id, recipient_role, recipient, channel, target, event_code, summary,
    payload, state, attempts, next_attempt_at, last_error, created_at, updated_at FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_v2 RENAME TO notifications;
CREATE INDEX notifications_due ON notifications (state, next_attempt_at);
CREATE INDEX notifications_message ON notifications (message_id)
"""

# Version 3: the roster moves to its own file (roster.db, see "roster: its own
# file" below); the main database keeps what the server writes while it runs:
# confirmed MRN links, the review queue, the score of a match.
_SCHEMA_V3 = """
CREATE TABLE confirmed_links (
    mrn TEXT NOT NULL,
    mrn_authority TEXT NOT NULL COLLATE NOCASE,
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    review_id INTEGER,
    confirmed_by TEXT NOT NULL,
    confirmed_at TEXT NOT NULL,
    PRIMARY KEY (mrn, mrn_authority, aco_id)
);
CREATE TABLE reviews (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL UNIQUE,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    grade TEXT NOT NULL,
    score REAL,
    candidates TEXT NOT NULL,
    decided_by TEXT,
    decided_at TEXT,
    aco_id TEXT,
    member_id TEXT,
    note TEXT
);
CREATE INDEX reviews_state ON reviews (state, id);
ALTER TABLE matches ADD COLUMN score REAL
"""

#: The roster columns of schema version 1 (what legacy_roster_members holds).
LEGACY_MEMBER_COLUMNS = (
    "aco_id",
    "member_id",
    "mbi",
    "mrn",
    "mrn_authority",
    "last_name",
    "first_name",
    "birth_date",
    "sex",
    "pcp_npi",
    "pcp_name",
    "care_manager",
    "effective_start",
    "effective_end",
)


# Version 3, continued: members imported by version 1 leave the main
# database. The table is renamed, not read here: the roster layer above the
# store (gateway.app.roster.adopt_legacy_roster) publishes them to the roster
# file, which needs matching's normalisation, and then drops the table.
_SCHEMA_V3_LEGACY = "ALTER TABLE roster_members RENAME TO legacy_roster_members"

# Version 4: a notification row no longer keeps a summary of the message (the
# patient's name, a second copy of PHI). What the demo showed from it is read
# from the message's Bundle. The table is rebuilt without the column; with
# secure_delete on (migrate sets it) the old pages are overwritten, and the
# checkpoint after the migration truncates the write-ahead log that still held
# them, so the names are gone from the files, not only from the schema.
_SCHEMA_V4 = """
CREATE TABLE notifications_v4 (
    id TEXT PRIMARY KEY,
    message_id INTEGER NOT NULL,
    recipient_role TEXT NOT NULL,
    recipient TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    event_code TEXT NOT NULL,
    payload TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT INTO notifications_v4 (id, message_id, recipient_role, recipient, channel, target, event_code,
    payload, state, attempts, next_attempt_at, last_error, created_at, updated_at)
    SELECT id, message_id, recipient_role, recipient, channel, target, event_code,
    payload, state, attempts, next_attempt_at, last_error, created_at, updated_at FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_v4 RENAME TO notifications;
CREATE INDEX notifications_due ON notifications (state, next_attempt_at);
CREATE INDEX notifications_message ON notifications (message_id)
"""


# Version 5: PHI at rest (gateway.store.sealing says what is sealed, bound to which
# row). Values are sealed as they are written; rows from before stay readable
# (plaintext opens as itself) until `herald keys rotate` seals them. A confirmed
# link's MRN is found by its keyed hash and kept sealed beside it (the table is
# rebuilt: the hash is its key). messages.sha256 now holds a keyed digest (32 hex
# digits); the plain SHA-256 of rows from before still recognises a retransmission
# until rotate replaces it. key_check names the ring the database is written with
# (KeyRing.fingerprint), so a wrong key is refused at start, by name.
_SCHEMA_V5 = """
CREATE TABLE key_check (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE confirmed_links_v5 (
    mrn_hash TEXT NOT NULL,
    mrn_authority TEXT NOT NULL COLLATE NOCASE,
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    review_id INTEGER,
    confirmed_by TEXT NOT NULL,
    confirmed_at TEXT NOT NULL,
    mrn BLOB NOT NULL,
    PRIMARY KEY (mrn_hash, mrn_authority, aco_id)
)
"""


def _migrate_v5(conn: sqlite3.Connection) -> None:
    run_sql(conn, _SCHEMA_V5)
    keys = keys_of(conn)
    rows = conn.execute("SELECT * FROM confirmed_links").fetchall()
    for r in rows:
        hashed = mrn_hash(keys, r["mrn"])
        sealed = keys.seal_text(r["mrn"], link_context(hashed, r["mrn_authority"], r["aco_id"]))
        conn.execute(
            "INSERT OR REPLACE INTO confirmed_links_v5 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (hashed, r["mrn_authority"], r["aco_id"], r["member_id"], r["review_id"], r["confirmed_by"])
            + (r["confirmed_at"], sealed),
        )
    conn.execute("DROP TABLE confirmed_links")
    conn.execute("ALTER TABLE confirmed_links_v5 RENAME TO confirmed_links")


# Version 6: a tamper-evident trail (gateway.store.events, gateway.store.integrity).
# Each event row carries the MAC chaining it to the row before; each message row a
# digest of its immutable columns; purged_at marks a message whose body retention
# removed (the row, its header and its digest stay). Rows from before are chained
# and stamped here, as they stand, and a "chain-started" event anchors them.
_SCHEMA_V6 = """
ALTER TABLE events ADD COLUMN mac BLOB;
ALTER TABLE messages ADD COLUMN digest BLOB;
ALTER TABLE messages ADD COLUMN purged_at TEXT
"""


def _migrate_v6(conn: sqlite3.Connection) -> None:
    from gateway.store import events, integrity

    run_sql(conn, _SCHEMA_V6)
    integrity.stamp_all(conn)
    events.chain_existing(conn, iso(utc_now()))


# Version 7: the recipient directory (gateway.store.directory), and what an outbox row
# needs to be sent through it: the directory entry and which of its channels, an
# ordering key per patient (a keyed hash: notifications for one patient to one
# destination go in the order their messages came), and the attribution shown in
# the human-readable summary (sealed: it names the member's PCP and ACO). Each attempt keeps
# the receiver's status (HTTP or SMTP code) and how long it took.
def _migrate_v7(conn: sqlite3.Connection) -> None:
    from gateway.store.directory import DIRECTORY_SCHEMA

    run_sql(conn, DIRECTORY_SCHEMA)
    run_sql(conn, _SCHEMA_V7)


_SCHEMA_V7 = """
ALTER TABLE notifications ADD COLUMN recipient_id TEXT NOT NULL DEFAULT '';
ALTER TABLE notifications ADD COLUMN channel_index INTEGER NOT NULL DEFAULT 0;
ALTER TABLE notifications ADD COLUMN patient_key TEXT NOT NULL DEFAULT '';
ALTER TABLE notifications ADD COLUMN attribution BLOB;
ALTER TABLE delivery_attempts ADD COLUMN status INTEGER;
ALTER TABLE delivery_attempts ADD COLUMN elapsed_ms INTEGER;
CREATE INDEX notifications_order ON notifications (patient_key, target, message_id)
    WHERE state IN ('pending', 'retrying') AND patient_key != ''
"""


# Version 8: care transitions (gateway.store.transitions). Each routed member's message
# leaves its episode event (sealed); the transitions service folds them into episodes (one
# per facility and visit number, found by the keyed hash of both; the state sealed) and
# makes worklist tasks (the FHIR Task sealed). Member and ACO ids, settings and statuses stay
# readable: the service and the CLI select by them.
_SCHEMA_V8 = """
CREATE TABLE episode_events (
    message_id INTEGER PRIMARY KEY,
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    episode_key TEXT NOT NULL,
    event BLOB NOT NULL,
    recorded_at TEXT NOT NULL,
    folded_at TEXT
);
CREATE INDEX episode_events_member ON episode_events (aco_id, member_id);
CREATE INDEX episode_events_key ON episode_events (episode_key);
CREATE INDEX episode_events_unfolded ON episode_events (message_id) WHERE folded_at IS NULL;
CREATE TABLE episodes (
    id INTEGER PRIMARY KEY,
    episode_key TEXT NOT NULL UNIQUE,
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    setting TEXT NOT NULL,
    status TEXT NOT NULL,
    snf INTEGER NOT NULL DEFAULT 0,
    state BLOB NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX episodes_member ON episodes (aco_id, member_id);
CREATE INDEX episodes_status ON episodes (status, setting);
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    code TEXT NOT NULL,
    episode_key TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    resource BLOB NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    closed_by TEXT
);
CREATE INDEX tasks_status ON tasks (status, aco_id);
CREATE INDEX tasks_member ON tasks (aco_id, member_id)
"""


# Version 9: the web console (gateway.store.console): its users and sessions (a session
# found by the hash of its cookie), and the message browser's blind index, message_terms
# (keyed hashes of the patient's identifiers, names and birth date, each with its message),
# with the indexes the browser reads by (control id, time received, a member's matches).
# The messages stored before are indexed in the background, not here.
def _migrate_v9(conn: sqlite3.Connection) -> None:
    from gateway.store.console import create_console_tables

    create_console_tables(conn)


# Version 10: claims (gateway.store.claims). On PostgreSQL several nodes share the tables, and a
# node marks the messages it converts and the notifications it sends with its name and a lease
# (seconds by the database server's clock), so no two nodes do the same work. SQLite (one node)
# leaves them empty.
_SCHEMA_V10 = """
ALTER TABLE messages ADD COLUMN claimed_by TEXT;
ALTER TABLE messages ADD COLUMN claim_expires REAL;
ALTER TABLE notifications ADD COLUMN claimed_by TEXT;
ALTER TABLE notifications ADD COLUMN claim_expires REAL
"""


# Version 11: the roster's published versions (gateway.store.roster_versions). With a PostgreSQL
# store every import adds its whole roster file (PHI sealed, as in the file) for every node to
# follow; on SQLite (one node, whose file is the roster) the tables stay empty.
def _migrate_v11(conn: sqlite3.Connection) -> None:
    from gateway.store.roster_versions import ROSTER_VERSIONS_SCHEMA

    run_sql(conn, ROSTER_VERSIONS_SCHEMA)


def _migrate_v3(conn: sqlite3.Connection) -> None:
    run_sql(conn, _SCHEMA_V3)
    if conn.execute("SELECT 1 FROM roster_members LIMIT 1").fetchone() is None:
        conn.execute("DROP TABLE roster_members")  # a new database: nothing to carry over
    else:
        run_sql(conn, _SCHEMA_V3_LEGACY)


def utc_now() -> datetime:
    """Now, in UTC (the default clock)."""
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """An aware datetime as ISO 8601 in UTC with milliseconds."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


class HeraldConnection(sqlite3.Connection):
    """A connection to a Herald database and the key ring (``keys``) its PHI is sealed and opened with."""

    keys: KeyRing


def open_database(
    path: Path | str | PostgresDatabase, *, readonly: bool = False, keys: KeyRing | None = None
) -> sqlite3.Connection:
    """Open the store's SQLite file with Herald's pragmas, sealing and opening PHI with ``keys``.

    Without ``keys`` the disabled ring: values are written as given (and
    sealed ones cannot be read). A read-only connection with an enabled ring
    checks that the database was written with it (:func:`check_keys`). A new
    file is created 0600 in a folder of mode 0700. A
    :class:`~gateway.store.postgres.PostgresDatabase` opens a connection to
    the PostgreSQL server instead (:mod:`gateway.store.postgres`).
    """
    if isinstance(path, PostgresDatabase):
        return _open_postgres(path, readonly, keys)
    path = Path(path)
    if readonly and not path.exists():
        raise StoreError(f"no Herald database at {path}")
    try:
        conn = _open(path, readonly)
    except sqlite3.DatabaseError as e:
        raise NotAHeraldDatabase(f"{path} is not a Herald database ({e})") from None
    conn.keys = keys or KeyRing.disabled()
    if readonly and conn.keys.enabled:
        try:
            check_keys(conn, path)
        except BaseException:
            conn.close()
            raise
    return conn


def _open_postgres(location: PostgresDatabase, readonly: bool, keys: KeyRing | None):
    from gateway.store.postgres import connect

    conn = connect(location, keys=keys, readonly=readonly)
    if readonly:
        try:
            if not table_exists(conn, "migrations"):
                raise StoreError(f"no Herald database at {location}")
            if conn.keys.enabled:
                check_keys(conn, location)
        except BaseException:
            conn.close()
            raise
    return conn


class NotAHeraldDatabase(StoreError):
    """The file exists but SQLite cannot use it as a database."""


def _open(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, factory=HeraldConnection
        )
    else:
        if not path.parent.exists():
            private_folder(path.parent)
        # Created 0600 before SQLite sees it: SQLite gives the -wal and -shm files the
        # database file's mode. A file from an older Herald (0644) is tightened.
        create_private_file(path)
        for companion in ("", "-wal", "-shm"):
            private_file(path.with_name(path.name + companion))
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, factory=HeraldConnection)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    # Deleted rows are overwritten, not left in free pages: a migration that drops PHI
    # (version 4) must not leave it readable in the file. Many builds default to this.
    conn.execute("PRAGMA secure_delete=ON")
    # Statement journals (each pipeline outcome's savepoint) and temporary tables stay in memory:
    # no page images of the database in temporary files, and none of their writes.
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


#: Schema migrations, applied in order; each runs once and is recorded in the
#: ``migrations`` table. Append new versions here; never edit an applied one.
#: A step is SQL text (statements separated by ``;``) or a function of the
#: connection, run inside the migration's transaction.
MIGRATIONS: list[tuple[int, str | Callable[[sqlite3.Connection], None]]] = [
    (1, _SCHEMA_V1),
    (2, _SCHEMA_V2),
    (3, _migrate_v3),
    (4, _SCHEMA_V4),
    (5, _migrate_v5),
    (6, _migrate_v6),
    (7, _migrate_v7),
    (8, _SCHEMA_V8),
    (9, _migrate_v9),
    (10, _SCHEMA_V10),
    (11, _migrate_v11),
]

#: The schema version this code writes.
SCHEMA_VERSION = MIGRATIONS[-1][0]


def run_sql(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script``'s statements (separated by ``;``) one by one, in the caller's transaction."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def schema_version(conn: sqlite3.Connection) -> int:
    """The newest migration applied to this database (0 for a new file)."""
    if not table_exists(conn, "migrations"):
        return 0
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM migrations").fetchone()[0]


def migrate(conn: sqlite3.Connection, now: datetime | None = None) -> None:
    """Bring the schema up to :data:`SCHEMA_VERSION`, one recorded migration at a time (idempotent).

    Refuses a database written by a newer Herald rather than guess at it.
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {current}, newer than this Herald's {SCHEMA_VERSION}; upgrade Herald"
        )
    if current == SCHEMA_VERSION:
        return
    stamp = iso(now or utc_now())
    postgres = is_postgres(conn)
    if postgres:
        prepare_database(conn)
    else:
        # Whatever this build's default: the pages that held PHI a migration drops are overwritten.
        conn.execute("PRAGMA secure_delete=ON")
    conn.execute("BEGIN IMMEDIATE")
    try:
        if postgres:  # one node migrates; another starting meanwhile waits, then finds it done
            conn.take_write_lock()
        run_sql(conn, _MIGRATIONS_TABLE)
        # Read again under the write lock: another process may have migrated meanwhile.
        current = schema_version(conn)
        for version, step in MIGRATIONS:
            if version <= current:
                continue
            if callable(step):
                step(conn)
            else:
                run_sql(conn, step)
            conn.execute("INSERT INTO migrations (version, applied_at) VALUES (?, ?)", (version, stamp))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if current < 4 and not postgres:
        # The pages that held the summaries were overwritten in the database (secure_delete);
        # their older copies in the write-ahead log go with a checkpoint that truncates it.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def check_keys(conn: sqlite3.Connection, path: Path | str = "the database", *, record: bool = False) -> None:
    """Refuse a key ring that is not the one this database is written with (:class:`KeyRingError`).

    The database names its ring by the ring's fingerprint (``key_check``).
    One written with encryption off takes a key (``record``: the writer
    notes it); one written with a key refuses another key, and refuses to
    be written with encryption off. A database older than schema version 5
    has no record and takes any ring.
    """
    keys = keys_of(conn)
    if not table_exists(conn, "key_check"):
        return
    row = conn.execute("SELECT value FROM key_check WHERE name = 'lookup'").fetchone()
    stored = row[0] if row else None
    if stored == keys.fingerprint:
        return
    if stored is None or (stored == KeyRing.disabled().fingerprint and keys.enabled):
        if record:
            names = ["lookup"]
            if conn.execute("SELECT 1 FROM messages LIMIT 1").fetchone() is None:
                names.append("digests")  # no message yet: every digest will be this ring's
            conn.executemany(
                "INSERT OR REPLACE INTO key_check (name, value) VALUES (?, ?)", [(n, keys.fingerprint) for n in names]
            )
        return
    if not keys.enabled:
        raise KeyRingError(
            f"{path} is encrypted (key check {stored}) but encryption at rest is off: "
            "set [security] key_file (or HERALD_KEYS) to its key ring"
        )
    raise KeyRingError(
        f"{path} was written with another key ring (key check {stored}; {keys.source} has {keys.fingerprint}): "
        "is [security] key_file (or HERALD_KEYS) the right one?"
    )


def check_database(conn: sqlite3.Connection) -> None:
    """Raise :class:`StoreError` unless ``conn`` is a Herald database (its message log can be read)."""
    try:
        conn.execute("SELECT id FROM messages LIMIT 1").fetchall()
    except sqlite3.Error as e:
        raise StoreError(str(e)) from None


@contextlib.contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read snapshot on ``conn`` for the block (a batch sees one state of the confirmed links)."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def legacy_roster(conn: sqlite3.Connection) -> list[dict] | None:
    """The members a version-1 database held in itself (every column as text), or None when there is none."""
    if not table_exists(conn, "legacy_roster_members"):
        return None
    cols = ", ".join(LEGACY_MEMBER_COLUMNS)
    rows = conn.execute(f"SELECT {cols} FROM legacy_roster_members ORDER BY aco_id, member_id").fetchall()
    return [{c: "" if r[c] is None else str(r[c]) for c in LEGACY_MEMBER_COLUMNS} for r in rows]


def drop_legacy_roster(conn: sqlite3.Connection) -> None:
    """Forget the version-1 members once they are published in the roster file."""
    conn.execute("DROP TABLE IF EXISTS legacy_roster_members")
