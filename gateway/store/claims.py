"""Work claimed by one node of several sharing a PostgreSQL store: the pipeline's messages, the outbox's notifications.

With SQLite there is one node, and the pipeline and delivery read their work
as it stands. On PostgreSQL several nodes read the same tables, so each takes
what it will work on with a *claim*: the rows are marked with the node's name
and a lease (``claimed_by``, ``claim_expires``, schema version 10), in one
statement that skips rows another node has locked (``FOR UPDATE SKIP
LOCKED``) or still holds (a lease not yet run out). So no two nodes convert
the same message or send the same notification. A node that dies holds its
claims until their leases run out; then another node takes them.

Leases are measured by the database server's clock, never a node's, so
nodes whose clocks disagree still agree on when a lease has run out.

A claim is a write, made by the node's reader thread on its own connection
(:class:`~gateway.store.writer.Writer`), not by the writer: taking work must
not wait for intake's commits nor hold the nodes' one writer lock.

What a claim does not change: a pipeline outcome still applies only to a
message still ``received`` (:func:`~gateway.store.messages.apply_outcomes`),
and a notification waits while an earlier one about the same patient to the
same destination is unsent (:func:`~gateway.store.outbox.due_notifications`),
whichever node holds that earlier one: the order per patient holds across
nodes.
"""

from __future__ import annotations

import sqlite3

from gateway.records import PENDING, RECEIVED, RETRYING, DeliveryAttempt, Notification
from gateway.store import integrity, outbox

__all__ = [
    "LEASE_SECONDS",
    "claim_messages",
    "claim_notifications",
    "claim_recipient_notifications",
    "record_attempts",
    "release_messages",
    "release_notifications",
    "take_lead",
]

#: How long a node holds the work it claimed (``[storage] claim_lease_seconds``): longer than a
#: batch's conversion (about a second) and than any channel's timeout. A node that dies holds its
#: claims this long; a send that outlasts it may be made again by another node.
LEASE_SECONDS = 300.0

#: Now, by the database server's clock, in seconds (what claim_expires is measured in).
_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"


def claim_messages(
    conn: sqlite3.Connection, node: str, limit: int, lease: float = LEASE_SECONDS, after_id: int = 0
) -> tuple[dict[int, str], list[tuple]]:
    """Claim up to ``limit`` messages still ``received`` that no node holds, oldest first; check each.

    This node's own claims with ids above ``after_id`` are taken again: the
    pipeline has them in hand up to ``after_id``, and what it dropped after
    (a batch that failed) it takes back at once rather than after the lease.

    Returns what :func:`~gateway.store.integrity.checked_pending` does:
    ``(altered id -> what is wrong, [(id, raw, received_at, charset) of the intact ones])``.
    """
    rows = conn.execute(
        f"UPDATE messages SET claimed_by = ?, claim_expires = {_NOW} + ? WHERE id IN ("
        "SELECT id FROM messages WHERE state = ? "
        f"AND (claim_expires IS NULL OR claim_expires < {_NOW} OR (claimed_by = ? AND id > ?)) "
        "ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED) "
        f"RETURNING {integrity._CHECK_SELECT}",
        (node, lease, RECEIVED, node, after_id, limit),
    ).fetchall()
    altered: dict[int, str] = {}
    intact: list[tuple] = []
    for r in sorted(rows, key=lambda r: r["id"]):
        problem, plain = integrity.checked_raw(conn, r)
        if problem is not None:
            altered[r["id"]] = problem
        else:
            intact.append((r["id"], plain if plain is not None else b"", r["received_at"], r["charset"] or ""))
    return altered, intact


def _claimable(where: str, order: str) -> str:
    """Due notifications (those ``where`` also picks) nobody holds, none waiting behind an earlier unsent one
    about the same patient to the same destination (the rule :func:`~gateway.store.outbox.due_notifications`
    applies row by row, here in one statement: each query a node makes is a round trip), locked as read.

    Parameters: ``where``'s, then pending, retrying, now, this node, the ids to leave out, the limit.
    """
    return (
        f"SELECT n.id FROM notifications n WHERE {where}n.state IN (?, ?) AND n.next_attempt_at <= ? "
        f"AND (n.claim_expires IS NULL OR n.claim_expires < {_NOW} OR n.claimed_by = ?) AND NOT (n.id = ANY(?)) "
        "AND (n.patient_key = '' OR NOT EXISTS (SELECT 1 FROM notifications e WHERE e.patient_key = n.patient_key "
        "AND e.target = n.target AND e.state IN ('pending', 'retrying') AND e.patient_key != '' "
        "AND e.message_id < n.message_id)) "
        # Nor behind an earlier message from the same sender that no node has converted yet: another node may
        # hold it, and its notifications, once written, come first (one node writes outcomes in order).
        "AND NOT EXISTS (SELECT 1 FROM messages nm JOIN messages m ON m.state = 'received' AND m.id < nm.id "
        "AND m.sending_facility = nm.sending_facility AND m.sending_application = nm.sending_application "
        "WHERE nm.id = n.message_id) "
        f"ORDER BY {order} LIMIT ? FOR UPDATE OF n SKIP LOCKED"
    )


#: What :func:`claim_notifications` reads: in due order.
_CLAIMABLE = _claimable("", "n.next_attempt_at, n.message_id")
#: What :func:`claim_recipient_notifications` reads: one recipient's channel, in message order.
_CLAIMABLE_FOR_RECIPIENT = _claimable("n.recipient_id = ? AND n.channel_index = ? AND ", "n.message_id")


def _claim(conn: sqlite3.Connection, node: str, ids: list[str], lease: float) -> set[str]:
    """Claim those of ``ids`` still unsent and held by nobody; the ids claimed."""
    if not ids:
        return set()
    rows = conn.execute(
        f"UPDATE notifications SET claimed_by = ?, claim_expires = {_NOW} + ? "
        f"WHERE id = ANY(?) AND state IN (?, ?) AND (claim_expires IS NULL OR claim_expires < {_NOW} "
        "OR claimed_by = ?) RETURNING id",
        (node, lease, ids, PENDING, RETRYING, node),
    ).fetchall()
    return {r[0] for r in rows}


def claim_notifications(
    conn: sqlite3.Connection,
    node: str,
    now_seconds: float,
    limit: int,
    exclude: tuple = (),
    lease: float = LEASE_SECONDS,
) -> list[Notification]:
    """Claim up to ``limit`` due notifications no node holds, in due order (:data:`_CLAIMABLE`).

    ``exclude``: ids this node has in hand already (sending them). What this
    node claimed and left waiting (its destination resting or busy) it may
    take again at once; what another node holds, it may not until the lease
    runs out. Rows another node is claiming at this moment are skipped, not
    waited for.
    """
    ids = [
        r[0] for r in conn.execute(_CLAIMABLE, (PENDING, RETRYING, now_seconds, node, list(exclude), limit)).fetchall()
    ]
    got = _claim(conn, node, ids, lease)
    return _due_rows(conn, [i for i in ids if i in got])


def _due_rows(conn: sqlite3.Connection, ids: list[str]) -> list[Notification]:
    """These notifications as the outbox's due reads give them (their Bundle, sealed values opened), in order."""
    if not ids:
        return []
    rows = conn.execute(
        f"SELECT {outbox._DUE_COLUMNS} FROM notifications n JOIN messages m ON m.id = n.message_id WHERE n.id = ANY(?)",
        (ids,),
    ).fetchall()
    found = {r["id"]: r for r in rows}
    return [outbox._due_row(conn, found[i]) for i in ids if i in found]


def claim_recipient_notifications(
    conn: sqlite3.Connection,
    node: str,
    recipient_id: str,
    channel_index: int,
    now_seconds: float,
    exclude: tuple = (),
    lease: float = LEASE_SECONDS,
) -> list[Notification]:
    """A digest's notifications (:func:`~gateway.store.outbox.due_for_recipient`): those of one recipient's
    channel this node could claim, under the same rules as :func:`claim_notifications`."""
    rows = conn.execute(
        _CLAIMABLE_FOR_RECIPIENT,
        (recipient_id, channel_index, PENDING, RETRYING, now_seconds, node, list(exclude), 10_000),
    ).fetchall()
    ids = [r[0] for r in rows]
    got = _claim(conn, node, ids, lease)
    return _due_rows(conn, [i for i in ids if i in got])


def record_attempts(conn: sqlite3.Connection, node: str, attempts: list[DeliveryAttempt], now: str) -> int:
    """:func:`~gateway.store.outbox.record_attempts`, and this node's claims on the notifications given up
    (not another node's: one that took a notification whose lease ran out holds it now)."""
    done = outbox.record_attempts(conn, attempts, now)
    conn.executemany(
        "UPDATE notifications SET claimed_by = NULL, claim_expires = NULL WHERE id = ? AND claimed_by = ?",
        [(a.notification_id, node) for a in attempts],
    )
    return done


def release_messages(conn: sqlite3.Connection, node: str) -> int:
    """Give up every message this node holds (a node stopping: the others need not wait for the leases)."""
    return conn.execute(
        "UPDATE messages SET claimed_by = NULL, claim_expires = NULL WHERE claimed_by = ? AND state = ?",
        (node, RECEIVED),
    ).rowcount


def release_notifications(conn: sqlite3.Connection, node: str) -> int:
    """Give up every notification this node holds and has not sent (a node stopping)."""
    return conn.execute(
        "UPDATE notifications SET claimed_by = NULL, claim_expires = NULL WHERE claimed_by = ? AND state IN (?, ?)",
        (node, PENDING, RETRYING),
    ).rowcount


def take_lead(conn: sqlite3.Connection, role: str) -> bool:
    """Whether this node now leads ``role`` (work one node of several does): a session advisory lock.

    Held until the node's connection ends (it stops, or dies and the server
    notices), when another node's next try takes it.
    """
    row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(?, 0))", ("herald.lead." + role,)).fetchone()
    return bool(row[0])
