"""Find a message's patient on the attribution roster.

Deterministic first: the Medicare Beneficiary Identifier, then an MRN with its
assigning authority (the roster's MRNs and the links a reviewer confirmed),
each grade ``certain``. Otherwise probabilistic, Fellegi-Sunter style: the
roster members that share a blocking key with the patient are compared field
by field (given, family and middle name, birth date, sex, phone, and the
address: street, city, state and ZIP scored once, at the finest place both
share, since they are not independent); each comparison's agreement level adds
its weight ``log2(m/u)`` and the total is graded ``certain`` / ``probable`` /
``possible`` / ``none`` (FHIR ``$match``). Two members scoring too close to
each other are never resolved by guessing: the result is ``possible`` with no
member chosen (a reviewer picks). The place never makes a match alone: when
given name, family name and birth date together carry too little evidence
(the identity floor), or look like a relative at the same house (the household
rule), the grade is at best ``possible``.

The weights, levels' similarity thresholds and grade thresholds are data in
``mappings/matching.toml`` (with how they were obtained); given-name
diminutives are in ``mappings/nicknames.csv``, street words in
``mappings/street_abbreviations.csv``.

Pure functions: no I/O except reading those mapping files once, no SQL. The
store supplies roster rows through :class:`RosterLookups`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import re
import tomllib
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cache, lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol

import jellyfish
from rapidfuzz import fuzz
from rapidfuzz.distance import DamerauLevenshtein, Hamming, JaroWinkler

from gateway.conversion.facts import facts_of_patient
from gateway.errors import ConfigError
from gateway.records import PatientFacts
from gateway.resources import mappings_dir

MAPPINGS_DIR = mappings_dir()
MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"

#: Grades from strongest to weakest (FHIR ``$match`` match-grade, plus none).
GRADES = ("certain", "probable", "possible", "none")
#: Every field :func:`compare` compares, in the order of :class:`Person`.
FIELDS = ("given", "family", "middle", "birth_date", "sex", "street", "city", "state", "zip", "phone")
#: The comparisons :func:`score` adds up, in the order it reports them.
SCORED = ("given", "family", "middle", "birth_date", "sex", "address", "phone")
#: The agreement levels each comparison can take (besides ``missing``: a side is empty, weight 0).
LEVELS: dict[str, tuple[str, ...]] = {
    "given": ("exact", "nickname", "compound", "close", "similar", "initial", "swapped", "disagree"),
    "family": ("exact", "compound", "close", "similar", "swapped", "disagree"),
    "middle": ("exact", "initial", "close", "disagree"),
    "birth_date": ("exact", "transposed", "one_digit", "partial", "disagree"),
    "sex": ("exact", "disagree"),
    "street": ("exact", "close", "similar", "disagree"),
    "city": ("exact", "close", "disagree"),
    "state": ("exact", "disagree"),
    "zip": ("exact", "one_digit", "disagree"),
    "phone": ("exact", "one_digit", "disagree"),
    # The finest place both agree on, from the parts' levels (see address_level).
    "address": ("house", "street", "zip", "town", "street_elsewhere", "state", "disagree"),
}
#: Raised whenever the blocking keys' recipe or the normalisation changes: the store
#: recomputes its stored keys and normalised persons when it differs from the roster's.
BLOCKING_RECIPE = "1"


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
) -> Person:
    """A :class:`Person` from raw strings, each normalised as its field requires."""
    zip_digits = _NON_DIGITS.sub("", zip or "")
    phone_digits = _NON_DIGITS.sub("", phone or "")
    return Person(
        given=normalise_name(given),
        family=normalise_name(family),
        middle=normalise_name(middle),
        birth_date=normalise_date(birth_date),
        sex=_SEX.get((sex or "").strip().upper(), ""),
        street=normalise_street(street),
        city=normalise_name(city),
        state=normalise_name(state).replace(" ", ""),
        zip=zip_digits[:5] if len(zip_digits) >= 3 else "",
        phone=phone_digits[-10:] if len(phone_digits) >= 7 else "",
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
    """``p`` as one string (its fields joined by U+001F), kept by the store beside the raw columns."""
    return _PACK.join((p.given, p.family, p.middle, p.birth_date, p.sex, p.street, p.city, p.state, p.zip, p.phone))


def unpack_person(text: str) -> Person | None:
    """The :class:`Person` of :func:`pack_person`'s string; None when it is not one."""
    parts = text.split(_PACK)
    return Person(*parts) if len(parts) == 10 else None


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
    )


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


# -- blocking --------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _compact(value: str) -> str:
    return value.replace(" ", "").replace("-", "")


@lru_cache(maxsize=65536)
def _parts(value: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[ \-]", value) if len(p) > 1)


@lru_cache(maxsize=65536)
def _formal(given: str) -> str:
    """The one formal name a given name stands for, or the name itself (BILL -> WILLIAM; AL stays AL)."""
    formals = nickname_groups().get(given)
    if formals and len(formals) == 1:
        return next(iter(formals))
    return given


@lru_cache(maxsize=65536)
def _soundex(value: str) -> str:
    return jellyfish.soundex(value) if value else ""


_HOUSE_NUMBER = re.compile(r"\d+")


def _house_number(street: str) -> str:
    """The leading number of a normalised street line ("" when it does not start with one)."""
    number = _HOUSE_NUMBER.match(street)
    return number.group() if number else ""


def blocking_keys(p: Person) -> list[str]:
    """The keys under which the roster stores ``p`` and a query looks it up; stable strings.

    A true match almost always shares at least one key with the query: birth
    date alone; the sounds of both names in either order; the family name's
    sound with the ZIP or the birth year; the given name's sound with the birth
    date without the year; the given name's sound with the ZIP; both initials
    with the ZIP; the house number with the ZIP. Empty fields make no key.
    Raise :data:`BLOCKING_RECIPE` when this changes: stored keys go stale. A compound family name
    (``GARCIA-LOPEZ``) gives keys for each part as well.
    """
    given = _compact(_formal(_compact(p.given))) if p.given else ""
    families = []
    if p.family:
        families.append(_soundex(_compact(p.family)))
        families.extend(_soundex(part) for part in _parts(p.family)[:2])
    families = list(dict.fromkeys(f for f in families if f))
    g = _soundex(given)
    dob = p.birth_date.replace("-", "")
    keys: list[str] = []
    if dob:
        keys.append(f"d:{dob}")
    for f in families:
        if g:
            keys.append("n:" + "|".join(sorted((f, g))))
        if p.zip:
            keys.append(f"fz:{f}|{p.zip}")
        if dob:
            keys.append(f"fy:{f}|{dob[:4]}")
    if g and dob:
        keys.append(f"gd:{g}|{dob[4:]}")
    if g and p.zip:
        keys.append(f"gz:{g}|{p.zip}")
    if p.given and p.family and p.zip:
        keys.append(f"iz:{_compact(p.given)[0]}{_compact(p.family)[0]}|{p.zip}")
    number = _house_number(p.street)
    if number and p.zip:
        keys.append(f"sz:{number}|{p.zip}")
    return list(dict.fromkeys(keys))


# -- the model -------------------------------------------------------------------


@dataclass(frozen=True)
class FieldModel:
    """m and u probabilities of each agreement level of one field, and the weight log2(m/u)."""

    name: str
    m: Mapping[str, float]
    u: Mapping[str, float]
    weights: Mapping[str, float]
    source: str = ""


@dataclass(frozen=True)
class MatchModel:
    """Field weights, similarity cut-offs and grade thresholds (match weights, log2 units)."""

    fields: Mapping[str, FieldModel]
    certain: float
    probable: float
    possible: float
    ambiguity_margin: float  # two candidates closer than this are ambiguous
    max_candidates: int
    identifier_conflict_grade: str  # best grade for a member whose MBI differs from the message's
    similarity: Mapping[str, float]
    # Best grades when surname and address (or phone) agree but the given name and birth date
    # both disagree (a relative: spouse, sibling), or one of them does (twin, Jr/Sr).
    household_both_differ: str = "none"
    household_one_differs: str = "possible"
    # Best grade when the evidence of given name, family name and birth date together is below
    # ``identity_floor`` bits: the place (or phone) alone never makes a match probable.
    identity_floor: float = -math.inf
    identity_best_grade: str = "possible"
    # Blocking: members scored per query (the prefilter's best), members the prefilter
    # ranks (the best by shared keys), and the largest bucket of one key still used.
    max_compared: int = 16
    max_bucket: int = 500
    max_prefiltered: int = 128
    roster_size: int = 0  # the roster size the thresholds were computed for
    on_roster_share: float = 0.0  # share of patients on the roster assumed in the thresholds
    source: str = ""
    fingerprint: str = ""  # sha256 of the TOML it came from, for the audit

    def weight(self, field_name: str, level: str) -> float:
        """The weight of ``level`` of ``field_name`` (0 for ``missing``)."""
        return self._table[field_name][level]

    @functools.cached_property
    def _table(self) -> dict[str, dict[str, float]]:
        # Every level's weight in one lookup (``missing`` included): scoring asks once per comparison.
        return {name: {"missing": 0.0, **fm.weights} for name, fm in self.fields.items()}

    @functools.cached_property
    def agreement_weights(self) -> tuple[tuple[float, float, float], ...]:
        """(exact, near, disagree) weights of each field in :data:`FIELDS` order, for :func:`prefilter`.

        ``near`` is the weight of the level the prefilter's cheap test stands for
        (see :data:`_NEAR_LEVEL`), or ``disagree`` for a field with none.
        """
        out = []
        for f in FIELDS:
            weights = self.fields[f].weights
            near = _NEAR_LEVEL.get(f)
            out.append((weights["exact"], weights[near] if near else weights["disagree"], weights["disagree"]))
        return tuple(out)


_BLOCKING_DEFAULTS = {"max_compared": 16, "max_bucket": 500, "max_prefiltered": 128}
_SIMILARITY_DEFAULTS = {
    "name_close": 0.92,
    "name_similar": 0.85,
    "street_close": 90.0,
    "street_similar": 70.0,
    "city_close": 0.90,
}


def load_model(path: Path | None = None, **overrides: float) -> MatchModel:
    """Read the matching model (default ``mappings/matching.toml``).

    Thresholds are match weights (bits). Unless the file gives them outright,
    each is computed from the roster size, the share of patients on the roster
    and the posterior probability the grade stands for:
    ``log2(roster_size / on_roster_share) + log2(p / (1 - p))``.

    ``overrides`` replace thresholds: ``certain=``, ``probable=``, ``possible=``,
    ``ambiguity_margin=``, or ``roster_size=`` (the grades then follow it); and
    blocking's ``max_compared=``, ``max_prefiltered=`` and ``max_bucket=``.
    Raises :class:`ConfigError` naming what is wrong.
    """
    path = path or MAPPINGS_DIR / "matching.toml"
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("matching", f"{path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("matching", f"{path}: {e}") from None
    allowed = {"certain", "probable", "possible", "ambiguity_margin", "roster_size"} | set(_BLOCKING_DEFAULTS)
    unknown = set(overrides) - allowed
    if unknown:
        raise ConfigError("matching", f"unknown override(s): {', '.join(sorted(unknown))}")

    def where(key: str) -> str:
        return f"{path.name}: {key}"

    def number(table: Mapping, key: str, low: float, high: float = math.inf) -> float:
        value = overrides.get(key, table.get(key))
        if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(
                "matching", where(f"thresholds.{key}: expected a number in [{low}, {high}], got {value!r}")
            )
        return float(value)

    thresholds = data.get("thresholds")
    if not isinstance(thresholds, dict):
        raise ConfigError("matching", where("[thresholds] is missing"))
    values: dict[str, float] = {}
    roster_size = number(thresholds, "roster_size", 1)
    on_roster = number(thresholds, "on_roster_share", 1e-6, 1)
    # Prior odds that one given member is the patient: on_roster / roster_size. A total of
    # w bits multiplies them by 2**w, so posterior odds p/(1-p) need w = log2(size/share) + log2(p/(1-p)).
    prior_bits = math.log2(roster_size / on_roster)
    for grade_name in ("certain", "probable", "possible"):
        if grade_name in overrides or grade_name in thresholds:
            values[grade_name] = number(thresholds, grade_name, -math.inf)
        else:
            p = number(thresholds, f"{grade_name}_posterior", 1e-9, 1 - 1e-12)
            values[grade_name] = round(prior_bits + math.log2(p / (1 - p)), 2)
    values["ambiguity_margin"] = number(thresholds, "ambiguity_margin", 0)
    if not values["certain"] >= values["probable"] >= values["possible"]:
        raise ConfigError("matching", where("thresholds: need certain >= probable >= possible"))
    max_candidates = thresholds.get("max_candidates", 5)
    if not isinstance(max_candidates, int) or max_candidates < 1:
        raise ConfigError("matching", where("thresholds.max_candidates: expected a positive integer"))
    conflict = thresholds.get("identifier_conflict_grade", "possible")
    if conflict not in GRADES:
        raise ConfigError("matching", where(f"thresholds.identifier_conflict_grade: not one of {', '.join(GRADES)}"))

    similarity = dict(_SIMILARITY_DEFAULTS)
    for key, value in (data.get("similarity") or {}).items():
        if key not in similarity or not isinstance(value, int | float):
            raise ConfigError("matching", where(f"similarity.{key}: unknown key or not a number"))
        similarity[key] = float(value)

    blocking = data.get("blocking") or {}
    limits: dict[str, int] = {}
    for key, default in _BLOCKING_DEFAULTS.items():
        value = overrides.get(key, blocking.get(key, default))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError("matching", where(f"blocking.{key}: expected a positive integer, got {value!r}"))
        limits[key] = value
    unknown_blocking = set(blocking) - set(limits)
    if unknown_blocking:
        raise ConfigError("matching", where(f"blocking: unknown key(s) {', '.join(sorted(unknown_blocking))}"))

    household = data.get("household") or {}
    for key in ("both_differ", "one_differs"):
        if household.get(key, "possible") not in GRADES:
            raise ConfigError("matching", where(f"household.{key}: not one of {', '.join(GRADES)}"))
    identity = data.get("identity") or {}
    unknown_identity = set(identity) - {"floor", "best_grade"}
    if unknown_identity:
        raise ConfigError("matching", where(f"identity: unknown key(s) {', '.join(sorted(unknown_identity))}"))
    identity_floor = identity.get("floor", -math.inf)
    if not isinstance(identity_floor, int | float) or isinstance(identity_floor, bool):
        raise ConfigError("matching", where(f"identity.floor: expected a number (bits), got {identity_floor!r}"))
    identity_best = identity.get("best_grade", "possible")
    if identity_best not in GRADES:
        raise ConfigError("matching", where(f"identity.best_grade: not one of {', '.join(GRADES)}"))

    fields: dict[str, FieldModel] = {}
    table = data.get("fields") or {}
    for name in LEVELS:  # the fields, and the address their parts make together
        spec = table.get(name)
        if not isinstance(spec, dict) or not isinstance(spec.get("levels"), dict):
            raise ConfigError("matching", where(f"[fields.{name}.levels] is missing"))
        m: dict[str, float] = {}
        u: dict[str, float] = {}
        weights: dict[str, float] = {}
        for level in LEVELS[name]:
            entry = spec["levels"].get(level)
            if not isinstance(entry, dict):
                raise ConfigError("matching", where(f"fields.{name}.levels.{level} is missing"))
            if "weight" in entry:  # a level whose evidence another field carries (given's "swapped")
                weights[level] = float(entry["weight"])
                m[level] = u[level] = float("nan")
                continue
            mv, uv = entry.get("m"), entry.get("u")
            if not all(isinstance(v, int | float) and 0 < v <= 1 for v in (mv, uv)):
                raise ConfigError("matching", where(f"fields.{name}.levels.{level}: m and u must be in (0, 1]"))
            m[level], u[level] = float(mv), float(uv)
            weights[level] = math.log2(mv / uv)
        extra = set(spec["levels"]) - set(LEVELS[name])
        if extra:
            raise ConfigError("matching", where(f"fields.{name}.levels: unknown level(s) {', '.join(sorted(extra))}"))
        fields[name] = FieldModel(name, m, u, weights, str(spec.get("source", "")))
    return MatchModel(
        fields=fields,
        certain=values["certain"],
        probable=values["probable"],
        possible=values["possible"],
        ambiguity_margin=values["ambiguity_margin"],
        max_candidates=max_candidates,
        identifier_conflict_grade=conflict,
        similarity=similarity,
        household_both_differ=household.get("both_differ", "none"),
        household_one_differs=household.get("one_differs", "possible"),
        identity_floor=float(identity_floor),
        identity_best_grade=identity_best,
        max_compared=limits["max_compared"],
        max_bucket=limits["max_bucket"],
        max_prefiltered=limits["max_prefiltered"],
        roster_size=int(roster_size),
        on_roster_share=on_roster,
        source=str(data.get("source", "")),
        fingerprint=hashlib.sha256(raw).hexdigest()[:16],
    )


# -- comparing -------------------------------------------------------------------


class FieldComparison(NamedTuple):
    """How one field of two people compared: its agreement level and the weight that level carries.

    A named tuple: a query builds one per comparison (:data:`SCORED`) per member it compares, and a
    tuple is built several times faster than a frozen dataclass.
    """

    field: str
    level: str
    weight: float


@dataclass(frozen=True)
class Scored:
    """The total match weight of a comparison and its parts, field by field."""

    total: float
    fields: tuple[FieldComparison, ...]

    def level(self, field_name: str) -> str:
        """The agreement level of ``field_name``."""
        for f in self.fields:
            if f.field == field_name:
                return f.level
        raise KeyError(field_name)


@lru_cache(maxsize=65536)
def _nysiis(value: str) -> str:
    return jellyfish.nysiis(value) if value else ""


def _name_level(a: str, b: str, sim: Mapping[str, float], given: bool) -> str:
    if not a or not b:
        return "missing"
    ca, cb = _compact(a), _compact(b)
    if ca == cb:
        return "exact"
    if given:
        fa, fb = nickname_groups().get(ca), nickname_groups().get(cb)
        if fa and fb and fa & fb:
            return "nickname"
    pa, pb = _parts(a), _parts(b)
    if (len(pa) > 1 or len(pb) > 1) and (set(pa) & set(pb) or ca in pb or cb in pa):
        return "compound"
    if len(ca) > 1 and len(cb) > 1:
        jw = JaroWinkler.similarity(ca, cb)
        if jw >= sim["name_close"]:
            return "close"
        if jw >= sim["name_similar"] or DamerauLevenshtein.distance(ca, cb) <= 1 or _nysiis(ca) == _nysiis(cb):
            return "similar"
    if given and (len(ca) == 1 or len(cb) == 1) and ca[0] == cb[0]:
        return "initial"
    return "disagree"


_STRONG_NAME = ("exact", "nickname", "compound", "close")


def _names(q: Person, c: Person, sim: Mapping[str, float]) -> tuple[str, str]:
    given = _name_level(q.given, c.given, sim, True)
    family = _name_level(q.family, c.family, sim, False)
    if given in _STRONG_NAME or family in _STRONG_NAME:
        return given, family
    # Given and family name entered the wrong way round.
    if (
        q.given
        and q.family
        and _name_level(q.given, c.family, sim, False) in _STRONG_NAME
        and _name_level(q.family, c.given, sim, True) in _STRONG_NAME
    ):
        return "swapped", "swapped"
    return given, family


def _middle_level(a: str, b: str, sim: Mapping[str, float]) -> str:
    if not a or not b:
        return "missing"
    ca, cb = _compact(a), _compact(b)
    if ca == cb:
        return "exact"
    if (len(ca) == 1 or len(cb) == 1) and ca[0] == cb[0]:
        return "initial"
    if JaroWinkler.similarity(ca, cb) >= sim["name_close"]:
        return "close"
    return "disagree"


def _date_level(a: str, b: str) -> str:
    if not a or not b:
        return "missing"
    if a == b:
        return "exact"
    ya, ma, da = a.split("-")
    yb, mb, db = b.split("-")
    if ya == yb and ma == db and da == mb:
        return "transposed"
    if DamerauLevenshtein.distance(ya + ma + da, yb + mb + db) <= 1:
        return "one_digit"
    if (ya == yb) + (ma == mb) + (da == db) >= 2:
        return "partial"
    return "disagree"


@lru_cache(maxsize=65536)
def _number_name_type(street: str) -> tuple[str, str, str]:
    """A normalised street line's house number, street name and street type, ``""`` for what is absent.

    The name runs from after the number to its first word of three letters or more, so
    a directional or a short prefix stays part of it (``N MAIN``, ``ST KILDA``); the type
    is the word after the name when it is a street type (``PL``, ``AVE``). What follows
    (a unit, a building, an estate) is left out: ``("8", "CAHALAN", "PL")`` of
    ``"8 CAHALAN PL IRON SHOE LODGE"``.
    """
    number = _house_number(street)
    if not number:
        return "", "", ""
    words = street[len(number) :].split()
    kinds = street_word_kinds()
    i = 0
    while i < len(words) - 1 and (len(words[i]) <= 2 or kinds.get(words[i]) == "directional"):
        i += 1
    name = " ".join(words[: i + 1])
    after = words[i + 1] if i + 1 < len(words) else ""
    return number, name, after if kinds.get(after) == "type" else ""


def _street_level(a: str, b: str, sim: Mapping[str, float]) -> str:
    if not a or not b:
        return "missing"
    ca, cb = _compact(a), _compact(b)
    if ca == cb:
        return "exact"
    similarity = max(fuzz.ratio(ca, cb), fuzz.token_sort_ratio(a, b))
    if similarity >= sim["street_close"]:
        return "close"
    # One line may carry what the other leaves out (a unit, a building, an estate or a
    # locality after the street: "8 CAHALAN PL" and "8 CAHALAN PL IRON SHOE LODGE"), which
    # pulls the whole-line similarity down. The same street name (up to a typo in a name of
    # four letters or more) and no two different street types (5TH AVE is not 5TH ST) is
    # the same street whatever follows: with the same number `close` (the same house), with
    # another `similar` (which address_level grades as a neighbour on that street).
    number_a, name_a, type_a = _number_name_type(a)
    number_b, name_b, type_b = _number_name_type(b)
    if (
        name_a
        and name_b
        and (not type_a or not type_b or type_a == type_b)
        and (
            name_a == name_b
            or (min(len(name_a), len(name_b)) >= 4 and JaroWinkler.similarity(name_a, name_b) >= sim["name_close"])
        )
    ):
        return "close" if number_a == number_b else "similar"
    if similarity >= sim["street_similar"]:
        return "similar"
    return "disagree"


def _city_level(a: str, b: str, sim: Mapping[str, float]) -> str:
    if not a or not b:
        return "missing"
    ca, cb = _compact(a), _compact(b)
    if ca == cb:
        return "exact"
    if JaroWinkler.similarity(ca, cb) >= sim["city_close"]:
        return "close"
    return "disagree"


def _digits_level(a: str, b: str) -> str:
    if not a or not b:
        return "missing"
    if a == b:
        return "exact"
    if len(a) == len(b) and DamerauLevenshtein.distance(a, b) <= 1:
        return "one_digit"
    return "disagree"


def _exact_level(a: str, b: str) -> str:
    if not a or not b:
        return "missing"
    return "exact" if a == b else "disagree"


def address_level(street: str, city: str, state: str, zip_level: str, same_number: bool = False) -> str:
    """The ``address`` level: the finest place two addresses share, from their parts' levels.

    The parts are not independent: one ZIP almost always means one town and
    state, and a street is only "the same" inside one town. So they are not
    added up; the address counts once, at the finest of (first that applies):
    ``house`` (street and number agree, up to a typo, in the same ZIP or town;
    ``same_number``: a similar street line with the same house number counts
    as the same house), ``street`` (a similar street line with another or no
    house number: a neighbour, or a bigger slip, in the same ZIP or town), ``zip``, ``town`` (city, or a ZIP one
    digit off), ``street_elsewhere`` (a street line alike in another town),
    ``state``, ``disagree``; ``missing`` when no part can be compared.
    """
    if street == city == state == zip_level == "missing":
        return "missing"
    same_area = zip_level in ("exact", "one_digit") or city in ("exact", "close")
    if same_area and (street in ("exact", "close") or (street == "similar" and same_number)):
        return "house"
    if same_area and street == "similar":
        return "street"
    if zip_level == "exact":
        return "zip"
    if same_area:
        return "town"
    if street in ("exact", "close", "similar"):
        return "street_elsewhere"
    if state == "exact":
        return "state"
    return "disagree"


def compare(query: Person, candidate: Person, model: MatchModel) -> dict[str, str]:
    """The agreement level of every field of two people (``missing`` where either side is empty),
    and of the ``address`` the street, city, state and ZIP make together."""
    sim = model.similarity
    given, family = _names(query, candidate, sim)
    sex_q = query.sex if query.sex in ("M", "F") else ""
    sex_c = candidate.sex if candidate.sex in ("M", "F") else ""
    street = _street_level(query.street, candidate.street, sim)
    city = _city_level(query.city, candidate.city, sim)
    state = _exact_level(query.state, candidate.state)
    zip_level = _digits_level(query.zip, candidate.zip)
    # The house numbers matter only to a "similar" street line (see address_level).
    same_number = street == "similar" and _house_number(query.street) == _house_number(candidate.street) != ""
    return {
        "given": given,
        "family": family,
        "middle": _middle_level(query.middle, candidate.middle, sim),
        "birth_date": _date_level(query.birth_date, candidate.birth_date),
        "sex": _exact_level(sex_q, sex_c),
        "street": street,
        "city": city,
        "state": state,
        "zip": zip_level,
        "phone": _digits_level(query.phone, candidate.phone),
        "address": address_level(street, city, state, zip_level, same_number),
    }


_HOUSEHOLD_NAME = ("exact", "compound", "close")


def household_limit(scored: Scored, model: MatchModel) -> str | None:
    """The best grade a comparison may have when it looks like two people of one household, else None.

    Relatives share a surname and an address or phone, so for them those
    agreements are not the independent evidence the weights assume: a spouse
    or sibling (given name and birth date both differ) is at best
    ``model.household_both_differ``; a twin or a Jr/Sr (one of them differs)
    at best ``model.household_one_differs``.
    """
    level = {f.field: f.level for f in scored.fields}
    if level["family"] not in _HOUSEHOLD_NAME:
        return None
    if level["address"] != "house" and level["phone"] != "exact":
        return None
    differ = (level["given"] == "disagree") + (level["birth_date"] == "disagree")
    if differ == 2:
        return model.household_both_differ
    if differ == 1:
        return model.household_one_differs
    return None


#: The comparisons that say who the person is (not where they live): :func:`identity_limit` sums them.
IDENTITY = ("given", "family", "birth_date")


def identity_floor_bounds(model: MatchModel) -> tuple[float, float]:
    """The interval the identity floor must lie in, from the model's weights: ``(low, high)``.

    ``low`` is the most that given + family + birth date can weigh when one name
    agrees (at any level) while another of the three disagrees and the third
    disagrees or is missing: a relative (the surname) or a namesake (the given
    name) at the same place. ``high`` is the birth date agreeing exactly
    against two other names, which is identity enough. A floor in
    ``(low, high]`` caps the first and not the second; ``bench/fit_weights.py``
    writes the midpoint, and a test holds the shipped model to the interval.
    """

    def agreeing(name: str) -> float:
        levels = model.fields[name].weights
        return max(w for lv, w in levels.items() if lv not in ("disagree", "swapped"))

    disagree = {f: model.weight(f, "disagree") for f in IDENTITY}
    low = -math.inf
    for name in ("given", "family"):
        for other in IDENTITY:
            if other == name:
                continue
            (third,) = set(IDENTITY) - {name, other}
            low = max(low, agreeing(name) + disagree[other] + max(disagree[third], 0.0))
    high = model.weight("birth_date", "exact") + disagree["given"] + disagree["family"]
    return low, high


def identity_limit(scored: Scored, model: MatchModel) -> str | None:
    """The best grade a comparison may have when its name and birth date say too little, else None.

    Address and phone are shared by neighbours and relatives, so they must
    not carry a match alone: when the weights of the given name, family name
    and birth date add up to less than ``model.identity_floor`` bits (say the
    given name agrees but the surname and birth date do not), the grade is at
    best ``model.identity_best_grade``.
    """
    evidence = sum(f.weight for f in scored.fields if f.field in IDENTITY)
    return model.identity_best_grade if evidence < model.identity_floor else None


def score(query: Person, candidate: Person, model: MatchModel) -> Scored:
    """Compare two people (:data:`SCORED`); the total is the sum of the levels' weights (log2 units)."""
    levels = compare(query, candidate, model)
    table = model._table
    parts = tuple([FieldComparison(name, levels[name], table[name][levels[name]]) for name in SCORED])
    return Scored(round(sum([p[2] for p in parts]), 6), parts)


def grade(total: float, model: MatchModel) -> str:
    """The FHIR ``$match`` grade of a total match weight: certain, probable, possible or none."""
    if total >= model.certain:
        return "certain"
    if total >= model.probable:
        return "probable"
    if total >= model.possible:
        return "possible"
    return "none"


# -- matching a message's patient ------------------------------------------------


@dataclass(frozen=True)
class PatientQuery:
    """What a message says about its patient: MBI, MRNs with their assigning authority, demographics."""

    mbi: str
    mrns: tuple[tuple[str, str], ...]
    person: Person


def query_from_facts(facts: PatientFacts) -> PatientQuery:
    """The :class:`PatientQuery` of the converter's :class:`~gateway.records.PatientFacts` (the MBI without dashes)."""
    mbi = facts.mbi.replace("-", "").upper()
    return PatientQuery(mbi=mbi, mrns=facts.mrns, person=person_from_facts(facts))


def query_from_patient(patient: dict) -> PatientQuery:
    """The :class:`PatientQuery` of a FHIR Patient (MBI by system us-mbi; MRNs with ``assigner.display``).

    For a Patient from elsewhere (a benchmark's, a test's); the pipeline has
    the converter's facts and calls :func:`query_from_facts`.
    """
    return query_from_facts(facts_of_patient(patient))


@dataclass(frozen=True)
class Candidate:
    """A roster member considered for the patient, with its comparison and grade."""

    member: dict
    scored: Scored
    grade: str


@dataclass(frozen=True)
class Match:
    """How a message's patient was (or was not) found on the roster."""

    grade: str  # certain / probable / possible / none
    method: str  # mbi / mrn / probabilistic / ambiguous / none
    score: float | None
    member: dict | None
    candidates: tuple[Candidate, ...] = ()
    detail: dict = field(default_factory=dict)

    @property
    def aco_id(self) -> str | None:
        """The ACO of the chosen member, if any."""
        return self.member["aco_id"] if self.member else None

    @property
    def member_id(self) -> str | None:
        """The member id of the chosen member, if any."""
        return self.member["member_id"] if self.member else None

    @property
    def matched(self) -> bool:
        """Whether a member was chosen (any grade but none)."""
        return self.member is not None


class RosterLookups(Protocol):
    """The roster reads matching needs.

    ``by_mbi`` and ``by_mrn`` return roster rows. Blocking takes two reads:
    ``blocking_buckets`` gives, for each key, references to the members stored
    under it (any hashable the same lookups understand), at most ``cap + 1`` of
    them (``cap + 1``: the bucket is over-full and is not used); ``persons``
    returns their normalised persons (:func:`pack_person`) for the prefilter;
    ``members`` returns the rows of the references matching chose to compare.
    """

    def by_mbi(self, mbi: str) -> Iterable[Mapping]: ...

    def by_mrn(self, mrn: str, authority: str) -> Iterable[Mapping]: ...  # roster MRNs and confirmed links

    def blocking_buckets(self, keys: Sequence[str], cap: int) -> Mapping[str, Sequence[Hashable]]: ...

    def persons(self, refs: Sequence[Hashable]) -> Mapping[Hashable, str]: ...

    def members(self, refs: Sequence[Hashable]) -> Iterable[Mapping]: ...


@dataclass(frozen=True)
class Shortlist:
    """The members blocking chose to look at, best first, and what it left out."""

    refs: tuple[Hashable, ...]
    blocked: int  # distinct members sharing a usable key
    over_full: int  # keys whose bucket was over-full (not used)


def shortlist(buckets: Mapping[str, Sequence[Hashable]], model: MatchModel) -> Shortlist:
    """The ``model.max_prefiltered`` members sharing the most evidence with the query.

    Each shared key counts ``log2(roster_size / bucket size)`` bits (a key that
    a member shares with few others says more than the birth date alone), so a
    true match, which shares most of its keys, ranks above members that share
    one broad key. A bucket of more than ``model.max_bucket`` members is
    skipped: it says almost nothing and would cost the most to read.
    """
    size = max(1, model.roster_size)
    evidence: dict[Hashable, float] = {}
    over_full = 0
    for refs in buckets.values():
        n = len(refs)
        if n > model.max_bucket:
            over_full += 1
            continue
        bits = math.log2(max(size, n) / n) if n else 0.0
        for ref in refs:
            evidence[ref] = evidence.get(ref, 0.0) + bits
    # Ties keep the lookups' order (deterministic), so the cut is reproducible.
    ranked = sorted(evidence, key=evidence.__getitem__, reverse=True)
    return Shortlist(tuple(ranked[: model.max_prefiltered]), len(evidence), over_full)


def members_to_compare(
    person: Person, keys: list[str], lookups: RosterLookups, model: MatchModel
) -> tuple[Shortlist, list]:
    """Blocking for one query: the key buckets, the shortlist by shared evidence, then (when it is
    longer than ``model.max_compared``) the prefilter's best. Returns the shortlist and the refs to score."""
    short = shortlist(lookups.blocking_buckets(keys, model.max_bucket), model)
    refs = list(short.refs)
    if len(refs) > model.max_compared:
        refs = prefilter(person, lookups.persons(refs), refs, model)[: model.max_compared]
    return short, refs


#: The level each field's cheap "near" test in :func:`prefilter` stands for.
_NEAR_LEVEL = {
    "given": "similar",  # same first three letters
    "family": "similar",
    "middle": "initial",  # same first letter
    "birth_date": "partial",  # two of year, month and day the same
    "street": "similar",  # same house number (first word)
    "city": "close",  # same first three letters
    "zip": "one_digit",  # one digit different
    "phone": "one_digit",
}


def _near_test(name: str, value: str) -> Callable[[str], bool] | None:
    """The prefilter's cheap stand-in for a partial agreement with ``value`` (see :data:`_NEAR_LEVEL`)."""
    if name in ("given", "family", "city"):
        prefix = value[:3]
        return (lambda other: other[:3] == prefix) if len(prefix) == 3 else None
    if name == "middle":
        first = value[0]
        return lambda other: other[0] == first
    if name == "birth_date":
        y, m, d = value[:4], value[5:7], value[8:]
        return lambda other: (other[:4] == y) + (other[5:7] == m) + (other[8:] == d) >= 2
    if name == "street":
        number = value.split(" ", 1)[0] + " "
        return lambda other: other.startswith(number)
    if name in ("zip", "phone"):
        size = len(value)
        return lambda other: len(other) == size and Hamming.distance(value, other) == 1
    return None


def prefilter(query: Person, persons: Mapping[Hashable, str], refs: Sequence[Hashable], model: MatchModel) -> list:
    """``refs`` ranked by a cheap estimate of the match weight; :func:`score` then compares the best few.

    Each field present on both sides adds its ``exact`` weight when the two
    normalised values are equal, the weight of a partial level when a cheap
    test stands for it (same first three letters of a name, same house
    number, one digit off, two of year/month/day: :data:`_NEAR_LEVEL`), and
    its ``disagree`` weight otherwise; given and family name entered the wrong
    way round count as agreeing. A corrupted true match that shares only a
    broad key (its birth date) still agrees on several fields, which members
    that merely share the birth date do not. Ties keep the order of ``refs``.
    """
    q = pack_person(query).split(_PACK)
    present = []
    for i, value in enumerate(q):
        if value:
            agree, near, disagree = model.agreement_weights[i]
            test = _near_test(FIELDS[i], value) if near != disagree else None
            present.append((i, value, agree, near, disagree, test))
    swap = model.weight("given", "swapped") if q[0] and q[1] else None
    estimate: dict[Hashable, float] = {}
    for ref in refs:
        c = persons.get(ref, "").split(_PACK)
        if len(c) != len(FIELDS):
            estimate[ref] = -math.inf
            continue
        total = 0.0
        for i, value, agree, near, disagree, test in present:
            other = c[i]
            if other:
                if other == value:
                    total += agree
                elif test is not None and test(other):
                    total += near
                else:
                    total += disagree
        if swap is not None and q[0] == c[1] and q[1] == c[0]:
            total += swap - model.agreement_weights[0][2] - model.agreement_weights[1][2]
        estimate[ref] = total
    return sorted(refs, key=estimate.__getitem__, reverse=True)


def is_effective(member: Mapping, on: str) -> bool:
    """Whether the member's attribution period covers ``on`` (YYYY-MM-DD; "" means today)."""
    start = _col(member, "effective_start")
    end = _col(member, "effective_end")
    if not on:
        return not end or end >= date.today().isoformat()
    return (not start or start <= on) and (not end or on <= end)


def _member_key(row: Mapping) -> tuple[str, str]:
    return (_col(row, "aco_id"), _col(row, "member_id"))


def _effective(rows: Iterable[Mapping], on: str) -> list[dict]:
    found: dict[tuple[str, str], dict] = {}
    for row in rows:
        if is_effective(row, on):
            found.setdefault(_member_key(row), dict(row))
    return [found[k] for k in sorted(found)]


def _audit(scored: Scored) -> dict:
    # Levels and weights only: no names, dates or identifiers.
    return {f.field: [f.level, round(f.weight, 2)] for f in scored.fields if f.level != "missing"}


def match_patient(query: PatientQuery, encounter_date: str, lookups: RosterLookups, model: MatchModel) -> Match:
    """Find the roster member for ``query`` among those effective on ``encounter_date``.

    MBI, then each MRN with its assigning authority (``certain``); otherwise
    the best-scoring member sharing a blocking key, graded by the model. More
    than one member for an identifier, or two members scoring within
    ``model.ambiguity_margin`` of each other, give ``possible`` with no member
    chosen (method ``ambiguous``) and the candidates for a reviewer.
    """
    rules: list[tuple[str, Iterable[Mapping]]] = []
    if query.mbi:
        rules.append(("mbi", lookups.by_mbi(query.mbi)))
    for value, authority in query.mrns:
        if value and authority:
            rules.append(("mrn", lookups.by_mrn(value, authority)))
    for method, rows in rules:
        found = _effective(rows, encounter_date)
        if not found:
            continue
        candidates = tuple(
            Candidate(row, score(query.person, person_from_member(row), model), "certain")
            for row in found[: model.max_candidates]
        )
        if len(found) == 1:
            only = candidates[0]
            detail = {"rule": method, "demographics": round(only.scored.total, 2), "model": model.fingerprint}
            return Match("certain", method, None, found[0], candidates, detail)
        detail = {"rule": method, "candidates": len(found), "model": model.fingerprint}
        return Match("possible", "ambiguous", None, None, candidates, detail)

    keys = blocking_keys(query.person)
    tried = [method for method, _ in rules]
    if not keys:
        return Match("none", "none", None, None, (), {"rules_tried": tried, "reason": "no demographics to compare"})
    short, refs = members_to_compare(query.person, keys, lookups, model)
    rows = _effective(lookups.members(refs) if refs else (), encounter_date)
    ranked: list[Candidate] = []
    conflicts = households = identities = 0
    for row in rows:
        scored = score(query.person, person_from_member(row), model)
        g = grade(scored.total, model)
        limit = household_limit(scored, model)
        if limit and GRADES.index(g) < GRADES.index(limit):
            g = limit
            households += 1
        limit = identity_limit(scored, model)
        if limit and GRADES.index(g) < GRADES.index(limit):
            g = limit
            identities += 1
        member_mbi = _col(row, "mbi").replace("-", "").upper()
        if g != "none" and query.mbi and member_mbi and member_mbi != query.mbi:
            # The message's MBI names someone else: never better than the configured grade.
            if GRADES.index(g) < GRADES.index(model.identifier_conflict_grade):
                g = model.identifier_conflict_grade
                conflicts += 1
        ranked.append(Candidate(row, scored, g))
    ranked.sort(key=lambda c: (-c.scored.total, _member_key(c.member)))
    shortlisted = tuple(c for c in ranked if c.grade != "none")[: model.max_candidates]
    detail: dict = {
        "rules_tried": [*tried, "probabilistic"],
        "blocked": short.blocked,
        "compared": len(ranked),
        "model": model.fingerprint,
    }
    if short.over_full:
        detail["over_full_keys"] = short.over_full
    if conflicts:
        detail["mbi_conflicts"] = conflicts
    if households:
        detail["household_limited"] = households
    if identities:
        detail["identity_limited"] = identities
    if not shortlisted:
        if ranked:
            detail["best"] = round(ranked[0].scored.total, 2)
        return Match("none", "none", ranked[0].scored.total if ranked else None, None, (), detail)
    best = shortlisted[0]
    detail["fields"] = _audit(best.scored)
    if len(shortlisted) > 1 and best.scored.total - shortlisted[1].scored.total < model.ambiguity_margin:
        detail["runner_up"] = round(shortlisted[1].scored.total, 2)
        return Match("possible", "ambiguous", best.scored.total, None, shortlisted, detail)
    return Match(best.grade, "probabilistic", best.scored.total, best.member, shortlisted, detail)
