"""The audit trail: one row per thing that happened to a message or a notification, each chained to the last.

Rows are only ever appended. Each names who acted (``intake``, ``pipeline``,
``router``, ``delivery``, ``review``, ``roster``, ``store``, ``cli:<user>``),
what happened and, as JSON, the details (ids, codes, counts; no patient data).

Every row carries ``mac``: an HMAC-SHA256 (the key ring's chain key) over the
row's canonical encoding (:func:`event_bytes`) and the ``mac`` of the row
before it. A row edited, deleted or moved no longer follows its neighbours,
and nobody without the key can make it follow again
(:mod:`gateway.store.integrity` walks the chain). The previous MAC is read in
the appending transaction, so the chain is right whatever commits or rolls
back around it, and when a second process (the CLI) appends too.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from gateway.store.keys import KeyRing
from gateway.store.sealing import keys_of

__all__ = [
    "ANCHOR_KINDS",
    "append_event",
    "appends_only",
    "append_events",
    "chain_existing",
    "chain_keys",
    "event_bytes",
    "events_of",
    "gathered",
    "rekey_chain",
]

#: Rows that start a chain afresh (their MAC follows b""): the migration that
#: chained rows written before the chain existed, and a change of chain key.
ANCHOR_KINDS = ("chain-started", "chain-rekeyed")
#: The actor of the store's own events (anchors, integrity).
STORE_ACTOR = "store"
#: One encoder, made once (``json.dumps`` with arguments makes one a call).
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def chain_keys(conn: sqlite3.Connection) -> KeyRing:
    """The key ring whose chain key the connection's appends and checks use (``open_database(keys=...)``)."""
    return keys_of(conn)


def event_bytes(
    event_id: int,
    at: str,
    message_id: int | None,
    notification_id: str | None,
    actor: str,
    kind: str,
    detail: str | None,
) -> bytes:
    """The canonical encoding of one event row (``detail`` as stored: JSON text or None), what its MAC covers."""
    row = [
        "herald-event-1",
        int(event_id),
        at,
        None if message_id is None else int(message_id),
        notification_id,
        actor,
        kind,
        detail,
    ]
    return _CANONICAL.encode(row).encode("ascii")


def _head(conn: sqlite3.Connection) -> tuple[int, bytes]:
    last = conn.execute("SELECT id, mac FROM events ORDER BY id DESC LIMIT 1").fetchone()
    return (0, b"") if last is None else (last[0], bytes(last[1] or b""))


_INSERT = (
    "INSERT INTO events (id, at, message_id, notification_id, actor, kind, detail, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def appends_only(fn):
    """Mark a store job that reads nothing from ``events`` (it may append): such jobs' appends may be gathered.

    The writer runs a commit made only of such jobs (intake's frames and its
    ``ack-sent`` events) in one :func:`gathered` block: one read of the
    chain's head and one insert for the commit's events.
    """
    fn.appends_only = True
    return fn


@appends_only
def append_event(
    conn: sqlite3.Connection,
    now: str,
    message_id: int | None,
    notification_id: str | None,
    actor: str,
    kind: str,
    detail: dict | None,
) -> None:
    """Append one audit event, chained to the last (in the caller's transaction)."""
    append_events(conn, [(now, message_id, notification_id, actor, kind, detail)])


#: Connections whose appends are being gathered (:func:`gathered`): ``id(conn)`` to the rows waiting.
_GATHERING: dict[int, list[tuple]] = {}


@contextmanager
def gathered(conn: sqlite3.Connection) -> Iterator[list[tuple]]:
    """Within the block, the connection's appends wait in a list; they are chained and written at its end.

    One read of the chain's head and one ``executemany`` for a whole batch of
    pipeline outcomes, instead of one each per event (a routed message makes
    five or more). Yields the list, so a caller that rolls a savepoint back can
    drop the rows appended since (``del rows[mark:]``). When the block raises,
    nothing is written (the transaction is being rolled back). Nested blocks
    write at the outermost one's end. Nothing in the block may read the events
    table: the rows are not there yet.
    """
    key = id(conn)
    if key in _GATHERING:
        yield _GATHERING[key]
        return
    rows: list[tuple] = []
    _GATHERING[key] = rows
    try:
        yield rows
    finally:
        del _GATHERING[key]
    _write_events(conn, rows)


def append_events(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Append many events: rows of (at, message id, notification id, actor, kind, detail dict or None)."""
    waiting = _GATHERING.get(id(conn))
    if waiting is not None:
        waiting.extend(rows)
        return
    _write_events(conn, list(rows))


def _write_events(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    if not rows:
        return
    keys = chain_keys(conn)
    event_id, mac = _head(conn)
    params = []
    for at, message_id, notification_id, actor, kind, detail in rows:
        event_id += 1
        text = json.dumps(detail) if detail is not None else None
        mac = keys.chain_mac(mac, event_bytes(event_id, at, message_id, notification_id, actor, kind, text))
        params.append((event_id, at, message_id, notification_id, actor, kind, text, mac))
    if len(params) == 1:  # the usual case; execute costs a third of executemany
        conn.execute(_INSERT, params[0])
    else:
        conn.executemany(_INSERT, params)


def _append_anchor(conn: sqlite3.Connection, keys: KeyRing, now: str, kind: str, detail: dict) -> None:
    """An anchor row: its MAC starts afresh (follows b"") under ``keys``; ``detail`` names what it follows."""
    event_id, _ = _head(conn)
    text = json.dumps(detail)
    mac = keys.chain_mac(b"", event_bytes(event_id + 1, now, None, None, STORE_ACTOR, kind, text))
    conn.execute(
        "INSERT INTO events (id, at, message_id, notification_id, actor, kind, detail, mac) "
        "VALUES (?, ?, NULL, NULL, ?, ?, ?, ?)",
        (event_id + 1, now, STORE_ACTOR, kind, text, mac),
    )


def chain_existing(conn: sqlite3.Connection, now: str) -> int:
    """Chain the rows written before the chain existed, then anchor them (the migration; in its transaction).

    They are chained as they stand now: the chain proves they have not
    changed since, not that they had not changed before. The anchor
    (``chain-started``) says how many and up to which id; it is the first row
    whose MAC is made when it is written. Returns how many rows were chained.
    """
    keys = chain_keys(conn)
    mac = b""
    count, first, last = 0, None, None
    updates = []
    for r in conn.execute("SELECT id, at, message_id, notification_id, actor, kind, detail FROM events ORDER BY id"):
        mac = keys.chain_mac(mac, event_bytes(*r))
        updates.append((mac, r[0]))
        count += 1
        first = r[0] if first is None else first
        last = r[0]
    conn.executemany("UPDATE events SET mac = ? WHERE id = ?", updates)
    if count:
        detail = {"chained": count, "first": first, "last": last, "last_mac": mac.hex()}
        _append_anchor(conn, keys, now, "chain-started", detail)
    return count


def head_follows(conn: sqlite3.Connection, keys: KeyRing) -> bool | None:
    """Whether the last row's MAC is right under ``keys`` (None for an empty trail)."""
    rows = conn.execute(
        "SELECT id, at, message_id, notification_id, actor, kind, detail, mac FROM events ORDER BY id DESC LIMIT 2"
    ).fetchall()
    if not rows:
        return None
    last = rows[0]
    if last["kind"] in ANCHOR_KINDS and last["actor"] == STORE_ACTOR:
        previous = b""
    else:
        previous = bytes(rows[1]["mac"] or b"") if len(rows) > 1 else b""
    return keys.chain_mac(previous, event_bytes(*tuple(last)[:7])) == bytes(last["mac"] or b"")


def rekey_chain(conn: sqlite3.Connection, old: KeyRing, now: str) -> dict:
    """Start the chain afresh under ``conn``'s keys after it was written under ``old`` (encryption turned on).

    Appends a ``chain-rekeyed`` anchor naming the last row (and its MAC)
    written under the old key, so the part before stays checkable with that
    key and cannot be rewritten without breaking the anchor, which needs the
    new one. Returns the anchor's detail.
    """
    event_id, mac = _head(conn)
    detail = {
        "previous": event_id,
        "previous_mac": mac.hex(),
        "previous_key": "disabled" if not old.enabled else "other",
    }
    _append_anchor(conn, chain_keys(conn), now, "chain-rekeyed", detail)
    return detail


def events_of(conn: sqlite3.Connection, message_id: int) -> list[dict]:
    """A message's events, oldest first (without their MACs)."""
    return [
        dict(e)
        for e in conn.execute(
            "SELECT id, at, message_id, notification_id, actor, kind, detail FROM events WHERE message_id = ? "
            "ORDER BY id",
            (message_id,),
        )
    ]
