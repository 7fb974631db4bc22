"""ACO attribution roster: CSV import and deterministic matching.

Matching here is deterministic, tried in order:

1. MBI (``certain``);
2. MRN with its assigning authority (``certain``);
3. exact last name + first name + birth date + sex, after normalising case,
   accents and punctuation (``probable``).

Only members whose effective period covers the encounter date count. A rule
that finds more than one member matches nobody (ambiguous) rather than guess.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from gateway.convert import MBI_PATTERN, PatientKeys
from gateway.errors import RosterError

#: Column -> accepted header spellings (case-insensitive).
COLUMNS: dict[str, tuple[str, ...]] = {
    "member_id": ("member_id", "member id", "memberid"),
    "mbi": ("mbi", "bene_mbi_id"),
    "mrn": ("mrn",),
    "mrn_authority": ("mrn_authority", "mrn assigning authority", "assigning_authority"),
    "last_name": ("last_name", "last name", "family_name", "bene_last_name"),
    "first_name": ("first_name", "first name", "given_name", "bene_1st_name"),
    "birth_date": ("birth_date", "birth date", "dob", "bene_brth_dt"),
    "sex": ("sex", "gender", "bene_sex_cd"),
    "aco_id": ("aco_id", "aco id", "aco"),
    "pcp_npi": ("pcp_npi", "pcp npi"),
    "pcp_name": ("pcp_name", "pcp name"),
    "care_manager": ("care_manager", "care manager", "care_manager_contact"),
    "effective_start": ("effective_start", "effective start", "start_date"),
    "effective_end": ("effective_end", "effective end", "end_date"),
}
REQUIRED = ("member_id", "last_name", "first_name", "birth_date", "sex", "aco_id")
_SEX = {"M": "M", "F": "F", "O": "O", "U": "U", "MALE": "M", "FEMALE": "F", "1": "M", "2": "F", "0": "U"}


@dataclass(frozen=True, slots=True)
class RosterMember:
    """One attributed patient of an ACO."""

    aco_id: str
    member_id: str
    mbi: str
    mrn: str
    mrn_authority: str
    last_name: str
    first_name: str
    birth_date: str
    sex: str
    pcp_npi: str
    pcp_name: str
    care_manager: str
    effective_start: str
    effective_end: str

    @property
    def name_key(self) -> str:
        return name_key(self.last_name, self.first_name, self.birth_date, self.sex)


@dataclass
class RosterFile:
    """A parsed roster: good members and the problems found, by line and column."""

    members: list[RosterMember] = field(default_factory=list)
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    rows: int = 0


def normalise_name(value: str) -> str:
    """Upper case, accents removed, only letters kept (``O'Brien-Smith`` -> ``OBRIENSMITH``)."""
    folded = unicodedata.normalize("NFKD", value)
    return re.sub(r"[^A-Z]", "", "".join(c for c in folded if not unicodedata.combining(c)).upper())


def name_key(last: str, first: str, birth_date: str, sex: str) -> str:
    """The exact-demographics key used for the third matching rule."""
    return f"{normalise_name(last)}|{normalise_name(first)}|{birth_date}|{sex.upper()}"


def _parse_date(value: str) -> str:
    value = value.strip()
    for fmt in ("%Y-%m-%d", "%m/%d/%Y", "%Y%m%d"):
        try:
            return datetime.strptime(value, fmt).date().isoformat()
        except ValueError:
            continue
    raise ValueError(f"{value!r} is not a date (use YYYY-MM-DD)")


def _cell(row: list[str], i: int | None) -> str:
    return row[i].strip() if i is not None and i < len(row) else ""


def read_roster(text: str, source: str = "roster") -> RosterFile:
    """Parse roster CSV text; collect every problem with its line number and column."""
    result = RosterFile()
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        result.problems.append((1, "-", "the file is empty"))
        return result
    lookup = {h.strip().lower(): i for i, h in enumerate(header)}
    index: dict[str, int] = {}
    for col, names in COLUMNS.items():
        for n in names:
            if n in lookup:
                index[col] = lookup[n]
                break
    missing = [c for c in REQUIRED if c not in index]
    if "mbi" not in index and "mrn" not in index:
        missing.append("mbi or mrn")
    if missing:
        for col in missing:
            result.problems.append((1, col, "required column is missing from the header"))
        return result
    lines: dict[tuple[str, str], list[int]] = {}  # (ACO, member id) -> lines of its good rows
    good: list[tuple[int, RosterMember]] = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        result.rows += 1

        problems: list[tuple[int, str, str]] = []
        if any(cell.strip() for cell in row[len(header) :]):
            # Usually an unquoted comma in a name: every later cell has moved one column.
            problems.append((line, "-", f"the row has {len(row)} cells but the header has {len(header)}"))
        values: dict[str, str] = {c: _cell(row, index.get(c)) for c in COLUMNS}
        for col in REQUIRED:
            if not values[col]:
                problems.append((line, col, "is empty"))
        for col in ("birth_date", "effective_start", "effective_end"):
            if values[col]:
                try:
                    values[col] = _parse_date(values[col])
                except ValueError as e:
                    problems.append((line, col, str(e)))
        if values["sex"]:
            sex = _SEX.get(values["sex"].upper())
            if sex is None:
                problems.append((line, "sex", f"{values['sex']!r} is not one of M, F, O, U"))
            else:
                values["sex"] = sex
        if values["mbi"]:
            values["mbi"] = values["mbi"].replace("-", "").upper()
            if not MBI_PATTERN.match(values["mbi"]):
                problems.append((line, "mbi", "is not a valid MBI (11 characters in the CMS format)"))
        if values["mrn"] and not values["mrn_authority"]:
            problems.append((line, "mrn_authority", "is empty but an MRN is given"))
        if not values["mbi"] and not values["mrn"]:
            problems.append((line, "mbi", "neither an MBI nor an MRN is given"))
        if values["pcp_npi"] and not re.fullmatch(r"\d{10}", values["pcp_npi"]):
            problems.append((line, "pcp_npi", "is not a 10-digit NPI"))
        if (
            values["effective_start"]
            and values["effective_end"]
            and values["effective_end"] < values["effective_start"]
        ):
            problems.append((line, "effective_end", "is before effective_start"))
        if problems:
            result.problems.extend(problems)
            continue
        member = RosterMember(**values)
        lines.setdefault((member.aco_id, member.member_id), []).append(line)
        good.append((line, member))
    # A member listed twice cannot be trusted either way: every copy is a problem row.
    repeated = {key: found for key, found in lines.items() if len(found) > 1}
    for line, member in good:
        found = repeated.get((member.aco_id, member.member_id))
        if found is None:
            result.members.append(member)
            continue
        where = ", ".join(str(n) for n in found)
        result.problems.append(
            (line, "member_id", f"member {member.member_id} of ACO {member.aco_id} appears on lines {where}")
        )
    result.problems.sort(key=lambda p: p[0])
    return result


def load_roster_file(path: Path, skip_bad_rows: bool = False) -> RosterFile:
    """Read and check a roster file; raise RosterError unless it is clean or ``skip_bad_rows``."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    parsed = read_roster(text, str(path))
    header_broken = any(line == 1 for line, _, _ in parsed.problems)
    if parsed.problems and (header_broken or not skip_bad_rows):
        raise RosterError(parsed.problems)
    return parsed


# -- matching ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """How a message's patient was (or was not) found on the roster."""

    grade: str  # certain / probable / none
    method: str  # mbi / mrn / demographics / none / ambiguous
    member: dict | None = None
    detail: dict = field(default_factory=dict)

    @property
    def aco_id(self) -> str | None:
        return self.member["aco_id"] if self.member else None

    @property
    def member_id(self) -> str | None:
        return self.member["member_id"] if self.member else None

    @property
    def matched(self) -> bool:
        return self.member is not None


def _active(member, on: str) -> bool:
    start = member["effective_start"] or ""
    end = member["effective_end"] or ""
    if not on:
        return not end or end >= date.today().isoformat()
    return (not start or start <= on) and (not end or on <= end)


def match_patient(
    keys: PatientKeys,
    encounter_date: str,
    by_mbi: Callable[[str], Iterable],
    by_mrn: Callable[[str, str], Iterable],
    by_name_key: Callable[[str], Iterable],
) -> Match:
    """Find the roster member for ``keys``; the lookups return roster rows (mappings)."""
    rules: list[tuple[str, str, Callable[[], Iterable]]] = []
    if keys.mbi:
        rules.append(("mbi", "certain", lambda: by_mbi(keys.mbi)))
    for value, authority in keys.mrns:
        if authority:
            rules.append(("mrn", "certain", lambda v=value, a=authority: by_mrn(v, a)))
    if keys.family and keys.given and keys.birth_date and keys.sex:
        key = name_key(keys.family, keys.given, keys.birth_date, keys.sex)
        rules.append(("demographics", "probable", lambda: by_name_key(key)))
    for method, grade, lookup in rules:
        found = [dict(m) for m in lookup() if _active(m, encounter_date)]
        if len(found) == 1:
            return Match(grade, method, found[0], {"rule": method})
        if len(found) > 1:
            return Match("none", "ambiguous", None, {"rule": method, "candidates": len(found)})
    return Match("none", "none", None, {"rules_tried": [r[0] for r in rules]})
