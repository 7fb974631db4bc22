"""Find a message's patient on the attribution roster.

Deterministic first: the Medicare Beneficiary Identifier, then an MRN with its
assigning authority (the roster's MRNs and the links a reviewer confirmed),
each grade ``certain``. Otherwise probabilistic: the roster members that share
a blocking key with the patient (:mod:`gateway.matching.blocking`) are scored
and graded (:mod:`gateway.matching.scoring`). Two members scoring too close to
each other are never resolved by guessing: the result is ``possible`` with no
member chosen (a reviewer picks).

Pure functions: no SQL. The store supplies roster rows through
:class:`RosterLookups`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol

from gateway.conversion.facts import facts_of_patient
from gateway.matching.blocking import Shortlist, blocking_keys, prefilter, shortlist
from gateway.matching.household import household_cap
from gateway.matching.model import GRADES, MatchModel
from gateway.matching.people import Person, _col, frequency_terms, person_from_facts, person_from_member
from gateway.matching.scoring import Scored, grade, identity_limit, score, term_weights
from gateway.records import PatientFacts


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
    returns their normalised persons (:func:`~gateway.matching.people.pack_person`) for the prefilter;
    ``members`` returns the rows of the references matching chose to compare.
    ``term_counts`` returns how many current members carry each term
    (:func:`~gateway.matching.people.frequency_terms`) and of how many members
    (0 when the roster keeps no counts: the model's average weights apply).
    """

    def by_mbi(self, mbi: str) -> Iterable[Mapping]: ...

    def by_mrn(self, mrn: str, authority: str) -> Iterable[Mapping]: ...  # roster MRNs and confirmed links

    def blocking_buckets(self, keys: Sequence[str], cap: int) -> Mapping[str, Sequence[Hashable]]: ...

    def persons(self, refs: Sequence[Hashable]) -> Mapping[Hashable, str]: ...

    def members(self, refs: Sequence[Hashable]) -> Iterable[Mapping]: ...

    def term_counts(self, terms: Sequence[str]) -> tuple[Mapping[str, int], int]: ...


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
    terms = frequency_terms(query.person)
    counts, total = lookups.term_counts(terms) if rows else ({}, 0)
    exact = term_weights(query.person, counts, total, model)
    # A given name nobody on the roster has is more likely a slip than another person's name.
    given_term = next((t for t in terms if t.startswith("given:")), "")
    given_is_a_name = not total or not given_term or counts.get(given_term, 0) > 0
    ranked: list[Candidate] = []
    conflicts = identities = 0
    household_limited: dict[str, int] = {}
    household_bits: dict[int, float] = {}
    for row in rows:
        member = person_from_member(row)
        scored = score(query.person, member, model, exact)
        g = grade(scored.total, model)
        limit, why, bits = household_cap(query.person, member, scored, model, given_is_a_name)
        if bits is not None:
            household_bits[id(row)] = bits
        if limit and GRADES.index(g) < GRADES.index(limit):
            g = limit
            household_limited[why] = household_limited.get(why, 0) + 1
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
    if household_limited:
        # How many members household evidence held back, by reason (no names: levels' words only).
        detail["household_limited"] = dict(sorted(household_limited.items()))
    if identities:
        detail["identity_limited"] = identities
    if not shortlisted:
        if ranked:
            detail["best"] = round(ranked[0].scored.total, 2)
        return Match("none", "none", ranked[0].scored.total if ranked else None, None, (), detail)
    best = shortlisted[0]
    detail["fields"] = _audit(best.scored)
    if id(best.member) in household_bits:
        detail["household_bits"] = round(household_bits[id(best.member)], 2)
    if len(shortlisted) > 1 and best.scored.total - shortlisted[1].scored.total < model.ambiguity_margin:
        detail["runner_up"] = round(shortlisted[1].scored.total, 2)
        return Match("possible", "ambiguous", best.scored.total, None, shortlisted, detail)
    return Match(best.grade, "probabilistic", best.scored.total, best.member, shortlisted, detail)
