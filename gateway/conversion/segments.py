"""HL7 v2 ADT segments -> FHIR resources, per the v2-to-FHIR IG's segment maps.

PID (+PD1, NK1, ROL/PRT for the primary care provider, IN2's Medicare number)
-> Patient; PV1 + PV2 (+ROL/PRT, DG1 ranks) -> Encounter; DG1 -> Condition;
AL1 -> AllergyIntolerance; IN1 (+IN2) -> Coverage; OBX -> Observation.
Each function records the fields it uses on the :class:`MessageContext`
(``ctx.used``), which costs nothing unless an analyst asked for an explanation.
docs/mapping-decisions.md lists where Herald departs from the IG.
"""

from __future__ import annotations

import re

from gateway.conversion.datatypes import (
    MBI_PATTERN,
    MBI_SYSTEM,
    NPI_SYSTEM,
    V2_0203,
    MessageContext,
    code_value,
    period_of,
    ref,
    resource_id,
)
from gateway.conversion.v2 import Segment
from gateway.errors import MessageError
from gateway.header import ERR_REQUIRED_FIELD_MISSING

#: An HL7 v2 table as a FHIR code system is this and its number.
V2_TABLE = "http://terminology.hl7.org/CodeSystem/v2-"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
V3_NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$", re.ASCII)

#: PV1 fields naming practitioners: (field, v3 ParticipationType code, display).
PV1_PARTICIPANTS = ((7, "ATND", "attender"), (8, "REF", "referrer"), (9, "CON", "consultant"), (17, "ADM", "admitter"))


def _coded_field(ctx: MessageContext, seg: Segment, n: int, target: str, v2_table: str, table: str = "") -> dict | None:
    """The first repetition of field ``n`` as a CodeableConcept, recorded as going to ``target``.

    ``v2_table`` is the field's HL7 table (its code system when CWE-3 is
    empty), ``table`` the Herald code table, if any (see :meth:`MessageContext.cwe`).
    """
    reps = seg.reps(n)
    if not reps:
        return None
    concept = ctx.cwe(reps[0], table, V2_TABLE + v2_table)
    if concept:
        ctx.used(seg, n, target)
    return concept


def _number(text: str) -> int | float | None:
    """An NM value as a JSON number; None when it is not one."""
    t = text.strip()
    if not _NUMBER.match(t):
        return None
    if "." in t:
        return float(t)
    return int(t)


# -- Patient -----------------------------------------------------------------


def patient(
    ctx: MessageContext,
    pid: Segment,
    pd1: Segment | None,
    nk1s: list[Segment],
    in2s: list[Segment],
) -> dict:
    """PID (with PD1, NK1 and IN2-6) as a Patient.

    The Patient's id is from the sender and its identifier (the MR-typed
    one of PID-3 when there is one), so every message about this patient
    from this sender names the same Patient.
    """
    identifiers: list[dict] = []
    seen: set[tuple[str, str]] = set()
    # PID-3 is the identifier list; PID-2 (external id) is how older (v2.3)
    # senders carry their MRN; PID-4 the alternate id.
    for n in (3, 2, 4):
        reps = pid.reps(n)
        if not reps:
            continue
        dropped = False
        for raw in reps:
            ident = ctx.cx(raw)
            if ident is None:
                dropped = dropped or bool(ctx.text(raw.split(ctx.msg.comp, 1)[0]))
                continue
            key = (ident["system"], ident["value"])
            if key in seen:
                continue
            seen.add(key)
            identifiers.append(ident)
        ctx.used(pid, n, "Patient.identifier")
        if dropped:
            ctx.used(pid, n, "(an SSN repetition: left out, SSNs are not forwarded)")
    if pid.reps(19):
        ctx.used(pid, 19, "(left out: SSNs are not forwarded)")
    # IN2-6 is the Medicare health insurance card number: in the MBI format
    # it is the patient's MBI. (IN2-8 is the Medicaid case number.)
    for in2 in in2s:
        value = ctx.field_text(in2, 6).replace("-", "").upper()
        if value and MBI_PATTERN.match(value):
            ctx.used(in2, 6, "Patient.identifier (MBI)")
            if (MBI_SYSTEM, value) not in seen:
                seen.add((MBI_SYSTEM, value))
                identifiers.append({"system": MBI_SYSTEM, "value": value})
    if not identifiers:
        raise MessageError("PID-3 has no patient identifier", ERR_REQUIRED_FIELD_MISSING, "PID-3")
    primary = next(
        (i for i in identifiers if i.get("type", {}).get("coding", [{}])[0].get("code") == "MR"), identifiers[0]
    )
    pat_id = resource_id("Patient", ctx.scope, primary["system"], primary["value"])
    res: dict = {"resourceType": "Patient", "id": pat_id, "identifier": identifiers}

    names = [nm for nm in map(ctx.xpn, pid.reps(5)) if nm]
    if names:
        ctx.used(pid, 5, "Patient.name")
    # XPN-15 "called by": a name of its own with use nickname (IG XPN[HumanName]).
    nicknames = []
    for raw in pid.reps(5):
        parts = ctx.split(raw)
        called = ctx.text(parts[14]) if len(parts) > 14 else ""
        if called and {"use": "nickname", "given": [called]} not in nicknames:
            nicknames.append({"use": "nickname", "given": [called]})
    if nicknames:
        ctx.used(pid, 5, "Patient.name (XPN-15 called by: use nickname)")
    aliases = [nm for nm in map(ctx.xpn, pid.reps(9)) if nm]
    if aliases:
        ctx.used(pid, 9, "Patient.name (alias)")
    if names or aliases or nicknames:
        res["name"] = names + nicknames + aliases
    maiden = ctx.field_text(pid, 6)
    if maiden:
        ctx.used(pid, 6, "Patient.extension (patient-mothersMaidenName)")
        res["extension"] = [
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": maiden}
        ]
    birth_raw = ctx.field_text(pid, 7)
    birth, birth_moment = ctx.dtm(birth_raw, "PID-7")
    if birth:
        ctx.used(pid, 7, "Patient.birthDate")
        res["birthDate"] = birth[:10]
        if birth_moment is not None:
            ctx.used(pid, 7, "Patient.birthDate.extension (patient-birthTime)")
            birth_time = {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": birth}
            res["_birthDate"] = {"extension": [birth_time]}
    sex = ctx.field_text(pid, 8).upper()
    if sex:
        gender = ctx.table_code("0001-administrative-gender", sex)
        if gender:
            ctx.used(pid, 8, "Patient.gender")
            res["gender"] = gender
        else:
            ctx.warn("PID-8", "not a table 0001 value")
    addresses = [a for a in map(ctx.xad, pid.reps(11)) if a]
    if addresses:
        ctx.used(pid, 11, "Patient.address")
    county = ctx.field_text(pid, 12)
    if county:
        # IG PID[Patient]: the county is the district of the only address when
        # it has none; otherwise (another county, several addresses, or none)
        # an address of its own, as PID-12 cannot say which address it is for.
        if len(addresses) == 1 and "district" not in addresses[0]:
            ctx.used(pid, 12, "Patient.address.district")
            addresses[0]["district"] = county
        elif not (len(addresses) == 1 and addresses[0]["district"] == county):
            ctx.used(pid, 12, "Patient.address.district (an address of its own)")
            addresses.append({"district": county})
    if addresses:
        res["address"] = addresses
    telecom = [t for t in (ctx.xtn(r, "home") for r in pid.reps(13)) if t]
    if telecom:
        ctx.used(pid, 13, "Patient.telecom")
    work = [t for t in (ctx.xtn(r, "work") for r in pid.reps(14)) if t]
    if work:
        ctx.used(pid, 14, "Patient.telecom")
    other = [t for t in map(ctx.xtn, pid.reps(40)) if t]
    if other:
        ctx.used(pid, 40, "Patient.telecom")
    telecom += work + other
    if telecom:
        res["telecom"] = telecom
    language = pid.reps(15)
    if language:
        concept = _language(ctx, language[0])
        if concept:
            ctx.used(pid, 15, "Patient.communication.language")
            res["communication"] = [{"language": concept}]
    marital = _coded_field(ctx, pid, 16, "Patient.maritalStatus", "0002", "0002-marital-status")
    if marital:
        res["maritalStatus"] = marital
    if pid.reps(17):
        ctx.used(pid, 17, "(left out: religion is not needed for a notification)")
    order = _number(ctx.field_text(pid, 25))
    multiple = ctx.field_text(pid, 24).upper()
    if isinstance(order, int) and order > 0:
        ctx.used(pid, 25, "Patient.multipleBirthInteger")
        res["multipleBirthInteger"] = order
    elif multiple in ("Y", "N"):
        ctx.used(pid, 24, "Patient.multipleBirthBoolean")
        res["multipleBirthBoolean"] = multiple == "Y"
    death = ctx.field_dtm(pid, 29)
    if death:
        ctx.used(pid, 29, "Patient.deceasedDateTime")
        res["deceasedDateTime"] = death
    elif ctx.field_text(pid, 30).upper() in ("Y", "N"):
        ctx.used(pid, 30, "Patient.deceasedBoolean")
        res["deceasedBoolean"] = ctx.field_text(pid, 30).upper() == "Y"

    contacts = [c for c in (_contact(ctx, nk1) for nk1 in nk1s) if c]
    if contacts:
        res["contact"] = contacts
    if pd1 is not None:
        gps = []
        for raw in pd1.reps(3):
            org = xon_organization(ctx, raw)
            if org:
                ctx.used(pd1, 3, "Patient.generalPractitioner (Organization)")
                gps.append({"reference": ctx.add(org)})
        for raw in pd1.reps(4):
            prac = ctx.xcn(raw)
            if prac:
                ctx.used(pd1, 4, "Patient.generalPractitioner (Practitioner)")
                gps.append({"reference": ctx.add(prac[1])})
        if gps:
            res["generalPractitioner"] = gps

    return res


def _language(ctx: MessageContext, raw: str) -> dict | None:
    concept = ctx.cwe(raw)
    if not concept:
        return None
    # A bare two-letter code is an ISO 639-1 language, which BCP 47 (the FHIR
    # language system) writes in lower case.
    for coding in concept.get("coding", []):
        code = coding["code"]
        if "system" not in coding and len(code) == 2 and code.isascii() and code.isalpha():
            coding["system"] = "urn:ietf:bcp:47"
            coding["code"] = code.lower()
        elif coding.get("system") == "urn:ietf:bcp:47":
            coding["code"] = code.lower()
    return concept


def _contact(ctx: MessageContext, nk1: Segment) -> dict | None:
    """NK1 as a Patient.contact (the IG's NK1[Patient] map)."""
    contact: dict = {}
    relationship = [
        concept
        for concept in (
            _coded_field(ctx, nk1, 3, "Patient.contact.relationship", "0063", "0063-relationship"),
            _coded_field(ctx, nk1, 7, "Patient.contact.relationship", "0131", "0131-contact-role"),
        )
        if concept
    ]
    if relationship:
        contact["relationship"] = relationship
    names = [nm for nm in map(ctx.xpn, nk1.reps(2)) if nm]
    if names:
        ctx.used(nk1, 2, "Patient.contact.name")
        contact["name"] = names[0]
    telecom = []
    for n, use in ((5, ""), (6, "work"), (40, ""), (41, "")):
        found = [t for t in (ctx.xtn(r, use) for r in nk1.reps(n)) if t]
        if found:
            ctx.used(nk1, n, "Patient.contact.telecom")
            telecom += found
    if telecom:
        contact["telecom"] = telecom
    addresses = [a for a in map(ctx.xad, nk1.reps(4)) if a]
    if addresses:
        ctx.used(nk1, 4, "Patient.contact.address")
        contact["address"] = addresses[0]
    sex = ctx.field_text(nk1, 15)
    gender = ctx.table_code("0001-administrative-gender", sex) if sex else ""
    if gender:
        ctx.used(nk1, 15, "Patient.contact.gender")
        contact["gender"] = gender
    period = period_of(ctx.date(ctx.field_text(nk1, 8), "NK1-8"), ctx.date(ctx.field_text(nk1, 9), "NK1-9"))
    if period:
        ctx.used(nk1, 8, "Patient.contact.period")
        contact["period"] = period
    # NK1-13: the contact is an organization (an employer, a care home); its
    # contact person (NK1-30/31/32) goes on the Organization (IG NK1[Patient]).
    for raw in nk1.reps(13)[:1]:
        org = xon_organization(ctx, raw)
        if org is None:
            continue
        ctx.used(nk1, 13, "Patient.contact.organization -> Organization")
        person: dict = {}
        person_names = [nm for nm in map(ctx.xpn, nk1.reps(30)) if nm]
        if person_names:
            ctx.used(nk1, 30, "Patient.contact.organization -> Organization.contact.name")
            person["name"] = person_names[0]
        person_telecom = [t for t in map(ctx.xtn, nk1.reps(31)) if t]
        if person_telecom:
            ctx.used(nk1, 31, "Patient.contact.organization -> Organization.contact.telecom")
            person["telecom"] = person_telecom
        person_address = [a for a in map(ctx.xad, nk1.reps(32)) if a]
        if person_address:
            ctx.used(nk1, 32, "Patient.contact.organization -> Organization.contact.address")
            person["address"] = person_address[0]
        if person:
            org["contact"] = [person]
        contact["organization"] = {"reference": ctx.add(org)}
    # FHIR (pat-1): a contact has details or an organization.
    if not any(k in contact for k in ("name", "telecom", "address", "organization")):
        return None
    return contact


def xon_organization(ctx: MessageContext, raw: str) -> dict | None:
    """An XON repetition as an Organization (name XON-1, id XON-10 or XON-3 by XON-6)."""
    c = raw.split(ctx.msg.comp)
    n = len(c)
    name = ctx.text(c[0])
    id_value = ctx.text(c[9]) if n > 9 else ""
    id_value = id_value or (ctx.text(c[2]) if n > 2 else "")
    if not name and not id_value:
        return None
    org: dict = {"resourceType": "Organization"}
    if id_value:
        authority = ctx.hd(c[5]) if n > 5 else None
        system = authority.system if authority else ctx.scope_system
        ident: dict = {}
        id_type = code_value(ctx.text(c[6])).upper() if n > 6 else ""
        if id_type:  # XON-7 (IG XON[Organization])
            ident["type"] = {"coding": [{"system": V2_0203, "code": id_type}]}
        ident["system"] = system
        ident["value"] = id_value
        org["identifier"] = [ident]
        org["id"] = resource_id("Organization", system, id_value)
    else:
        org["id"] = resource_id("Organization", ctx.scope, name)
    if name:
        org["name"] = name
    return org


def organization(ctx: MessageContext, name: str, npi: str = "") -> dict:
    """The facility (or sender) as an Organization named ``name``; the same name is one resource."""
    rid = resource_id("Organization", ctx.scope, name)
    found = ctx.resources.get(rid)
    if found is not None:
        return found
    org: dict = {"resourceType": "Organization", "id": rid, "name": name}
    if npi:
        org["identifier"] = [{"system": NPI_SYSTEM, "value": npi}]
    ctx.add(org)
    return org


# -- Encounter ---------------------------------------------------------------


def encounter(
    ctx: MessageContext,
    pv1: Segment,
    pv2: Segment | None,
    evn: Segment | None,
    status: str,
    starts: bool,
    ends: bool,
    facility: str,
    org_ref: str,
) -> dict:
    """PV1 (+PV2, EVN times) as an Encounter; ``status`` from the event rule.

    "from-visit" derives the status as the IG's PV1 map does: finished when
    PV1-45 is valued, else table 0004's status for the patient class.
    """
    patient_class = code_value(ctx.field_text(pv1, 2)).upper()
    if status == "from-visit":
        if ctx.field_text(pv1, 45):
            status = "finished"
            ctx.used(pv1, 45, "Encounter.status (finished)")
        else:
            status = ctx.table_code("0004-encounter-status", patient_class) or "unknown"
            ctx.used(pv1, 2, "Encounter.status")
    enc: dict = {"resourceType": "Encounter", "id": "", "status": status}
    row = ctx.table_coding("0004-encounter-class", patient_class) if patient_class else None
    if row is not None:
        enc["class"] = row
        ctx.used(pv1, 2, "Encounter.class")
    elif patient_class:
        enc["class"] = {"code": patient_class}
        ctx.used(pv1, 2, "Encounter.class (code without a system)")
        ctx.warnings.append("PV1-2: not a table 0004 value; Encounter.class keeps the code without a system")
    else:
        enc["class"] = {"system": V3_NULL_FLAVOR, "code": "UNK", "display": "unknown"}
        ctx.warnings.append("PV1-2: patient class is empty; Encounter.class is UNK (unknown)")

    identifiers = []
    for n in (19, 50):
        # PV1-19 is one visit number; PV1-50 (alternate visit ids) repeats.
        for raw in pv1.reps(n)[:1] if n == 19 else pv1.reps(n):
            ident = ctx.cx(raw)
            if ident is None:
                continue
            if n == 19:  # the IG: a visit number, whatever CX-5 says
                ident["use"] = "usual"
                ident["type"] = {"coding": [{"system": V2_0203, "code": "VN", "display": "Visit number"}]}
            ctx.used(pv1, n, "Encounter.identifier")
            identifiers.append(ident)
    if identifiers:
        enc["identifier"] = identifiers

    evn_occurred = ctx.field_dtm(evn, 6) if evn is not None else ""
    evn_recorded = ctx.field_dtm(evn, 2) if evn is not None else ""
    start = ctx.field_dtm(pv1, 44)
    if start:
        ctx.used(pv1, 44, "Encounter.period.start")
    elif starts and (evn_occurred or evn_recorded):
        start = evn_occurred or evn_recorded
        ctx.used(evn, 6 if evn_occurred else 2, "Encounter.period.start (PV1-44 is empty)")
    end = ""
    if status == "finished":
        end = ctx.field_dtm(pv1, 45)
        if end:
            ctx.used(pv1, 45, "Encounter.period.end")
        elif ends and (evn_occurred or evn_recorded):
            end = evn_occurred or evn_recorded
            ctx.used(evn, 6 if evn_occurred else 2, "Encounter.period.end (PV1-45 is empty)")
    elif pv1.reps(45):
        ctx.used(pv1, 45, f"(not used: the encounter is {status})")
    period = period_of(start, end)
    if period:
        enc["period"] = period

    admission_type = _coded_field(ctx, pv1, 4, "Encounter.type", "0007", "0007-admission-type")
    if admission_type:
        enc["type"] = [admission_type]
    service = _coded_field(ctx, pv1, 10, "Encounter.serviceType", "0069")
    if service:
        enc["serviceType"] = service
    if pv2 is not None:
        reasons = [c for c in map(ctx.cwe, pv2.reps(3)) if c]
        if reasons:
            ctx.used(pv2, 3, "Encounter.reasonCode")
            enc["reasonCode"] = reasons
        priority = _coded_field(ctx, pv2, 25, "Encounter.priority", "0217", "0217-encounter-priority")
        if priority:
            enc["priority"] = priority

    participants = []
    for n, code, display in PV1_PARTICIPANTS:
        for raw in pv1.reps(n):
            prac = ctx.xcn(raw)
            if prac:
                ctx.used(pv1, n, f"Encounter.participant ({code}) -> Practitioner")
                _add_participant(participants, _participant(ctx, prac[1], code, display))
    for raw in pv1.reps(52):
        prac = ctx.xcn(raw)
        if prac:
            ctx.used(pv1, 52, "Encounter.participant (PART) -> Practitioner")
            _add_participant(participants, _participant(ctx, prac[1], "PART", "Participation"))
    for raw in pv2.reps(13) if pv2 is not None else ():
        # PV2-13 referral source: a referrer too (IG PV2[Encounter]).
        prac = ctx.xcn(raw)
        if prac:
            ctx.used(pv2, 13, "Encounter.participant (REF) -> Practitioner")
            _add_participant(participants, _participant(ctx, prac[1], "REF", "referrer"))
    if participants:
        enc["participant"] = participants

    hosp: dict = {}
    preadmit = pv1.reps(5)
    if preadmit:
        ident = ctx.cx(preadmit[0])
        if ident:
            ctx.used(pv1, 5, "Encounter.hospitalization.preAdmissionIdentifier")
            hosp["preAdmissionIdentifier"] = ident
    admit_source = _coded_field(ctx, pv1, 14, "Encounter.hospitalization.admitSource", "0023")
    if admit_source:
        hosp["admitSource"] = admit_source
    readmission = _coded_field(ctx, pv1, 13, "Encounter.hospitalization.reAdmission", "0092")
    if readmission:
        hosp["reAdmission"] = readmission
    disposition = _coded_field(
        ctx, pv1, 36, "Encounter.hospitalization.dischargeDisposition", "0112", "0112-discharge-disposition"
    )
    if disposition:
        hosp["dischargeDisposition"] = disposition
    destination = pv1.reps(37)
    if destination:
        place = _discharged_to(ctx, destination[0])
        if place is not None:
            ctx.used(pv1, 37, "Encounter.hospitalization.destination -> Location")
            hosp["destination"] = {"reference": ctx.add(place)}
    if hosp:
        enc["hospitalization"] = hosp

    locations = []
    current = pv1.reps(3)
    if current:
        loc = ctx.pl(current[0], facility, org_ref)
        if loc is not None:
            ctx.used(pv1, 3, "Encounter.location -> Location")
            # IG PV1[Encounter]: planned for a pre-admit (PV1-2 P), else active;
            # Herald: completed once the encounter is over (a discharged
            # patient is no longer in the bed).
            if status in ("finished", "cancelled"):
                loc_status = "completed"
            elif patient_class == "P":
                loc_status = "planned"
            else:
                loc_status = "active"
            locations.append({"location": {"reference": ctx.add(loc)}, "status": loc_status})
    prior = pv1.reps(6)
    if prior:
        loc = ctx.pl(prior[0], facility, org_ref)
        if loc is not None and (not locations or ref(loc["id"]) != locations[0]["location"]["reference"]):
            ctx.used(pv1, 6, "Encounter.location (completed) -> Location")
            locations.append({"location": {"reference": ctx.add(loc)}, "status": "completed"})
    if locations:
        enc["location"] = locations
    return enc


def _discharged_to(ctx: MessageContext, raw: str) -> dict | None:
    """PV1-37 (DLD) as a Location: DLD-1, a CWE whose parts are subcomponents, is its type and name.

    The IG's DLD[Location-Discharge]: a new Location typed by the discharge
    location code. DLD-2 (effective date) is left out: PV1-45 says when.
    """
    first = ctx.split(raw)[0]
    if not first:
        return None
    concept = ctx.cwe(first.replace(ctx.msg.sub, ctx.msg.comp))
    if concept is None:
        return None
    coding = concept.get("coding", [{}])[0]
    name = concept.get("text") or coding.get("display") or coding.get("code", "")
    return {
        "resourceType": "Location",
        "id": resource_id("Location", ctx.scope, "discharged-to", coding.get("system", ""), coding.get("code", name)),
        "name": name,
        "mode": "kind",
        "type": [concept],
    }


def _add_participant(participants: list[dict], participant: dict) -> None:
    """Append ``participant`` unless the same practitioner already has the same role.

    A Practitioner is identified by its identifier (or name), so two
    repetitions naming the same person are one participant, not two.
    """
    if participant not in participants:
        participants.append(participant)


def _participant(ctx: MessageContext, practitioner: dict, code: str, display: str) -> dict:
    return {
        "type": [{"coding": [{"system": PARTICIPATION_TYPE, "code": code, "display": display}]}],
        "individual": {"reference": ctx.add(practitioner)},
    }


def roles(ctx: MessageContext, segments: list[Segment], patient_res: dict, enc: dict) -> None:
    """ROL and PRT segments: primary care roles -> Patient.generalPractitioner,
    other roles -> Encounter.participant (type by table 0443; PART when unmapped)."""
    primary = ctx.vocab.primary_care_roles
    for seg in segments:
        role_field, person_field = (3, 4) if seg.name == "ROL" else (4, 5)
        if ctx.field_text(seg, 2).upper() == "D":
            ctx.used(seg, 2, "(a deleted role: not mapped)")
            continue
        role = code_value(ctx.field_text(seg, role_field)).upper()
        for raw in seg.reps(person_field):
            prac = ctx.xcn(raw)
            if prac is None:
                continue
            reference = ctx.add(prac[1])
            ctx.used(seg, role_field, "Encounter.participant.type / Patient.generalPractitioner (by role)")
            if role in primary:
                ctx.used(seg, person_field, "Patient.generalPractitioner -> Practitioner")
                gps = patient_res.setdefault("generalPractitioner", [])
                if {"reference": reference} not in gps:
                    gps.append({"reference": reference})
            else:
                row = ctx.vocab.tables["0443-participation-type"].get(role)
                if row is not None and row.system == PARTICIPATION_TYPE:
                    coding = row.as_fhir()
                else:
                    coding = {"system": PARTICIPATION_TYPE, "code": "PART", "display": "Participation"}
                ctx.used(seg, person_field, f"Encounter.participant ({coding['code']}) -> Practitioner")
                entry = {"type": [{"coding": [coding]}], "individual": {"reference": reference}}
                start = ctx.field_dtm(seg, 5 if seg.name == "ROL" else 11)
                end = ctx.field_dtm(seg, 6 if seg.name == "ROL" else 12)
                period = period_of(start, end)
                if period:
                    entry["period"] = period
                enc.setdefault("participant", []).append(entry)


# -- clinical segments -------------------------------------------------------


def conditions(ctx: MessageContext, dg1s: list[Segment], pat_ref: str, enc: dict, enc_ref: str) -> None:
    """DG1 -> Condition (encounter-diagnosis), ranked on Encounter.diagnosis."""
    diagnoses = []
    for i, dg1 in enumerate(dg1s):
        reps = dg1.reps(3)
        concept = ctx.cwe(reps[0]) if reps else None
        description = ctx.field_text(dg1, 4)
        if concept is not None:
            ctx.used(dg1, 3, "Condition.code")
            if description and "text" not in concept:
                concept["text"] = description
                ctx.used(dg1, 4, "Condition.code.text")
        elif description:
            concept = {"text": description}
            ctx.used(dg1, 4, "Condition.code.text")
        else:
            continue
        set_id = ctx.field_text(dg1, 1) or str(i + 1)
        first_code = concept.get("coding", [{}])[0].get("code", concept.get("text", ""))
        cond_id = resource_id("Condition", enc["id"], set_id, first_code)
        condition: dict = {"resourceType": "Condition", "id": cond_id}
        if ctx.field_text(dg1, 21).upper() == "D":
            # FHIR con-5: an entered-in-error Condition has no clinical status.
            ctx.used(dg1, 21, "Condition.verificationStatus (entered-in-error)")
            condition["verificationStatus"] = {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "entered-in-error"}
                ]
            }
        condition["category"] = [{"coding": [{"system": CONDITION_CATEGORY, "code": "encounter-diagnosis"}]}]
        condition["code"] = concept
        condition["subject"] = {"reference": pat_ref}
        condition["encounter"] = {"reference": enc_ref}
        onset = ctx.field_dtm(dg1, 5)
        if onset:
            ctx.used(dg1, 5, "Condition.onsetDateTime")
            condition["onsetDateTime"] = onset
        recorded = ctx.field_dtm(dg1, 19)
        if recorded:
            ctx.used(dg1, 19, "Condition.recordedDate")
            condition["recordedDate"] = recorded
        for raw in dg1.reps(16)[:1]:
            prac = ctx.xcn(raw)
            if prac:
                ctx.used(dg1, 16, "Condition.asserter -> Practitioner")
                condition["asserter"] = {"reference": ctx.add(prac[1])}
        ctx.add(condition)
        diagnosis: dict = {"condition": {"reference": ref(cond_id)}}
        dtype = ctx.field_text(dg1, 6)
        if dtype:
            use_concept = ctx.cwe(dg1.reps(6)[0], "0052-diagnosis-use", "http://terminology.hl7.org/CodeSystem/v2-0052")
            if use_concept:
                ctx.used(dg1, 6, "Encounter.diagnosis.use")
                diagnosis["use"] = use_concept
        priority = _number(ctx.field_text(dg1, 15))
        if isinstance(priority, int) and priority > 0:
            ctx.used(dg1, 15, "Encounter.diagnosis.rank")
            diagnosis["rank"] = priority
        else:
            diagnosis["rank"] = len(diagnoses) + 1
        diagnoses.append(diagnosis)
    if diagnoses:
        enc["diagnosis"] = diagnoses


def allergies(ctx: MessageContext, al1s: list[Segment], pat_ref: str, enc_ref: str, pat_id: str) -> None:
    """AL1 -> AllergyIntolerance (clinical status active, as the IG assigns)."""
    for i, al1 in enumerate(al1s):
        reps = al1.reps(3)
        concept = ctx.cwe(reps[0]) if reps else None
        if concept is None:
            continue
        ctx.used(al1, 3, "AllergyIntolerance.code")
        set_id = ctx.field_text(al1, 1) or str(i + 1)
        key = concept.get("coding", [{}])[0].get("code", concept.get("text", ""))
        res: dict = {
            "resourceType": "AllergyIntolerance",
            "id": resource_id("AllergyIntolerance", pat_id, set_id, key),
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}
                ]
            },
        }
        kind = code_value(ctx.field_text(al1, 2)).upper()
        if kind:
            category = ctx.table_code("0127-allergy-category", kind)
            if category:
                ctx.used(al1, 2, "AllergyIntolerance.category")
                res["category"] = [category]
            if kind != "MC":  # the IG: every allergen type but a contraindication is an allergy
                res["type"] = "allergy"
        res["code"] = concept
        res["patient"] = {"reference": pat_ref}
        res["encounter"] = {"reference": enc_ref}
        severity = code_value(ctx.field_text(al1, 4)).upper()
        criticality = ctx.table_code("0128-allergy-criticality", severity) if severity else ""
        if criticality:
            ctx.used(al1, 4, "AllergyIntolerance.criticality")
            res["criticality"] = criticality
        onset = ctx.date(ctx.field_text(al1, 6), "AL1-6")
        if onset:
            ctx.used(al1, 6, "AllergyIntolerance.onsetDateTime")
            res["onsetDateTime"] = onset
        reactions = [ctx.text(r.split(ctx.msg.comp, 1)[0]) for r in al1.reps(5)]
        reactions = [r for r in reactions if r]
        if reactions:
            ctx.used(al1, 5, "AllergyIntolerance.reaction.manifestation.text")
            res["reaction"] = [{"manifestation": [{"text": r} for r in reactions]}]
        ctx.add(res)


def coverages(ctx: MessageContext, groups: list[tuple[Segment, Segment | None]], pat_ref: str, pat_id: str) -> None:
    """IN1 (+IN2) -> Coverage; an IN1 naming no insurer is left out with a warning."""
    for i, (in1, _in2) in enumerate(groups):
        payors = []
        for raw in in1.reps(4)[:1]:
            org = xon_organization(ctx, raw)
            if org is not None:
                company_id = in1.reps(3)
                if "identifier" not in org and company_id:
                    ident = ctx.cx(company_id[0])
                    if ident:
                        org["identifier"] = [ident]
                        ctx.used(in1, 3, "Coverage.payor -> Organization.identifier")
                addresses = [a for a in map(ctx.xad, in1.reps(5)) if a]
                if addresses:
                    org["address"] = addresses
                    ctx.used(in1, 5, "Coverage.payor -> Organization.address")
                ctx.used(in1, 4, "Coverage.payor -> Organization")
                payors.append({"reference": ctx.add(org)})
        if not payors:
            ident = ctx.cx(in1.reps(3)[0]) if in1.reps(3) else None
            if ident is None:
                ctx.warn(f"IN1-4 (IN1 #{i + 1})", "names no insurance company, so no Coverage was made")
                continue
            org = {
                "resourceType": "Organization",
                "id": resource_id("Organization", ident["system"], ident["value"]),
                "identifier": [ident],
            }
            ctx.used(in1, 3, "Coverage.payor -> Organization.identifier")
            payors.append({"reference": ctx.add(org)})
        plan = ctx.field_text(in1, 2)
        policy = ctx.field_text(in1, 36)
        res: dict = {
            "resourceType": "Coverage",
            "id": resource_id("Coverage", pat_id, ctx.field_text(in1, 1) or str(i + 1), plan, policy),
            "status": "active",
        }
        if plan:
            ctx.used(in1, 2, "Coverage.identifier")
            res["identifier"] = [{"system": ctx.scope_system, "value": plan}]
        plan_type = _coded_field(ctx, in1, 15, "Coverage.type", "0086")
        if plan_type:
            res["type"] = plan_type
        subscriber = ctx.field_text(in1, 49) or policy
        if subscriber:
            ctx.used(in1, 49 if ctx.field_text(in1, 49) else 36, "Coverage.subscriberId")
            res["subscriberId"] = subscriber
        holder = _policy_holder(ctx, in1)
        if holder is not None:
            res["policyHolder"] = {"reference": ctx.add(holder)}
        relationship = _coded_field(ctx, in1, 17, "Coverage.relationship", "0063")
        relation_code = ""
        if relationship:
            res["relationship"] = relationship
            relation_code = relationship.get("coding", [{}])[0].get("code", "").upper()
        # IN1-16/17 (IG IN1[Coverage]): the insured is the patient (SEL), else a RelatedPerson.
        if relation_code == "SEL":
            ctx.used(in1, 16, "Coverage.subscriber (the patient: IN1-17 SEL)")
            res["subscriber"] = {"reference": pat_ref}
        else:
            insured = _insured(ctx, in1, pat_ref, pat_id, res.get("relationship"))
            if insured is not None:
                res["subscriber"] = {"reference": ctx.add(insured)}
        res["beneficiary"] = {"reference": pat_ref}
        period = period_of(ctx.date(ctx.field_text(in1, 12), "IN1-12"), ctx.date(ctx.field_text(in1, 13), "IN1-13"))
        if period:
            ctx.used(in1, 12, "Coverage.period")
            res["period"] = period
        res["payor"] = payors
        group = ctx.field_text(in1, 8)
        if group:
            ctx.used(in1, 8, "Coverage.class (group)")
            cls = {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "group"}]
                },
                "value": group,
            }
            group_name = ctx.field_text(in1, 9)
            if group_name:
                ctx.used(in1, 9, "Coverage.class.name")
                cls["name"] = group_name
            res["class"] = [cls]
        ctx.add(res)


def _policy_holder(ctx: MessageContext, in1: Segment) -> dict | None:
    """IN1-11 (insured's group employer) as an Organization, with IN1-10 ids as its identifiers."""
    org = xon_organization(ctx, in1.reps(11)[0]) if in1.reps(11) else None
    if org is None:
        return None
    ctx.used(in1, 11, "Coverage.policyHolder -> Organization")
    org = ctx.resources.get(org["id"], org)  # the same organization named earlier (as the payor, say)
    ids = [i for i in map(ctx.cx, in1.reps(10)) if i]
    if ids:
        ctx.used(in1, 10, "Coverage.policyHolder -> Organization.identifier")
        known = org.setdefault("identifier", [])
        known += [i for i in ids if i not in known]
    return org


def _insured(ctx: MessageContext, in1: Segment, pat_ref: str, pat_id: str, relationship: dict | None) -> dict | None:
    """IN1-16 (name of insured, not the patient) as a RelatedPerson: name, relationship, birth date, address."""
    names = [nm for nm in map(ctx.xpn, in1.reps(16)) if nm]
    if not names:
        return None
    ctx.used(in1, 16, "Coverage.subscriber -> RelatedPerson")
    first = names[0]
    person: dict = {
        "resourceType": "RelatedPerson",
        "id": resource_id("RelatedPerson", pat_id, first.get("family", ""), *first.get("given", [])),
        "patient": {"reference": pat_ref},
    }
    if relationship:
        person["relationship"] = [relationship]
    person["name"] = names
    birth = ctx.date(ctx.field_text(in1, 18), "IN1-18")
    if birth:
        ctx.used(in1, 18, "Coverage.subscriber -> RelatedPerson.birthDate")
        person["birthDate"] = birth
    addresses = [a for a in map(ctx.xad, in1.reps(19)) if a]
    if addresses:
        ctx.used(in1, 19, "Coverage.subscriber -> RelatedPerson.address")
        person["address"] = addresses
    return person


_OBX_TEXT = frozenset({"ST", "TX", "FT"})
_OBX_CODED = frozenset({"CE", "CWE", "CNE", "CF"})
_OBX_TIME = frozenset({"DT", "DTM", "TS"})


def observations(ctx: MessageContext, obxs: list[Segment], pat_ref: str, enc_ref: str, enc_id: str) -> None:
    """OBX -> Observation (value by OBX-2; status by table 0085, "unknown" when OBX-11 is empty)."""
    for i, obx in enumerate(obxs):
        reps = obx.reps(3)
        code = ctx.cwe(reps[0]) if reps else None
        if code is None:
            if obx.reps(5):
                ctx.warn(f"OBX-3 (OBX #{i + 1})", "has no observation code, so no Observation was made")
            continue
        status_code = code_value(ctx.field_text(obx, 11)).upper()
        status = ctx.table_code("0085-observation-status", status_code) if status_code else ""
        if status:
            ctx.used(obx, 11, "Observation.status")
        res: dict = {
            "resourceType": "Observation",
            "id": resource_id(
                "Observation", enc_id, ctx.field_text(obx, 1) or str(i + 1), code.get("coding", [{}])[0].get("code", "")
            ),
            "status": status or "unknown",
            "code": code,
            "subject": {"reference": pat_ref},
            "encounter": {"reference": enc_ref},
        }
        ctx.used(obx, 3, "Observation.code")
        value_type = code_value(ctx.field_text(obx, 2)).upper()
        values = obx.reps(5)
        if values and _observation_value(ctx, res, value_type, values, obx):
            ctx.used(obx, 5, f"Observation.value[x] (OBX-2 {value_type or 'empty'})")
        elif values:
            ctx.used(obx, 5, f"(not mapped: value type {value_type or 'empty'})")
        v2_0078 = "http://terminology.hl7.org/CodeSystem/v2-0078"
        interpretation = [c for c in (ctx.cwe(r, "", v2_0078) for r in obx.reps(8)) if c]
        if interpretation:
            ctx.used(obx, 8, "Observation.interpretation")
            res["interpretation"] = interpretation
        ref_range = ctx.field_text(obx, 7)
        if ref_range:
            ctx.used(obx, 7, "Observation.referenceRange.text")
            res["referenceRange"] = [{"text": ref_range}]
        effective = ctx.field_dtm(obx, 14)
        if effective:
            ctx.used(obx, 14, "Observation.effectiveDateTime")
            res["effectiveDateTime"] = effective
        ctx.add(res)


def _observation_value(ctx: MessageContext, res: dict, value_type: str, values: list[str], obx: Segment) -> bool:
    if value_type in _OBX_TEXT:
        text = "\n".join(t for t in (ctx.text(v) for v in values) if t)
        if text:
            res["valueString"] = text
            return True
        return False
    if value_type in _OBX_CODED:
        concept = ctx.cwe(values[0])
        if concept:
            res["valueCodeableConcept"] = concept
            return True
        return False
    if value_type in _OBX_TIME:
        moment = ctx.dtm(ctx.text(values[0].split(ctx.msg.comp, 1)[0]), "OBX-5")[0]
        if moment:
            res["valueDateTime"] = moment
            return True
        return False
    if value_type in ("NM", "SN"):
        comps = ctx.texts(values[0])
        comparator = ""
        if value_type == "SN":
            comparator, number_text = comps[0], (comps[1] if len(comps) > 1 else "")
            if len(comps) > 2 and any(comps[2:]):  # a ratio or a range: kept as text
                text = " ".join(x for x in comps if x)
                res["valueString"] = text
                return bool(text)
        else:
            number_text = comps[0]
        number = _number(number_text)
        if number is None:
            if number_text:
                ctx.warn("OBX-5", "not a number")
            return False
        quantity: dict = {"value": number}
        if comparator in ("<", "<=", ">", ">="):
            quantity["comparator"] = comparator
        units = obx.reps(6)
        if units:
            u = ctx.texts(units[0])
            unit_code = code_value(u[0])
            unit_text = (u[1] if len(u) > 1 else "") or u[0]
            if unit_text:
                quantity["unit"] = unit_text
            system = ctx.coding_system(u[2]) if len(u) > 2 else ""
            if unit_code and system:
                quantity["system"] = system
                quantity["code"] = unit_code
            ctx.used(obx, 6, "Observation.valueQuantity.unit")
        res["valueQuantity"] = quantity
        return True
    return False
