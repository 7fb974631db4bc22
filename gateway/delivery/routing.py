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
from datetime import UTC, datetime

from gateway.config import Recipient
from gateway.conversion.convert import Conversion, resource_id
from gateway.delivery.directory import DirectoryEntry, event_kind, recipients_for
from gateway.delivery.policy import next_digest_time
from gateway.matching import Match
from gateway.records import Notification


def patient_keys(conversion: Conversion, member: Mapping | None) -> tuple[str, str]:
    """(key for the member's recipients, key for the HIE): who a notification is about, for ordering.

    The member (ACO and member id) when matched; the HIE gets every message,
    matched or not, so its key is the sending facility's MRN when there is one.
    Plain here, hashed with the key ring by the store.
    """
    member_key = f"member:{member.get('aco_id', '')}:{member.get('member_id', '')}" if member else ""
    mrns = conversion.patient.mrns
    mrn_key = f"mrn:{conversion.facility}:{mrns[0][1]}:{mrns[0][0]}" if mrns else ""
    return member_key, mrn_key or member_key


def attribution_of(member: Mapping | None) -> dict | None:
    """What the summary says of the attribution: the ACO, the PCP and the care manager (roster values)."""
    if not member:
        return None
    out = {
        "aco": member.get("aco_id", ""),
        "pcp": member.get("pcp_name", ""),
        "pcp_npi": member.get("pcp_npi", ""),
        "care_manager": member.get("care_manager", ""),
    }
    return {k: v for k, v in out.items() if v}


def route(
    conversion: Conversion,
    match: Match,
    recipients: Mapping[str, Recipient | None],
    message_id: int,
    directory: Mapping[str, DirectoryEntry] | None = None,
    now: datetime | None = None,
) -> list[Notification]:
    """One notification per recipient: the PCP and the ACO care team when the
    patient matched, the HIE (when configured) always.

    With a recipient ``directory`` (not empty) the directory decides instead
    (:func:`route_directory`); ``[recipients]`` in the config are then not used.
    """
    if directory:
        return route_directory(conversion, match, directory, message_id, now)[0]
    member = match.member
    member_key, hie_key = patient_keys(conversion, member)
    attribution = attribution_of(member)
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
                payload=None,  # built from the message's Bundle when sent
                patient_key=hie_key if role == "hie" else member_key,
                attribution=attribution,
            )
        )
    return out


def route_directory(
    conversion: Conversion,
    match: Match,
    directory: Mapping[str, DirectoryEntry],
    message_id: int,
    now: datetime | None = None,
) -> tuple[list[Notification], tuple[str, ...]]:
    """The notifications the recipient directory asks for, and the PCP NPIs it has no entry for.

    One per (entry, channel) that wants this kind of event (ED visit, admit,
    discharge, discharge to a SNF, transfer). A digest entry's notification is
    not due before its next digest time (in its own time zone).
    """
    member = match.member
    kind = event_kind(conversion.bundle)
    selection = recipients_for(kind, member, directory)
    member_key, hie_key = patient_keys(conversion, member)
    attribution = attribution_of(member)
    moment = now or datetime.now(UTC)
    base = conversion.bundle
    out = []
    for entry, index, channel in selection.deliveries:
        nid = resource_id("Notification", base["id"], entry.id, str(index), str(message_id))
        not_before = None
        if entry.mode == "digest":
            not_before = next_digest_time(moment, entry.digest_at, entry.timezone).timestamp()
        who = entry.name + (f" (NPI {entry.npi})" if entry.npi else "")
        out.append(
            Notification(
                id=nid,
                message_id=message_id,
                recipient_role=entry.kind,
                recipient=who,
                channel=channel["channel"],
                target=channel_target(channel),
                event_code=conversion.event_code,
                payload=None,
                recipient_id=entry.id,
                channel_index=index,
                patient_key=hie_key if entry.kind == "hie" else member_key,
                attribution=attribution,
                not_before=not_before,
            )
        )
    return out, selection.missing_pcps


def channel_target(channel: Mapping) -> str:
    """The destination a directory channel names, as the outbox lists it (no credentials)."""
    kind = channel["channel"]
    if kind == "fhir":
        base = str(channel["url"]).rstrip("/")
        return base if base.endswith("$process-message") else base + "/$process-message"
    if kind == "mllp":
        return f"mllp://{channel['host']}:{channel['port']}"
    if kind == "direct":
        return f"direct:{channel['to']}"
    return str(channel["directory"])


def destination_endpoint(channel: str, target: str) -> str:
    """MessageHeader.destination.endpoint for a recipient: its URL, a file: URL for a file drop,
    ``mailto:`` for a Direct address, the ``mllp://`` address for an MLLP forward."""
    if channel in ("fhir", "mllp"):
        return target
    if channel == "direct":
        return "mailto:" + target.removeprefix("direct:")
    return f"file://{target}"


def bundle_json(bundle: dict) -> str:
    """The message's Bundle as stored (compact JSON); notification payloads are built from this text."""
    return _dump(bundle)


def payload_builder(bundle: dict | str) -> Callable[[Notification], str]:
    """A function giving each recipient's Bundle (see :func:`notification_payload`) for one message.

    The text is exactly ``json.dumps`` of the whole Bundle with compact
    separators. From the stored text (what :func:`bundle_json` wrote) only
    the MessageHeader entry is decoded; the rest is spliced in as it is, so
    the server's cost does not grow with the size of the Bundle.
    """
    if isinstance(bundle, str):
        parts = _split_stored(bundle)
        if parts is not None:
            head, tail, header_entry, rest = parts

            def build_from_text(notification: Notification) -> str:
                entry = _dump(_with_destination(header_entry, notification))
                return head + _dump(notification.id) + tail + entry + rest

            return build_from_text
        bundle = json.loads(bundle)
    whole = bundle
    header_entry, *others = whole["entry"]

    def build(notification: Notification) -> str:
        # Not the stored form (tests, a Bundle stored some other way): encode it whole.
        header = _with_destination(header_entry, notification)
        return _dump({**whole, "id": notification.id, "entry": [header, *others]})

    return build


def _with_destination(header_entry: dict, notification: Notification) -> dict:
    # Only the MessageHeader differs per recipient.
    endpoint = destination_endpoint(notification.channel, notification.target)
    header = dict(header_entry)
    header["resource"] = {
        **header_entry["resource"],
        "destination": [{"name": notification.recipient, "endpoint": endpoint}],
    }
    return header


_STORED_PREFIX = '{"resourceType":"Bundle","id":'
_ENTRY_KEY = '"entry":['
_DECODER = json.JSONDecoder()


def _split_stored(text: str) -> tuple[str, str, dict, str] | None:
    """Cut a stored Bundle into (text up to the id value, text from after it up to the
    first entry, the first entry decoded, text after it); None when it is not in the expected form.

    A quote inside a JSON string is always escaped, so ``"entry":[`` can only
    be a key; the Bundle's own entry list is the first one because the keys
    before it (identifier, type, timestamp) hold no entries.
    """
    if not text.startswith(_STORED_PREFIX):
        return None
    try:
        id_value, id_end = _DECODER.raw_decode(text, len(_STORED_PREFIX))
        entries = text.index(_ENTRY_KEY, id_end) + len(_ENTRY_KEY)
        header_entry, header_end = _DECODER.raw_decode(text, entries)
    except ValueError:
        return None
    if not isinstance(id_value, str) or not isinstance(header_entry, dict) or "resource" not in header_entry:
        return None
    return _STORED_PREFIX, text[id_end:entries], header_entry, text[header_end:]


def notification_payload(bundle: dict | str, notification: Notification) -> str:
    """The Bundle one recipient is sent: the message's Bundle with the notification's id and destination.

    ``bundle`` is the message's Bundle, parsed or as stored. The result is a
    function of the stored Bundle and the outbox row alone, so it is the same
    bytes on every attempt.
    """
    return payload_builder(bundle)(notification)


def _dump(value) -> str:
    return json.dumps(value, separators=(",", ":"))
