"""Routing: which recipients get a notification, and the Bundle each one gets.

A notification's Bundle is the message's Bundle with its own id and a
MessageHeader.destination naming the recipient. It is not stored per
recipient: the outbox row keeps the recipient, and :func:`notification_payload`
rebuilds the exact same bytes from the message's stored Bundle (written once,
never changed) whenever the notification is sent, so every retry sends the
same bytes and a receiver can drop duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from gateway.config import Recipient
from gateway.convert import Conversion, resource_id
from gateway.roster import Match
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
                payload=None,  # built from the message's Bundle when sent
            )
        )
    return out


def destination_endpoint(channel: str, target: str) -> str:
    """MessageHeader.destination.endpoint for a recipient: its URL, or a file: URL for a file drop."""
    return target if channel == "fhir" else f"file://{target}"


def bundle_json(bundle: dict) -> str:
    """The message's Bundle as stored (compact JSON); notification payloads are built from this text."""
    return _dump(bundle)


def payload_builder(bundle: dict | str) -> Callable[[Notification], str]:
    """A function giving each recipient's Bundle (see :func:`notification_payload`) for one message.

    The parts every recipient shares (all but the Bundle id and the
    MessageHeader entry) are encoded once; each call encodes only the header
    and joins the parts. The text is exactly ``json.dumps`` of the whole
    Bundle with compact separators, at a fraction of the cost.
    """
    base = json.loads(bundle) if isinstance(bundle, str) else bundle
    keys = list(base) if "id" in base else [*base, "id"]
    fixed = {k: _dump(v) for k, v in base.items() if k not in ("id", "entry")}
    header_entry = base["entry"][0]
    others = "".join("," + _dump(e) for e in base["entry"][1:])

    def build(notification: Notification) -> str:
        endpoint = destination_endpoint(notification.channel, notification.target)
        # Only the MessageHeader differs per recipient.
        header = dict(header_entry)
        header["resource"] = {
            **header_entry["resource"],
            "destination": [{"name": notification.recipient, "endpoint": endpoint}],
        }
        parts = []
        for k in keys:
            if k == "id":
                value = _dump(notification.id)
            elif k == "entry":
                value = "[" + _dump(header) + others + "]"
            else:
                value = fixed[k]
            parts.append(_dump(k) + ":" + value)
        return "{" + ",".join(parts) + "}"

    return build


def notification_payload(bundle: dict | str, notification: Notification) -> str:
    """The Bundle one recipient is sent: the message's Bundle with the notification's id and destination.

    ``bundle`` is the message's Bundle, parsed or as stored. The result is a
    function of the stored Bundle and the outbox row alone, so it is the same
    bytes on every attempt.
    """
    return payload_builder(bundle)(notification)


def _dump(value) -> str:
    return json.dumps(value, separators=(",", ":"))
