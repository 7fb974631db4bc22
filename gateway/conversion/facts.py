"""What the converter tells matching about the patient: :class:`~gateway.records.PatientFacts`.

Read from the Patient resource the converter has just built (so matching
never reads the Bundle back): the MBI, every other identifier with its
assigning authority, the official name, the birth date and gender, the home
address and phone.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.conversion.datatypes import MBI_SYSTEM
from gateway.records import PatientFacts

__all__ = ["facts_of_patient"]

#: Name uses that do not name the patient as registered now.
_NOT_CURRENT = ("old", "maiden", "nickname", "anonymous")


def facts_of_patient(patient: dict) -> PatientFacts:
    """The facts of a FHIR Patient (a dict): MBI by system us-mbi, MRNs with ``assigner.display``,
    the official (else usual, else first current) name, the home address and phone."""
    mbi = ""
    mrns: list[tuple[str, str]] = []
    for ident in patient.get("identifier") or []:
        value = (ident.get("value") or "").strip()
        if not value:
            continue
        if ident.get("system") == MBI_SYSTEM:
            mbi = mbi or value
        else:
            mrns.append((value, ((ident.get("assigner") or {}).get("display") or "").strip()))
    name = _pick_name(patient.get("name") or [])
    givens = name.get("given") or []
    address = _pick(patient.get("address") or [], lambda a: bool(a.get("line") or a.get("postalCode")))
    phone = _pick(patient.get("telecom") or [], lambda t: t.get("system") == "phone" and bool(t.get("value")))
    return PatientFacts(
        mbi=mbi,
        mrns=tuple(mrns),
        given=givens[0] if givens else "",
        family=name.get("family", ""),
        middle=" ".join(givens[1:]),
        birth_date=patient.get("birthDate", ""),
        gender=patient.get("gender", ""),
        street=" ".join(address.get("line") or []),
        city=address.get("city", ""),
        state=address.get("state", ""),
        zip=address.get("postalCode", ""),
        phone=phone.get("value", ""),
        suffix=" ".join(name.get("suffix") or []),
    )


def _pick_name(names: list[dict]) -> dict:
    for wanted in ("official", "usual"):
        for n in names:
            if n.get("use") == wanted:
                return n
    for n in names:
        if n.get("use") not in _NOT_CURRENT:
            return n
    return names[0] if names else {}


def _pick(entries: list[dict], good: Callable[[dict], bool]) -> dict:
    for e in entries:
        if good(e) and e.get("use") in (None, "home"):
            return e
    for e in entries:
        if good(e) and e.get("use") != "old":
            return e
    return {}
