"""Analyst output for ``herald match`` and ``herald review list``.

This prints patient demographics on the analyst's terminal, which is its
purpose; nothing here goes to the server's logs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from gateway.app.replay import ReplayError, collect_messages
from gateway.config import Config
from gateway.conversion.convert import convert
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import load_vocabulary
from gateway.errors import MessageError
from gateway.matching import (
    Candidate,
    Match,
    Person,
    match_patient,
    person_from_member,
    query_from_facts,
    query_from_patient,
)
from gateway.pipeline.process import MatchPolicy, decide
from gateway.store import RosterSnapshot, StoredRoster, roster_member


def match_summary(where: str, control_id: str, encounter_date: str, match: Match, routing: str) -> dict:
    """The ``--json`` object of one message: grade, score, member (or null) and the top candidates."""
    return {
        "file": where,
        "control_id": control_id,
        "encounter_date": encounter_date,
        "grade": match.grade,
        "method": match.method,
        "score": None if match.score is None else round(match.score, 3),
        "aco_id": match.aco_id,
        "member_id": match.member_id,
        "routing": routing,
        "candidates": [_candidate_json(c) for c in match.candidates],
    }


def _candidate_json(c: Candidate) -> dict:
    return {
        "aco_id": c.member.get("aco_id", ""),
        "member_id": c.member.get("member_id", ""),
        "grade": c.grade,
        "score": round(c.scored.total, 3),
        "fields": [{"field": f.field, "level": f.level, "weight": round(f.weight, 3)} for f in c.scored.fields],
    }


def routing_of(match: Match, policy: MatchPolicy) -> str:
    """What the pipeline does with this match: route, review, hie-only (opted out), or unmatched."""
    decision = decide(match, policy)
    if decision.review:
        return "review"
    if decision.withheld:
        return "hie-only (member opted out)"
    return "route" if decision.member is not None else "unmatched"


def explain_messages(
    paths: Iterable[Path],
    cfg: Config,
    roster: RosterSnapshot,
    conn,  # a read-only connection to the main database (confirmed MRN links)
    as_json: bool,
    out: Callable[[str], None],
    err: Callable[[str], None],
) -> int:
    """Match each message of ``paths`` against ``roster`` (with ``conn``'s confirmed links) and
    print why; return the failures."""
    try:
        messages = collect_messages(paths)
    except ReplayError as e:
        err(f"herald match: {e}")
        return 1
    if not messages:
        err("herald match: no HL7 messages (text starting with MSH) in the given paths")
        return 1
    vocab = load_vocabulary()
    policy = MatchPolicy.from_config(cfg, roster.size())
    lookups = StoredRoster(roster, conn)
    failures = 0
    if not as_json:
        m = policy.model
        out(
            f"thresholds: certain >= {m.certain:g}, probable >= {m.probable:g}, possible >= {m.possible:g}; "
            f"probable matches are {'routed' if policy.route_probable else 'held for review'}"
        )
    for where, raw in messages:
        try:
            msg = V2Message(raw)
            conversion = convert(msg, vocab, cfg.tzinfo, datetime.now(UTC))
        except MessageError as e:
            failures += 1
            if as_json:
                out(json.dumps({"file": where, "error": str(e)}))
            else:
                err(f"herald match: {where}: {e} (HL7 error {e.code})")
            continue
        query = query_from_facts(conversion.patient)
        match = match_patient(query, conversion.encounter_date, lookups, policy.model)
        control_id = msg.msh.get(10)
        routing = routing_of(match, policy)
        if as_json:
            out(json.dumps(match_summary(where, control_id, conversion.encounter_date, match, routing)))
            continue
        out("")
        out(f"{where}  control id {control_id}  {conversion.trigger_event} on {conversion.encounter_date or '?'}")
        ids = [f"MBI {query.mbi}"] if query.mbi else []
        ids += [f"MRN {v} ({a or 'no authority'})" for v, a in query.mrns]
        out(f"  patient: {_person(query.person)}" + (f"; {', '.join(ids)}" if ids else ""))
        score = "" if match.score is None else f", score {match.score:.2f}"
        chosen = f" -> member {match.member_id} of ACO {match.aco_id}" if match.matched else ""
        out(f"  result: {match.grade} by {match.method}{score}{chosen}; {routing}")
        if not match.candidates:
            out("  candidates: none")
        for n, c in enumerate(match.candidates, 1):
            member = c.member
            out(
                f"  #{n} member {member.get('member_id')} of ACO {member.get('aco_id')}: "
                f"{_person(person_from_member(member))}  total {c.scored.total:.2f}  {c.grade}"
            )
            for f in c.scored.fields:
                out(f"       {f.field:<10} {f.level:<14} {f.weight:+7.2f}")
    return failures


def _person(p: Person) -> str:
    parts = [" ".join(x for x in (p.family + ",", p.given, p.middle) if x.strip(",")) or "(no name)"]
    if p.birth_date:
        parts.append(f"born {p.birth_date}")
    if p.sex:
        parts.append(f"sex {p.sex}")
    place = " ".join(x for x in (p.street, p.city, p.state, p.zip) if x)
    if place:
        parts.append(place)
    if p.phone:
        parts.append(f"phone {p.phone}")
    return "  ".join(parts)


def describe_review(roster: RosterSnapshot, item: dict) -> list[str]:
    """Lines describing one review for ``herald review list``: the patient and each candidate."""
    lines = [
        f"review {item['id']}  [{item['state']}]  message {item['message_id']} (control id {item['control_id']}, "
        f"{item['trigger_event']}, received {item['received_at'][:19]})  {item['grade']}"
        + ("" if item["score"] is None else f", score {item['score']:.2f}")
    ]
    if item.get("fhir"):
        try:
            patient = _stored_patient(json.loads(item["fhir"]))
            lines.append(f"  patient: {_person(query_from_patient(patient).person)}")
        except (MessageError, ValueError):
            lines.append("  patient: (stored FHIR unreadable)")
    for c in item["candidates"]:
        member = roster_member(roster, c["aco_id"], c["member_id"])
        who = _person(person_from_member(member)) if member else "(no longer on the roster)"
        lines.append(f"  candidate {c['member_id']} of ACO {c['aco_id']}: {who}  score {c['score']:.2f}  {c['grade']}")
    if item["state"] != "open":
        chosen = f" -> member {item['member_id']} of ACO {item['aco_id']}" if item["member_id"] else ""
        why = f": {item['note']}" if item.get("note") else ""
        lines.append(f"  {item['state']} by {item['decided_by']} at {item['decided_at']}{chosen}{why}")
    return lines


def _stored_patient(bundle: dict) -> dict:
    """The Patient of a stored Bundle (for showing a review; the pipeline uses the converter's facts)."""
    for entry in bundle.get("entry", ()):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            return resource
    raise ValueError("the Bundle has no Patient")
