"""Roster matching: find a message's patient on the attribution roster.

The public API is re-exported here (``from gateway.matching import match_patient, load_model``);
each module holds one concern:

- :mod:`~gateway.matching.people`: :class:`Person`, the normalisers, and the reference data they read
  (nicknames, street abbreviations);
- :mod:`~gateway.matching.model`: the matching model (:class:`MatchModel`, :func:`load_model`) and its grades;
- :mod:`~gateway.matching.blocking`: blocking keys, the shortlist and the prefilter;
- :mod:`~gateway.matching.scoring`: field comparison levels, :func:`compare`, :func:`score`, :func:`grade`
  and the household and identity limits;
- :mod:`~gateway.matching.match`: :func:`match_patient`, its query and result, and the roster reads it needs
  (:class:`RosterLookups`);
- :mod:`~gateway.matching.roster`: roster file formats (imported from there, not re-exported).
"""

from gateway.matching.blocking import BLOCKING_RECIPE, Shortlist, blocking_keys, prefilter, shortlist
from gateway.matching.match import (
    Candidate,
    Match,
    PatientQuery,
    RosterLookups,
    is_effective,
    match_patient,
    members_to_compare,
    query_from_facts,
    query_from_patient,
)
from gateway.matching.model import GRADES, LEVELS, FieldModel, MatchModel, load_model
from gateway.matching.people import (
    FIELDS,
    MAPPINGS_DIR,
    Person,
    make_person,
    nickname_groups,
    normalise_date,
    normalise_name,
    normalise_street,
    pack_person,
    person_from_facts,
    person_from_member,
    person_from_patient,
    street_abbreviations,
    street_word_kinds,
    unpack_person,
)
from gateway.matching.scoring import (
    IDENTITY,
    SCORED,
    FieldComparison,
    Scored,
    address_level,
    compare,
    grade,
    household_limit,
    identity_floor_bounds,
    identity_limit,
    score,
)

__all__ = [
    # people
    "FIELDS",
    "MAPPINGS_DIR",
    "Person",
    "make_person",
    "nickname_groups",
    "normalise_date",
    "normalise_name",
    "normalise_street",
    "pack_person",
    "person_from_facts",
    "person_from_member",
    "person_from_patient",
    "street_abbreviations",
    "street_word_kinds",
    "unpack_person",
    # model
    "GRADES",
    "LEVELS",
    "FieldModel",
    "MatchModel",
    "load_model",
    # blocking
    "BLOCKING_RECIPE",
    "Shortlist",
    "blocking_keys",
    "prefilter",
    "shortlist",
    # scoring
    "IDENTITY",
    "SCORED",
    "FieldComparison",
    "Scored",
    "address_level",
    "compare",
    "grade",
    "household_limit",
    "identity_floor_bounds",
    "identity_limit",
    "score",
    # match
    "Candidate",
    "Match",
    "PatientQuery",
    "RosterLookups",
    "is_effective",
    "match_patient",
    "members_to_compare",
    "query_from_facts",
    "query_from_patient",
]
