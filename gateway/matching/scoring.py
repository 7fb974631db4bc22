"""Comparing two people: each field's agreement level, its weight, the total and its grade.

Fellegi-Sunter style: two people are compared field by field (given, family
and middle name, birth date, sex, phone, and the address: street, city, state
and ZIP scored once, at the finest place both share, since they are not
independent); each comparison's agreement level adds its weight ``log2(m/u)``
and the total is graded ``certain`` / ``probable`` / ``possible`` / ``none``
(FHIR ``$match``). The place never makes a match alone: when given name,
family name and birth date together carry too little evidence (the identity
floor), or look like a relative at the same house (the household rule), the
grade is at best ``possible``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import jellyfish
from rapidfuzz import fuzz
from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler

from gateway.matching.model import MatchModel
from gateway.matching.people import Person, _compact, _house_number, _parts, nickname_groups, street_word_kinds

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
