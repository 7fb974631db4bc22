"""Matches and the review queue: how each message's patient was found, and the decisions people made.

A possible match (or a probable one, when the policy holds those) opens a
review. Accepting it routes the held notifications and remembers the
message's MRNs as confirmed links to the member, so the next message with one
of them matches ``certain``; rejecting it leaves the message unmatched.

A review's candidates are sealed (member ids may be MBIs); a confirmed link's
MRN is found by its keyed hash and kept sealed beside it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from gateway.errors import StoreError
from gateway.records import (
    MATCHED,
    REVIEW,
    REVIEW_ACCEPTED,
    REVIEW_OPEN,
    REVIEW_REJECTED,
    ROUTED,
    UNMATCHED,
    MatchRecord,
    Notification,
)
from gateway.store.events import append_event
from gateway.store.outbox import has_notifications, insert_notification
from gateway.store.sealing import candidates_context, keys_of, link_context, message_context, mrn_hash

__all__ = ["accept_review", "list_reviews", "record_match", "reject_review", "review_detail", "stored_match"]


def record_match(conn: sqlite3.Connection, message_id: int, match: MatchRecord, review: dict | None, now: str) -> None:
    """Store a message's match (grade, method, score) and, when held, open its review."""
    conn.execute(
        "INSERT OR REPLACE INTO matches (message_id, aco_id, member_id, method, grade, score, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (message_id, match.aco_id, match.member_id, match.method, match.grade, match.score, json.dumps(match.detail)),
    )
    if review is not None:
        candidates = keys_of(conn).seal_text(json.dumps(review["candidates"]), candidates_context(message_id))
        conn.execute(
            "INSERT INTO reviews (message_id, state, created_at, grade, score, candidates) VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, REVIEW_OPEN, now, match.grade, match.score, candidates),
        )


def stored_match(conn: sqlite3.Connection, message_id: int) -> dict | None:
    """A message's match row (grade, method, score, member, detail as a dict)."""
    row = conn.execute("SELECT * FROM matches WHERE message_id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    item = dict(row)
    item["detail"] = json.loads(item["detail"] or "{}")
    return item


def list_reviews(conn: sqlite3.Connection, state: str | None = REVIEW_OPEN, limit: int = 100) -> list[dict]:
    """Reviews (open ones by default), oldest first, with their message's header fields."""
    sql = (
        "SELECT v.*, m.received_at, m.sending_application, m.sending_facility, m.trigger_event, m.control_id, "
        "m.fhir, m.state AS message_state FROM reviews v JOIN messages m ON m.id = v.message_id"
    )
    args: list[Any] = []
    if state:
        sql += " WHERE v.state = ?"
        args.append(state)
    sql += " ORDER BY v.id LIMIT ?"
    args.append(limit)
    keys = keys_of(conn)
    out = []
    for row in conn.execute(sql, args):
        item = dict(row)
        item["candidates"] = json.loads(keys.open_text(item["candidates"], candidates_context(item["message_id"])))
        item["fhir"] = keys.open_text(item["fhir"], message_context("fhir", item["message_id"]))
        out.append(item)
    return out


def review_detail(conn: sqlite3.Connection, review_id: int) -> dict | None:
    """One review with what deciding it needs: the stored message (raw bytes, charset, receipt time)."""
    row = conn.execute(
        "SELECT v.*, m.raw, m.charset, m.received_at, m.control_id, m.state AS message_state "
        "FROM reviews v JOIN messages m ON m.id = v.message_id WHERE v.id = ?",
        (review_id,),
    ).fetchone()
    if row is None:
        return None
    keys = keys_of(conn)
    item = dict(row)
    item["candidates"] = json.loads(keys.open_text(item["candidates"], candidates_context(item["message_id"])))
    if item["raw"] is not None:  # None: purged (retention)
        item["raw"] = keys.open(item["raw"], message_context("raw", item["message_id"]))
    return item


def _decide(conn: sqlite3.Connection, review_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT id, message_id, state FROM reviews WHERE id = ?", (review_id,)).fetchone()
    if row is None:
        raise StoreError(f"no review with id {review_id}")
    if row["state"] != REVIEW_OPEN:
        raise StoreError(f"review {review_id} is already {row['state']}")
    return row


def accept_review(
    conn: sqlite3.Connection,
    review_id: int,
    aco_id: str,
    member_id: str,
    notifications: list[Notification],
    events: list[tuple[str, dict]],
    mrns: Iterable[tuple[str, str]],
    by: str,
    now: str,
    due: float,
) -> str:
    """Accept a review: route the held notifications (due at ``due``), remember the MRN links.

    Returns the message's new state. Raises :class:`StoreError` when the
    review does not exist or was already decided.
    """
    message_id = _decide(conn, review_id)["message_id"]
    conn.execute(
        "UPDATE reviews SET state = ?, decided_by = ?, decided_at = ?, aco_id = ?, member_id = ? WHERE id = ?",
        (REVIEW_ACCEPTED, by, now, aco_id, member_id, review_id),
    )
    conn.execute(
        "UPDATE matches SET aco_id = ?, member_id = ?, method = 'review', detail = ? WHERE message_id = ?",
        (aco_id, member_id, _reviewed_detail(conn, message_id, review_id, by), message_id),
    )
    decision = {"review": review_id, "by": by, "aco": aco_id, "member": member_id}
    append_event(conn, now, message_id, None, "review", "review-accepted", decision)
    for kind, detail in events:
        append_event(conn, now, message_id, None, "review", kind, detail)
    for n in notifications:
        insert_notification(conn, n, now, due)
    keys = keys_of(conn)
    for mrn, authority in mrns:
        hashed = mrn_hash(keys, mrn)
        conn.execute(
            "INSERT OR REPLACE INTO confirmed_links (mrn_hash, mrn_authority, aco_id, member_id, review_id, "
            "confirmed_by, confirmed_at, mrn) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (hashed, authority, aco_id, member_id, review_id, by, now)
            + (keys.seal_text(mrn, link_context(hashed, authority, aco_id)),),
        )
    return _settle(conn, message_id, MATCHED, now)


def reject_review(conn: sqlite3.Connection, review_id: int, by: str, reason: str, now: str) -> str:
    """Reject a review: the message is unmatched (its HIE notification stands). Returns its new state."""
    message_id = _decide(conn, review_id)["message_id"]
    conn.execute(
        "UPDATE reviews SET state = ?, decided_by = ?, decided_at = ?, note = ? WHERE id = ?",
        (REVIEW_REJECTED, by, now, reason or None, review_id),
    )
    conn.execute(
        "UPDATE matches SET aco_id = NULL, member_id = NULL, grade = 'none', method = 'review', detail = ? "
        "WHERE message_id = ?",
        (_reviewed_detail(conn, message_id, review_id, by), message_id),
    )
    decision = {"review": review_id, "by": by, **({"reason": reason} if reason else {})}
    append_event(conn, now, message_id, None, "review", "review-rejected", decision)
    return _settle(conn, message_id, UNMATCHED, now)


def _reviewed_detail(conn: sqlite3.Connection, message_id: int, review_id: int, by: str) -> str:
    """A match's detail with the review that decided it and who did (read and written here: the
    engines' JSON functions differ)."""
    row = conn.execute("SELECT detail FROM matches WHERE message_id = ?", (message_id,)).fetchone()
    detail = json.loads(row[0] or "{}") if row is not None else {}
    detail.update(review=review_id, reviewed_by=by)
    return json.dumps(detail)


def _settle(conn: sqlite3.Connection, message_id: int, without_notifications: str, now: str) -> str:
    """Move a message out of ``review``: ``routed`` if it has notifications, else the given state."""
    state = ROUTED if has_notifications(conn, message_id) else without_notifications
    conn.execute(
        "UPDATE messages SET state = ?, updated_at = ? WHERE id = ? AND state = ?", (state, now, message_id, REVIEW)
    )
    return state
