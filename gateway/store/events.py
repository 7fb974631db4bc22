"""The audit trail: one row per thing that happened to a message or a notification.

Rows are only ever appended. Each names who acted (``intake``, ``pipeline``,
``router``, ``delivery``, ``review``, ``roster``), what happened and, as
JSON, the details (ids, codes, counts; no patient data).
"""

from __future__ import annotations

import json
import sqlite3

__all__ = ["append_event", "append_events", "events_of"]


def append_event(
    conn: sqlite3.Connection,
    now: str,
    message_id: int | None,
    notification_id: str | None,
    actor: str,
    kind: str,
    detail: dict | None,
) -> None:
    """Append one audit event (in the caller's transaction)."""
    conn.execute(
        "INSERT INTO events (at, message_id, notification_id, actor, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (now, message_id, notification_id, actor, kind, json.dumps(detail) if detail is not None else None),
    )


def append_events(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    """Append many events: rows of (at, message id, notification id, actor, kind, detail dict or None)."""
    conn.executemany(
        "INSERT INTO events (at, message_id, notification_id, actor, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
        [(*r[:5], json.dumps(r[5]) if r[5] is not None else None) for r in rows],
    )


def events_of(conn: sqlite3.Connection, message_id: int) -> list[dict]:
    """A message's events, oldest first."""
    return [dict(e) for e in conn.execute("SELECT * FROM events WHERE message_id = ? ORDER BY id", (message_id,))]
