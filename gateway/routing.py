"""Routing: which recipients get a notification, and the Bundle each one gets."""

from __future__ import annotations

import json
from collections.abc import Mapping

from gateway.config import Recipient
from gateway.convert import Conversion, resource_id
from gateway.matching import Match
from gateway.store import Notification


def route(
    conversion: Conversion,
    match: Match,
    recipients: Mapping[str, Recipient | None],
    message_id: int,
) -> list[Notification]:
    """One notification per recipient: the PCP and the ACO care team when the
    patient matched, the HIE (when configured) always."""
    member = match.member
    wanted: list[tuple[str, str]] = []
    if member is not None:
        if recipients.get("pcp") and (member.get("pcp_npi") or member.get("pcp_name")):
            who = member.get("pcp_name") or "PCP"
            if member.get("pcp_npi"):
                who += f" (NPI {member['pcp_npi']})"
            wanted.append(("pcp", who))
        if recipients.get("care_team"):
            who = f"ACO {member['aco_id']} care team"
            if member.get("care_manager"):
                who += f" ({member['care_manager']})"
            wanted.append(("care_team", who))
    if recipients.get("hie"):
        wanted.append(("hie", "HIE"))

    summary = json.dumps(
        {
            "event": conversion.event_code,
            "trigger": conversion.trigger_event,
            "patient": conversion.patient_display,
            "facility": conversion.facility,
            "date": conversion.encounter_date,
            "pcp": (member or {}).get("pcp_name") or "",
            "pcp_npi": (member or {}).get("pcp_npi") or "",
            "aco": (member or {}).get("aco_id") or "",
            "grade": match.grade,
        }
    )
    out = []
    base = conversion.bundle
    for role, who in wanted:
        recipient = recipients[role]
        assert recipient is not None
        # The stored message's row id makes the notification unique even when a
        # sender reuses an MSH-10 for a different message, and keeps it stable
        # across delivery retries and reprocessing.
        nid = resource_id("Notification", base["id"], role, str(message_id))
        bundle = dict(base)
        entries = list(base["entry"])
        endpoint = recipient.target if recipient.channel == "fhir" else f"file://{recipient.target}"
        # Only the MessageHeader differs per recipient: copy it, share the rest.
        header = dict(entries[0])
        header["resource"] = {**header["resource"], "destination": [{"name": who, "endpoint": endpoint}]}
        entries[0] = header
        bundle["id"] = nid
        bundle["entry"] = entries
        out.append(
            Notification(
                id=nid,
                message_id=message_id,
                recipient_role=role,
                recipient=who,
                channel=recipient.channel,
                target=recipient.target,
                event_code=conversion.event_code,
                summary=summary,
                payload=json.dumps(bundle, separators=(",", ":")),
            )
        )
    return out
