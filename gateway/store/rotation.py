"""Sealing again under the newest key: the jobs ``herald keys rotate`` runs, and ``herald keys status``.

A rotation appends a key to the ring; new values are sealed under it at once.
The values sealed before (and plaintext written before encryption at rest)
are sealed again here, a bounded batch per job: each job is one small
transaction on the store's writer, so intake's commits go on between them.
Lookups keep their hashes across a rotation (they are under the first key);
only hashes made under another ring (a database first written with
encryption off, or message digests from before schema version 5) are made
again, from the opened values.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.store.integrity import check_message, stamp_message
from gateway.store.keys import SEALED_PREFIX, KeyRing, KeyRingError
from gateway.store.postgres import PostgresDatabase
from gateway.store.sealing import (
    attribution_context,
    candidates_context,
    episode_event_context,
    episode_state_context,
    keys_of,
    link_context,
    message_context,
    mrn_hash,
    payload_context,
    task_context,
)

__all__ = [
    "SEALED_COLUMNS",
    "SealedColumn",
    "digests_keyed",
    "empty_the_log",
    "key_counts",
    "rehash_digests",
    "reseal_batch",
]


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """A column of sealed values: its table, the key its rows are walked by, and each row's context."""

    name: str  # as status and progress say it: "messages.raw"
    table: str
    key: str | None  # an integer (or text) column that orders the rows; None: walked by what they hold
    column: str
    also: tuple[str, ...]  # other columns the context needs
    context: Callable[[sqlite3.Row], bytes]
    text: bool  # the plaintext is text (JSON), not bytes
    before_first: int | str = -1  # a value below every key (text keys: "")


SEALED_COLUMNS = (
    SealedColumn("messages.raw", "messages", "id", "raw", (), lambda r: message_context("raw", r["id"]), False),
    SealedColumn("messages.fhir", "messages", "id", "fhir", (), lambda r: message_context("fhir", r["id"]), True),
    SealedColumn(
        "notifications.payload", "notifications", "id", "payload", (), lambda r: payload_context(r["id"]), True, ""
    ),
    SealedColumn(
        "reviews.candidates",
        "reviews",
        "id",
        "candidates",
        ("message_id",),
        lambda r: candidates_context(r["message_id"]),
        True,
    ),
    # Its key is three columns and a re-hash changes one of them: each batch takes the rows not yet
    # sealed under the newest key, whichever they are.
    SealedColumn(
        "confirmed_links.mrn",
        "confirmed_links",
        None,
        "mrn",
        ("mrn_hash", "mrn_authority", "aco_id"),
        lambda r: link_context(r["mrn_hash"], r["mrn_authority"], r["aco_id"]),
        True,
    ),
    SealedColumn(
        "notifications.attribution",
        "notifications",
        "id",
        "attribution",
        (),
        lambda r: attribution_context(r["id"]),
        True,
        "",
    ),
    SealedColumn(
        "episode_events.event",
        "episode_events",
        "message_id",
        "event",
        (),
        lambda r: episode_event_context(r["message_id"]),
        True,
    ),
    SealedColumn(
        "episodes.state",
        "episodes",
        "id",
        "state",
        ("episode_key",),
        lambda r: episode_state_context(r["episode_key"]),
        True,
    ),
    SealedColumn("tasks.resource", "tasks", "id", "resource", (), lambda r: task_context(r["id"]), True, ""),
)
_BY_NAME = {c.name: c for c in SEALED_COLUMNS}


def _head(keys: KeyRing) -> bytes:
    key_id = keys.current_id.encode("ascii")
    return SEALED_PREFIX + bytes([len(key_id)]) + key_id


def reseal_batch(conn: sqlite3.Connection, name: str, after, limit: int) -> tuple[int, object | None]:
    """Seal under the newest key up to ``limit`` values of column ``name`` (rows after ``after``) that are not.

    Returns (how many were sealed, the row key to go on after; None when the
    column is done). A column walked without a key (confirmed links) finds
    the rows left by what they hold, whatever ``after`` says. A confirmed
    link's MRN is hashed again on the way when its hash is another ring's.
    """
    keys = keys_of(conn)
    if not keys.enabled:
        return 0, None
    c = _BY_NAME[name]
    head = _head(keys)
    # A value sealed under the newest key starts with its head; text (plaintext from before) never does.
    left = f"{c.column} IS NOT NULL AND substr(CAST({c.column} AS BLOB), 1, ?) != ?"
    if c.key is None:
        rows = conn.execute(
            f"SELECT {', '.join((c.column, *c.also))} FROM {c.table} WHERE {left} ORDER BY {', '.join(c.also)} LIMIT ?",
            (len(head), head, limit),
        ).fetchall()
    else:
        start = after if after is not None else c.before_first
        rows = conn.execute(
            f"SELECT {', '.join(dict.fromkeys((c.key, c.column, *c.also)))} FROM {c.table} "
            f"WHERE {c.key} > ? AND {left} ORDER BY {c.key} LIMIT ?",
            (start, len(head), head, limit),
        ).fetchall()
    for r in rows:
        if c.table == "confirmed_links":
            _reseal_link(conn, keys, r)
            continue
        value = r[c.column]
        if c.text:
            sealed = keys.seal_text(keys.open_text(value, c.context(r)), c.context(r))
        else:
            sealed = keys.seal(keys.open(value, c.context(r)), c.context(r))
        conn.execute(f"UPDATE {c.table} SET {c.column} = ? WHERE {c.key} = ?", (sealed, r[c.key]))
    if len(rows) < limit:
        return len(rows), None
    return len(rows), rows[-1][c.key] if c.key is not None else len(rows)


def _reseal_link(conn: sqlite3.Connection, keys: KeyRing, r: sqlite3.Row) -> None:
    authority, aco_id = r["mrn_authority"], r["aco_id"]
    mrn = keys.open_text(r["mrn"], link_context(r["mrn_hash"], authority, aco_id))
    hashed = mrn_hash(keys, mrn)
    sealed = keys.seal_text(mrn, link_context(hashed, authority, aco_id))
    where = "mrn_hash = ? AND mrn_authority = ? AND aco_id = ?"
    if hashed != r["mrn_hash"]:
        # A hash under the disabled ring's key (written with encryption off) is made again; the same
        # link confirmed since under this ring's hash gives way (what SQLite's UPDATE OR REPLACE did).
        conn.execute(f"DELETE FROM confirmed_links WHERE {where}", (hashed, authority, aco_id))
    conn.execute(
        f"UPDATE confirmed_links SET mrn_hash = ?, mrn = ? WHERE {where}",
        (hashed, sealed, r["mrn_hash"], authority, aco_id),
    )


def rehash_digests(conn: sqlite3.Connection, after: int, limit: int) -> tuple[int, int | None]:
    """Make the digests of up to ``limit`` messages after id ``after`` this ring's keyed digests where they
    are not (a plain SHA-256 from before schema version 5, or the disabled ring's). Returns (how many were
    changed, the id to go on after; None when done, and then the database notes that its digests are keyed).

    Only a message whose record checks (:func:`~gateway.store.integrity.check_message`) gets a new digest,
    and its row is stamped again: a rotation never launders an altered record.
    """
    keys = keys_of(conn)
    rows = conn.execute(
        "SELECT id, raw, sha256, purged_at FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
    ).fetchall()
    changed = 0
    for r in rows:
        if r["raw"] is None or r["purged_at"]:  # purged (raw = X''): its digest stays, the record of what was received
            continue
        try:
            digest = keys.digest(keys.open(r["raw"], message_context("raw", r["id"])))
        except KeyRingError:
            continue  # altered, or under a key this ring lacks: left for audit verify to name
        if digest == r["sha256"] or check_message(conn, r["id"]) is not None:
            continue
        conn.execute("UPDATE messages SET sha256 = ? WHERE id = ?", (digest, r["id"]))
        stamp_message(conn, r["id"])
        changed += 1
    if len(rows) < limit:
        conn.execute("INSERT OR REPLACE INTO key_check (name, value) VALUES ('digests', ?)", (keys.fingerprint,))
        return changed, None
    return changed, rows[-1]["id"]


def digests_keyed(conn: sqlite3.Connection) -> bool:
    """Whether every message digest is known to be this ring's keyed digest (a full pass was made with it)."""
    try:
        row = conn.execute("SELECT value FROM key_check WHERE name = 'digests'").fetchone()
    except sqlite3.OperationalError:  # a database before schema version 5 (read before the server migrated it)
        return False
    return row is not None and row[0] == keys_of(conn).fingerprint


def empty_the_log(database: Path | PostgresDatabase) -> bool:
    """Checkpoint and truncate the write-ahead log, so no page written before a rotation stays in it.

    A running gateway's readers may hold the log: then it is left to the
    writer's own checkpoints (False). A PostgreSQL server keeps its own log
    and recycles it itself: there is nothing of Herald's to empty (True).
    """
    if isinstance(database, PostgresDatabase):
        return True
    conn = sqlite3.connect(str(database), isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=2000")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def key_counts(conn: sqlite3.Connection) -> dict[str, Counter]:
    """Per sealed column, how many values each key id seals (``None``: plaintext, written before)."""
    keys = keys_of(conn)
    out: dict[str, Counter] = {}
    for c in SEALED_COLUMNS:
        counts: Counter = Counter()
        for (head,) in conn.execute(f"SELECT substr({c.column}, 1, 40) FROM {c.table} WHERE {c.column} IS NOT NULL"):
            counts[keys.key_of(head if isinstance(head, bytes) else None)] += 1
        out[c.name] = counts
    return out
