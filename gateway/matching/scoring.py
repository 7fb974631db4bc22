"""Comparing two people: each field's agreement level, its weight, the total and its grade.

Fellegi-Sunter style: two people are compared field by field (given, family
and middle name, birth date, sex, phone, and the address: street, city, state
and ZIP scored once, at the finest place both share, since they are not
independent); each comparison's agreement level adds its weight ``log2(m/u)``
and the total is graded ``certain`` / ``probable`` / ``possible`` / ``none``
(FHIR ``$match``). The place never makes a match alone: when given name,
family name and birth date together carry too little evidence (the identity
floor), the grade is at best ``possible``; telling a member from a relative
sharing the home is :mod:`gateway.matching.household`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import NamedTuple

import jellyfish
from rapidfuzz import fuzz
from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler

from gateway.matching.model import MatchModel
from gateway.matching.people import (
    Person,
    _compact,
    _house_number,
    _parts,
    frequency_terms,
    name_variants,
    nickname_groups,
    street_word_kinds,
)

#: The comparisons :func:`score` adds up, in the order it reports them.
SCORED = ("given", "family", "middle", "birth_date", "sex", "address", "phone")


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


#: The least Jaro-Winkler similarity at which two names sharing a NYSIIS code are ``similar``
#: (STEPHEN/STEVEN 0.89, SEAN/SHAWN 0.81, MARY/MARIE 0.85 pass; JOHN/JEAN 0.67, JOHN/JAMES 0.48 do not).
_SOUNDS_ALIKE_JW = 0.75


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
        # Sounding alike counts only for names alike in writing too: JOHN and JAMES share a
        # NYSIIS code (JAN) and are two people's names (twins', as often as not).
        if (
            jw >= sim["name_similar"]
            or DamerauLevenshtein.distance(ca, cb) <= 1
            or (jw >= _SOUNDS_ALIKE_JW and _nysiis(ca) == _nysiis(cb))
        ):
            return "similar"
        if given and _typo_of_a_variant(ca, cb):
            return "similar"
    if given and (len(ca) == 1 or len(cb) == 1) and ca[0] == cb[0]:
        return "initial"
    return "disagree"


def _typo_of_a_variant(a: str, b: str) -> bool:
    """Whether one given name is one keystroke from a diminutive or formal form of the other
    (``RICK`` for FREDERICK typed ``RIKC``): both errors at once. Names of four letters or more,
    with the first letter kept: among three-letter names one keystroke leads from one person's
    name to another's (``BEN`` for Benjamin, ``KEN`` for Kenneth), and so does a first letter
    (``TERRY`` for Terence, ``JERRY``)."""
    if len(a) < 4 or len(b) < 4:
        return False
    variants = name_variants()
    return any(_slip_of(a, v) for v in variants.get(b, ())) or any(_slip_of(b, v) for v in variants.get(a, ()))


def _slip_of(typed: str, name: str) -> bool:
    # One keystroke, not at the first letter: TERRY (for TERENCE) and JERRY are twins' names.
    return len(name) >= 4 and typed[0] == name[0] and DamerauLevenshtein.distance(typed, name) <= 1


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
    if abs((date.fromisoformat(a) - date.fromisoformat(b)).days) == 1:
        return "one_digit"  # a day off across the end of a month is the same slip as within one
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
    # The model's own weights, not a rare name's: the floor's interval was derived from them.
    evidence = sum(model.weight(f.field, f.level) for f in scored.fields if f.field in IDENTITY)
    return model.identity_best_grade if evidence < model.identity_floor else None


def score(query: Person, candidate: Person, model: MatchModel, exact: Mapping[str, float] | None = None) -> Scored:
    """Compare two people (:data:`SCORED`); the total is the sum of the levels' weights (log2 units).

    ``exact`` replaces the weight of an ``exact`` agreement of some fields: the query's
    value weighed by how rare it is on the roster (:func:`term_weights`). When the
    address says the patient does not live at the member's (a move, or another
    person), the phone is weighed as it behaves after a move
    (:attr:`~gateway.matching.model.MatchModel.moved_phone_weights`): a move changes
    both, so the two disagreeing are one piece of evidence, not two.
    """
    levels = compare(query, candidate, model)
    table = model._table
    moved = model.moved_phone_weights if levels["address"] not in _SAME_HOME else None
    parts = []
    for name in SCORED:
        level = levels[name]
        if exact and level == "exact" and name in exact:
            weight = exact[name]
        elif name == "phone" and moved is not None:
            weight = moved[level]
        else:
            weight = table[name][level]
        parts.append(FieldComparison(name, level, weight))
    return Scored(round(sum([p[2] for p in parts]), 6), tuple(parts))


#: Address levels at which the patient lives at the member's (or nothing is known of it).
_SAME_HOME = ("house", "street", "missing")


def term_weights(query: Person, counts: Mapping[str, int], total: int, model: MatchModel) -> dict[str, float]:
    """The weight of an exact agreement on each of the query's names and birth date, by its frequency
    on the roster (Splink's term-frequency adjustment): ``log2(m / u)`` with ``u`` the share of the
    roster's ``total`` current members that carry the value, not the field's average.

    The share is of the other members (the one compared carries the value), smoothed towards the
    model's average ``u`` (one expected sighting at that rate: ``(others + 1) / (total - 1 + 1 / u)``),
    so a value seen once on a small roster is not taken for a rare one, and on a roster of a few
    members the weights stay the model's. ``counts`` are the
    roster's counts of :func:`~gateway.matching.people.frequency_terms`; ``total`` 0 gives ``{}``.
    """
    if total <= 0:
        return {}
    out = {}
    for term in frequency_terms(query):
        name, _, _ = term.partition(":")
        fm = model.fields[name]
        # An exact agreement means the member compared carries the value: the others are the count less one.
        others = max(counts.get(term, 0) - 1, 0)
        u = (others + 1) / (max(total - 1, 0) + 1 / fm.u["exact"])
        out[name] = math.log2(fm.m["exact"] / u)
    return out


def grade(total: float, model: MatchModel) -> str:
    """The FHIR ``$match`` grade of a total match weight: certain, probable, possible or none."""
    if total >= model.certain:
        return "certain"
    if total >= model.probable:
        return "probable"
    if total >= model.possible:
        return "possible"
    return "none"
