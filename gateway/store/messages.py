"""The message log: each frame as received, its header fields, state and Bundle.

Jobs for the writer (``record_frame``, ``apply_outcomes``) and reads for the
pipeline, the CLI and a console. Every function takes a connection and runs in
its caller's transaction. A message's body and Bundle are sealed with the
connection's key ring, each bound to the message's id; reads open them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from gateway.records import (
    FAILED,
    PENDING,
    RECEIVED,
    REJECTED,
    RETRYING,
    IntakeRecord,
    IntakeResult,
    MessageOutcome,
    PendingMessage,
)
from gateway.store.console import index_message
from gateway.store.events import append_event, appends_only, events_of, gathered
from gateway.store.integrity import intake_digest, message_problem
from gateway.store.keys import KeyRingError
from gateway.store.outbox import attempts_of, insert_notification, notifications_of
from gateway.store.reviews import record_match
from gateway.store.sealing import keys_of, message_context, message_digest_matches
from gateway.store.transitions import record_episode_event

__all__ = [
    "apply_outcomes",
    "count_by_state",
    "list_messages",
    "message_detail",
    "messages_bundles",
    "outstanding_work",
    "pending_messages",
    "record_frame",
]


@appends_only
def record_frame(conn: sqlite3.Connection, r: IntakeRecord, now: str) -> IntakeResult:
    """Store a frame and its ``received`` event, or recognise it as a retransmission.

    A retransmission is the same sender, MSH-10 and bytes as a stored,
    non-rejected message: it gets an event, not a row. The same MSH-10 with
    other bytes is stored and flagged ``control-id-reused``. The bytes are
    compared by a keyed digest (a plain one could be confirmed by guessing a
    message) and stored sealed, bound to the message's id.
    """
    keys = keys_of(conn)
    digest = keys.digest(r.raw)
    flag = None
    if r.control_id and r.state == RECEIVED:
        earlier = conn.execute(
            "SELECT id, sha256 FROM messages WHERE sending_facility = ? AND sending_application = ? "
            "AND control_id = ? AND state != ? ORDER BY id",
            (r.sending_facility, r.sending_application, r.control_id, REJECTED),
        ).fetchall()
        for row in earlier:
            if message_digest_matches(keys, row["sha256"], r.raw, digest):
                append_event(conn, now, row["id"], None, "intake", "retransmission", {"peer": r.peer})
                return IntakeResult(row["id"], row["id"], None)
        if earlier:
            flag = "control-id-reused"
    # The id the row gets (the next rowid, as SQLite would choose it), read under the
    # writer's lock, so the body is sealed once, bound to its own row.
    message_id = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM messages").fetchone()[0]
    conn.execute(
        "INSERT INTO messages (id, received_at, peer, sending_application, sending_facility, message_type, "
        "trigger_event, control_id, version, processing_id, accept_ack_type, application_ack_type, charset, "
        "sha256, raw, state, reason, flag, ack_code, updated_at, digest) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message_id,
            now,
            r.peer,
            r.sending_application,
            r.sending_facility,
            r.message_type,
            r.trigger_event,
            r.control_id,
            r.version,
            r.processing_id,
            r.accept_ack_type,
            r.application_ack_type,
            r.charset,
            digest,
            keys.seal(r.raw, message_context("raw", message_id)),
            r.state,
            r.reason,
            flag,
            r.ack_code,
            now,
            # Its digest: the row is tamper-evident from its first commit (gateway.store.integrity).
            intake_digest(keys, message_id, now, r, digest, flag),
        ),
    )
    detail: dict[str, Any] = {"peer": r.peer, "bytes": len(r.raw)}
    # Over mutual TLS, the client certificate that sent it (the peer column stays host:port).
    certificate = getattr(r.peer, "certificate", None)
    if certificate is not None:
        detail["certificate"] = certificate.audit()
    if flag:
        detail["flag"] = flag
    append_event(conn, now, message_id, None, "intake", "received", detail)
    if r.state == REJECTED:
        append_event(conn, now, message_id, None, "intake", "rejected", {"reason": r.reason})
    return IntakeResult(message_id, None, flag)


def pending_messages(conn: sqlite3.Connection, after_id: int, limit: int) -> list[PendingMessage]:
    """Messages still in state ``received`` with id > ``after_id``, oldest first."""
    rows = conn.execute(
        "SELECT id, raw, received_at, charset FROM messages WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
        (RECEIVED, after_id, limit),
    ).fetchall()
    keys = keys_of(conn)
    return [
        PendingMessage(
            r["id"], keys.open(r["raw"], message_context("raw", r["id"])), r["received_at"], r["charset"] or ""
        )
        for r in rows
    ]


def apply_outcomes(conn: sqlite3.Connection, outcomes: list[MessageOutcome], now: str, due: float) -> int:
    """Apply pipeline outcomes (state, FHIR, match, outbox rows, events); return how many applied.

    Each applies only if its message is still ``received``, so a message is
    never turned into notifications twice; each is whole in its savepoint, so
    one message's conflict does not hold up the rest.
    """
    applied = 0
    with gathered(conn) as events:  # the batch's audit events chained and written at once
        for o in outcomes:
            mark = len(events)
            conn.execute("SAVEPOINT outcome")
            try:
                applied += _apply_outcome(conn, o, now, due)
                conn.execute("RELEASE outcome")
            except sqlite3.IntegrityError as e:
                conn.execute("ROLLBACK TO outcome")
                conn.execute("RELEASE outcome")
                del events[mark:]  # the rolled-back outcome's events go with it
                reason = f"its outcome could not be stored: {e}"
                conn.execute(
                    "UPDATE messages SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state = ?",
                    (FAILED, reason, now, o.message_id, RECEIVED),
                )
                append_event(conn, now, o.message_id, None, "pipeline", "failed", {"stage": "store", "reason": reason})
    return applied


def _apply_outcome(conn: sqlite3.Connection, o: MessageOutcome, now: str, due: float) -> int:
    fhir = keys_of(conn).seal_text(o.fhir_json, message_context("fhir", o.message_id))
    cur = conn.execute(
        "UPDATE messages SET state = ?, reason = ?, fhir = ?, updated_at = ? WHERE id = ? AND state = ?",
        (o.state, o.reason, fhir, now, o.message_id, RECEIVED),
    )
    if cur.rowcount != 1:
        return 0
    for kind, detail in o.events:
        append_event(conn, now, o.message_id, None, "pipeline", kind, detail)
    if o.match is not None:
        record_match(conn, o.message_id, o.match, o.review, now)
    # The patient's terms in the message browser's blind index (gateway.store.console).
    index_message(conn, o.message_id, o.fhir_json, o.patient)
    # The member's episode event (care transitions), and its flags on the member's notifications.
    for n in record_episode_event(conn, o, now):
        insert_notification(conn, n, now, due)
    return 1


def list_messages(conn: sqlite3.Connection, limit: int = 50, state: str | None = None) -> list[sqlite3.Row]:
    """The newest messages, with header fields and state (no raw bytes)."""
    sql = (
        "SELECT m.id, m.received_at, m.sending_application, m.sending_facility, m.message_type, m.trigger_event, "
        "m.control_id, m.state, m.reason, m.flag, m.ack_code, "
        "(SELECT COUNT(*) FROM notifications n WHERE n.message_id = m.id) AS notifications, "
        "(SELECT COUNT(*) FROM notifications n WHERE n.message_id = m.id AND n.state = 'dead') AS dead "
        "FROM messages m"
    )
    args: list[Any] = []
    if state:
        sql += " WHERE m.state = ?"
        args.append(state)
    sql += " ORDER BY m.id DESC LIMIT ?"
    args.append(limit)
    return conn.execute(sql, args).fetchall()


def message_detail(conn: sqlite3.Connection, message_id: int) -> dict | None:
    """Everything about one message: row (its body and Bundle opened), match, notifications, attempts and events."""
    row = conn.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    match = conn.execute("SELECT * FROM matches WHERE message_id = ?", (message_id,)).fetchone()
    # Checked before anything is opened: an altered row is said loudly, not shown as if intact.
    altered = message_problem(conn, row)
    message = dict(row)
    keys = keys_of(conn)
    try:
        if message["raw"] is not None:  # None: purged (retention)
            message["raw"] = keys.open(message["raw"], message_context("raw", message_id))
        message["fhir"] = keys.open_text(message["fhir"], message_context("fhir", message_id))
    except KeyRingError:
        if altered is None:
            raise
        message["raw"], message["fhir"] = b"", None  # what was altered does not open: the warning says so
    return {
        "message": message,
        "match": dict(match) if match else None,
        "notifications": notifications_of(conn, message_id),
        "attempts": attempts_of(conn, message_id),
        "events": events_of(conn, message_id),
        "integrity": altered,  # None, or what was altered after the message was stored
    }


def outstanding_work(conn: sqlite3.Connection) -> int:
    """Messages not yet processed plus notifications not yet sent (pending or retrying): 0 when all is done."""
    return conn.execute(
        "SELECT (SELECT COUNT(*) FROM messages WHERE state = ?) + "
        "(SELECT COUNT(*) FROM notifications WHERE state IN (?, ?))",
        (RECEIVED, PENDING, RETRYING),
    ).fetchone()[0]


def count_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """Messages per state."""
    return {r[0]: r[1] for r in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")}


def messages_bundles(conn: sqlite3.Connection, message_ids: Iterable[int]) -> dict[int, str | None]:
    """The stored Bundles (JSON text) of these messages, by id."""
    ids = list(message_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    keys = keys_of(conn)
    rows = conn.execute(f"SELECT id, fhir FROM messages WHERE id IN ({marks})", ids).fetchall()
    return {i: keys.open_text(fhir, message_context("fhir", i)) for i, fhir in rows}
