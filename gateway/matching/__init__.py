"""Roster matching: find a message's patient on the attribution roster.

The public API is re-exported here (``from gateway.matching import match_patient, load_model``);
each module holds one concern:

- :mod:`~gateway.matching.people`: :class:`Person`, the normalisers, and the reference data they read
  (nicknames, street abbreviations);
- :mod:`~gateway.matching.model`: the matching model (:class:`MatchModel`, :func:`load_model`) and its grades;
- :mod:`~gateway.matching.blocking`: blocking keys, the shortlist and the prefilter;
- :mod:`~gateway.matching.scoring`: field comparison levels, :func:`compare`, :func:`score`, :func:`grade`
  and the identity floor;
- :mod:`~gateway.matching.household`: telling a member from a relative sharing the home, and the
  evidence that two records are two people (:func:`household_cap`);
- :mod:`~gateway.matching.match`: :func:`match_patient`, its query and result, and the roster reads it needs
  (:class:`RosterLookups`);
- :mod:`~gateway.matching.roster`: roster file formats (imported from there, not re-exported).
"""

from gateway.matching.blocking import BLOCKING_RECIPE, Shortlist, blocking_keys, prefilter, shortlist
from gateway.matching.household import another_person, household_cap, household_levels, shares_home
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
from gateway.matching.model import (
    GRADES,
    HOUSEHOLD_LEVELS,
    LEVELS,
    FieldModel,
    HouseholdModel,
    MatchModel,
    load_household,
    load_model,
)
from gateway.matching.people import (
    FIELDS,
    FREQUENCY_FIELDS,
    MAPPINGS_DIR,
    PACKED_FIELDS,
    Person,
    frequency_terms,
    make_person,
    name_variants,
    nickname_groups,
    normalise_date,
    normalise_name,
    normalise_street,
    normalise_suffix,
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
    identity_floor_bounds,
    identity_limit,
    score,
    term_weights,
)

__all__ = [
    # people
    "FIELDS",
    "FREQUENCY_FIELDS",
    "MAPPINGS_DIR",
    "PACKED_FIELDS",
    "Person",
    "frequency_terms",
    "make_person",
    "name_variants",
    "nickname_groups",
    "normalise_date",
    "normalise_name",
    "normalise_street",
    "normalise_suffix",
    "pack_person",
    "person_from_facts",
    "person_from_member",
    "person_from_patient",
    "street_abbreviations",
    "street_word_kinds",
    "unpack_person",
    # model
    "GRADES",
    "HOUSEHOLD_LEVELS",
    "LEVELS",
    "FieldModel",
    "HouseholdModel",
    "MatchModel",
    "load_household",
    "load_model",
    # blocking
    "BLOCKING_RECIPE",
    "Shortlist",
    "blocking_keys",
    "prefilter",
    "shortlist",
    # household
    "another_person",
    "household_cap",
    "household_levels",
    "shares_home",
    # scoring
    "IDENTITY",
    "SCORED",
    "FieldComparison",
    "Scored",
    "address_level",
    "compare",
    "grade",
    "identity_floor_bounds",
    "identity_limit",
    "score",
    "term_weights",
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
