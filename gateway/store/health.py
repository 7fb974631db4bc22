"""What the health endpoint and the metrics read from the database (``gateway.app.health``, ``gateway.app.metrics``).

Reads are small and use the indexes: the pipeline's backlog through
``messages_state`` (state, id), the outbox's unsent rows through
``notifications_due`` (state, next_attempt_at), so a scrape costs the same on a
log of a million sent notifications as on an empty one. The write probe is a
real write, committed like any other: a database that cannot be written to
(read-only file or file system, full disk, ``query_only``) fails it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from gateway.records import DEAD, PENDING, RECEIVED, RETRYING

__all__ = ["DestinationBacklog", "Snapshot", "probe_write", "snapshot"]


def probe_write(conn: sqlite3.Connection) -> int:
    """Rewrite the newest ``migrations`` row with its own value: a page written and committed, nothing changed.

    Runs in the writer's transaction (``Store.submit``); returns the rows written (1).
    """
    cur = conn.execute(
        "UPDATE migrations SET applied_at = applied_at WHERE version = (SELECT MAX(version) FROM migrations)"
    )
    return cur.rowcount


@dataclass(frozen=True)
class DestinationBacklog:
    """One destination's unsent notifications."""

    destination: str
    pending: int = 0
    retrying: int = 0
    dead: int = 0
    #: When the oldest notification not yet tried fell due (reactor seconds; None: none is due).
    due_since: float | None = None
    #: When the oldest notification tried and still retrying was queued (ISO 8601; None: none is).
    failing_since: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """The pipeline's backlog and the outbox's, read in one read transaction."""

    #: Messages stored and acknowledged but not yet processed, and when the oldest was received (ISO 8601).
    backlog: int
    oldest_received_at: str | None
    destinations: list[DestinationBacklog] = field(default_factory=list)


def snapshot(conn: sqlite3.Connection, now_seconds: float) -> Snapshot:
    """The backlog of the pipeline and of every destination with unsent notifications.

    A notification waits from when it first fell due: a row not yet tried
    counts from its due time, in the reactor's seconds (a digest row waiting
    for its hour is not late), a row tried and failing from when it was queued
    (the store clock's ISO time; every ``created_at`` is written alike, so the
    smallest string is the earliest).
    """
    count, first = conn.execute("SELECT COUNT(*), MIN(id) FROM messages WHERE state = ?", (RECEIVED,)).fetchone()
    oldest = None
    if first is not None:
        oldest = conn.execute("SELECT received_at FROM messages WHERE id = ?", (first,)).fetchone()[0]
    rows = conn.execute(
        "SELECT target, state, COUNT(*), "
        "MIN(CASE WHEN attempts = 0 AND next_attempt_at <= ? THEN next_attempt_at END), "
        "MIN(CASE WHEN attempts > 0 AND state != ? THEN created_at END) "
        "FROM notifications WHERE state IN (?, ?, ?) GROUP BY target, state ORDER BY target",
        (now_seconds, DEAD, PENDING, RETRYING, DEAD),
    ).fetchall()
    by_target: dict[str, dict] = {}
    for target, state, n, due_since, queued_at in rows:
        entry = by_target.setdefault(target, {"destination": target})
        entry[state] = n
        if due_since is not None:
            entry["due_since"] = min(entry.get("due_since") or due_since, due_since)
        if queued_at is not None:
            entry["failing_since"] = min(entry.get("failing_since") or queued_at, queued_at)
    return Snapshot(count, oldest, [DestinationBacklog(**e) for e in by_target.values()])
