"""A notification's short human-readable summary, read from its Bundle.

What a PCP office or care manager needs to act, in a few lines of plain text:
what happened (ED visit, admit, discharge, transfer), where (facility and
unit) and when (with its time zone); who (name, birth date, MRN); why
(reason, diagnoses), the attending, where the patient went on discharge (a
skilled nursing facility named); and the patient's ACO, attributed PCP and
care manager. Every value comes from the Bundle that is sent with it, never
from a stored copy, so the text and the Bundle cannot disagree. A stage
function: data in, text out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

__all__ = ["notification_summary", "event_title"]

#: HL7 table 0112 discharge dispositions Herald names in words (the code is shown for the rest).
_DISPOSITIONS = {
    "01": "home or self care",
    "02": "another short-term hospital",
    "03": "a skilled nursing facility (SNF)",
    "04": "an intermediate care facility",
    "05": "another type of institution",
    "06": "home with home health care",
    "07": "left against medical advice",
    "20": "expired",
    "21": "court or law enforcement",
    "50": "hospice, at home",
    "51": "hospice, in a medical facility",
    "61": "a swing bed",
    "62": "an inpatient rehabilitation facility",
    "63": "a long-term care hospital",
    "64": "a nursing facility (Medicaid)",
    "65": "a psychiatric hospital",
    "66": "a critical access hospital",
}
#: What each care-transition flag (gateway.transitions.alerts.encounter_flags) says to a person.
_FLAGS = {
    "readmission-30d": "readmitted within 30 days of a discharge",
    "ed-3-in-60d": "3 or more ED visits in 60 days",
    "admitted-from-snf": "admitted from a skilled nursing facility",
    "discharged-to-snf": "discharged to a skilled nursing facility",
}
_EVENTS = {
    "notification-admit": "Admission",
    "notification-discharge": "Discharge",
    "notification-transfer": "Transfer",
}


def _resolver(bundle: Mapping) -> Mapping[str, dict]:
    by_ref: dict[str, dict] = {}
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") or {}
        if entry.get("fullUrl"):
            by_ref[entry["fullUrl"]] = resource
        if resource.get("resourceType") and resource.get("id"):
            by_ref[f"{resource['resourceType']}/{resource['id']}"] = resource
    return by_ref


def _first(bundle: Mapping, kind: str) -> dict:
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == kind:
            return resource
    return {}


def _codes(concept: Mapping | None) -> Iterable[Mapping]:
    return (concept or {}).get("coding") or ()


def _text(concept: Mapping | None) -> str:
    """A CodeableConcept in words: its text, else a coding's display, else its code."""
    if not concept:
        return ""
    if concept.get("text"):
        return concept["text"]
    for coding in _codes(concept):
        if coding.get("display"):
            return coding["display"]
    for coding in _codes(concept):
        if coding.get("code"):
            return coding["code"]
    return ""


def _human_name(names: Iterable[Mapping] | None) -> str:
    for name in names or ():
        if name.get("text"):
            return name["text"]
        parts = [*name.get("prefix", ()), *name.get("given", ()), name.get("family", ""), *name.get("suffix", ())]
        text = " ".join(p for p in parts if p)
        if text:
            return text
    return ""


def _when(value: str) -> str:
    """A FHIR dateTime as ``YYYY-MM-DD HH:MM (UTC-05:00)``; the zone is the sender's, as the message gave it."""
    if not value:
        return "time not given"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if len(value) <= 10:
        return moment.date().isoformat()
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M") + " (no time zone given)"
    offset = moment.strftime("%z")
    return moment.strftime("%Y-%m-%d %H:%M") + f" (UTC{offset[:3]}:{offset[3:]})"


def event_title(bundle: Mapping) -> str:
    """What happened, in words: ``ED visit``, ``Admission (inpatient)``, ``Discharge from the ED``..."""
    header = _first(bundle, "MessageHeader")
    encounter = _first(bundle, "Encounter")
    code = (header.get("eventCoding") or {}).get("code", "")
    event = _EVENTS.get(code, code or "Encounter")
    klass = (encounter.get("class") or {}).get("code", "")
    if klass == "EMER":
        if code == "notification-admit":
            return "ED visit (registration)"
        if code == "notification-discharge":
            return "ED visit ended (discharge from the ED)"
        return f"{event} (ED)"
    setting = {"IMP": "inpatient", "ACUTE": "inpatient", "OBSENC": "observation", "AMB": "outpatient"}.get(klass)
    return f"{event} ({setting})" if setting else event


def notification_summary(bundle: Mapping, attribution: Mapping[str, str] | None = None) -> str:
    """The summary's lines joined by newlines (see the module docstring).

    ``attribution`` may name the ``aco``, ``pcp`` and ``care_manager`` when
    the Bundle does not carry them; a value the Bundle carries wins.
    """
    refs = _resolver(bundle)
    encounter = _first(bundle, "Encounter")
    patient = refs.get((encounter.get("subject") or {}).get("reference", "")) or _first(bundle, "Patient")

    def resolve(reference: Mapping | None) -> dict:
        return refs.get((reference or {}).get("reference", ""), {}) if reference else {}

    lines = []
    facility = resolve(encounter.get("serviceProvider")).get("name") or (encounter.get("serviceProvider") or {}).get(
        "display", ""
    )
    units = [resolve(loc.get("location")).get("name", "") for loc in encounter.get("location") or ()]
    unit = next((u for u in units if u), "")
    period = encounter.get("period") or {}
    ended = bool(period.get("end")) and encounter.get("status") == "finished"
    moment = period.get("end") if ended else period.get("start", "")
    where = facility or "an unnamed facility"
    if unit:
        where += f", {unit}"
    lines.append(f"{event_title(bundle)} at {where}, {_when(moment or '')}")

    mrn = ""
    for identifier in patient.get("identifier") or ():
        if any(c.get("code") == "MR" for c in _codes(identifier.get("type"))):
            assigner = (identifier.get("assigner") or {}).get("display")
            mrn = identifier.get("value", "") + (f" ({assigner})" if assigner else "")
            break
    who = _human_name(patient.get("name")) or "name not given"
    born = patient.get("birthDate") or "not given"
    lines.append(f"Patient: {who}, born {born}, MRN {mrn or 'not given'}")

    reasons = [_text(r) for r in encounter.get("reasonCode") or ()]
    for diagnosis in encounter.get("diagnosis") or ():
        condition = resolve(diagnosis.get("condition"))
        reasons.append(_text(condition.get("code")))
    reasons = [r for r in dict.fromkeys(reasons) if r]
    if reasons:
        lines.append("Reason / diagnoses: " + "; ".join(reasons))

    attending = ""
    for participant in encounter.get("participant") or ():
        if any(c.get("code") == "ATND" for t in participant.get("type") or () for c in _codes(t)):
            attending = _human_name(resolve(participant.get("individual")).get("name"))
            break
    if attending:
        lines.append(f"Attending: {attending}")

    stay = encounter.get("hospitalization") or {}
    disposition = stay.get("dischargeDisposition")
    destination = resolve(stay.get("destination")).get("name", "")
    if disposition or destination:
        # The v2 code (table 0112) is the finer one: 06 is home *with home health*, which FHIR's "home" loses.
        v2 = next((c.get("code", "") for c in _codes(disposition) if c.get("system", "").endswith("v2-0112")), "")
        said = _DISPOSITIONS.get(v2) or _text(disposition)
        if said and destination:
            lines.append(f"Discharged to {said}: {destination}")
        else:
            lines.append(f"Discharged to {said or destination}")

    attribution = dict(attribution or {})
    practitioners = [refs.get(g.get("reference", ""), {}) for g in patient.get("generalPractitioner") or ()]
    pcp = next((_human_name(p.get("name")) for p in practitioners if p.get("resourceType") == "Practitioner"), "")
    if pcp:
        attribution["pcp"] = pcp
    said = [
        f"{label} {attribution[key]}"
        for key, label in (("aco", "ACO"), ("pcp", "PCP"), ("care_manager", "care manager"))
        if attribution.get(key)
    ]
    if said:
        lines.append("Attributed: " + "; ".join(said))
    flags = [_FLAGS.get(f, f) for f in attribution.get("flags") or ()]
    if flags:
        lines.append("Flags: " + "; ".join(flags))
    return "\n".join(lines)
