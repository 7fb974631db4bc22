"""The outbox: one row per notification (recipient and channel), and every delivery attempt.

A notification row holds who is told, where and how, never the patient's
data: its Bundle is built from the message's stored Bundle when it is sent
(:mod:`gateway.delivery.routing`). Rows are written in the transaction that
routes the message, so a message's notifications exist exactly once. A payload
stored by an older Herald is sealed (by ``herald keys rotate``) and opened
here, as is the message's Bundle a due notification is built from.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from gateway.records import CANCELLED, DEAD, PENDING, RETRYING, SENT, DeliveryAttempt, Notification
from gateway.store.events import append_event, append_events
from gateway.store.sealing import attribution_context, keys_of, message_context, payload_context

__all__ = [
    "attempts_of",
    "notification_detail",
    "cancel_notifications",
    "list_outbox",
    "outbox_counts",
    "requeue_notifications",
    "due_notifications",
    "due_for_recipient",
    "insert_notification",
    "notification_message_id",
    "notifications_for",
    "notifications_of",
    "record_attempts",
]

_LISTED = "id, message_id, recipient_role, recipient, channel, target, event_code, state, attempts"


def insert_notification(conn: sqlite3.Connection, n: Notification, now: str, due: float) -> None:
    """One outbox row, pending from ``due`` (reactor seconds; a digest's from its time), and its ``routed`` event.

    The patient key is stored as its keyed hash; the attribution sealed.
    """
    keys = keys_of(conn)
    payload = keys.seal_text(n.payload, payload_context(n.id))
    attribution = None
    if n.attribution:
        attribution = keys.seal_text(json.dumps(n.attribution, sort_keys=True), attribution_context(n.id))
    patient_key = keys.lookup(n.patient_key) if n.patient_key else ""
    if n.not_before is not None:
        due = max(due, n.not_before)
    conn.execute(
        "INSERT INTO notifications (id, message_id, recipient_role, recipient, channel, target, event_code, "
        "payload, state, attempts, next_attempt_at, created_at, updated_at, recipient_id, channel_index, "
        "patient_key, attribution) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)",
        (n.id, n.message_id, n.recipient_role, n.recipient, n.channel, n.target, n.event_code, payload, PENDING)
        + (due, now, now, n.recipient_id, n.channel_index, patient_key, attribution),
    )
    detail = {"role": n.recipient_role, "channel": n.channel, "target": n.target}
    if n.recipient_id:
        detail["recipient_id"] = n.recipient_id
    if n.not_before is not None:
        detail["digest"] = True
    append_event(conn, now, n.message_id, n.id, "router", "routed", detail)


def due_notifications(conn: sqlite3.Connection, now_seconds: float, limit: int, exclude: tuple) -> list[Notification]:
    """Notifications pending or retrying whose next attempt is due, with the Bundle they are built from.

    One waits while an earlier notification (by message) about the same patient
    to the same destination is not yet sent, dead or cancelled: a receiver gets
    one patient's events in the order they happened, even after an outage.
    Candidates are read in pages in due order and each is checked with one
    lookup on the ordering index, so a poll costs what it returns, not the
    size of the backlog. An MLLP forward is read with the v2 message as received.
    """
    due: list[Notification] = []
    skip = set(exclude)
    page = max(limit + len(skip), 32)
    offset = 0
    while len(due) < limit:
        # One indexed range read per state (notifications_due: state, next_attempt_at), no sort of the backlog.
        rows: list[sqlite3.Row] = []
        full_page = False
        for state in (PENDING, RETRYING):
            got = conn.execute(
                "SELECT id, next_attempt_at, message_id, patient_key, target FROM notifications "
                "WHERE state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ? OFFSET ?",
                (state, now_seconds, page, offset),
            ).fetchall()
            rows.extend(got)
            full_page = full_page or len(got) == page
        rows.sort(key=lambda r: (r["next_attempt_at"], r["message_id"]))
        for r in rows:
            if r["id"] in skip or (r["patient_key"] and _held_back(conn, r)):
                continue
            full = conn.execute(
                f"SELECT {_DUE_COLUMNS} FROM notifications n JOIN messages m ON m.id = n.message_id WHERE n.id = ?",
                (r["id"],),
            ).fetchone()
            due.append(_due_row(conn, full))
            if len(due) == limit:
                break
        if not full_page:
            break
        offset += page
    return due


def _held_back(conn: sqlite3.Connection, r: sqlite3.Row) -> bool:
    """Whether an earlier notification about the same patient to the same destination is still unsent."""
    return (
        conn.execute(
            "SELECT 1 FROM notifications INDEXED BY notifications_order WHERE patient_key = ? AND target = ? "
            "AND state IN ('pending', 'retrying') AND patient_key != '' AND message_id < ? LIMIT 1",
            (r["patient_key"], r["target"], r["message_id"]),
        ).fetchone()
        is not None
    )


_DUE_COLUMNS = (
    "n.id, n.message_id, n.recipient_role, n.recipient, n.channel, n.target, n.event_code, "
    "n.payload, n.state, n.attempts, CASE WHEN n.payload IS NULL THEN m.fhir END AS bundle, n.created_at, "
    "n.recipient_id, n.channel_index, n.attribution, CASE WHEN n.channel = 'mllp' THEN m.raw END AS original"
)


def _due_row(conn: sqlite3.Connection, r: sqlite3.Row) -> Notification:
    """A due row as a Notification, its sealed values opened."""
    keys = keys_of(conn)
    item = dict(r)
    item["payload"] = keys.open_text(item["payload"], payload_context(item["id"]))
    item["bundle"] = keys.open_text(item["bundle"], message_context("fhir", item["message_id"]))
    attribution = keys.open_text(item["attribution"], attribution_context(item["id"]))
    item["attribution"] = json.loads(attribution) if attribution else None
    if item["original"] is not None:
        item["original"] = keys.open(item["original"], message_context("raw", item["message_id"]))
    return Notification(**item)


def due_for_recipient(
    conn: sqlite3.Connection, recipient_id: str, channel_index: int, now_seconds: float, exclude: tuple = ()
) -> list[Notification]:
    """Every due notification (pending or retrying) of one directory recipient's channel, oldest message
    first: what a digest sends together."""
    rows = conn.execute(
        f"SELECT {_DUE_COLUMNS} FROM notifications n JOIN messages m ON m.id = n.message_id "
        "WHERE n.recipient_id = ? AND n.channel_index = ? AND n.state IN (?, ?) AND n.next_attempt_at <= ? "
        "ORDER BY n.message_id",
        (recipient_id, channel_index, PENDING, RETRYING, now_seconds),
    ).fetchall()
    return [_due_row(conn, r) for r in rows if r["id"] not in exclude]


def record_attempts(conn: sqlite3.Connection, attempts: list[DeliveryAttempt], now: str) -> int:
    """Record delivery attempts, their notifications' new states and an audit event each."""
    conn.executemany(
        "UPDATE notifications SET attempts = ?, state = ?, next_attempt_at = ?, last_error = ?, "
        "updated_at = ? WHERE id = ?",
        [
            (a.attempt, a.state, a.next_attempt_at, None if a.outcome == "ok" else a.detail, now, a.notification_id)
            for a in attempts
        ],
    )
    conn.executemany(
        "INSERT INTO delivery_attempts (notification_id, attempt, at, outcome, detail, status, elapsed_ms) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(a.notification_id, a.attempt, now, a.outcome, a.detail, a.status, a.elapsed_ms) for a in attempts],
    )
    kinds = {SENT: "delivered", DEAD: "dead-letter"}
    append_events(
        conn,
        [
            (
                now,
                a.message_id,
                a.notification_id,
                "delivery",
                kinds.get(a.state, "delivery-failed"),
                {"attempt": a.attempt, "detail": a.detail, "status": a.status, "elapsed_ms": a.elapsed_ms},
            )
            for a in attempts
        ],
    )
    return len(attempts)


def notification_detail(conn: sqlite3.Connection, notification_id: str) -> dict | None:
    """One outbox row (no payload, no attribution) with every attempt: when, outcome, status, time taken."""
    row = conn.execute(
        "SELECT id, message_id, recipient_role, recipient, recipient_id, channel, target, event_code, state, "
        "attempts, next_attempt_at, last_error, created_at, updated_at FROM notifications WHERE id = ?",
        (notification_id,),
    ).fetchone()
    if row is None:
        return None
    out = dict(row)
    out["attempt_log"] = [
        dict(a)
        for a in conn.execute(
            "SELECT attempt, at, outcome, status, elapsed_ms, detail FROM delivery_attempts "
            "WHERE notification_id = ? ORDER BY id",
            (notification_id,),
        )
    ]
    return out


def notifications_for(conn: sqlite3.Connection, message_ids: Iterable[int] | None = None) -> list[sqlite3.Row]:
    """Notifications (without payloads), optionally for some messages only."""
    sql = f"SELECT {_LISTED} FROM notifications"
    if message_ids is not None:
        ids = list(message_ids)
        sql += f" WHERE message_id IN ({','.join('?' * len(ids))})"
        return conn.execute(sql + " ORDER BY message_id, recipient_role", ids).fetchall()
    return conn.execute(sql + " ORDER BY message_id, recipient_role").fetchall()


def notifications_of(conn: sqlite3.Connection, message_id: int) -> list[dict]:
    """One message's notifications with their delivery state and last error."""
    rows = conn.execute(
        "SELECT id, recipient_role, recipient, channel, target, event_code, state, attempts, last_error "
        "FROM notifications WHERE message_id = ? ORDER BY recipient_role",
        (message_id,),
    )
    return [dict(n) for n in rows]


def attempts_of(conn: sqlite3.Connection, message_id: int) -> list[dict]:
    """Every delivery attempt of a message's notifications, oldest first."""
    rows = conn.execute(
        "SELECT a.* FROM delivery_attempts a JOIN notifications n ON n.id = a.notification_id "
        "WHERE n.message_id = ? ORDER BY a.id",
        (message_id,),
    )
    return [dict(a) for a in rows]


def has_notifications(conn: sqlite3.Connection, message_id: int) -> bool:
    """Whether any notification was written for the message."""
    return (
        conn.execute("SELECT 1 FROM notifications WHERE message_id = ? LIMIT 1", (message_id,)).fetchone() is not None
    )


def notification_message_id(conn: sqlite3.Connection, notification_id: str) -> int | None:
    """The message a notification was made for (None when there is no such notification)."""
    row = conn.execute("SELECT message_id FROM notifications WHERE id = ?", (notification_id,)).fetchone()
    return None if row is None else row[0]


def list_outbox(
    conn: sqlite3.Connection, state: str | None = None, target: str | None = None, limit: int = 50
) -> list[dict]:
    """Outbox rows, newest change first, by state and destination (no patient data: ids, targets, errors)."""
    sql = (
        "SELECT id, message_id, recipient_role, recipient, channel, target, event_code, state, attempts, "
        "last_error, created_at, updated_at FROM notifications"
    )
    where, args = [], []
    if state:
        where.append("state = ?")
        args.append(state)
    if target:
        where.append("target = ?")
        args.append(target)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY updated_at DESC, id LIMIT ?"
    return [dict(r) for r in conn.execute(sql, (*args, limit))]


def outbox_counts(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(destination, state, count) for every destination and state: the figure ops alert on (dead letters)."""
    rows = conn.execute("SELECT target, state, COUNT(*) FROM notifications GROUP BY target, state ORDER BY 1, 2")
    return [tuple(r) for r in rows]


def requeue_notifications(
    conn: sqlite3.Connection, ids: list[str] | None, now: str, now_seconds: float, by: str
) -> list[str]:
    """Make dead (or, by id, retrying) notifications due again now; ``ids`` None: every dead one.

    The attempt count is kept (the history stays true); the retry horizon counts
    again from now. Returns the ids requeued, each with a ``requeued`` event.
    """
    if ids is None:
        ids = [r[0] for r in conn.execute("SELECT id FROM notifications WHERE state = ?", (DEAD,))]
    done = []
    for nid in ids:
        row = conn.execute("SELECT message_id, state FROM notifications WHERE id = ?", (nid,)).fetchone()
        if row is None or row["state"] not in (DEAD, RETRYING):
            continue
        conn.execute(
            "UPDATE notifications SET state = ?, next_attempt_at = ?, created_at = ?, updated_at = ? WHERE id = ?",
            (PENDING, now_seconds, now, now, nid),
        )
        append_event(conn, now, row["message_id"], nid, "cli", "requeued", {"by": by, "was": row["state"]})
        done.append(nid)
    return done


def cancel_notifications(conn: sqlite3.Connection, ids: list[str], now: str, by: str) -> list[str]:
    """Cancel notifications not yet sent (pending, retrying or dead): they are never sent. Returns those cancelled."""
    done = []
    for nid in ids:
        row = conn.execute("SELECT message_id, state FROM notifications WHERE id = ?", (nid,)).fetchone()
        if row is None or row["state"] not in (PENDING, RETRYING, DEAD):
            continue
        conn.execute("UPDATE notifications SET state = ?, updated_at = ? WHERE id = ?", (CANCELLED, now, nid))
        append_event(conn, now, row["message_id"], nid, "cli", "cancelled", {"by": by, "was": row["state"]})
        done.append(nid)
    return done
