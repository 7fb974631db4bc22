"""Retention: a message's body is kept only as long as it is needed.

A message past retention whose work is finished (not ``received``, not in
review, no notification pending or retrying) loses its body: the raw
message, its Bundle and any stored notification payload. Its row stays, with
its header fields, its state and its digest, whose inputs do not include the
body (:mod:`gateway.store.integrity`), so the trail still verifies. Each
batch appends one ``purged`` event naming the messages (as id ranges) and
how many; a body removed without one is reported by ``herald audit verify``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.records import FAILED, IGNORED, MATCHED, PENDING, REJECTED, RETRYING, ROUTED, UNMATCHED
from gateway.store.events import append_event

__all__ = ["FINISHED_STATES", "PurgeBatch", "id_ranges", "purge_next", "purgeable"]

#: States in which nothing more will be done with a message's body.
FINISHED_STATES = (REJECTED, IGNORED, FAILED, ROUTED, MATCHED, UNMATCHED)


@dataclass(frozen=True, slots=True)
class PurgeBatch:
    """What one purge transaction did."""

    message_ids: tuple[int, ...]
    notifications: int  # notification payloads removed
    file_drops: tuple[tuple[str, str], ...]  # (folder, notification id) of the messages' file notifications


def id_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Sorted ids as [first, last] runs: ``[1, 2, 3, 7]`` -> ``[[1, 3], [7, 7]]``."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def purgeable(conn: sqlite3.Connection, before: str, limit: int | None = None) -> list[int]:
    """Messages received before ``before`` (ISO, UTC) whose work is finished and whose body is still stored."""
    marks = ",".join("?" * len(FINISHED_STATES))
    sql = (
        f"SELECT m.id FROM messages m WHERE m.received_at < ? AND m.purged_at IS NULL AND m.state IN ({marks}) "
        "AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.message_id = m.id AND n.state IN (?, ?)) "
        "ORDER BY m.id"
    )
    args: list = [before, *FINISHED_STATES, PENDING, RETRYING]
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return [r[0] for r in conn.execute(sql, args)]


def purge_next(conn: sqlite3.Connection, before: str, now: str, actor: str, limit: int) -> PurgeBatch:
    """Remove the bodies of up to ``limit`` purgeable messages and append the ``purged`` event (one transaction)."""
    ids = purgeable(conn, before, limit)
    if not ids:
        return PurgeBatch((), 0, ())
    marks = ",".join("?" * len(ids))
    # The row keeps its header and digest; the body (raw, Bundle) goes. With secure_delete
    # on (open_database) the pages that held it are overwritten, not left free.
    conn.execute(
        f"UPDATE messages SET raw = ?, fhir = NULL, purged_at = ?, updated_at = ? WHERE id IN ({marks})",
        [b"", now, now, *ids],
    )
    payloads = conn.execute(
        f"UPDATE notifications SET payload = NULL WHERE message_id IN ({marks}) AND payload IS NOT NULL", ids
    ).rowcount
    drops = conn.execute(
        f"SELECT target, id FROM notifications WHERE message_id IN ({marks}) AND channel = 'file' ORDER BY id", ids
    ).fetchall()
    detail = {"count": len(ids), "ranges": id_ranges(ids), "received_before": before, "notification_payloads": payloads}
    append_event(conn, now, None, None, actor, "purged", detail)
    return PurgeBatch(tuple(ids), payloads, tuple((r[0], r[1]) for r in drops))
