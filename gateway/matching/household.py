"""Telling a member from a relative who shares the member's home.

A spouse, a twin, a parent or an adult child shares the member's surname,
address and phone. For such a pair those agreements are not the independent
evidence the Fellegi-Sunter weights assume: among people who share a home
they say nothing about who is who. So when a query shares a member's home
(the same house, or the same phone), matching asks a second question, with
the fields that do tell relatives apart: is this the member, or someone
living with them?

The answer is a likelihood ratio over the household fields
(:data:`~gateway.matching.model.HOUSEHOLD_LEVELS`): how likely the pair's
levels are when the two records are one person (with the registration errors
of an ADT feed), against how likely they are when the query is a spouse, a
twin, a parent or child, a Jr or Sr, or a sibling, each weighed by how many of
a member's housemates are of that kind. Within one relation the fields are
taken as independent; across relations they are not (a Jr shares the name AND
is a generation younger). Everything is fitted, not set by hand
(``bench/fit_household.py``). Added to the prior odds it gives the posterior
that the query is the member; below ``possible_posterior`` the pair is graded
``none`` (it is a relative), below ``route_posterior`` at best ``possible``.

Separately, some evidence says "another person" wherever the two live
(:func:`another_person`): given names that differ outright while the birth
dates agree (a twin), M against F, two different generational suffixes (Jr
and Sr), birth dates a generation apart. Such a pair is never routed.

Pure functions: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from gateway.matching.model import GRADES, MatchModel
from gateway.matching.people import Person
from gateway.matching.scoring import Scored, _nysiis

# The scoring levels each household level gathers (what is not listed is ``disagree``).
_GIVEN = {"exact": "same", "compound": "same", "swapped": "same", "nickname": "variant", "close": "variant"}
_GIVEN |= {"similar": "variant", "initial": "variant"}
_FAMILY = {"exact": "same", "compound": "same", "close": "same", "swapped": "same", "similar": "variant"}
_MIDDLE = {"exact": "agree", "initial": "agree", "close": "agree"}
_NEAR_DATE = ("transposed", "one_digit", "partial")

#: Years between two birth dates from which they are a generation apart, not a slip of the keyboard.
GENERATION_YEARS = 15


def shares_home(levels: Mapping[str, str]) -> bool:
    """Whether two people's compared levels put them in one home: the same house, or the same phone."""
    return levels["address"] == "house" or levels["phone"] == "exact"


def _years_apart(a: str, b: str) -> int:
    return abs(int(a[:4]) - int(b[:4]))


def household_levels(query: Person, candidate: Person, levels: Mapping[str, str]) -> dict[str, str]:
    """The household test's level of each field (:data:`~gateway.matching.model.HOUSEHOLD_LEVELS`),
    from scoring's ``levels``.

    The birth date is ``exact``; ``near`` (a transposition, one digit, or two of
    year, month and day alike, within a year); ``generation`` (at least
    :data:`GENERATION_YEARS` years apart); else ``apart``.
    """

    def gathered(field: str, table: Mapping[str, str]) -> str:
        level = levels[field]
        return "missing" if level == "missing" else table.get(level, "disagree")

    birth = levels["birth_date"]
    if birth not in ("missing", "exact"):
        years = _years_apart(query.birth_date, candidate.birth_date)
        if years >= GENERATION_YEARS:
            birth = "generation"
        elif birth in _NEAR_DATE and years <= 1:
            birth = "near"
        else:
            birth = "apart"
    if not query.suffix and not candidate.suffix:
        suffix = "missing"
    elif query.suffix == candidate.suffix:
        suffix = "same"
    elif not query.suffix or not candidate.suffix:
        suffix = "one_side"
    else:
        suffix = "differ"
    return {
        "given": gathered("given", _GIVEN),
        "family": gathered("family", _FAMILY),
        "middle": gathered("middle", _MIDDLE),
        "birth_date": birth,
        "sex": levels["sex"],
        "suffix": suffix,
    }


def household_bits(hlevels: Mapping[str, str], model: MatchModel) -> float:
    """The log2 odds that a query sharing a member's home is the member, not a relative living there.

    ``prior + log2(m(levels) / sum over relations of share * h(levels))``: each
    relation's fields are independent given the relation, so a Jr's same name and
    his birth date a generation apart are explained together, as they occur.
    """
    hm = model.household
    log_m = hm.log_m
    member = sum(log_m[f][lv] for f, lv in hlevels.items())
    terms = [share + sum(log_h[f][lv] for f, lv in hlevels.items()) for share, log_h in hm.log_h.values()]
    top = max(terms)
    relative = top + math.log2(sum(math.pow(2.0, t - top) for t in terms))
    return hm.prior_bits + member - relative


def household_limit(bits: float, model: MatchModel) -> str | None:
    """The best grade of a pair sharing a home, from :func:`household_bits`; None when it may be routed."""
    hm = model.household
    posterior = 1.0 / (1.0 + math.pow(2.0, -bits)) if bits > -1000 else 0.0
    if posterior >= hm.route_posterior:
        return None
    if posterior >= hm.possible_posterior:
        return "possible"
    return "none"


def rhymes(a: str, b: str) -> bool:
    """Whether two given names differ only in their first sound: DONALD and RONALD, JADEN and
    KADEN (twins' names), not CATHY and KATHY (one sound, two spellings). Keying errors seldom
    change the first letter ("few errors are made in the first character of a word":
    Yannakoudakis and Fawthrop, 1983); a dropped first letter (HILIP) is a slip, not a rhyme."""
    return len(a) > 1 and a[1:] == b[1:] and a[0] != b[0] and _nysiis(a[:2]) != _nysiis(b[:2])


def another_person(
    levels: Mapping[str, str],
    hlevels: Mapping[str, str],
    query_given: str = "",
    candidate_given: str = "",
    given_is_a_name: bool = True,
) -> str | None:
    """Why the two records are two people whatever their weights say (a reason), or None.

    Given names that differ outright (not a nickname, an initial, a typo or a
    swap), or alike but for their first sound (:func:`rhymes`), or alike with
    middle names that differ, while the birth dates agree: a twin (JEAN E and
    JOAN M born the same day are two sisters). The last two only when the
    query's given name is one people have (``given_is_a_name``: someone on the
    roster has it): NTEPHANIE for STEPHANIE is a slip, RONALD for DONALD a twin. M against F. Two different
    generational suffixes: Jr and Sr. The same name with birth dates a
    generation apart: parent and child.
    """
    given = levels["given"]
    if levels["birth_date"] == "exact" and (
        given == "disagree"
        or (given_is_a_name and given in ("close", "similar") and rhymes(query_given, candidate_given))
        or (given_is_a_name and given == "similar" and levels["middle"] == "disagree")
    ):
        return "given name differs, birth date agrees"
    if levels["sex"] == "disagree":
        return "sex differs"
    if hlevels["suffix"] == "differ":
        return "generational suffix differs"
    if hlevels["birth_date"] == "generation":
        return "birth dates a generation apart"
    return None


def household_cap(
    query: Person, candidate: Person, scored: Scored, model: MatchModel, given_is_a_name: bool = True
) -> tuple[str | None, str, float | None]:
    """What household evidence allows a compared pair: ``(best grade or None, why, bits)``.

    ``why`` is ``"household"`` when the household test capped the pair, else the
    :func:`another_person` reason (or ""); ``bits`` is the test's log2 odds when the
    two share a home, else None. The weaker of the two caps wins. ``given_is_a_name``:
    whether the query's given name is one people have (see :func:`another_person`).
    """
    levels = {f.field: f.level for f in scored.fields}
    hlevels = household_levels(query, candidate, levels)
    cap: str | None = None
    why = ""
    bits = None
    if model.household is not None and shares_home(levels):
        bits = household_bits(hlevels, model)
        cap = household_limit(bits, model)
        why = "household" if cap else ""
    reason = another_person(levels, hlevels, query.given, candidate.given, given_is_a_name)
    if reason:
        best = model.household.another_person_grade if model.household is not None else "possible"
        if cap is None or GRADES.index(best) > GRADES.index(cap):
            cap, why = best, reason
    return cap, why, bits
