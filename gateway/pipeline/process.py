"""The pipeline: one stored message in, one outcome out.

:func:`process_message` is a plain function. It parses, converts, validates,
matches and routes, and describes the result as a :class:`MessageOutcome` for
the store to apply in one transaction. Problems become a state and a reason,
never an exception that escapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from functools import lru_cache
from pathlib import Path

from gateway.config import Config, Recipient
from gateway.conversion.convert import convert, is_notification_event, message_event, validate_bundle
from gateway.conversion.profiles import ProfileSet, apply_profile, open_message, profile_event
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import Vocabulary
from gateway.delivery.directory import DirectoryEntry
from gateway.delivery.routing import bundle_json, route, route_directory
from gateway.errors import MessageError
from gateway.limits import Limits
from gateway.matching import (
    Match,
    MatchModel,
    PatientQuery,
    RosterLookups,
    load_model,
    match_patient,
    query_from_facts,
)
from gateway.records import (
    FAILED,
    IGNORED,
    MATCHED,
    MEMBER_ROLES,
    REVIEW,
    ROUTED,
    UNMATCHED,
    MatchRecord,
    MessageOutcome,
    Notification,
    PendingMessage,
)
from gateway.transitions.episodes import episode_event, event_as_dict

__all__ = ["MatchPolicy", "decide", "match_record", "process_message", "review_candidates", "route_reviewed"]

#: Who an opted-out member's notification is withheld from (see README, "Opt-outs").
OPT_OUT_WITHHELD = MEMBER_ROLES


@dataclass(frozen=True)
class MatchPolicy:
    """How matches route: the model grades them; a probable one is routed or held for review."""

    model: MatchModel
    route_probable: bool = True

    @classmethod
    def from_config(cls, config: Config, roster_size: int | None = None) -> MatchPolicy:
        """The policy of ``config``'s ``[matching]`` section for a roster of ``roster_size`` members.

        The model's thresholds follow the roster's size unless the config sets
        them; models are loaded once per setting.
        """
        thresholds = (config.matching_certain, config.matching_probable, config.matching_possible)
        size = max(1, roster_size) if roster_size is not None else None
        return _policy(config.matching_model, thresholds, config.matching_route_probable, size)


@lru_cache(maxsize=16)
def _policy(model_path: Path | None, thresholds: tuple, route_probable: bool, size: int | None) -> MatchPolicy:
    names = ("certain", "probable", "possible")
    overrides = {k: float(v) for k, v in zip(names, thresholds, strict=True) if v is not None}
    if size is not None:
        overrides["roster_size"] = size
    return MatchPolicy(load_model(model_path, **overrides), route_probable)


@dataclass(frozen=True)
class MatchDecision:
    """What a match means for routing: the member notified for, a review to open, roles withheld."""

    member: dict | None
    review: bool = False
    withheld: tuple[str, ...] = ()


def decide(match: Match, policy: MatchPolicy) -> MatchDecision:
    """``certain`` routes; ``probable`` routes or goes to review per the policy; ``possible`` goes to
    review; an opted-out member's PCP and care team are not told (the HIE is, as for a patient not on
    the roster)."""
    if match.grade == "possible" or (match.grade == "probable" and not policy.route_probable):
        return MatchDecision(None, review=True)
    if match.member is None or match.grade not in ("certain", "probable"):
        return MatchDecision(None)
    if _opted_out(match.member):
        return MatchDecision(None, withheld=OPT_OUT_WITHHELD)
    return MatchDecision(match.member)


def _opted_out(member: dict) -> bool:
    return member.get("opted_out") in (1, "1", True)


def review_candidates(match: Match) -> list[dict]:
    """The candidates a reviewer chooses from: ids, scores and grades (no demographics)."""
    return [
        {
            "aco_id": c.member.get("aco_id", ""),
            "member_id": c.member.get("member_id", ""),
            "score": round(c.scored.total, 2),
            "grade": c.grade,
        }
        for c in match.candidates
    ]


def match_record(match: Match) -> MatchRecord:
    """The match as the store keeps it."""
    return MatchRecord(match.grade, match.method, match.score, match.aco_id, match.member_id, match.detail)


def process_message(
    pending: PendingMessage,
    vocab: Vocabulary,
    default_tz: tzinfo,
    lookups: RosterLookups,
    recipients: Mapping[str, Recipient | None],
    validate: bool = True,
    policy: MatchPolicy | None = None,
    limits: Limits = Config.limits,
    profiles: ProfileSet | None = None,
    directory: Mapping[str, DirectoryEntry] | None = None,
) -> MessageOutcome:
    """Turn one stored message into its outcome (state, FHIR, match, notifications).

    A problem with the message is a ``failed`` or ``ignored`` outcome with the
    reason. Only the roster lookups' own errors (the database) propagate, so
    the batch is tried again later. A message over ``limits`` fails at
    parsing: it is never converted. With ``profiles``, the sender's profile
    is applied before the conversion (its time zone, when it has one, wins
    over ``default_tz``); a sender with none fails when they say so. With a
    recipient ``directory`` (not empty), it decides who is told, and a PCP the
    roster names with no entry is recorded (``pcp-missing``), not skipped silently.
    """
    mid = pending.id
    selection = None
    try:
        if profiles is None:
            msg = V2Message(pending.raw, pending.charset, limits=limits)
        else:
            msg, selection = open_message(pending.raw, profiles, pending.charset, limits)
    except MessageError as e:
        return MessageOutcome(mid, FAILED, str(e), events=[("failed", {"stage": "parse", "reason": str(e)})])
    except Exception as e:
        return _internal_error(mid, "parse", e, [])
    parsed = {"segments": len(msg.segments), "charset": msg.codec}
    events: list[tuple[str, dict]] = [("parsed", parsed)]
    if selection is not None:
        if not selection.known and profiles.reject_unknown:
            parsed.update(profile_event(selection, None))
            reason = f'{selection.reason}, and [profiles] unknown_senders = "reject"'
            events.append(("failed", {"stage": "profile", "reason": reason}))
            return MessageOutcome(mid, FAILED, reason, events=events)
        try:
            applied = apply_profile(msg, selection.profile)
        except Exception as e:
            return _internal_error(mid, "profile", e, events)
        parsed.update(profile_event(selection, applied))
        default_tz = applied.tz or default_tz
    message_type, trigger = message_event(msg)
    if not is_notification_event(message_type, trigger, vocab):
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
                "validated": validate,
            },
        )
    )
    policy = policy or MatchPolicy(_default_model())
    try:
        query = query_from_facts(conversion.patient)
    except Exception as e:
        return _internal_error(mid, "match", e, events)
    match = match_patient(query, conversion.encounter_date, lookups, policy.model)
    decision = decide(match, policy)
    match_event = {"grade": match.grade, "method": match.method, "score": _rounded(match.score)}
    if match.matched:
        events.append(("matched", {**match_event, "aco": match.aco_id, "member": match.member_id}))
    else:
        events.append(("unmatched", {**match_event, **match.detail}))
    review = None
    if decision.review:
        review = {"candidates": review_candidates(match)}
        events.append(("review-queued", {**match_event, "candidates": len(review["candidates"])}))
    if decision.withheld:
        events.append(
            (
                "opt-out-honoured",
                {
                    "aco": match.aco_id,
                    "member": match.member_id,
                    "withheld": list(decision.withheld),
                    "reason": "the member opted out of data sharing; the HIE is told as for a patient not on a roster",
                },
            )
        )
    routed = match if decision.member is match.member else dataclasses.replace(match, member=None)
    try:
        if directory:
            notifications, missing = route_directory(conversion, routed, directory, mid)
            for npi in missing:
                events.append(
                    ("pcp-missing", {"npi": npi, "reason": "the roster names this PCP; the directory does not"})
                )
        else:
            notifications = route(conversion, routed, recipients, mid)
    except Exception as e:
        return _internal_error(mid, "route", e, events)
    if review is not None:
        state = REVIEW
    elif notifications:
        state = ROUTED
    else:
        state = MATCHED if match.matched else UNMATCHED
    return MessageOutcome(
        mid,
        state,
        None,
        bundle_json(conversion.bundle),
        match_record(match),
        notifications,
        events,
        review,
        episode=_episode_of(conversion.bundle, trigger, mid, decision.member, events),
        patient=conversion.patient_resource,
    )


def _episode_of(bundle: dict, trigger: str, message_id: int, member: dict | None, events: list) -> dict | None:
    """The message's episode event (care transitions) for the member it is routed for; None without one.

    Episodes are a member's: an unmatched patient, one in review and an opted-out member have none.
    A message with no visit number (PV1-19) has none either. Reading it never fails the message.
    """
    if member is None:
        return None
    aco_id, member_id = str(member.get("aco_id", "")), str(member.get("member_id", ""))
    try:
        event = episode_event(bundle, trigger, message_id, f"{aco_id}|{member_id}")
    except Exception as e:
        events.append(("episode-skipped", {"reason": f"the visit could not be read ({type(e).__name__})"}))
        return None
    if event is None:
        return None
    return {**event_as_dict(event), "aco_id": aco_id, "member_id": member_id}


def route_reviewed(
    pending: PendingMessage,
    vocab: Vocabulary,
    default_tz: tzinfo,
    match: Match,
    member: dict,
    recipients: Mapping[str, Recipient | None],
    profiles: ProfileSet | None = None,
    directory: Mapping[str, DirectoryEntry] | None = None,
) -> tuple[list[Notification], list[tuple[str, dict]], PatientQuery]:
    """The notifications held for review, now that a reviewer chose ``member``.

    Converts the stored message again (ids are deterministic, so the Bundle is
    the one the HIE got) and routes it to the PCP and care team only: the HIE
    was told when the message arrived. An opted-out member's are withheld.
    Returns the notifications, audit events and the message's query (for its
    MRNs). Raises :class:`MessageError` when the message no longer converts. ``profiles``: as
    :func:`process_message` applied them (the sender's profile changes the ids it is given).
    """
    if profiles is None:
        msg = V2Message(pending.raw, pending.charset)
    else:
        msg, selection = open_message(pending.raw, profiles, pending.charset)
        default_tz = apply_profile(msg, selection.profile).tz or default_tz
    conversion = convert(msg, vocab, default_tz, _received_at(pending.received_at))
    query = query_from_facts(conversion.patient)
    chosen = dataclasses.replace(match, member=member)
    if _opted_out(member):
        event = {
            "aco": member.get("aco_id"),
            "member": member.get("member_id"),
            "withheld": list(OPT_OUT_WITHHELD),
            "reason": "the member opted out of data sharing",
        }
        return [], [("opt-out-honoured", event)], query
    if directory:
        # The HIE was told when the message arrived: only the member's own recipients now.
        member_entries = {k: e for k, e in directory.items() if e.kind != "hie"}
        notifications, missing = route_directory(conversion, chosen, member_entries, pending.id)
        events = [
            ("pcp-missing", {"npi": npi, "reason": "the roster names this PCP; the directory does not"})
            for npi in missing
        ]
        return notifications, events, query
    held = {role: recipients.get(role) for role in MEMBER_ROLES}
    return route(conversion, chosen, held, pending.id), [], query


def pcp_missing_events(npis) -> list[tuple[str, dict]]:
    """A ``pcp-missing`` audit event per PCP NPI the roster names and the directory does not."""
    return [
        ("pcp-missing", {"npi": npi, "reason": "the roster names this PCP; the directory does not"}) for npi in npis
    ]


@lru_cache(maxsize=1)
def _default_model() -> MatchModel:
    return load_model()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


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
