"""ADT A01/A03/A04 -> FHIR R4 notification Bundle (Da Vinci Notifications shape).

A plain function of its input: :func:`convert` takes a parsed message and the
vocabulary and returns a :class:`Conversion`, or raises
:class:`~gateway.errors.MessageError`. Resources are built as plain dicts (fast)
and the whole Bundle is then validated with fhir.resources (R4B) by
:func:`validate_bundle`.

Resource ids are UUIDv5 of the sender and the business identifiers, so a
retransmission converts to the same ids and two patients never share one.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from gateway.errors import MessageError
from gateway.header import ERR_REQUIRED_FIELD_MISSING, ERR_SEGMENT_SEQUENCE, ERR_UNSUPPORTED_EVENT
from gateway.v2 import Segment, V2Message, parse_dtm
from gateway.vocabulary import Vocabulary

NOTIFICATION_EVENT_SYSTEM = "http://hl7.org/fhir/us/davinci-alerts/CodeSystem/notification-event"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0004 = "http://terminology.hl7.org/CodeSystem/v2-0004"
V3_ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"

#: Namespace for Herald's deterministic resource ids.
HERALD_NAMESPACE = uuid.UUID("6f1b7c1e-1e0b-5a53-9f51-6c1d7b0e4a11")

#: The MBI format (CMS): 11 characters, letters excluding S, L, O, I, B, Z.
MBI_PATTERN = re.compile(
    r"^[1-9][AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9][0-9][AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9][0-9]"
    r"[AC-HJKMNP-RT-Y]{2}[0-9]{2}$"
)

_NAME_USE = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname", "A": "anonymous", "S": "anonymous"}
_ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "old", "M": "home"}
_TELECOM_USE = {
    "PRN": "home",
    "ORN": "home",
    "WPN": "work",
    "VHN": "home",
    "ASN": "home",
    "EMR": "home",
    "NET": "home",
    "BPN": "work",
    "PRS": "mobile",
}
_TELECOM_SYSTEM = {
    "PH": "phone",
    "FX": "fax",
    "CP": "phone",
    "BP": "pager",
    "Internet": "email",
    "X.400": "email",
    "MD": "other",
    "TDD": "other",
    "TTY": "other",
}


@dataclass(frozen=True, slots=True)
class PatientKeys:
    """What matching needs from the message, normalised."""

    mbi: str
    mrns: tuple[tuple[str, str], ...]  # (value, assigning authority)
    family: str
    given: str
    birth_date: str  # YYYY-MM-DD or ""
    sex: str  # M / F / O / U or ""


@dataclass(slots=True)
class Conversion:
    """The result of converting one ADT message."""

    bundle: dict
    event_code: str
    trigger_event: str
    keys: PatientKeys
    encounter_date: str
    facility: str
    patient_display: str
    warnings: list[str] = field(default_factory=list)


def resource_id(*parts: str) -> str:
    """A deterministic id for the resource named by ``parts``."""
    return str(uuid.uuid5(HERALD_NAMESPACE, "|".join(parts)))


def _ref(rid: str) -> str:
    return f"urn:uuid:{rid}"


class _Converter:
    def __init__(self, msg: V2Message, vocab: Vocabulary, default_tz: tzinfo, received_at: datetime | None) -> None:
        self.msg = msg
        self.vocab = vocab
        self.tz = default_tz
        self.received_at = received_at
        self.warnings: list[str] = []

    def dtm(self, value: str, location: str) -> tuple[str, datetime | None]:
        if not value:
            return "", None
        try:
            return parse_dtm(value, location, self.tz)
        except MessageError as e:
            self.warnings.append(f"{e.location}: {e.reason}; the field was left out")
            return "", None

    # -- datatypes -------------------------------------------------------

    def cx(self, raw: str, location: str, sender_scope: str) -> dict | None:
        comps = self.msg.components(raw)
        value = comps[0].strip() if comps else ""
        if not value:
            return None
        authority = _hd_text(self.msg, comps[3]) if len(comps) > 3 else ""
        id_type = comps[4].strip().upper() if len(comps) > 4 else ""
        if id_type == "SS":
            return None  # minimum necessary: SSNs are not forwarded
        ident: dict = {"value": value}
        system = self.vocab.identifier_systems.get(id_type)
        if system is None and (authority.upper() in self.vocab.mbi_authorities) and MBI_PATTERN.match(value):
            system = MBI_SYSTEM
        if system is None:
            system = _authority_system(authority or sender_scope)
        ident["system"] = system
        if id_type:
            ident["type"] = {"coding": [{"system": V2_0203, "code": id_type}]}
        if id_type == "MR":
            ident["use"] = "usual"
        if authority:
            ident["assigner"] = {"display": authority}
        return ident

    def xpn(self, raw: str) -> dict | None:
        c = self.msg.components(raw)
        family = c[0].strip() if c else ""
        if "&" in family or self.msg.sub in family:
            family = family.split(self.msg.sub)[0]
        given = [g.strip() for g in c[1:3] if g.strip()] if len(c) > 1 else []
        name: dict = {}
        if family:
            name["family"] = family
        if given:
            name["given"] = given
        if len(c) > 3 and c[3].strip():
            name["suffix"] = [c[3].strip()]
        if len(c) > 4 and c[4].strip():
            name["prefix"] = [c[4].strip()]
        if len(c) > 6 and c[6].strip():
            use = _NAME_USE.get(c[6].strip().upper())
            if use:
                name["use"] = use
        return name or None

    def xad(self, raw: str) -> dict | None:
        c = self.msg.components(raw)
        get = lambda i: c[i].strip() if len(c) > i else ""  # noqa: E731
        line = [x for x in (get(0), get(1)) if x]
        addr: dict = {}
        if line:
            addr["line"] = line
        for key, idx in (("city", 2), ("state", 3), ("postalCode", 4), ("country", 5), ("district", 8)):
            if get(idx):
                addr[key] = get(idx)
        if get(6):
            use = _ADDRESS_USE.get(get(6).upper())
            if use:
                addr["use"] = use
        return addr or None

    def xtn(self, raw: str, default_use: str) -> dict | None:
        c = self.msg.components(raw)
        get = lambda i: c[i].strip() if len(c) > i else ""  # noqa: E731
        system = _TELECOM_SYSTEM.get(get(2), "phone")
        if get(3) and system == "email" or (get(3) and not get(0) and not get(6)):
            return {"system": "email", "value": get(3), "use": default_use}
        value = get(0)
        if get(6):  # v2.3+ component form: (area) local ext
            value = (f"({get(5)}) " if get(5) else "") + get(6)
            if get(7):
                value += f" x{get(7)}"
        if not value:
            return None
        use = _TELECOM_USE.get(get(1), default_use) if get(1) else default_use
        if get(2) == "CP":
            use = "mobile"
        return {"system": system, "value": value, "use": use}

    def cwe(self, comps: list[str]) -> dict | None:
        get = lambda i: comps[i].strip() if len(comps) > i else ""  # noqa: E731
        codings = []
        for code_i, text_i, sys_i in ((0, 1, 2), (3, 4, 5)):
            if get(code_i):
                coding: dict = {"code": get(code_i)}
                system_name = get(sys_i)
                if system_name:
                    url = self.vocab.coding_systems.get(system_name.upper())
                    coding["system"] = url or _table_system(system_name)
                if get(text_i):
                    coding["display"] = get(text_i)
                codings.append(coding)
        concept: dict = {}
        if codings:
            concept["coding"] = codings
        text = get(8) or get(1) or get(4)
        if text:
            concept["text"] = text
        return concept or None

    def xcn_practitioner(self, raw: str, sender_scope: str) -> tuple[str, dict] | None:
        c = self.msg.components(raw)
        get = lambda i: c[i].strip() if len(c) > i else ""  # noqa: E731
        ident_value, family = get(0), get(1)
        if not ident_value and not family:
            return None
        authority = _hd_text(self.msg, c[8]) if len(c) > 8 else ""
        id_type = get(12).upper()
        practitioner: dict = {"resourceType": "Practitioner"}
        if ident_value:
            is_npi = (
                id_type == "NPI"
                or authority.upper() in ("NPI", "CMS", "2.16.840.1.113883.4.6")
                or (_looks_like_npi(ident_value) and not authority)
            )
            system = NPI_SYSTEM if is_npi else _authority_system(authority or sender_scope)
            ident: dict = {"system": system, "value": ident_value}
            if id_type:
                ident["type"] = {"coding": [{"system": V2_0203, "code": id_type}]}
            practitioner["identifier"] = [ident]
            key = (system, ident_value)
        else:
            key = (sender_scope, family, get(2))
        name: dict = {}
        if family:
            name["family"] = family
        given = [g for g in (get(2), get(3)) if g]
        if given:
            name["given"] = given
        if get(5):
            name["prefix"] = [get(5)]
        if get(4):
            name["suffix"] = [get(4)]
        if name:
            practitioner["name"] = [name]
        rid = resource_id("Practitioner", *key)
        practitioner["id"] = rid
        return rid, practitioner

    # -- the message -----------------------------------------------------

    def run(self) -> Conversion:
        msg = self.msg
        msh = msg.msh
        message_type = msh.get(9, 1)
        trigger = msh.get(9, 2)
        evn = msg.segment("EVN")
        if not trigger and evn is not None:
            trigger = evn.get(1)
        if message_type != "ADT":
            raise MessageError(f"message type {message_type or '(empty)'} is not ADT", "200", "MSH-9")
        rule = self.vocab.events.get(trigger)
        if rule is None:
            raise MessageError(f"ADT event {trigger or '(empty)'} is not converted", ERR_UNSUPPORTED_EVENT, "MSH-9")
        pid = msg.segment("PID")
        if pid is None:
            raise MessageError("the ADT message has no PID segment", ERR_SEGMENT_SEQUENCE, "PID")
        pv1 = msg.segment("PV1")
        if pv1 is None:
            raise MessageError("the ADT message has no PV1 segment", ERR_SEGMENT_SEQUENCE, "PV1")

        sending_app = msh.get(3)
        sending_fac = msh.get(4)
        scope = f"{sending_app}|{sending_fac}"
        control_id = msh.raw(10)
        if not control_id:
            raise MessageError("MSH-10 message control id is empty", ERR_REQUIRED_FIELD_MISSING, "MSH-10")

        msg_time, _ = self.dtm(msh.get(7), "MSH-7")
        if not msg_time or "T" not in msg_time:
            received = self.received_at or datetime.now(UTC)
            if received.tzinfo is None:  # Bundle.timestamp is an instant: it needs an offset
                received = received.replace(tzinfo=UTC)
            msg_time = received.isoformat(timespec="seconds")

        # Organization: the facility (PV1-3.4, else PV1-39, else MSH-4).
        facility = _hd_text(msg, pv1.comps(3)[3]) if len(pv1.comps(3)) > 3 else ""
        facility = facility or pv1.get(39) or sending_fac or sending_app or "unknown facility"
        org_id = resource_id("Organization", facility)
        organization = {"resourceType": "Organization", "id": org_id, "name": facility}

        # Patient.
        patient_keys, patient = self.patient(pid, scope)
        first_ident = patient.get("identifier", [{}])[0]
        pat_id = resource_id("Patient", first_ident.get("system", scope), first_ident.get("value", control_id))
        patient["id"] = pat_id

        # Encounter.
        patient_class = pv1.get(2).strip().upper()
        encounter = self.encounter(pv1, evn, rule, trigger, patient_class, scope)
        visit = pv1.get(19)
        enc_id = (
            resource_id("Encounter", scope, visit)
            if visit
            else resource_id("Encounter", pat_id, encounter.get("period", {}).get("start", ""), control_id)
        )
        encounter["id"] = enc_id
        encounter["subject"] = {"reference": _ref(pat_id)}
        encounter["serviceProvider"] = {"reference": _ref(org_id), "display": facility}

        entries: list[dict] = []
        loc = self.location(pv1, facility, org_id)
        if loc is not None:
            entries.append(loc)
            encounter["location"] = [
                {
                    "location": {"reference": _ref(loc["id"])},
                    "status": "active" if encounter["status"] != "finished" else "completed",
                }
            ]
        attending = pv1.reps(7)
        participants = []
        for raw in attending[:1]:
            prac = self.xcn_practitioner(raw, scope)
            if prac:
                rid, res = prac
                entries.append(res)
                participants.append(
                    {
                        "type": [{"coding": [{"system": PARTICIPATION_TYPE, "code": "ATND", "display": "attender"}]}],
                        "individual": {"reference": _ref(rid)},
                    }
                )
        if participants:
            encounter["participant"] = participants

        pv2 = msg.segment("PV2")
        if pv2 is not None and pv2.reps(3):
            reason = self.cwe(pv2.comps(3))
            if reason:
                encounter["reasonCode"] = [reason]

        diagnoses = []
        for i, dg1 in enumerate(msg.all("DG1")):
            concept = self.cwe(dg1.comps(3))
            if concept is None and dg1.get(4):
                concept = {"text": dg1.get(4)}
            if concept is None:
                continue
            cond_id = resource_id("Condition", enc_id, dg1.get(1) or str(i + 1), dg1.get(3))
            condition = {
                "resourceType": "Condition",
                "id": cond_id,
                "category": [{"coding": [{"system": CONDITION_CATEGORY, "code": "encounter-diagnosis"}]}],
                "code": concept,
                "subject": {"reference": _ref(pat_id)},
                "encounter": {"reference": _ref(enc_id)},
            }
            onset, _ = self.dtm(dg1.get(5), "DG1-5")
            if onset:
                condition["onsetDateTime"] = onset
            entries.append(condition)
            diagnoses.append({"condition": {"reference": _ref(cond_id)}, "rank": len(diagnoses) + 1})
        if diagnoses:
            encounter["diagnosis"] = diagnoses

        header_id = resource_id("MessageHeader", scope, control_id)
        header = {
            "resourceType": "MessageHeader",
            "id": header_id,
            "eventCoding": {"system": NOTIFICATION_EVENT_SYSTEM, "code": rule.notification},
            "source": {"name": sending_app or sending_fac, "endpoint": _source_endpoint(sending_app, sending_fac)},
            "sender": {"reference": _ref(org_id), "display": facility},
            "focus": [{"reference": _ref(enc_id)}],
        }
        bundle = {
            "resourceType": "Bundle",
            "id": resource_id("Bundle", scope, control_id),
            "identifier": {"system": _authority_system(scope), "value": control_id},
            "type": "message",
            "timestamp": msg_time,
            "entry": [
                _entry(header),
                _entry(encounter),
                _entry(patient),
                _entry(organization),
                *(_entry(e) for e in entries),
            ],
        }
        start = encounter.get("period", {}).get("start", "")
        end = encounter.get("period", {}).get("end", "")
        encounter_date = (end if rule.encounter_status == "finished" and end else start)[:10]
        display = " ".join(x for x in (patient_keys.given, patient_keys.family) if x) or "(no name)"
        return Conversion(
            bundle=bundle,
            event_code=rule.notification,
            trigger_event=trigger,
            keys=patient_keys,
            encounter_date=encounter_date,
            facility=facility,
            patient_display=display,
            warnings=self.warnings,
        )

    def patient(self, pid: Segment, scope: str) -> tuple[PatientKeys, dict]:
        identifiers: list[dict] = []
        mrns: list[tuple[str, str]] = []
        mbi = ""
        # PID-3 is the patient identifier list; PID-2 (external id) is how
        # older (v2.3) senders carry their MRN.
        for field_no in (3, 2, 4):
            for raw in pid.reps(field_no):
                ident = self.cx(raw, f"PID-{field_no}", scope)
                if ident is None:
                    continue
                if ident["system"] == MBI_SYSTEM:
                    # The roster keeps MBIs upper case without the dashes some senders print.
                    mbi = mbi or ident["value"].replace("-", "").upper()
                else:
                    authority = ident.get("assigner", {}).get("display", "")
                    mrns.append((ident["value"], authority))
                if not any(i["system"] == ident["system"] and i["value"] == ident["value"] for i in identifiers):
                    identifiers.append(ident)
        if not identifiers:
            raise MessageError("PID-3 has no patient identifier", ERR_REQUIRED_FIELD_MISSING, "PID-3")
        patient: dict = {"resourceType": "Patient", "identifier": identifiers}
        names = [n for n in (self.xpn(r) for r in pid.reps(5)) if n]
        if names:
            patient["name"] = names
        birth, _ = self.dtm(pid.get(7), "PID-7")
        if birth:
            patient["birthDate"] = birth[:10]
        sex = pid.get(8).strip().upper()
        if sex:
            gender = self.vocab.gender.get(sex)
            if gender:
                patient["gender"] = gender
            else:
                self.warnings.append("PID-8: not a table 0001 value; the field was left out")
        addresses = [a for a in (self.xad(r) for r in pid.reps(11)) if a]
        if addresses:
            patient["address"] = addresses
        telecom = [t for t in (self.xtn(r, "home") for r in pid.reps(13)) if t]
        telecom += [t for t in (self.xtn(r, "work") for r in pid.reps(14)) if t]
        if telecom:
            patient["telecom"] = telecom
        death, _ = self.dtm(pid.get(29), "PID-29")
        if death:
            patient["deceasedDateTime"] = death
        elif pid.get(30).upper() == "Y":
            patient["deceasedBoolean"] = True
        first = names[0] if names else {}
        keys = PatientKeys(
            mbi=mbi,
            mrns=tuple(mrns),
            family=first.get("family", ""),
            given=(first.get("given") or [""])[0],
            birth_date=patient.get("birthDate", "") if len(patient.get("birthDate", "")) == 10 else "",
            sex=sex if sex in ("M", "F", "O", "U") else "",
        )
        return keys, patient

    def encounter(self, pv1: Segment, evn: Segment | None, rule, trigger: str, patient_class: str, scope: str) -> dict:
        status = rule.status_by_class.get(patient_class, rule.encounter_status)
        cls = self.vocab.patient_class.get(patient_class)
        if cls:
            enc_class = {"system": V3_ACTCODE, **cls}
        elif patient_class:
            enc_class = {"system": V2_0004, "code": patient_class}
        else:
            enc_class = {"system": V3_ACTCODE, "code": "AMB", "display": "ambulatory"}
            self.warnings.append("PV1-2: patient class is empty; Encounter.class set to AMB")
        encounter: dict = {"resourceType": "Encounter", "status": status, "class": enc_class}
        visit = pv1.comps(19)
        if visit and visit[0]:
            authority = _hd_text(self.msg, visit[3]) if len(visit) > 3 else ""
            encounter["identifier"] = [
                {
                    "use": "usual",
                    "type": {"coding": [{"system": V2_0203, "code": "VN"}]},
                    "system": _authority_system(authority or scope),
                    "value": visit[0],
                }
            ]
        start, _ = self.dtm(pv1.get(44), "PV1-44")
        end, _ = self.dtm(pv1.get(45), "PV1-45")
        recorded, _ = self.dtm(evn.get(2), "EVN-2") if evn is not None else ("", None)
        event_time, _ = self.dtm(evn.get(6), "EVN-6") if evn is not None else ("", None)
        if not start and trigger != "A03":
            start = event_time or recorded
        if status == "finished" and not end:
            end = event_time or recorded
        period: dict = {}
        if start:
            period["start"] = start
        if end:
            period["end"] = end
        if period:
            encounter["period"] = period
        hosp: dict = {}
        admit_source, disposition = pv1.get(14).strip(), pv1.get(36).strip()
        if admit_source:
            hosp["admitSource"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0023", "code": admit_source}]
            }
        if disposition:
            hosp["dischargeDisposition"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0112", "code": disposition}]
            }
        if hosp:
            encounter["hospitalization"] = hosp
        return encounter

    def location(self, pv1: Segment, facility: str, org_id: str) -> dict | None:
        c = pv1.comps(3)
        parts = [p.strip() for p in c[:3]] if c else []
        parts = [p for p in parts if p]
        if not parts:
            return None
        name = " ".join(parts)
        rid = resource_id("Location", facility, *parts)
        return {
            "resourceType": "Location",
            "id": rid,
            "name": name,
            "mode": "instance",
            "managingOrganization": {"reference": _ref(org_id)},
        }


def convert(
    msg: V2Message,
    vocab: Vocabulary,
    default_tz: tzinfo = UTC,
    received_at: datetime | None = None,
) -> Conversion:
    """Convert an ADT A01/A03/A04 to a notification Bundle; raise MessageError when it cannot be."""
    return _Converter(msg, vocab, default_tz, received_at).run()


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


def _entry(resource: dict) -> dict:
    return {"fullUrl": _ref(resource["id"]), "resource": resource}


def _hd_text(msg: V2Message, raw_component: str) -> str:
    """The namespace id of an HD component (first subcomponent), or its universal id."""
    subs = msg.subcomponents(raw_component) if raw_component else []
    for s in subs:
        if s.strip():
            return s.strip()
    return ""


_URN_SAFE = re.compile(r"[^A-Za-z0-9.\-]+")


def _authority_system(authority: str) -> str:
    """A system URI for an assigning authority: OIDs as urn:oid, others as a Herald URN."""
    a = authority.strip()
    if re.fullmatch(r"[0-2](\.\d+)+", a):
        return f"urn:oid:{a}"
    if a.lower().startswith(("http://", "https://", "urn:")):
        return a
    return "urn:herald:id:" + (_URN_SAFE.sub("-", a).strip("-") or "local")


def _table_system(name: str) -> str:
    if re.fullmatch(r"HL7\d{4}", name.upper()):
        return f"http://terminology.hl7.org/CodeSystem/v2-{name[3:]}"
    return "urn:herald:codesystem:" + (_URN_SAFE.sub("-", name).strip("-") or "local")


def _source_endpoint(app: str, facility: str) -> str:
    return "urn:herald:source:" + (_URN_SAFE.sub("-", f"{app}.{facility}").strip("-") or "unknown")


def _looks_like_npi(value: str) -> bool:
    """10 digits passing the NPI Luhn check (prefix 80840)."""
    if not (len(value) == 10 and value.isdigit()):
        return False
    digits = [int(d) for d in "80840" + value]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0
