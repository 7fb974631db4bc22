"""ADT -> FHIR R4 notification Bundle (Da Vinci Unsolicited Notifications shape).

A plain function of its input: :func:`convert` takes a parsed message and the
vocabulary and returns a :class:`Conversion`, or raises
:class:`~gateway.errors.MessageError`. Resources are built as plain dicts
(fast) by the datatype maps in :mod:`gateway.conversion.datatypes` and the
segment maps in :mod:`gateway.conversion.segments`; the whole Bundle is then
validated with fhir.resources (R4B) by :func:`validate_bundle`.

Resource ids are UUIDv5 of the sender and the business identifiers, so a
retransmission converts to the same ids, two patients or visits never share
one, and a cancel (A11, A12, A13) names the Encounter it retracts.

With ``explain=True`` every field used is recorded as it is mapped (see
:mod:`gateway.conversion.explain`); without it the recording is a no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from gateway.conversion import segments
from gateway.conversion.datatypes import (
    HD,
    HERALD_NAMESPACE,
    MBI_PATTERN,
    MBI_SYSTEM,
    NPI_SYSTEM,
    MessageContext,
    authority_system,
    code_value,
    looks_like_npi,
    ref,
    resource_id,
    system_uri,
)
from gateway.conversion.facts import facts_of_patient
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import Vocabulary
from gateway.errors import MessageError
from gateway.header import (
    ERR_REQUIRED_FIELD_MISSING,
    ERR_SEGMENT_SEQUENCE,
    ERR_UNSUPPORTED_EVENT,
    ERR_UNSUPPORTED_MESSAGE_TYPE,
)
from gateway.records import PatientFacts

__all__ = [
    "HERALD_NAMESPACE",
    "MBI_PATTERN",
    "MBI_SYSTEM",
    "NOTIFICATION_EVENT_SYSTEM",
    "NPI_SYSTEM",
    "Conversion",
    "convert",
    "is_notification_event",
    "message_event",
    "looks_like_npi",
    "resource_id",
    "validate_bundle",
]

NOTIFICATION_EVENT_SYSTEM = "http://hl7.org/fhir/us/davinci-alerts/CodeSystem/notification-event"
V2_0003 = "http://terminology.hl7.org/CodeSystem/v2-0003"
V2_0301 = "http://terminology.hl7.org/CodeSystem/v2-0301"
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$", re.ASCII)


@dataclass(slots=True)
class Conversion:
    """The result of converting one ADT message."""

    bundle: dict
    event_code: str
    trigger_event: str
    #: The Patient resource built here (the same dict as in the Bundle).
    patient_resource: dict
    encounter_date: str
    facility: str
    warnings: list[str] = field(default_factory=list)
    #: True for a cancel (A11, A12, A13): it retracts the notification of the same Encounter.
    retraction: bool = False
    #: (segment, field number, FHIR target) per field used; None unless converted with explain=True.
    trace: list | None = None

    @property
    def patient(self) -> PatientFacts:
        """What matching needs of the patient, read from the Patient built here (not looked up in the Bundle).

        Computed when asked for: the pipeline asks once, to match; a conversion
        that is only shown (``herald convert``) does not pay for it.
        """
        return facts_of_patient(self.patient_resource)


def message_event(msg: V2Message) -> tuple[str, str]:
    """The message type and trigger event (MSH-9.1 and 9.2; EVN-1 when MSH-9.2 is empty, as older
    senders write it), trimmed and the trigger upper-cased: what the pipeline filters on and the
    converter maps."""
    msh = msg.msh
    trigger = msh.get(9, 2).strip().upper()
    if not trigger:
        evn = msg.segment("EVN")
        if evn is not None:
            trigger = evn.get(1).strip().upper()
    return msh.get(9, 1).strip(), trigger


def is_notification_event(message_type: str, trigger: str, vocab: Vocabulary) -> bool:
    """Whether :func:`message_event`'s answer is an ADT event Herald turns into a notification
    (``mappings/tables.toml``); :func:`convert` refuses exactly the others."""
    return message_type == "ADT" and trigger in vocab.events


def convert(
    msg: V2Message,
    vocab: Vocabulary,
    default_tz: tzinfo = UTC,
    received_at: datetime | None = None,
    *,
    explain: bool = False,
) -> Conversion:
    """Convert an ADT message to a notification Bundle; raise MessageError when it cannot be.

    ``default_tz`` is the sender's zone for times sent without an offset;
    ``received_at`` the Bundle's timestamp when MSH-7 has no time.
    """
    msh = msg.msh
    message_type, trigger = message_event(msg)
    evn = msg.segment("EVN")
    if message_type != "ADT":
        raise MessageError(
            f"message type {message_type or '(empty)'} is not ADT", ERR_UNSUPPORTED_MESSAGE_TYPE, "MSH-9"
        )
    rule = vocab.events.get(trigger)
    if rule is None:
        raise MessageError(f"ADT event {trigger or '(empty)'} is not converted", ERR_UNSUPPORTED_EVENT, "MSH-9")
    pid = msg.segment("PID")
    if pid is None:
        raise MessageError("the ADT message has no PID segment", ERR_SEGMENT_SEQUENCE, "PID")
    pv1 = msg.segment("PV1")
    if pv1 is None:
        raise MessageError("the ADT message has no PV1 segment", ERR_SEGMENT_SEQUENCE, "PV1")
    control_id = msh.raw(10).strip()
    if not control_id:
        raise MessageError("MSH-10 message control id is empty", ERR_REQUIRED_FIELD_MISSING, "MSH-10")

    trace: list | None = [] if explain else None
    # MSH-3 and MSH-4 are HDs; their names scope the ids, so they are read before the context is made.
    probe = MessageContext(msg, vocab, default_tz, "", None)
    app_hd = probe.hd_field(msh.reps(3)[0]) if msh.reps(3) else None
    fac_hd = probe.hd_field(msh.reps(4)[0]) if msh.reps(4) else None
    sending_app = app_hd.text if app_hd is not None else ""
    sending_fac = fac_hd.text if fac_hd is not None else ""
    scope = f"{sending_app}|{sending_fac}"
    ctx = MessageContext(msg, vocab, default_tz, scope, trace)
    ctx.used(msh, 9, "MessageHeader.eventCoding (by mappings/tables.toml events) and MessageHeader.reason")
    ctx.used(msh, 10, "Bundle.identifier")
    if msg.codec:
        ctx.used(msh, 1, "(the separators)")
        ctx.used(msh, 2, "(the encoding characters)")
    if msh.reps(18):
        ctx.used(msh, 18, f"(the character set: decoded as {msg.codec})")
    if msh.reps(12):
        ctx.used(msh, 12, "(the HL7 version: field names)")

    timestamp = ""
    msg_time, moment = ctx.dtm(ctx.field_text(msh, 7), "MSH-7")
    if moment is not None:
        timestamp = msg_time
        ctx.used(msh, 7, "Bundle.timestamp")
    if not timestamp:
        received = received_at or datetime.now(UTC)
        if received.tzinfo is None:  # Bundle.timestamp is an instant: it needs an offset
            received = received.replace(tzinfo=UTC)
        timestamp = received.isoformat(timespec="seconds")

    # The facility: PV1-3.4, else PV1-39, else MSH-4 (else MSH-3).
    pv1_location = pv1.reps(3)
    loc_parts = pv1_location[0].split(msg.comp) if pv1_location else []
    facility = ctx.hd(loc_parts[3]).text if len(loc_parts) > 3 else ""
    if not facility:
        facility = ctx.field_text(pv1, 39)
        if facility:
            ctx.used(pv1, 39, "Encounter.serviceProvider -> Organization.name")
    facility = facility or sending_fac or sending_app or "unknown facility"
    facility_npi = ""
    if evn is not None and ctx.field_text(evn, 7):
        event_facility = evn.reps(7)[0].split(msg.comp)
        if len(event_facility) > 2 and ctx.text(event_facility[2]).upper() == "NPI":
            facility_npi = ctx.text(event_facility[1])
            ctx.used(evn, 7, "Organization.identifier (the facility's NPI)")
    org = segments.organization(ctx, facility, facility_npi)
    org_ref = ref(org["id"])
    sender_org = segments.organization(ctx, sending_fac or facility)
    country = ctx.field_text(msh, 17)
    if country and "address" not in sender_org:
        ctx.used(msh, 17, "MessageHeader.sender -> Organization.address.country")
        sender_org["address"] = [{"country": country}]
    if fac_hd is not None:
        ctx.used(msh, 4, "MessageHeader.sender -> Organization")
        # IG HD[Organization]: the universal id (HD-2, typed by HD-3) is an identifier.
        if fac_hd.universal_uri:
            kind = fac_hd.kind.upper() or "ISO"  # untyped: universal_uri accepts only an OID
            ident = {
                "type": {"coding": [{"system": V2_0301, "code": kind}]},
                "system": "urn:ietf:rfc:3986",
                "value": fac_hd.universal_uri,
            }
            if ident not in sender_org.setdefault("identifier", []):
                sender_org["identifier"].append(ident)

    # Patient.
    pd1 = msg.segment("PD1")
    in2s = msg.all("IN2")
    patient = segments.patient(ctx, pid, pd1, msg.all("NK1"), in2s)
    pat_id = patient["id"]
    pat_ref = ref(pat_id)

    # Encounter.
    patient_class = ctx.field_text(pv1, 2).upper()
    notification, status_rule = rule.for_class(code_value(patient_class))
    encounter = segments.encounter(
        ctx, pv1, msg.segment("PV2"), evn, status_rule, rule.starts_encounter, rule.ends_encounter, facility, org_ref
    )
    visit = encounter.get("identifier", [{}])[0] if pv1.reps(19) else {}
    if visit.get("value"):
        enc_id = resource_id("Encounter", scope, visit["value"])
    elif encounter.get("period", {}).get("start") and pv1.reps(44):
        enc_id = resource_id("Encounter", pat_id, encounter["period"]["start"])
    else:
        enc_id = resource_id("Encounter", pat_id, "message", control_id)
        ctx.warnings.append(
            "PV1-19: no visit number (nor PV1-44): the Encounter id is this message's own, "
            "so later messages about this visit cannot name the same Encounter"
        )
    encounter["id"] = enc_id
    enc_ref = ref(enc_id)
    encounter["subject"] = {"reference": pat_ref}
    encounter["serviceProvider"] = {"reference": org_ref, "display": facility}

    segments.roles(ctx, msg.all("ROL") + msg.all("PRT"), patient, encounter)
    segments.conditions(ctx, msg.all("DG1"), pat_ref, encounter, enc_ref)
    segments.allergies(ctx, msg.all("AL1"), pat_ref, enc_ref, pat_id)
    segments.coverages(ctx, _insurance_groups(msg), pat_ref, pat_id)
    segments.observations(ctx, msg.all("OBX"), pat_ref, enc_ref, enc_id)

    header = {
        "resourceType": "MessageHeader",
        "id": resource_id("MessageHeader", scope, control_id),
        "eventCoding": {"system": NOTIFICATION_EVENT_SYSTEM, "code": notification},
        "source": _source(ctx, app_hd, sending_fac),
        "sender": {"reference": ref(sender_org["id"]), "display": sender_org["name"]},
        "responsible": _responsible(ctx, org_ref, facility),
        "reason": {"coding": [{"system": V2_0003, "code": trigger}]},
        "focus": [{"reference": enc_ref}],
    }
    language_cwe = ctx.texts(msh.reps(19)[0]) if msh.reps(19) else [""]
    language = language_cwe[0] or (language_cwe[3] if len(language_cwe) > 3 else "")
    if language and _LANGUAGE_TAG.match(language):
        # MSH-19 (IG: MessageHeader.language), its alternate code when the first is empty;
        # BCP 47 writes the language subtag in lower case.
        ctx.used(msh, 19, "MessageHeader.language")
        primary, _, rest = language.partition("-")
        header["language"] = primary.lower() + (f"-{rest}" if rest else "")
    if rule.display:
        header["reason"]["coding"][0]["display"] = rule.display
    if rule.retraction:
        header["reason"]["text"] = f"{trigger}: retracts the earlier notification about this Encounter"
    bundle = {
        "resourceType": "Bundle",
        "id": resource_id("Bundle", scope, control_id),
        "identifier": {"system": authority_system(scope), "value": control_id},
        "type": "message",
        "timestamp": timestamp,
        "entry": [
            {"fullUrl": ref(header["id"]), "resource": header},
            {"fullUrl": enc_ref, "resource": encounter},
            {"fullUrl": pat_ref, "resource": patient},
            *({"fullUrl": ref(rid), "resource": res} for rid, res in ctx.resources.items()),
        ],
    }
    period = encounter.get("period", {})
    start, end = period.get("start", ""), period.get("end", "")
    encounter_date = (end if encounter["status"] == "finished" and end else start)[:10]
    return Conversion(
        bundle=bundle,
        event_code=notification,
        trigger_event=trigger,
        patient_resource=patient,
        encounter_date=encounter_date,
        facility=facility,
        warnings=ctx.warnings,
        retraction=rule.retraction,
        trace=trace,
    )


def _responsible(ctx: MessageContext, org_ref: str, facility: str) -> dict:
    """MSH-22 (sending responsible organization, IG) when valued, else the facility."""
    msh = ctx.msg.msh
    org = segments.xon_organization(ctx, msh.reps(22)[0]) if msh.reps(22) else None
    if org is None:
        return {"reference": org_ref, "display": facility}
    ctx.used(msh, 22, "MessageHeader.responsible -> Organization")
    reference = ctx.add(org)
    return {"reference": reference, "display": org["name"]} if org.get("name") else {"reference": reference}


def _insurance_groups(msg: V2Message) -> list:
    """Each IN1 with the IN2 that follows it (before the next IN1), if any."""
    groups: list = []
    for seg in msg.segments:
        if seg.name == "IN1":
            groups.append([seg, None])
        elif seg.name == "IN2" and groups and groups[-1][1] is None:
            groups[-1][1] = seg
    return [tuple(g) for g in groups]


def _source(ctx: MessageContext, sending: HD | None, facility: str) -> dict:
    """MessageHeader.source: MSH-3 (name); endpoint from MSH-24, else MSH-3 (IG HD[MessageHeader.source-endpoint]).

    The endpoint is the first universal id (HD-2) that is valid for its type
    (ISO OID, UUID, URI, DNS name), MSH-24's before MSH-3's; else MSH-24's
    namespace when it is a URI; else a Herald URN of MSH-3 and MSH-4
    (endpoint is required, and an invalid URI would fail validation).
    """
    msh = ctx.msg.msh
    source: dict = {}
    app = sending.text if sending is not None else ""
    if app:
        source["name"] = app
        ctx.used(msh, 3, "MessageHeader.source.name")
    network = ctx.hd_field(msh.reps(24)[0]) if msh.reps(24) else None
    endpoint = ""
    for n, hd in ((24, network), (3, sending)):
        if hd is not None and hd.universal_uri:
            endpoint = hd.universal_uri
            ctx.used(msh, n, "MessageHeader.source.endpoint")
            break
    if not endpoint and network:
        system = authority_system(network.namespace)
        if not system.startswith("urn:herald:"):
            endpoint = system
            ctx.used(msh, 24, "MessageHeader.source.endpoint")
    if not endpoint:
        endpoint = system_uri(f"{app}.{facility}", "source")
    source["endpoint"] = endpoint
    sft = ctx.msg.segment("SFT")
    if sft is not None:
        software = ctx.field_text(sft, 3)
        version = ctx.field_text(sft, 2)
        if software:
            source["software"] = software
            ctx.used(sft, 3, "MessageHeader.source.software")
        if version:
            source["version"] = version
            ctx.used(sft, 2, "MessageHeader.source.version")
    return source


def validate_bundle(bundle: dict) -> None:
    """Check ``bundle`` against the FHIR R4B models; raise MessageError with the first problems.

    Each entry's resource is validated with its own model class (resolved once
    and cached), and the Bundle around them with the entries' resources left
    out: the same checks as validating the whole Bundle, about a fifth cheaper
    because fhir.resources does not look each class up again.
    """
    from pydantic import ValidationError

    shell = dict(bundle)
    entries = bundle.get("entry") or []
    shell["entry"] = [{k: v for k, v in e.items() if k != "resource"} for e in entries]
    try:
        _model("Bundle").model_validate(shell)
        for i, entry in enumerate(entries):
            resource = entry.get("resource")
            if resource is None:
                continue
            try:
                _model(resource.get("resourceType", "")).model_validate(resource)
            except ValidationError as e:
                raise _invalid(e, f"entry.{i}.resource.") from None
    except ValidationError as e:
        raise _invalid(e, "") from None


_MODELS: dict[str, type] = {}


def _model(resource_type: str):
    model = _MODELS.get(resource_type)
    if model is None:
        from fhir.resources.R4B import get_fhir_model_class

        try:
            model = get_fhir_model_class(resource_type)
        except (KeyError, ValueError, AttributeError, ImportError):
            raise MessageError(f"{resource_type!r} is not a FHIR R4 resource type", "207", "FHIR") from None
        _MODELS[resource_type] = model
    return model


def _invalid(error, prefix: str) -> MessageError:
    problems = "; ".join(f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in error.errors()[:3])
    return MessageError(f"the FHIR Bundle is not valid R4: {problems}", "207", "FHIR")
