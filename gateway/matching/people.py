"""The people matching compares, normalised, and the reference data normalising reads.

A :class:`Person` is one side of a comparison: names upper case with accents
folded, the birth date ISO, the ZIP five digits, the phone the last ten, the
street line with its words abbreviated (USPS style). It is made from raw
strings (:func:`make_person`), from the converter's facts about a message's
patient, from a FHIR Patient, or from a roster row; the store keeps it packed
beside the raw columns (:func:`pack_person`), so scoring a candidate costs no
normalising.

Given-name diminutives are in ``mappings/nicknames.csv``, street words in
``mappings/street_abbreviations.csv``. No I/O except reading those mapping
files once, no SQL.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache, lru_cache
from pathlib import Path

from gateway.conversion.facts import facts_of_patient
from gateway.errors import ConfigError
from gateway.records import PatientFacts
from gateway.resources import mappings_dir

MAPPINGS_DIR = mappings_dir()

#: Every field :func:`~gateway.matching.scoring.compare` compares, in the order of :class:`Person`.
FIELDS = ("given", "family", "middle", "birth_date", "sex", "street", "city", "state", "zip", "phone")
#: What :func:`pack_person` keeps: :data:`FIELDS`, then the generational suffix (which only the
#: household test reads: :mod:`gateway.matching.household`).
PACKED_FIELDS = (*FIELDS, "suffix")


# -- people --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Person:
    """One side of a comparison, already normalised (see :func:`make_person`)."""

    given: str = ""  # upper case, accents folded, letters/space/hyphen only
    family: str = ""
    middle: str = ""
    birth_date: str = ""  # YYYY-MM-DD or ""
    sex: str = ""  # M F O U or ""
    street: str = ""  # number + street, normalised
    city: str = ""
    state: str = ""
    zip: str = ""  # first 5 digits
    phone: str = ""  # digits, last 10
    suffix: str = ""  # generational: JR SR II III IV V, or ""


def _fold(value: str) -> str:
    if value.isascii():  # most values: no accents to fold
        return value.upper()
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


_NAME_DROP = re.compile(r"['’.`]")
_NAME_OTHER = re.compile(r"[^A-Z\- ]")
_NAME_HYPHEN = re.compile(r"\s*-\s*")
_SPACES = re.compile(r"\s+")
_STREET_DROP = re.compile(r"['’.]")
_STREET_OTHER = re.compile(r"[^A-Z0-9 ]")
_NON_DIGITS = re.compile(r"\D")
_NON_ALNUM = re.compile(r"[^A-Z0-9]")


# Names, towns and states repeat a great deal across a roster: a cache spares a
# million-member import most of the work.
@lru_cache(maxsize=1 << 17)
def normalise_name(value: str) -> str:
    """Upper case, accents folded; apostrophes and dots dropped, other punctuation a space.

    ``"o'Brien-Smith "`` -> ``"OBRIEN-SMITH"``, ``"Mary  Ann"`` -> ``"MARY ANN"``.
    """
    text = _NAME_DROP.sub("", _fold(value or ""))
    text = _NAME_OTHER.sub(" ", text)
    text = _NAME_HYPHEN.sub("-", text)
    return _SPACES.sub(" ", text).strip(" -")


def normalise_street(value: str) -> str:
    """Upper case, accents folded, letters/digits/spaces, street words abbreviated (USPS style)."""
    words = _STREET_OTHER.sub(" ", _STREET_DROP.sub("", _fold(value or ""))).split()
    abbreviations = street_abbreviations()
    return " ".join(abbreviations.get(w, w) for w in words)


_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ].*)?")
_HL7_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})(?:\d*(?:[.+-]\d*)?)?")
_US_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")


@lru_cache(maxsize=1 << 16)
def normalise_date(value: str) -> str:
    """``YYYY-MM-DD`` from ``YYYY-MM-DD[...]``, ``YYYYMMDD`` or ``MM/DD/YYYY``; "" unless a real date."""
    value = (value or "").strip()
    m = _ISO_DATE.fullmatch(value) or _HL7_DATE.fullmatch(value)
    if m:
        y, mo, d = m.groups()
    else:
        us = _US_DATE.fullmatch(value)
        if not us:
            return ""
        mo, d, y = us.groups()
    try:
        return date(int(y), int(mo), int(d)).isoformat()
    except ValueError:
        return ""


#: Generational suffixes as written -> as compared (XPN-4, a roster's suffix column, or the end of a name).
_SUFFIXES = {
    "JR": "JR",
    "JNR": "JR",
    "JUNIOR": "JR",
    "SR": "SR",
    "SNR": "SR",
    "SENIOR": "SR",
    "I": "I",
    "II": "II",
    "2ND": "II",
    "III": "III",
    "3RD": "III",
    "IV": "IV",
    "4TH": "IV",
    "V": "V",
    "5TH": "V",
}


def normalise_suffix(value: str) -> str:
    """The generational suffix ``value`` stands for (``"Jr."`` -> ``"JR"``, ``"3rd"`` -> ``"III"``); "" if none.

    A degree or a professional suffix (MD, PHD, RN) is not generational and gives "";
    of several words (a FHIR name's suffixes joined) the first generational one counts.
    """
    for word in (value or "").upper().split():
        suffix = _SUFFIXES.get(_NON_ALNUM.sub("", word))
        if suffix:
            return suffix
    return ""


def split_suffix(name: str) -> tuple[str, str]:
    """A normalised name and the generational suffix at its end: ``"SMITH JR"`` -> ``("SMITH", "JR")``.

    Registration often types the suffix into the family or given name. A name that is
    only a suffix-like word keeps it, and a last word ``I`` or ``V`` (an initial as often as
    a suffix) stays part of the name.
    """
    head, _, last = name.rpartition(" ")
    suffix = _SUFFIXES.get(last, "") if head and last not in ("I", "V") else ""
    return (head.strip(" -"), suffix) if suffix else (name, "")


_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O", "U": "U", "UNKNOWN": "U"}


def make_person(
    *,
    given: str = "",
    family: str = "",
    middle: str = "",
    birth_date: str = "",
    sex: str = "",
    street: str = "",
    city: str = "",
    state: str = "",
    zip: str = "",
    phone: str = "",
    suffix: str = "",
) -> Person:
    """A :class:`Person` from raw strings, each normalised as its field requires.

    A generational suffix typed at the end of the family or given name (``"Smith Jr"``)
    is taken off the name and kept as the suffix when ``suffix`` gives none.
    """
    zip_digits = _NON_DIGITS.sub("", zip or "")
    phone_digits = _NON_DIGITS.sub("", phone or "")
    family_name, family_suffix = split_suffix(normalise_name(family))
    given_name, given_suffix = split_suffix(normalise_name(given))
    return Person(
        given=given_name,
        family=family_name,
        middle=normalise_name(middle),
        birth_date=normalise_date(birth_date),
        sex=_SEX.get((sex or "").strip().upper(), ""),
        street=normalise_street(street),
        city=normalise_name(city),
        state=normalise_name(state).replace(" ", ""),
        zip=zip_digits[:5] if len(zip_digits) >= 3 else "",
        phone=phone_digits[-10:] if len(phone_digits) >= 7 else "",
        suffix=normalise_suffix(suffix) or family_suffix or given_suffix,
    )


_GENDER = {"male": "M", "female": "F", "other": "O", "unknown": "U"}


def person_from_facts(facts: PatientFacts) -> Person:
    """The normalised :class:`Person` of what the converter read about the patient."""
    return make_person(
        given=facts.given,
        family=facts.family,
        middle=facts.middle,
        birth_date=facts.birth_date,
        sex=_GENDER.get(facts.gender, ""),
        street=facts.street,
        city=facts.city,
        state=facts.state,
        zip=facts.zip,
        phone=facts.phone,
        suffix=facts.suffix,
    )


def person_from_patient(patient: dict) -> Person:
    """The :class:`Person` of a FHIR Patient resource (as a dict): official name, home address and phone."""
    return person_from_facts(facts_of_patient(patient))


def _col(row: Mapping, key: str) -> str:
    try:
        value = row[key]
    except (KeyError, IndexError):
        return ""
    return "" if value is None else str(value)


#: Separator of a packed person's fields: a control character no normalised field can hold.
_PACK = "\x1f"


def pack_person(p: Person) -> str:
    """``p`` as one string (its :data:`PACKED_FIELDS` joined by U+001F), kept by the store beside the raw columns."""
    return _PACK.join(
        (p.given, p.family, p.middle, p.birth_date, p.sex, p.street, p.city, p.state, p.zip, p.phone, p.suffix)
    )


def unpack_person(text: str) -> Person | None:
    """The :class:`Person` of :func:`pack_person`'s string; None when it is not one (or one an older
    Herald packed, without the suffix: the caller normalises the raw columns again)."""
    parts = text.split(_PACK)
    return Person(*parts) if len(parts) == len(PACKED_FIELDS) else None


def person_from_member(row: Mapping) -> Person:
    """The :class:`Person` of a roster row (columns as the store returns them; missing ones read as "").

    A row carrying its normalised person (column ``person``, from :func:`pack_person`, as the
    store keeps it) is not normalised again: scoring a candidate then costs no normalising.
    """
    packed = _col(row, "person")
    if packed:
        person = unpack_person(packed)
        if person is not None:
            return person
    return make_person(
        given=_col(row, "first_name"),
        family=_col(row, "last_name"),
        middle=_col(row, "middle_name"),
        birth_date=_col(row, "birth_date"),
        sex=_col(row, "sex"),
        street=_col(row, "address_line"),
        city=_col(row, "city"),
        state=_col(row, "state"),
        zip=_col(row, "zip"),
        phone=_col(row, "phone"),
        suffix=_col(row, "name_suffix"),
    )


#: The fields whose values' frequencies on the roster weigh an exact agreement (term frequency).
FREQUENCY_FIELDS = ("given", "family", "birth_date")


def frequency_terms(p: Person) -> list[str]:
    """The terms of ``p`` whose roster frequencies matching reads: ``given:MARY``, ``family:OBRIEN``,
    ``birth_date:1941-03-07`` (names compacted as the ``exact`` level compares them); empty fields none."""
    values = (_compact(p.given), _compact(p.family), p.birth_date)
    return [f"{f}:{v}" for f, v in zip(FREQUENCY_FIELDS, values, strict=True) if v]


# -- reference data --------------------------------------------------------------


def _read_csv(path: Path, columns: tuple[str, str]) -> list[tuple[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
                raise ConfigError("matching", f"{path}: the header must have columns {', '.join(columns)}")
            rows = []
            for line, row in enumerate(reader, start=2):
                a, b = ((row.get(c) or "").strip() for c in columns)
                if not a or not b:
                    raise ConfigError("matching", f"{path}: line {line}: {columns[0]} and {columns[1]} are required")
                rows.append((a.upper(), b.upper()))
            return rows
    except FileNotFoundError:
        raise ConfigError("matching", f"{path} not found") from None


@cache
def nickname_groups() -> dict[str, frozenset[str]]:
    """Given name -> the formal names it may stand for (itself included), from ``nicknames.csv``."""
    rows = _read_csv(MAPPINGS_DIR / "nicknames.csv", ("name", "variant"))
    groups: dict[str, set[str]] = {formal: {formal} for formal, _ in rows}
    for formal, variant in rows:
        groups.setdefault(variant, set()).add(formal)
    return {name: frozenset(formals) for name, formals in groups.items()}


@cache
def name_variants() -> dict[str, frozenset[str]]:
    """Given name -> every name that may stand for the same person (its formal names and their
    diminutives, itself included), from ``nicknames.csv``: ``BILL`` -> WILLIAM, BILL, WILL, BILLY, ..."""
    groups = nickname_groups()
    by_formal: dict[str, set[str]] = {}
    for name, formals in groups.items():
        for formal in formals:
            by_formal.setdefault(formal, set()).add(name)
    return {name: frozenset().union(*(by_formal[f] for f in formals)) for name, formals in groups.items()}


@cache
def street_abbreviations() -> dict[str, str]:
    """Street word -> its USPS abbreviation, from ``street_abbreviations.csv``."""
    return dict(_read_csv(MAPPINGS_DIR / "street_abbreviations.csv", ("word", "abbreviation")))


@cache
def street_word_kinds() -> dict[str, str]:
    """USPS abbreviation -> what it is in a street line: ``type`` (ST, AVE), ``directional`` (N, SW)
    or ``unit`` (APT, STE); from the ``kind`` column of ``street_abbreviations.csv``."""
    kinds = dict(_read_csv(MAPPINGS_DIR / "street_abbreviations.csv", ("abbreviation", "kind")))
    unknown = set(kinds.values()) - {"TYPE", "DIRECTIONAL", "UNIT"}
    if unknown:
        raise ConfigError(
            "matching",
            f"street_abbreviations.csv: kind must be type, directional or unit, not {', '.join(sorted(unknown))}",
        )
    return {abbreviation: kind.lower() for abbreviation, kind in kinds.items()}


# -- parts of normalised values (for blocking and comparing) ---------------------


@lru_cache(maxsize=65536)
def _compact(value: str) -> str:
    return value.replace(" ", "").replace("-", "")


@lru_cache(maxsize=65536)
def _parts(value: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[ \-]", value) if len(p) > 1)


_HOUSE_NUMBER = re.compile(r"\d+")


def _house_number(street: str) -> str:
    """The leading number of a normalised street line ("" when it does not start with one)."""
    number = _HOUSE_NUMBER.match(street)
    return number.group() if number else ""
