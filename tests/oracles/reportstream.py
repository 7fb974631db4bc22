"""CDC ReportStream's mapping-inventory pairs as a field-level oracle for PID, PD1, NK1, PV1/PV2, IN1 and MSH.

Their inputs are ORU^R01 / OML^O21 v2.5.1 messages built around the segment
under test. Herald converts ADT only, so each is re-wrapped as a minimal
ADT^A01: their MSH (message type set to ``ADT^A01^ADT_A01``; an empty MSH-10
filled; an empty MSH-3 filled with ``ORACLE`` unless MSH itself is under test,
so that defect D1 does not mask the segment under test), an EVN, the segment
under test, and a minimal PID / PV1 where those are not under test. A PID
under test with an empty PID-3 gets one (``ORACLE-PATIENT``): Herald rightly
refuses a PID without an identifier, and the other PID fields are what the
pair tests.

Their expected output is compared leaf by leaf with the corresponding
resource of Herald's Bundle (for NK1, ReportStream's RelatedPerson with
Herald's Patient.contact, the IG's other NK1 map, seen in RelatedPerson's
shape), ignoring ReportStream's extensions, ids and
``meta``; references are followed to the resource they name; list items are
paired with the Herald item that agrees on the most leaves. Agreement for a
segment is leaves agreeing / leaves compared (every leaf of their expected
resource is compared).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

from oracles.corpus import CORPUS, bundle_index, herald_outcome, index_rows, load_table, matches

FOLDER = CORPUS / "reportstream-mappinginventory"

#: Segment under test -> (folder under catchall/, FHIR resource compared).
SEGMENTS = {
    "MSH": ("msh", "MessageHeader"),
    "PID": ("pid", "Patient"),
    "PD1": ("pd1", "Patient"),
    "NK1": ("nk1", "RelatedPerson"),
    "PV1/PV2": ("pv1pv2", "Encounter"),
    "IN1": ("in1", "Coverage"),
}

#: Keys never compared: ReportStream's own extensions, ids, bookkeeping and narrative.
IGNORED_KEYS = frozenset({"extension", "modifierExtension", "id", "meta", "text", "contained"})

#: References to the message's patient: not followed (the patient is compared under PID, and the
#: minimal PID put around other segments is ours, not theirs).
PATIENT_REFERENCES = frozenset({"patient", "subject", "beneficiary"})

MINIMAL_PID = "PID|1||ORACLE-PATIENT^^^ORACLE^MR||ORACLE^TEST"
MINIMAL_PV1 = "PV1|1|I"


@dataclass(frozen=True)
class Pair:
    """One ReportStream input and its expected FHIR Bundle."""

    segment: str
    hl7: str  # relative to the corpus folder
    fhir: str

    @property
    def name(self) -> str:
        """The input path below ``catchall/``, without ``.hl7``."""
        return self.hl7.removeprefix("catchall/").removesuffix(".hl7")


@dataclass(frozen=True)
class Leaf:
    """One compared leaf of ReportStream's expected resource."""

    element: str  # e.g. Patient.name.given
    expected: str
    herald: str | None

    @property
    def agrees(self) -> bool:
        """True when Herald has the same value."""
        return self.herald is not None and self.herald == self.expected


def pairs() -> list[Pair]:
    """The asserted pairs for the segments compared ([] when the corpus is absent)."""
    if not (FOLDER / "INDEX.tsv").is_file():
        return []
    out = []
    for row in index_rows(FOLDER.name):
        hl7, fhir, status, _ = (row + ["", "", "", ""])[:4]
        if status != "asserted hl7->fhir":
            continue
        for segment, (folder, _) in SEGMENTS.items():
            if hl7.startswith(f"catchall/{folder}/"):
                out.append(Pair(segment, hl7, fhir))
    return out


def wrap(text: str, segment: str) -> bytes:
    """ReportStream's message re-wrapped as the minimal ADT^A01 described in the module docstring."""
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    msh = lines[0]
    fs = msh[3]
    fields = msh.split(fs)  # fields[n - 1] is MSH-n
    comp = fields[1][0]
    fields += [""] * (12 - len(fields))
    fields[8] = comp.join(("ADT", "A01", "ADT_A01"))
    if not fields[9]:
        fields[9] = "ORACLE-1"
    if segment != "MSH" and not fields[2]:
        fields[2] = "ORACLE"
    by_name: dict[str, list[str]] = {}
    for line in lines[1:]:
        by_name.setdefault(line[:3], []).append(line)
    under_test = {"MSH": [], "PID": ["PID"], "PD1": ["PD1"], "NK1": ["NK1"], "PV1/PV2": ["PV1", "PV2"], "IN1": ["IN1"]}
    tested = under_test[segment]
    out = [fs.join(fields), fs.join(("EVN", "A01", fields[6] or "20230501102531"))]
    if "PID" in tested:
        pid = by_name.get("PID", [])[0].split(fs)
        pid += [""] * (4 - len(pid))
        if not pid[3]:  # Herald rightly refuses a PID without an identifier; give it one to compare the rest
            pid[3] = comp.join(("ORACLE-PATIENT", "", "", "ORACLE", "MR"))
        out.append(fs.join(pid))
    else:
        out.append(MINIMAL_PID.replace("|", fs))
    for name in ("PD1", "NK1"):
        if name in tested:
            out += by_name.get(name, [])
    if "PV1" in tested:
        out += by_name.get("PV1", [])[:1] + by_name.get("PV2", [])[:1]
    else:
        out.append(MINIMAL_PV1.replace("|", fs))
    if "IN1" in tested:
        out += by_name.get("IN1", [])
    return ("\r".join(out) + "\r").encode("utf-8")


@cache
def _result(hl7: str) -> tuple[list[dict], list[dict], str]:
    pair = next(p for p in pairs() if p.hl7 == hl7)
    resource_type = SEGMENTS[pair.segment][1]
    expected_bundle = json.loads((FOLDER / pair.fhir).read_text(encoding="utf-8"))
    outcome = herald_outcome(wrap((FOLDER / pair.hl7).read_text(encoding="utf-8"), pair.segment))
    ours = outcome.conversion.bundle if outcome.conversion else {"entry": []}
    if resource_type == "RelatedPerson":
        herald = [_contact_as_related_person(c) for p in _resources(ours, "Patient") for c in p.get("contact", [])]
    else:
        herald = _resources(ours, resource_type)
    return _resources(expected_bundle, resource_type), herald, outcome.describe()


def _contact_as_related_person(contact: dict) -> dict:
    """A Patient.contact (Herald's NK1 map, the IG's NK1[Patient]) in RelatedPerson's shape.

    The two carry the same NK1 fields (relationship, name, telecom, address,
    gender, period); RelatedPerson has lists where contact has one name and
    one address. Elements only RelatedPerson has (identifier, birthDate,
    communication) stay absent, and so disagree.
    """
    out = {k: v for k, v in contact.items() if k in ("relationship", "telecom", "gender", "period")}
    if "name" in contact:
        out["name"] = [contact["name"]]
    if "address" in contact:
        out["address"] = [contact["address"]]
    return out


def outcome_of(pair: Pair) -> str:
    """How Herald's conversion of the wrapped message ended."""
    return _result(pair.hl7)[2]


def leaves(pair: Pair) -> list[Leaf]:
    """Every leaf of ReportStream's expected resource(s), with Herald's value beside it."""
    theirs, ours, _ = _result(pair.hl7)
    resource_type = SEGMENTS[pair.segment][1]
    return _compare(theirs, ours, resource_type)


def top_elements(pair: Pair) -> list[str]:
    """The top-level elements of ReportStream's expected resource(s) (e.g. Patient.name), in order."""
    theirs, _, _ = _result(pair.hl7)
    resource_type = SEGMENTS[pair.segment][1]
    seen: list[str] = []
    for leaf in _compare(theirs, theirs, resource_type):
        top = ".".join(leaf.element.split(".")[:2])
        if top not in seen:
            seen.append(top)
    return seen


# -- known differences -----------------------------------------------------------


def known_rows() -> list[dict]:
    """The rows of ``reportstream_known_differences.toml``."""
    return load_table("reportstream_known_differences.toml").get("difference", [])


def row_covers(row: dict, pair: Pair, leaf: Leaf) -> bool:
    """True when a known-difference row explains a disagreeing ``leaf`` of ``pair``."""
    return (
        matches(pair.segment, row.get("segment", "*"))
        and matches(pair.name, row.get("case", "*"))
        and matches(leaf.element, row["element"])
        and row.get("herald", leaf.herald or "") == (leaf.herald or "")
    )


def explained(pair: Pair, leaf: Leaf) -> dict | None:
    """The row that explains ``leaf``'s disagreement, if any."""
    return next((r for r in known_rows() if row_covers(r, pair, leaf)), None)


# -- comparison ------------------------------------------------------------------


def _resources(bundle: dict, resource_type: str) -> list[dict]:
    """The resources of ``resource_type``, stripped, with references replaced by what they name."""
    index = bundle_index(bundle)
    found = [
        e["resource"] for e in bundle.get("entry", []) if e.get("resource", {}).get("resourceType") == resource_type
    ]
    return [_strip(r, index, depth=0) for r in found]


def _strip(value, index: dict[str, dict], depth: int):
    if isinstance(value, dict):
        if "reference" in value and isinstance(value["reference"], str):
            target = index.get(value["reference"])
            if target is None or depth >= 2:
                return {k: _strip(v, index, depth) for k, v in value.items() if k not in ("reference", *IGNORED_KEYS)}
            return _strip(target, index, depth + 1)
        return {
            k: _strip(v, index, depth)
            for k, v in value.items()
            if k not in IGNORED_KEYS and k not in PATIENT_REFERENCES and not k.startswith("_") and k != "resourceType"
        }
    if isinstance(value, list):
        return [_strip(v, index, depth) for v in value]
    return value


def _compare(expected, actual, path: str) -> list[Leaf]:
    if isinstance(expected, dict):
        act = actual if isinstance(actual, dict) else {}
        out: list[Leaf] = []
        for key, value in expected.items():
            out += _compare(value, act.get(key), f"{path}.{key}")
        return out
    if isinstance(expected, list):
        candidates = actual if isinstance(actual, list) else ([] if actual is None else [actual])
        # Pair items best match first (most agreeing leaves), so order and gaps do not matter.
        scores = sorted(
            (
                (-sum(leaf.agrees for leaf in _compare(item, cand, path)), i, j)
                for i, item in enumerate(expected)
                for j, cand in enumerate(candidates)
            )
        )
        paired: dict[int, int] = {}
        for _, i, j in scores:
            if i not in paired and j not in paired.values():
                paired[i] = j
        out = []
        for i, item in enumerate(expected):
            out += _compare(item, candidates[paired[i]] if i in paired else None, path)
        return out
    return [Leaf(path, _norm(expected), None if actual is None or isinstance(actual, dict | list) else _norm(actual))]


def _norm(value) -> str:
    """A scalar as comparable text: strings stripped, booleans lower case, instants in UTC."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip()
    if "T" in text and re.match(r"^\d{4}-\d{2}-\d{2}T", text):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return text
        if moment.tzinfo is not None:
            return moment.astimezone(UTC).isoformat()
    return text
