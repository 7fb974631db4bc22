"""Field-level comparison with Microsoft FHIR-Converter's expected bundles (A01, A03, A04).

Their output is a ``batch`` Bundle with hash ids, one resource per thing
mentioned anywhere in the message; Herald's is a ``message`` Bundle with
UUIDv5 ids. So the comparison is of meaning, not bytes: each side is reduced
to "facts" (element path -> short text), references are followed to the
resource they name, instants are compared in UTC, and code systems that only
say "no known system" (their ``http://example.com/...``, our
``urn:herald:...``) compare equal. A difference is a fact whose text differs,
or that one side has and the other has not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

from oracles.corpus import CORPUS, bundle_index, herald_outcome, index_rows, load_table, matches

FOLDER = CORPUS / "msft-fhir-converter"

#: The message structures Herald converts, as INDEX.tsv names their templates.
TEMPLATES = ("ADT_A01", "ADT_A03", "ADT_A04")

#: The aspects compared, in report order (the issue's list).
ASPECTS = (
    "MessageHeader.event",
    "MessageHeader.source",
    "Patient.identifier",
    "Patient.name",
    "Patient.birthDate",
    "Patient.gender",
    "Patient.address",
    "Patient.telecom",
    "Encounter.class",
    "Encounter.status",
    "Encounter.period",
    "Encounter.location",
    "Encounter.participant",
    "Encounter.diagnosis",
)

#: Trigger event -> Da Vinci notification event (the Da Vinci Notifications IG; Herald's README).
DA_VINCI_EVENT = {"A01": "notification-admit", "A03": "notification-discharge", "A04": "notification-admit"}

ABSENT = "(absent)"
PRESENT = "present"
NOT_CONVERTED = "(not converted)"
LOCAL_SYSTEM = "(local)"
NO_ADDRESS = "(no address)"


@dataclass(frozen=True)
class Pair:
    """A message and Microsoft's expected bundle for it."""

    stem: str  # file name without .hl7, e.g. ADT-A01-01
    message: str  # relative to the corpus folder
    expected: str


@dataclass(frozen=True)
class Difference:
    """One fact on which Herald and Microsoft's converter differ."""

    case: str
    aspect: str
    element: str
    msft: str
    herald: str

    def describe(self) -> str:
        """``element: msft=... herald=...``."""
        return f"{self.element}: msft={self.msft!r} herald={self.herald!r}"


def pairs() -> list[Pair]:
    """The A01/A03/A04 pairs of INDEX.tsv ([] when the corpus is absent)."""
    if not (FOLDER / "INDEX.tsv").is_file():
        return []
    out = []
    for message, template, expected in index_rows(FOLDER.name):
        if template in TEMPLATES:
            out.append(Pair(message.rsplit("/", 1)[-1].removesuffix(".hl7"), message, expected))
    return out


@cache
def _pair_bundles(stem: str) -> tuple[dict, dict | None, str]:
    pair = next(p for p in pairs() if p.stem == stem)
    expected = json.loads((FOLDER / pair.expected).read_text(encoding="utf-8"))
    from gateway.app.replay import split_messages

    raw = split_messages((FOLDER / pair.message).read_bytes())[0]
    outcome = herald_outcome(raw)
    bundle = outcome.conversion.bundle if outcome.conversion else None
    return expected, bundle, outcome.describe()


def differences(stem: str) -> list[Difference]:
    """Every difference between Herald's Bundle for ``stem`` and Microsoft's expected one."""
    expected, bundle, described = _pair_bundles(stem)
    if bundle is None:
        return [Difference(stem, a, NOT_CONVERTED, "(converted)", described) for a in ASPECTS]
    theirs, ours = facts(expected, "msft"), facts(bundle, "herald")
    out = []
    for aspect in ASPECTS:
        m, h = theirs.get(aspect, {}), ours.get(aspect, {})
        diff = {el for el in m.keys() | h.keys() if m.get(el, ABSENT) != h.get(el, ABSENT)}
        # An item one side lacks is one difference, not one per field of it.
        whole = {el for el in diff if PRESENT in (m.get(el), h.get(el))}
        for el in sorted(diff):
            if any(el != w and el.startswith(w + ".") for w in whole):
                continue
            out.append(Difference(stem, aspect, el, m.get(el, ABSENT), h.get(el, ABSENT)))
    return out


# -- known differences -----------------------------------------------------------


def known_rows() -> list[dict]:
    """The rows of ``msft_known_differences.toml``."""
    return load_table("msft_known_differences.toml").get("difference", [])


def row_covers(row: dict, d: Difference) -> bool:
    """True when a known-difference row explains ``d`` (case and element patterns, and any pinned values)."""
    return (
        matches(d.case, row["case"])
        and matches(d.element, row["element"])
        and row.get("msft", d.msft) == d.msft
        and row.get("herald", d.herald) == d.herald
    )


def explained(d: Difference) -> dict | None:
    """The known-difference row that explains ``d``, if any."""
    return next((r for r in known_rows() if row_covers(r, d)), None)


# -- facts -------------------------------------------------------------------------


def facts(bundle: dict, side: str) -> dict[str, dict[str, str]]:
    """Aspect -> {element path: text} for one Bundle; ``side`` is "msft" or "herald"."""
    index = bundle_index(bundle)

    def first(rtype: str) -> dict:
        return next((e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == rtype), {})

    def resolve(ref: dict | None) -> dict:
        return index.get((ref or {}).get("reference", ""), {})

    out: dict[str, dict[str, str]] = {a: {} for a in ASPECTS}
    header, patient, encounter = first("MessageHeader"), first("Patient"), first("Encounter")

    code = header.get("eventCoding", {}).get("code", "")
    out["MessageHeader.event"]["MessageHeader.eventCoding"] = DA_VINCI_EVENT.get(code, code) if side == "msft" else code
    source = header.get("source", {})
    put(out["MessageHeader.source"], "MessageHeader.source.name", source.get("name"))
    put(out["MessageHeader.source"], "MessageHeader.source.endpoint", _endpoint(source.get("endpoint")))

    ids = out["Patient.identifier"]
    for ident in patient.get("identifier", []):
        key = _unique(ids, f"Patient.identifier[{ident.get('value', '')}]")
        ids[key] = PRESENT
        put(ids, key + ".type", _codes(ident.get("type")))
        put(ids, key + ".system", _system(ident.get("system")))

    names = out["Patient.name"]
    for i, name in enumerate(patient.get("name", [])):
        key = _unique(names, f"Patient.name[{name.get('family') or i}]")
        names[key] = PRESENT
        for f in ("given", "prefix", "suffix", "use"):
            put(names, f"{key}.{f}", name.get(f))

    put(out["Patient.birthDate"], "Patient.birthDate", patient.get("birthDate"))
    put(out["Patient.gender"], "Patient.gender", patient.get("gender"))

    addresses = out["Patient.address"]
    for i, addr in enumerate(patient.get("address", [])):
        key = _unique(addresses, f"Patient.address[{(addr.get('city') or str(i)).strip()}]")
        addresses[key] = PRESENT
        for f in ("line", "city", "state", "postalCode", "country", "district", "use"):
            put(addresses, f"{key}.{f}", addr.get(f))

    telecom = out["Patient.telecom"]
    for t in patient.get("telecom", []):
        key = _unique(telecom, f"Patient.telecom[{t.get('value', '')}]")
        telecom[key] = PRESENT
        for f in ("system", "use"):
            put(telecom, f"{key}.{f}", t.get(f))

    cls = encounter.get("class", {})
    put(out["Encounter.class"], "Encounter.class", f"{cls.get('system', '')}|{cls.get('code', '')}" if cls else None)
    put(out["Encounter.status"], "Encounter.status", encounter.get("status"))
    period = encounter.get("period", {})
    put(out["Encounter.period"], "Encounter.period.start", _instant(period.get("start")))
    put(out["Encounter.period"], "Encounter.period.end", _instant(period.get("end")))

    locations = out["Encounter.location"]
    others: dict[str, list[str]] = {}
    for loc in encounter.get("location", []):
        status = loc.get("status", "")
        chain = []
        res = resolve(loc.get("location"))
        while res and len(chain) < 8:
            chain.append(res)
            res = resolve(res.get("partOf"))
        if not chain:
            continue
        if status == "active":
            put(locations, "Encounter.location[active].name", chain[0].get("name"))
            site = next((c for c in chain if _codes(c.get("physicalType")) == "si"), None)
            facility = site.get("name") if site else resolve(chain[0].get("managingOrganization")).get("name")
            put(locations, "Encounter.location[active].facility", facility)
        else:
            others.setdefault(status, []).append(chain[0].get("name", ""))
    for status, found in others.items():
        locations[f"Encounter.location[{status}]"] = "; ".join(sorted(found))

    participants: dict[str, list[str]] = {}
    for p in encounter.get("participant", []):
        who = resolve(p.get("individual"))
        role = _codes(p.get("type")) or "(no type)"
        ident = (who.get("identifier") or [{}])[0].get("value", "")
        family = (who.get("name") or [{}])[0].get("family", "")
        participants.setdefault(role, []).append(
            " ".join(x for x in (ident, family) if x) or who.get("resourceType", "")
        )
    for role, found in participants.items():
        out["Encounter.participant"][f"Encounter.participant[{role}]"] = "; ".join(sorted(found))

    diagnoses = out["Encounter.diagnosis"]
    for d in encounter.get("diagnosis", []):
        cond = resolve(d.get("condition"))
        codings = cond.get("code", {}).get("coding", [])
        key = "Encounter.diagnosis[{}]".format(
            " ".join(f"{_system(c.get('system'))}|{c.get('code', '')}" for c in codings)
            or cond.get("code", {}).get("text", "")
        )
        diagnoses[key] = PRESENT
        put(diagnoses, key + ".use", _codes(d.get("use")))
        put(diagnoses, key + ".rank", d.get("rank"))
    return out


def _unique(target: dict[str, str], key: str) -> str:
    """``key``, or ``key`` with ``#2``, ``#3`` ... when an earlier item already used it."""
    n, found = 1, key
    while found in target:
        n += 1
        found = f"{key}#{n}"
    return found


def put(target: dict[str, str], element: str, value) -> None:
    """Record ``value`` as text (lists joined by spaces, strings stripped); empty values are not recorded."""
    if value is None:
        return
    if isinstance(value, list):
        value = " ".join(str(v).strip() for v in value if str(v).strip())
    text = str(value).strip()
    if text:
        target[element] = text


def _codes(concept: dict | list | None) -> str:
    """The codes of a CodeableConcept (or a list of them), space separated."""
    if not concept:
        return ""
    concepts = concept if isinstance(concept, list) else [concept]
    return " ".join(c.get("code", "") for cc in concepts for c in cc.get("coding", []) if c.get("code"))


def _system(system: str | None) -> str:
    """A system URI, with the two converters' "no known system" placeholders made equal."""
    if not system:
        return ""
    if system.startswith(("http://example.com/", "urn:herald:")):
        return LOCAL_SYSTEM
    return system


def _endpoint(endpoint: str | None) -> str:
    """MessageHeader.source.endpoint, with "no network address known" made equal on both sides."""
    if not endpoint or endpoint.startswith("urn:herald:source:"):
        return NO_ADDRESS
    return endpoint


def _instant(value: str | None) -> str | None:
    """A dateTime with a time as a UTC instant (the two converters pick different offsets); dates as they are."""
    if not value or "T" not in value:
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is None:
        return value
    return moment.astimezone(UTC).isoformat()
