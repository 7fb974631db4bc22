"""Patient matching: normalisation, field levels, blocking keys, grades and match_patient's rules."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.matching import (
    MAPPINGS_DIR,
    Person,
    blocking_keys,
    compare,
    frequency_terms,
    grade,
    identity_floor_bounds,
    identity_limit,
    load_model,
    make_person,
    match_patient,
    nickname_groups,
    pack_person,
    person_from_member,
    person_from_patient,
    prefilter,
    query_from_patient,
    score,
    shortlist,
)
from gateway.matching import PatientQuery as Query

# Every person below is invented; MBIs follow CMS's published format only.


@pytest.fixture(scope="module")
def model():
    return load_model()


def member(member_id: str, **columns) -> dict:
    """A roster row with the store's columns; unspecified ones empty."""
    row = {
        "aco_id": "ACO-TEST",
        "member_id": member_id,
        "mbi": "",
        "mrn": "",
        "mrn_authority": "",
        "last_name": "",
        "first_name": "",
        "middle_name": "",
        "birth_date": "",
        "sex": "",
        "address_line": "",
        "city": "",
        "state": "",
        "zip": "",
        "phone": "",
        "pcp_npi": "",
        "pcp_name": "",
        "care_manager": "",
        "effective_start": "",
        "effective_end": "",
        "opted_out": 0,
    }
    row.update(columns)
    return row


class MemoryRoster:
    """RosterLookups over a few rows, blocking by a dict index as the store's table does."""

    def __init__(self, rows: list[dict], links: Iterable[tuple[str, str, str]] = ()) -> None:
        self.rows = rows
        self.index: dict[str, list[int]] = defaultdict(list)
        self.terms: Counter[str] = Counter()
        for i, row in enumerate(rows):
            person = person_from_member(row)
            for key in blocking_keys(person):
                self.index[key].append(i)
            self.terms.update(frequency_terms(person))
        self.links = list(links)  # (mrn, authority, member_id) confirmed by a reviewer
        self.calls: list[str] = []

    def by_mbi(self, mbi: str) -> Iterable[Mapping]:
        self.calls.append("mbi")
        return [r for r in self.rows if r["mbi"] == mbi]

    def by_mrn(self, mrn: str, authority: str) -> Iterable[Mapping]:
        self.calls.append("mrn")
        linked = {m for v, a, m in self.links if (v, a) == (mrn, authority)}
        return [r for r in self.rows if (r["mrn"], r["mrn_authority"]) == (mrn, authority) or r["member_id"] in linked]

    def blocking_buckets(self, keys: list[str], cap: int) -> dict[str, list[int]]:
        self.calls.append("blocking")
        return {key: self.index[key][: cap + 1] for key in keys if key in self.index}

    def persons(self, refs: list[int]) -> dict[int, str]:
        return {i: pack_person(person_from_member(self.rows[i])) for i in refs}

    def members(self, refs: list[int]) -> Iterable[Mapping]:
        return [self.rows[i] for i in refs]

    def term_counts(self, terms: list[str]) -> tuple[dict[str, int], int]:
        return {t: self.terms[t] for t in terms if t in self.terms}, len(self.rows)


def query(mbi: str = "", mrns: tuple[tuple[str, str], ...] = (), **person) -> Query:
    return Query(mbi=mbi, mrns=mrns, person=make_person(**person))


ALICE = {
    "first_name": "Alicia",
    "last_name": "Fenwright",
    "middle_name": "Joan",
    "birth_date": "1951-03-14",
    "sex": "F",
    "address_line": "48 Larkspur Lane",
    "city": "Millbrook",
    "state": "OH",
    "zip": "44101",
    "phone": "216-555-0148",
}
ALICE_QUERY = {
    "given": "Alicia",
    "family": "Fenwright",
    "middle": "Joan",
    "birth_date": "1951-03-14",
    "sex": "F",
    "street": "48 Larkspur Ln",
    "city": "Millbrook",
    "state": "OH",
    "zip": "44101-2210",
    "phone": "(216) 555-0148",
}


# -- normalisation ---------------------------------------------------------------


def test_make_person_normalises_each_field():
    """Names fold case, accents and apostrophes; dates become ISO; ZIP keeps 5 digits, phone the last 10."""
    p = make_person(
        given=" zoë ",
        family="O'Brien - Smith",
        middle="j.",
        birth_date="03/14/1951",
        sex="female",
        street="48 Larkspur Street, Apt. 2",
        city="St. Paul",
        state="mn",
        zip="55101-1234",
        phone="+1 (651) 555-0199",
    )
    assert p == Person(
        given="ZOE",
        family="OBRIEN-SMITH",
        middle="J",
        birth_date="1951-03-14",
        sex="F",
        street="48 LARKSPUR ST APT 2",
        city="ST PAUL",
        state="MN",
        zip="55101",
        phone="6515550199",
    )


@pytest.mark.parametrize("raw", ["1951-02-30", "19511314", "14/03/1951x", "unknown", ""])
def test_an_impossible_birth_date_is_left_empty(raw):
    """A birth date that is not a real calendar date is dropped, not guessed."""
    assert make_person(birth_date=raw).birth_date == ""


def test_person_from_patient_reads_official_name_home_address_and_phone():
    """A FHIR Patient gives the official name (other givens as middle), the home address and the phone."""
    patient = {
        "resourceType": "Patient",
        "name": [
            {"use": "maiden", "family": "Oldname", "given": ["Alicia"]},
            {"family": "Fenwright", "given": ["Alicia", "Joan"]},
        ],
        "birthDate": "1951-03-14",
        "gender": "female",
        "address": [
            {"use": "work", "line": ["1 Office Park"], "postalCode": "44199"},
            {"use": "home", "line": ["48 Larkspur Lane"], "city": "Millbrook", "state": "OH", "postalCode": "44101"},
        ],
        "telecom": [{"system": "email", "value": "a@example.org"}, {"system": "phone", "value": "216-555-0148"}],
    }
    assert person_from_patient(patient) == make_person(**{**ALICE_QUERY, "street": "48 Larkspur Lane"})


def test_query_from_patient_separates_mbi_from_mrns():
    """The us-mbi identifier is the MBI (dashes dropped); other identifiers are MRNs with their assigner."""
    patient = {
        "identifier": [
            {"system": "urn:oid:1.2.3", "value": "MRN77", "assigner": {"display": "NRG"}},
            {"system": "http://hl7.org/fhir/sid/us-mbi", "value": "1eg4-te5-mk73"},
            {"system": "urn:oid:9.9", "value": "X1"},
        ],
        "name": [{"family": "Fenwright", "given": ["Alicia"]}],
    }
    q = query_from_patient(patient)
    assert q.mbi == "1EG4TE5MK73"
    assert q.mrns == (("MRN77", "NRG"), ("X1", ""))
    assert (q.person.given, q.person.family) == ("ALICIA", "FENWRIGHT")


def test_person_from_member_reads_missing_columns_as_empty():
    """A roster row without the optional columns still gives a Person."""
    p = person_from_member({"first_name": "Alicia", "last_name": "Fenwright", "birth_date": "1951-03-14", "zip": None})
    assert p == Person(given="ALICIA", family="FENWRIGHT", birth_date="1951-03-14")


# -- field levels ----------------------------------------------------------------


def levels(model, q: dict, c: dict) -> dict[str, str]:
    return compare(make_person(**q), make_person(**c), model)


def test_nickname_is_its_own_level(model):
    """BOB against ROBERT agrees at the nickname level, weaker than exact but positive."""
    lv = levels(model, {"given": "Bob"}, {"given": "Robert"})
    assert lv["given"] == "nickname"
    assert 0 < model.weight("given", "nickname") < model.weight("given", "exact")
    assert "ROBERT" in nickname_groups()["BOBBY"]


def test_transposed_day_and_month_and_one_digit_off(model):
    """Day and month swapped, and one digit mistyped, are levels of their own with positive weight."""
    assert levels(model, {"birth_date": "1951-03-14"}, {"birth_date": "1951-03-14"})["birth_date"] == "exact"
    assert levels(model, {"birth_date": "1951-04-03"}, {"birth_date": "1951-03-04"})["birth_date"] == "transposed"
    assert levels(model, {"birth_date": "1951-03-14"}, {"birth_date": "1957-03-14"})["birth_date"] == "one_digit"
    assert levels(model, {"birth_date": "1951-03-14"}, {"birth_date": "1915-03-14"})["birth_date"] == "one_digit"
    assert levels(model, {"birth_date": "1951-03-14"}, {"birth_date": "1948-11-02"})["birth_date"] == "disagree"
    for level in ("transposed", "one_digit"):
        assert 0 < model.weight("birth_date", level) < model.weight("birth_date", "exact")


def test_hyphenated_surname_agrees_with_either_part(model):
    """GARCIA-LOPEZ against GARCIA or LOPEZ (or GARCIA LOPEZ) is a compound agreement."""
    for other in ("Garcia", "Lopez", "Garcia Lopez"):
        assert levels(model, {"family": "García-López"}, {"family": other})["family"] in ("compound", "exact")
    assert levels(model, {"family": "Garcia-Lopez"}, {"family": "Garcia Lopez"})["family"] == "exact"
    assert levels(model, {"family": "Garcia-Lopez"}, {"family": "Lopez"})["family"] == "compound"
    assert model.weight("family", "compound") > 0


def test_typos_grade_close_or_similar(model):
    """A one-letter typo is close; a sound-alike spelling similar; a different name disagrees."""
    assert levels(model, {"family": "Fenwright"}, {"family": "Fenwrihgt"})["family"] == "close"
    assert levels(model, {"given": "Mia"}, {"given": "Mai"})["given"] == "similar"
    assert levels(model, {"family": "Fenwright"}, {"family": "Castellano"})["family"] == "disagree"


def test_swapped_given_and_family_names(model):
    """Given and family entered the wrong way round score as one 'swapped' agreement, not two disagreements."""
    lv = levels(model, {"given": "Fenwright", "family": "Alicia"}, {"given": "Alicia", "family": "Fenwright"})
    assert (lv["given"], lv["family"]) == ("swapped", "swapped")
    assert model.weight("given", "swapped") > 0
    assert model.weight("family", "swapped") == 0  # the given field carries the evidence of both


def test_missing_fields_weigh_nothing(model):
    """A field empty on either side is 'missing' with weight 0; a disagreement weighs negative."""
    s = score(
        make_person(given="Alicia", family="Fenwright"), make_person(given="Alicia", birth_date="1951-03-14"), model
    )
    by_field = {f.field: f for f in s.fields}
    assert by_field["family"].level == "missing" and by_field["family"].weight == 0
    assert by_field["birth_date"].level == "missing" and by_field["birth_date"].weight == 0
    assert s.total == pytest.approx(model.weight("given", "exact"))
    assert model.weight("birth_date", "disagree") < 0


def test_score_is_symmetric_for_symmetric_levels(model):
    """Comparing A with B gives the same total as B with A."""
    a = make_person(**ALICE_QUERY)
    b = make_person(**{**ALICE_QUERY, "given": "Alica", "birth_date": "1951-14-03", "zip": "44110"})
    assert score(a, b, model).total == score(b, a, model).total


# -- the address as one comparison ------------------------------------------------

HOME = {"street": "1761 Heron Rd", "city": "Ravenholt", "state": "KY", "zip": "17447"}


@pytest.mark.parametrize(
    "other,expected",
    [
        (HOME, "house"),
        ({**HOME, "street": "1761 Heron Road"}, "house"),  # normalised: ROAD -> RD
        ({**HOME, "street": "1716 Heron Rd"}, "house"),  # a typo in the number
        ({**HOME, "street": "1761 Herron Dr"}, "house"),  # similar street line, same number
        ({**HOME, "street": "4976 Heron Drive"}, "street"),  # the same street name, another house
        ({**HOME, "street": "22 Copper Ct"}, "zip"),
        ({**HOME, "street": "22 Copper Ct", "zip": "17448"}, "town"),  # ZIP one digit off
        ({**HOME, "street": "22 Copper Ct", "zip": "60601", "city": "Ravenholt"}, "town"),
        ({**HOME, "zip": "60601", "city": "Belmere"}, "street_elsewhere"),
        ({"street": "22 Copper Ct", "city": "Belmere", "state": "KY", "zip": "60601"}, "state"),
        ({"street": "22 Copper Ct", "city": "Belmere", "state": "OH", "zip": "60601"}, "disagree"),
        ({"zip": "17447"}, "zip"),
        ({"phone": "2165550148"}, "missing"),
        # A second line on one side only (a unit, a building, an estate): the street still agrees.
        ({**HOME, "street": "1761 Heron Rd Bayview Apartments"}, "house"),
        ({**HOME, "street": "1761 Herron Rd Unit 4B"}, "house"),  # and a typo in the name
        ({**HOME, "street": "4976 Heron Rd Bayview Apartments"}, "street"),  # another number: a neighbour
        ({**HOME, "street": "1761 Copper Ct Heron Village"}, "zip"),  # the same number on another street
        ({**HOME, "street": "1761"}, "zip"),  # a number alone names no street
    ],
)
def test_address_is_graded_at_the_finest_place_both_share(model, other, expected):
    """House, street, ZIP, town, a like street elsewhere, state: the finest agreement is the address's level."""
    assert levels(model, HOME, other)["address"] == expected


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ("8 CAHALAN PL", "8 CAHALAN PL IRON SHOE LODGE", "close"),
        ("12 MAPLE ST", "12 MAPLEWOOD DR", "disagree"),  # a name's prefix is another street
        ("12 OAK ST BRIARWOOD ESTATE", "12 OAKS LN", "disagree"),  # short names must agree exactly
        ("30 VOGELSANG PL", "30 VOGELSNAG PL ALBION HEIGHTS", "close"),  # a typo in a long name
        ("30 VOGELSANG PL", "31 VOGELSANG PL ALBION HEIGHTS", "similar"),
        ("BAYVIEW TERRACE", "BAYVIEW ST HARBOUR ESTATE", "disagree"),  # no house number: no street name
        ("8 CAHALAN", "8 CAHALAN PL IRON SHOE LODGE", "close"),  # the type left out on one side
        ("12 5TH AVE", "12 5TH ST APT 3", "disagree"),  # two street types: two streets
        ("12 N MAIN ST", "12 N ELM ST BLDG 2", "disagree"),  # a directional is part of the name
        ("12 ST KILDA RD", "12 ST GEORGES RD UNIT 4", "disagree"),  # and so is a short prefix
        ("12 N MAIN ST", "12 N MAIN ST REAR", "close"),
    ],
)
def test_street_line_with_a_second_line_on_one_side(model, a, b, expected):
    """The same house number and street name agree, whatever one line adds after them."""
    assert levels(model, {"street": a}, {"street": b})["street"] == expected


def test_the_shipped_identity_floor_lies_in_its_derived_interval(model):
    """The floor is above one name agreeing against the other two fields and below the birth date
    agreeing against both names (gateway.matching.identity_floor_bounds; bench/fit_weights.py)."""
    low, high = identity_floor_bounds(model)
    assert low < model.identity_floor <= high
    # The interval's ends are the sums they claim to be.
    w = model.weight
    assert high == pytest.approx(w("birth_date", "exact") + w("given", "disagree") + w("family", "disagree"))
    assert low >= w("family", "exact") + w("given", "disagree") + w("birth_date", "disagree")
    assert low >= w("given", "exact") + w("family", "disagree")


def test_the_address_counts_once_however_many_parts_agree(model):
    """Same ZIP with or without the same town and state weighs the same: they add no independent evidence."""
    q = make_person(given="Yusuf", **HOME)
    only_zip = score(q, make_person(given="Yusuf", street="22 Copper Ct", zip="17447"), model)
    zip_town_state = score(q, make_person(given="Yusuf", **{**HOME, "street": "22 Copper Ct"}), model)
    assert (
        only_zip.total
        == zip_town_state.total
        == pytest.approx(model.weight("given", "exact") + model.weight("address", "zip"))
    )
    assert [f.field for f in only_zip.fields] == ["given", "family", "middle", "birth_date", "sex", "address", "phone"]
    # The finer the place, the stronger the evidence; a like street in another town is weak.
    w = {lv: model.weight("address", lv) for lv in ("house", "street", "zip", "town", "street_elsewhere", "state")}
    assert w["house"] > w["street"] > w["zip"] > w["town"] > 0
    assert w["street_elsewhere"] < w["zip"] and w["state"] < 0


# -- blocking --------------------------------------------------------------------


def test_blocking_keys_are_pinned():
    """The keys of a fixed person are exactly these (stored keys go stale if this recipe changes)."""
    keys = blocking_keys(make_person(**ALICE_QUERY))
    assert keys == [
        "d:19510314",
        "n:A420|F562",
        "fz:F562|44101",
        "fy:F562|1951",
        "gd:A420|0314",
        "gz:A420|44101",
        "iz:AF|44101",
        "sz:48|44101",
    ]


def test_blocking_keys_ignore_spelling_of_case_accents_and_punctuation():
    """Raw spellings that normalise alike give the same keys."""
    a = make_person(given="Zoë", family="O'Brien", birth_date="1961-09-30", zip="02139")
    b = make_person(given="ZOE", family="obrien", birth_date="19610930", zip="02139-0001")
    assert blocking_keys(a) == blocking_keys(b)


@pytest.mark.parametrize(
    "variant",
    [
        {"given": "Bob"},  # nickname
        {"given": "Roberts", "family": "Robert"},  # swapped and typo'd
        {"family": "Kowalczyk-Nowak"},  # hyphenated
        {"birth_date": "1949-12-07"},  # transposed date
        {"family": "Kowalcyzk", "birth_date": ""},  # typo and no date
        {"zip": "", "birth_date": "1948-07-12"},  # one digit off and no ZIP
    ],
)
def test_blocking_keys_survive_common_errors(variant):
    """A person and a variant of them with a typical error share at least one key."""
    base = {"given": "Robert", "family": "Kowalczyk", "birth_date": "1949-07-12", "zip": "60614", "street": "9 Elm St"}
    assert set(blocking_keys(make_person(**base))) & set(blocking_keys(make_person(**{**base, **variant})))


def test_no_demographics_no_keys():
    """A person with nothing to compare gets no blocking key (a lookup would scan)."""
    assert blocking_keys(Person()) == []
    assert blocking_keys(make_person(sex="F", state="OH")) == []


# -- grades and the model --------------------------------------------------------


def test_grade_thresholds_and_overrides(model):
    """Totals grade by the model's thresholds; load_model's overrides replace them."""
    assert grade(model.certain, model) == "certain"
    assert grade(model.probable, model) == "probable"
    assert grade(model.possible, model) == "possible"
    assert grade(model.possible - 0.01, model) == "none"
    strict = load_model(certain=1000, probable=999, possible=998)
    assert grade(model.certain, strict) == "none"


def test_thresholds_follow_roster_size_and_posteriors(model):
    """Each threshold is log2(roster_size / on_roster_share) + log2(p/(1-p)); a 20x bigger roster adds log2(20)."""
    import math

    assert model.probable == pytest.approx(
        math.log2(model.roster_size / model.on_roster_share) + math.log2(999), abs=0.01
    )
    small = load_model(roster_size=5_000)
    big = load_model(roster_size=100_000)
    for name in ("certain", "probable", "possible"):
        assert getattr(big, name) - getattr(small, name) == pytest.approx(math.log2(20), abs=0.02)


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda t: t.replace("certain_posterior = ", "certain_posterior = 0.5 #"), "certain >= probable"),
        (lambda t: t.replace("levels.transposed", "levels.reversed"), "transposed"),
        (lambda t: t + "\n[similarity]\nname_close = 0.9\n", ""),
        (lambda t: t.replace("levels.exact = { m = ", "levels.exact = { m = 1.5, x = "), "m and u"),
        (lambda t: t.replace("probable_posterior = ", "probable_posterior = 'high' #"), "probable_posterior"),
        (lambda t: t.replace("roster_size = ", "roster_size = 0 #"), "roster_size"),
        (lambda t: t + '\n[household]\nboth_differ = "possible"\n', "[household] moved to household.toml"),
        (lambda t: t.replace("[identity]\nfloor = ", "[identity]\nfloor = 'high' #"), "identity.floor"),
        (lambda t: t.replace('best_grade = "possible"', 'best_grade = "maybe"'), "identity.best_grade"),
        (lambda t: t.replace("[identity]\n", "[identity]\nceiling = 3\n"), "identity: unknown key"),
        (lambda t: t.replace("levels.street_elsewhere", "levels.street_far"), "address.levels.street_elsewhere"),
        (lambda t: t.replace("max_compared = ", "max_compared = 0 #"), "blocking.max_compared"),
        (lambda t: t.replace("max_bucket = ", "max_bucket = 'big' #"), "blocking.max_bucket"),
    ],
)
def test_bad_model_files_name_the_problem(tmp_path, edit, reason):
    """A malformed matching.toml is refused with a ConfigError naming the key."""
    path = tmp_path / "matching.toml"
    path.write_text(edit((MAPPINGS_DIR / "matching.toml").read_text()))
    with pytest.raises(ConfigError) as e:
        load_model(path)
    assert reason in str(e.value)


def test_unknown_override_and_missing_file_are_refused(tmp_path):
    """Only the threshold names are overridable; a missing file is named."""
    with pytest.raises(ConfigError, match="unknown override"):
        load_model(probabl=3)
    with pytest.raises(ConfigError, match="not found"):
        load_model(tmp_path / "nope.toml")


# -- match_patient ---------------------------------------------------------------


def test_exact_demographics_match_certain(model):
    """Every field agreeing grades certain, method probabilistic, with the member chosen."""
    roster = MemoryRoster(
        [member("M-1", **ALICE), member("M-2", **{**ALICE, "first_name": "Bernadette", "birth_date": "1938-11-02"})]
    )
    m = match_patient(query(**ALICE_QUERY), "2026-03-01", roster, model)
    assert (m.grade, m.method, m.member_id, m.matched) == ("certain", "probabilistic", "M-1", True)
    assert m.candidates[0].member["member_id"] == "M-1"
    assert "Alicia" not in repr(m.detail) and "1951" not in repr(m.detail)  # no PHI in the audit detail


def test_determinism_first_mbi_beats_demographics(model):
    """An MBI on the roster wins (certain) even when the demographics point at someone else."""
    roster = MemoryRoster(
        [member("M-1", **ALICE), member("M-2", mbi="1EG4TE5MK73", first_name="Ruth", last_name="Okafor")]
    )
    m = match_patient(query(mbi="1EG4TE5MK73", **ALICE_QUERY), "2026-03-01", roster, model)
    assert (m.grade, m.method, m.member_id) == ("certain", "mbi", "M-2")
    assert "blocking" not in roster.calls


def test_mrn_with_authority_and_confirmed_link(model):
    """An MRN matches only with its assigning authority; a reviewer's confirmed link counts the same."""
    roster = MemoryRoster(
        [member("M-1", mrn="MRN9", mrn_authority="NRG"), member("M-2", first_name="Ruth")],
        links=[("X77", "PCH", "M-2")],
    )
    assert match_patient(query(mrns=(("MRN9", "NRG"),)), "", roster, model).member_id == "M-1"
    assert match_patient(query(mrns=(("MRN9", "PCH"),)), "", roster, model).grade == "none"
    linked = match_patient(query(mrns=(("X77", "PCH"),)), "", roster, model)
    assert (linked.grade, linked.method, linked.member_id) == ("certain", "mrn", "M-2")
    assert "mbi" not in roster.calls  # no MBI in the query, no MBI lookup


def test_two_members_with_one_mbi_is_ambiguous(model):
    """Two effective members under one identifier: possible, ambiguous, no member chosen."""
    roster = MemoryRoster([member("M-1", mbi="1EG4TE5MK73"), member("M-2", mbi="1EG4TE5MK73", aco_id="ACO-OTHER")])
    m = match_patient(query(mbi="1EG4TE5MK73"), "2026-03-01", roster, model)
    assert (m.grade, m.method, m.member, m.matched) == ("possible", "ambiguous", None, False)
    assert len(m.candidates) == 2


def test_near_identical_members_are_ambiguous_not_guessed(model):
    """Two members scoring within the ambiguity margin give possible with both candidates, no member."""
    roster = MemoryRoster([member("M-1", **ALICE), member("M-2", **{**ALICE, "phone": "", "middle_name": ""})])
    m = match_patient(query(**{**ALICE_QUERY, "phone": "", "middle": ""}), "2026-03-01", roster, model)
    assert (m.grade, m.method, m.member) == ("possible", "ambiguous", None)
    assert {c.member["member_id"] for c in m.candidates} == {"M-1", "M-2"}


def test_effective_dates_apply_to_every_rule(model):
    """A member whose attribution period does not cover the encounter is not matched, by MBI or demographics."""
    row = member("M-1", mbi="1EG4TE5MK73", effective_start="2026-01-01", effective_end="2026-06-30", **ALICE)
    roster = MemoryRoster([row])
    assert match_patient(query(mbi="1EG4TE5MK73"), "2026-03-01", roster, model).member_id == "M-1"
    assert match_patient(query(mbi="1EG4TE5MK73"), "2026-07-01", roster, model).grade == "none"
    assert match_patient(query(**ALICE_QUERY), "2025-12-31", roster, model).grade == "none"
    assert match_patient(query(**ALICE_QUERY), "2026-06-30", roster, model).member_id == "M-1"


def test_mbi_naming_someone_else_caps_the_grade(model):
    """Demographics agreeing with a member whose MBI differs from the message's are at best possible."""
    roster = MemoryRoster([member("M-1", mbi="2EG4TE5MK74", **ALICE)])
    m = match_patient(query(mbi="1EG4TE5MK73", **ALICE_QUERY), "2026-03-01", roster, model)
    assert m.grade == model.identifier_conflict_grade == "possible"
    assert m.member_id == "M-1" and m.detail["mbi_conflicts"] == 1


def test_no_demographics_and_no_identifiers_match_nobody(model):
    """A query with nothing usable is 'none' with the reason, not a roster scan."""
    roster = MemoryRoster([member("M-1", **ALICE)])
    m = match_patient(query(sex="F"), "2026-03-01", roster, model)
    assert (m.grade, m.method, m.member) == ("none", "none", None)
    assert roster.calls == []


def test_opted_out_members_are_still_matched(model):
    """Opting out is a routing decision: matching still finds the member."""
    roster = MemoryRoster([member("M-1", opted_out=1, **ALICE)])
    assert match_patient(query(**ALICE_QUERY), "2026-03-01", roster, model).member_id == "M-1"


# -- a fixed synthetic set with expected grades ----------------------------------

#: (case, changes to the query, expected grade, expected member). The roster is
#: ROSTER below, graded with the default thresholds (a roster of 100,000): there,
#: name and birth date alone are not enough for probable. Every person is invented.
ROSTER = [
    member("S-1", **ALICE),
    member(
        "S-2",
        first_name="William",
        last_name="Oduya-Baptiste",
        birth_date="1947-11-05",
        sex="M",
        address_line="7 Quarry Road",
        city="Fernvale",
        state="OH",
        zip="44230",
    ),
    member("S-3", first_name="Marisol", last_name="Quenneville", birth_date="1962-06-09", sex="F", zip="44113"),
    member(
        "S-4",
        first_name="Desmond",
        last_name="Achterberg",
        birth_date="1939-02-27",
        sex="M",
        address_line="311 Birch Ave",
        zip="44120",
    ),
    member(
        "S-5",
        first_name="Desiree",
        last_name="Achterberg",
        birth_date="1941-08-16",
        sex="F",
        address_line="311 Birch Ave",
        zip="44120",
    ),
]
WILLIAM = {
    "given": "William",
    "family": "Oduya-Baptiste",
    "birth_date": "1947-11-05",
    "sex": "M",
    "street": "7 Quarry Rd",
    "city": "Fernvale",
    "state": "OH",
    "zip": "44230",
}
CASES = [
    ("all fields agree", ALICE_QUERY, "certain", "S-1"),
    (
        # A move changes address and phone together: the phone's disagreement is not counted again.
        "new address and phone",
        {**ALICE_QUERY, "street": "2 Harbor View", "city": "Lakeside", "zip": "44870", "phone": "4195550100"},
        "probable",
        "S-1",
    ),
    ("nickname, one part of the surname", {**WILLIAM, "given": "Bill", "family": "Baptiste"}, "certain", "S-2"),
    (
        "day and month swapped, no address",
        {"given": "Marisol", "family": "Quenneville", "birth_date": "1962-09-06", "sex": "F"},
        "possible",
        "S-3",
    ),
    ("typo in surname, no middle name", {**ALICE_QUERY, "family": "Fenwrigth", "middle": ""}, "certain", "S-1"),
    ("names swapped", {**WILLIAM, "given": "Oduya-Baptiste", "family": "William"}, "certain", "S-2"),
    (
        "name and birth date only",
        {"given": "Desmond", "family": "Achterberg", "birth_date": "1939-02-27"},
        "possible",
        "S-4",
    ),
    (
        "household member: same surname and address, other person",
        {
            "given": "Dominic",
            "family": "Achterberg",
            "birth_date": "1972-04-30",
            "street": "311 Birch Ave",
            "zip": "44120",
        },
        "none",  # born a generation after both members: a child of the house, not a member
        None,
    ),
    (
        "same name, different birth date and ZIP: another person",
        {"given": "Marisol", "family": "Quenneville", "birth_date": "1980-01-22", "zip": "97201"},
        "none",
        None,
    ),
    ("stranger", {"given": "Teodora", "family": "Lindqvist", "birth_date": "1958-10-10", "zip": "44101"}, "none", None),
]


@pytest.mark.parametrize("case,changes,expected,member_id", CASES, ids=[c[0] for c in CASES])
def test_synthetic_cases_grade_as_expected(model, case, changes, expected, member_id):
    """Each invented case gets the grade and member a reviewer would expect."""
    m = match_patient(query(**changes), "2026-03-01", MemoryRoster(ROSTER), model)
    assert (m.grade, m.member_id) == (expected, member_id), (case, m.score, m.detail)


def test_a_smaller_roster_needs_less_evidence():
    """Name and birth date alone are possible on a 100,000-member roster but probable on a 5,000-member one."""
    q = query(given="Desmond", family="Achterberg", birth_date="1939-02-27")
    assert match_patient(q, "2026-03-01", MemoryRoster(ROSTER), load_model(roster_size=100_000)).grade == "possible"
    assert match_patient(q, "2026-03-01", MemoryRoster(ROSTER), load_model(roster_size=5_000)).grade == "probable"


# The stranger the lead found among the pipeline bench's synthetic patients (invented people).
NEIGHBOUR = member(
    "N-1",
    first_name="Yusuf",
    last_name="Mabridge",
    middle_name="P",
    birth_date="1928-01-25",
    sex="M",
    address_line="4976 Heron Drive",
    city="Ravenholt",
    state="KY",
    zip="17447",
    phone="3485551829",
)
STRANGER = {
    "given": "Yusuf",
    "family": "Nevton",
    "middle": "F",
    "birth_date": "1976-02-17",
    "sex": "M",
    "street": "1761 Heron Rd",
    "city": "Ravenholt",
    "state": "KY",
    "zip": "17447",
    "phone": "8685557596",
}


@pytest.mark.parametrize("roster_size", [10_000, 1_000_000])
def test_a_same_named_neighbour_with_another_surname_and_birth_date_is_not_matched(roster_size):
    """Same given name, street name and ZIP, other surname and birth date: not matched (was probable, 25.7 bits)."""
    model = load_model(roster_size=roster_size)
    m = match_patient(query(**STRANGER), "2026-03-01", MemoryRoster([NEIGHBOUR]), model)
    assert (m.grade, m.member_id) == ("none", None), m.score
    assert m.score < model.possible
    scored = score(query(**STRANGER).person, person_from_member(NEIGHBOUR), model)
    assert (scored.level("address"), scored.total) == ("street", m.score)


def test_the_place_alone_never_makes_a_match_probable():
    """Given name, house and phone agreeing but surname and birth date not: not matched, even on a roster so
    small that the total would be certain (the household test; the identity floor would cap it at possible)."""
    model = load_model(roster_size=20)
    housemate = {**STRANGER, "street": "4976 Heron Drive", "phone": "3485551829", "middle": "", "sex": ""}
    scored = score(query(**housemate).person, person_from_member(NEIGHBOUR), model)
    assert grade(scored.total, model) == "certain"
    assert identity_limit(scored, model) == "possible"
    m = match_patient(query(**housemate), "2026-03-01", MemoryRoster([NEIGHBOUR]), model)
    assert (m.grade, m.detail["household_limited"]) == ("none", {"household": 1})
    # Given name and birth date agreeing are identity enough for the floor, and no relative living there
    # shares both (the household test): the surname is the slip.
    same = {**housemate, "birth_date": "1928-01-25"}
    m = match_patient(query(**same), "2026-03-01", MemoryRoster([NEIGHBOUR]), model)
    assert m.grade == "certain" and "identity_limited" not in m.detail and "household_limited" not in m.detail


def test_the_identity_floor_sums_given_family_and_birth_date(model):
    """The floor compares given + family + birth date weights (the place and phone do not count) with its bits."""
    q = make_person(given="Yusuf", family="Nevton", birth_date="1976-02-17", zip="17447", phone="8685557596")
    c = make_person(given="Yusuf", family="Mabridge", birth_date="1928-01-25", zip="17447", phone="8685557596")
    scored = score(q, c, model)
    evidence = sum(
        model.weight(f, lv) for f, lv in (("given", "exact"), ("family", "disagree"), ("birth_date", "disagree"))
    )
    assert evidence < model.identity_floor
    assert identity_limit(scored, model) == model.identity_best_grade == "possible"
    same_birth = score(q, make_person(given="Yusuf", family="Mabridge", birth_date="1976-02-17"), model)
    assert identity_limit(same_birth, model) is None


def test_person_is_a_frozen_value():
    """Person is immutable and compares by value."""
    p = make_person(given="Alicia")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.given = "X"  # type: ignore[misc]
    assert p == make_person(given="ALICIA")


@pytest.mark.parametrize(
    "text,message",
    [
        ("word,abbreviation,kind\nSTREET,ST,road\n", "kind must be type, directional or unit, not ROAD"),
        ("word,abbreviation\nSTREET,ST\n", "the header must have columns abbreviation, kind"),
        ("word,abbreviation,kind\nSTREET,ST,\n", "line 2: abbreviation and kind are required"),
    ],
)
def test_a_bad_street_abbreviations_file_is_named(tmp_path, monkeypatch, text, message):
    """A street word's kind that is not type/directional/unit, or a missing kind column, is a ConfigError."""
    import gateway.matching.people as matching

    (tmp_path / "street_abbreviations.csv").write_text(text)
    monkeypatch.setattr(matching, "MAPPINGS_DIR", tmp_path)
    matching.street_word_kinds.cache_clear()
    try:
        with pytest.raises(ConfigError, match=message):
            matching.street_word_kinds()
    finally:
        monkeypatch.undo()
        matching.street_word_kinds.cache_clear()
    assert matching.street_word_kinds()["AVE"] == "type"


def test_mapping_files_exist():
    """The model and its reference tables are in mappings/."""
    for name in ("matching.toml", "nicknames.csv", "street_abbreviations.csv"):
        assert (Path(MAPPINGS_DIR) / name).is_file()


# -- blocking at scale: shortlist and prefilter -----------------------------------

GIVEN_NAMES = ["Bruno", "Clara", "Dorian", "Elsa", "Felix", "Gemma", "Hugo", "Iris", "Jonas", "Katya"]


def born_with_alice(n: int) -> dict:
    """A member who shares Alice's birth date (the broad ``d:`` key) and nothing else."""
    return member(
        f"D-{n:03d}",
        first_name=GIVEN_NAMES[n % 10],
        last_name=f"Quorrington{'abcdefghij'[n // 10 % 10]}",
        birth_date="1951-03-14",
        address_line=f"{100 + n} Harbor Way",
        city="Stonebridge",
        state="IN",
        zip=f"{46000 + n:05d}",
    )


def test_shortlist_ranks_members_by_the_evidence_of_shared_keys():
    """A member sharing a key few others have ranks above members sharing only a broad key."""
    buckets = {"d:19510314": [1, 2, 3, 4, 5, 9], "fz:F563|44101": [9], "sz:48|44101": [9, 7]}
    short = shortlist(buckets, load_model(roster_size=1_000_000, max_prefiltered=3))
    assert short.refs[:2] == (9, 7) and len(short.refs) == 3
    assert (short.blocked, short.over_full) == (7, 0)


def test_over_full_buckets_are_skipped_and_counted():
    """A key with more members than max_bucket is not used (it would cost most and say least)."""
    buckets = {"d:19510314": list(range(1, 7)), "fz:F563|44101": [9]}
    short = shortlist(buckets, load_model(max_bucket=5))
    assert (short.refs, short.blocked, short.over_full) == ((9,), 1, 1)


def test_prefilter_ranks_exact_and_near_agreement_first():
    """The prefilter puts the member agreeing (exactly or nearly) on most fields first, whatever the order given."""
    model = load_model()
    true = pack_person(make_person(**{**ALICE_QUERY, "given": "Alicai", "family": "Fenwrite", "zip": "44110"}))
    strangers = {n: pack_person(person_from_member(born_with_alice(n))) for n in range(20)}
    order = prefilter(make_person(**ALICE_QUERY), {**strangers, 99: true}, [*strangers, 99], model)
    assert order[0] == 99


def test_a_corrupted_member_sharing_only_its_birth_date_is_still_compared():
    """Among 60 members born the same day, a true match whose names (their Soundex too) and ZIP are
    mistyped shares only the birth-date key; the prefilter still puts it among the 4 compared."""
    rows = [born_with_alice(n) for n in range(60)]
    rows.insert(37, member("S-1", **ALICE))
    corrupted = {**ALICE_QUERY, "given": "Elicia", "family": "Venwright", "zip": "44110", "phone": ""}
    shared = set(blocking_keys(make_person(**corrupted))) & set(blocking_keys(person_from_member(rows[37])))
    assert shared == {"d:19510314"}
    roster = MemoryRoster(rows)
    few = load_model(roster_size=100_000, max_compared=4)
    everyone = load_model(roster_size=100_000, max_compared=1000, max_prefiltered=1000)
    found = match_patient(query(**corrupted), "2026-03-01", roster, few)
    assert (found.grade, found.member_id) == ("certain", "S-1"), found.detail
    assert found.detail["compared"] == 4 and found.detail["blocked"] == 61
    full = match_patient(query(**corrupted), "2026-03-01", roster, everyone)
    assert (full.grade, full.member_id, full.score) == (found.grade, found.member_id, found.score)
