"""What an interface analyst does to a running gateway's data, as library functions.

The CLI calls these and formats what they return; a web console would call
the same functions (off the reactor: they block). Each takes the store (or a
read-only connection) and the configuration, does one thing, and raises
:class:`OperationError` with a message fit to show a person when it cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.app.roster import opened_store
from gateway.config import Config
from gateway.conversion.fieldnames import describe_location, field_info
from gateway.conversion.profiles import load_profiles
from gateway.conversion.v2 import V2Message, decode
from gateway.conversion.vocabulary import load_vocabulary
from gateway.errors import HeraldError, MessageError, ProfileError, StoreError
from gateway.header import read_header_leniently
from gateway.matching import Match
from gateway.pipeline.process import route_reviewed
from gateway.records import REVIEW_OPEN, ROLES, PendingMessage
from gateway.store import RosterSnapshot, Store, message_detail, roster_member

__all__ = [
    "MessageView",
    "OperationError",
    "ReviewDecision",
    "accept_review",
    "ack_said",
    "message_view",
    "opened_store",
    "reject_review",
]


class OperationError(HeraldError):
    """An operation that cannot be done as asked; ``bad_input`` when the request itself was wrong."""

    def __init__(self, message: str, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


# -- the review queue ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReviewDecision:
    """What deciding a review did."""

    review_id: int
    message_id: int
    state: str  # the message's new state
    aco_id: str = ""
    member_id: str = ""
    roles: tuple[str, ...] = ()  # notifications queued
    opted_out: bool = False
    links: int = 0  # MRN links remembered


def accept_review(
    store: Store,
    roster: RosterSnapshot,
    config: Config,
    review_id: int,
    *,
    by: str,
    member_id: str | None = None,
    aco_id: str | None = None,
) -> ReviewDecision:
    """Accept a review for one of its candidates (the best one unless ``member_id``/``aco_id`` say which).

    Converts the stored message again (ids are deterministic: the Bundle is
    the one the HIE got), routes it to the member's PCP and care team, and
    remembers the message's MRNs as links to the member, in one transaction.
    """
    item = store.review(review_id)
    if item is None:
        raise OperationError(f"no review with id {review_id}")
    if item["state"] != REVIEW_OPEN:
        raise OperationError(f"review {review_id} is already {item['state']} (by {item['decided_by']})")
    candidates = item["candidates"]
    chosen = [
        c
        for c in candidates
        if (member_id is None or c["member_id"] == member_id) and (aco_id is None or c["aco_id"] == aco_id)
    ]
    if not chosen:
        ids = ", ".join(f"{c['member_id']} ({c['aco_id']})" for c in candidates) or "none"
        raise OperationError(
            f"{member_id or aco_id} is not a candidate of review {review_id} (candidates: {ids})", bad_input=True
        )
    if member_id is not None and len(chosen) > 1:
        raise OperationError(f"member {member_id} is a candidate in several ACOs: give --aco", bad_input=True)
    pick = chosen[0]
    member = roster_member(roster, pick["aco_id"], pick["member_id"])
    if member is None:
        raise OperationError(f"member {pick['member_id']} of ACO {pick['aco_id']} is no longer on the roster")
    stored = store.stored_match(item["message_id"])
    match = (
        Match(stored["grade"], stored["method"], stored["score"], None, (), stored["detail"])
        if stored is not None
        else Match("possible", "review", None, None)
    )
    pending = PendingMessage(item["message_id"], item["raw"], item["received_at"], item["charset"] or "")
    recipients = {role: config.recipient(role) for role in ROLES}
    vocab = load_vocabulary()
    try:
        # Converted again with the sender's profile, as the pipeline did (it gives the ids).
        profiles = load_profiles(config.profiles_folder, vocab, config.profiles_unknown_senders)
    except ProfileError as e:
        raise OperationError(f"the sender profiles do not load: {e}") from None
    try:
        notifications, events, query = route_reviewed(
            pending, vocab, config.tzinfo, match, member, recipients, profiles
        )
    except MessageError as e:
        raise OperationError(f"message {item['message_id']} no longer converts: {e}") from None
    mrns = [(value, authority) for value, authority in query.mrns if value and authority]
    try:
        state = store.accept_review(
            review_id,
            aco_id=pick["aco_id"],
            member_id=pick["member_id"],
            notifications=notifications,
            events=events,
            mrns=mrns,
            by=by,
        )
    except StoreError as e:
        raise OperationError(str(e)) from None
    return ReviewDecision(
        review_id,
        item["message_id"],
        state,
        pick["aco_id"],
        pick["member_id"],
        tuple(n.recipient_role for n in notifications),
        bool(events),
        len(mrns),
    )


def reject_review(store: Store, review_id: int, *, by: str, reason: str = "") -> ReviewDecision:
    """Reject a review: none of the candidates is the patient; the message stays unmatched."""
    item = store.review(review_id)
    if item is None:
        raise OperationError(f"no review with id {review_id}")
    try:
        state = store.reject_review(review_id, by=by, reason=reason)
    except StoreError as e:
        raise OperationError(str(e)) from None
    return ReviewDecision(review_id, item["message_id"], state)


# -- the message log ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageView:
    """One message as an analyst reads it: the stored row and all that became of it, made readable."""

    detail: dict  # message, match, notifications, attempts, events (see gateway.store.message_detail)
    reason: str  # the rejection or failure reason, its location named ("PID-7 (Date/time of birth): ...")
    segments: list[str]  # the raw message, decoded, one segment a line
    fields: list[str]  # "PID-5 Patient Name (XPN): value" per non-empty field, when asked for


def message_view(conn, message_id: int, *, fields: bool = False) -> MessageView:
    """Everything about one stored message, for ``herald log show`` and a console's message page."""
    detail = message_detail(conn, message_id)
    if detail is None:
        raise OperationError(f"no message with id {message_id}")
    m = detail["message"]
    reason = m["reason"] or ""
    if reason and ": " in reason:
        # "PID-7: not a valid date" -> "PID-7 (Date/time of birth): not a valid date"
        where, _, why = reason.partition(": ")
        reason = f"{describe_location(where, m['version'] or '')}: {why}"
    header = read_header_leniently(m["raw"])
    text, _ = decode(m["raw"], m["charset"] or (header.charset.strip() if header else ""))
    segments = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]
    lines = _field_lines(m["raw"], m["charset"] or "", m["version"] or "") if fields else []
    return MessageView(detail, reason, segments, lines)


def _field_lines(raw: bytes, charset: str, version: str) -> list[str]:
    """Each non-empty field as ``PID-5 Patient name: value`` (names from hl7apy)."""
    try:
        msg = V2Message(raw, charset)
    except MessageError as e:
        return [f"(cannot be split into fields: {e})"]
    lines = []
    for seg in msg.segments:
        for n in range(1, len(seg.fields)):
            value = seg.fields[n]
            if not value:
                continue
            info = field_info(seg.name, n, version or "2.5.1")
            name = f" {info[0]} ({info[1]})" if info else ""
            lines.append(f"{seg.name}-{n}{name}: {value}")
    return lines


def ack_said(message: dict, events: list[dict]) -> str:
    """What the sender was answered: the ACK code sent, or why none was (MSH-15 NE/ER asks for none)."""
    sent = [e for e in events if e["kind"] == "ack-sent"]
    if sent:
        return f"ACK {json.loads(sent[-1]['detail'] or '{}').get('code', message['ack_code'])}"
    if message["state"] == "rejected" and message["ack_code"]:
        return f"ACK {message['ack_code']} (refused)"
    if message["accept_ack_type"] in ("NE", "ER"):
        return f"no accept ACK sent (MSH-15 {message['accept_ack_type']})"
    return "no ACK recorded"
