"""Blocking: which roster members a query is compared with.

Scoring every member of a million-member roster for each message would cost
too much, so the roster stores each member under a few blocking keys
(:func:`blocking_keys`) and a query looks up the members sharing one of its
own. The members that share the most evidence come first
(:func:`shortlist`), and when they are still too many a cheap estimate of the
match weight (:func:`prefilter`) chooses the few that
:func:`~gateway.matching.scoring.score` then compares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import jellyfish
from rapidfuzz.distance import Hamming

from gateway.matching.model import MatchModel
from gateway.matching.people import (
    _PACK,
    FIELDS,
    PACKED_FIELDS,
    Person,
    _compact,
    _house_number,
    _parts,
    nickname_groups,
    pack_person,
)

#: Raised whenever the blocking keys' recipe or the normalisation changes: the store
#: recomputes its stored keys and normalised persons when it differs from the roster's.
BLOCKING_RECIPE = "2"  # 2: the packed person keeps the generational suffix


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


# -- the shortlist and the prefilter ---------------------------------------------


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


def _near_test(name: str, value: str) -> Callable[[str], bool] | None:
    """The prefilter's cheap stand-in for a partial agreement with ``value`` (see ``model._NEAR_LEVEL``)."""
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
    number, one digit off, two of year/month/day: ``model._NEAR_LEVEL``), and
    its ``disagree`` weight otherwise; given and family name entered the wrong
    way round count as agreeing. A corrupted true match that shares only a
    broad key (its birth date) still agrees on several fields, which members
    that merely share the birth date do not. Ties keep the order of ``refs``.
    """
    q = pack_person(query).split(_PACK)[: len(FIELDS)]
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
        if len(c) != len(PACKED_FIELDS):
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
