"""The pipeline: one stored message in, one outcome out.

:func:`process_message` is a plain function. It parses, converts, validates,
matches and routes, and describes the result as a :class:`MessageOutcome` for
the store to apply in one transaction. Problems become a state and a reason,
never an exception that escapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from gateway.config import Recipient
from gateway.convert import convert, validate_bundle
from gateway.errors import MessageError
from gateway.roster import Match, match_patient
from gateway.routing import bundle_json, route
from gateway.store import FAILED, IGNORED, ROUTED, PendingMessage
from gateway.v2 import V2Message
from gateway.vocabulary import Vocabulary

#: The patient is on the roster but no enabled recipient is to be told.
MATCHED = "matched"
#: The patient is not on the roster and no HIE is configured.
UNMATCHED = "unmatched"


@dataclass(frozen=True)
class RosterLookups:
    """The three roster lookups matching needs (each returns rows as mappings)."""

    by_mbi: Callable[[str], Iterable]
    by_mrn: Callable[[str, str], Iterable]
    by_name_key: Callable[[str], Iterable]


@dataclass
class MessageOutcome:
    """What the pipeline decided for one message."""

    message_id: int
    state: str
    reason: str | None = None
    fhir_json: str | None = None
    match: Match | None = None
    notifications: list = field(default_factory=list)
    events: list[tuple[str, dict]] = field(default_factory=list)


def process_message(
    pending: PendingMessage,
    vocab: Vocabulary,
    default_tz: tzinfo,
    lookups: RosterLookups,
    recipients: Mapping[str, Recipient | None],
    validate: bool = True,
) -> MessageOutcome:
    """Turn one stored message into its outcome (state, FHIR, match, notifications).

    A problem with the message is a ``failed`` or ``ignored`` outcome with the
    reason. Only the roster lookups' own errors (the database) propagate, so
    the batch is tried again later.
    """
    mid = pending.id
    try:
        msg = V2Message(pending.raw, pending.charset)
    except MessageError as e:
        return MessageOutcome(mid, FAILED, str(e), events=[("failed", {"stage": "parse", "reason": str(e)})])
    except Exception as e:
        return _internal_error(mid, "parse", e, [])
    events: list[tuple[str, dict]] = [("parsed", {"segments": len(msg.segments), "charset": msg.codec})]
    message_type, trigger = msg.msh.get(9, 1), msg.msh.get(9, 2)
    evn = msg.segment("EVN")
    if not trigger and evn is not None:
        trigger = evn.get(1)  # as convert() does: older senders put the event in EVN-1 only
    if message_type != "ADT" or trigger not in vocab.events:
        known = ", ".join(sorted(vocab.events))
        reason = f"{message_type or '?'}^{trigger or '?'} is not a notification event (ADT {known})"
        events.append(("ignored", {"reason": reason}))
        return MessageOutcome(mid, IGNORED, reason, events=events)
    try:
        conversion = convert(msg, vocab, default_tz, _received_at(pending.received_at))
        if validate:
            validate_bundle(conversion.bundle)
    except MessageError as e:
        events.append(("failed", {"stage": "convert", "code": e.code, "location": e.location, "reason": e.reason}))
        return MessageOutcome(mid, FAILED, str(e), events=events)
    except Exception as e:
        return _internal_error(mid, "convert", e, events)
    events.append(
        (
            "converted",
            {
                "event": conversion.event_code,
                "resources": len(conversion.bundle["entry"]),
                "warnings": conversion.warnings,
            },
        )
    )
    match = match_patient(
        conversion.keys, conversion.encounter_date, lookups.by_mbi, lookups.by_mrn, lookups.by_name_key
    )
    if match.matched:
        events.append(
            ("matched", {"grade": match.grade, "method": match.method, "aco": match.aco_id, "member": match.member_id})
        )
    else:
        events.append(("unmatched", {"method": match.method, **match.detail}))
    try:
        notifications = route(conversion, match, recipients, mid)
    except Exception as e:
        return _internal_error(mid, "route", e, events)
    if notifications:
        state = ROUTED
    else:
        state = MATCHED if match.matched else UNMATCHED
    return MessageOutcome(
        mid,
        state,
        None,
        bundle_json(conversion.bundle),
        match,
        notifications,
        events,
    )


def _received_at(value: str) -> datetime | None:
    """The stored receipt time (the Bundle's timestamp when MSH-7 has none); None if unreadable."""
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None


def _internal_error(mid: int, stage: str, error: Exception, events: list[tuple[str, dict]]) -> MessageOutcome:
    # A bug must fail this one message, not stall every batch behind it in a
    # retry loop. Only the exception's type is kept: its text may quote PHI.
    reason = f"internal error in stage {stage} ({type(error).__name__})"
    events.append(("failed", {"stage": stage, "reason": reason}))
    return MessageOutcome(mid, FAILED, reason, events=events)
