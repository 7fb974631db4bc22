"""Matching that knows households: a relative of a member is never routed as the member.

Every person here is invented. The roster is small, so the probabilistic
grades are those of a small roster; what these tests hold is the household
evidence: twins, spouses, parents and children, Jr and Sr are not routed, and
members with ordinary registration errors still are.
"""

from __future__ import annotations

import json

import pytest
from test_matching import MemoryRoster, member, query

from gateway.errors import ConfigError
from gateway.matching import (
    MAPPINGS_DIR,
    compare,
    frequency_terms,
    load_household,
    load_model,
    make_person,
    match_patient,
    normalise_suffix,
    term_weights,
)
from gateway.matching.household import rhymes

ON = "2026-03-01"
ROUTED = ("certain", "probable")

# The Calloway-Brandt household: Harold (a member) and his wife Maureen live at one house with one phone.
HAROLD = {
    "first_name": "Harold",
    "middle_name": "Eugene",
    "last_name": "Calloway",
    "birth_date": "1948-05-17",
    "sex": "M",
    "address_line": "212 Wrenfield Road",
    "city": "Ashbury",
    "state": "OH",
    "zip": "44301",
    "phone": "330-555-0142",
}
HOME = {"street": "212 Wrenfield Rd", "city": "Ashbury", "state": "OH", "zip": "44301", "phone": "(330) 555-0142"}
# Strangers elsewhere fill the roster, so that term counts exist (and mean what they do on a real one).
OTHERS = [
    member(
        f"X-{i}",
        first_name=given,
        last_name=family,
        birth_date=f"19{40 + i}-0{1 + i % 9}-1{i % 9}",
        sex="F" if i % 2 else "M",
        zip=f"4{4400 + i}",
    )
    for i, (given, family) in enumerate(
        [("Stephanie", "Orlov"), ("Ronald", "Pike"), ("Mary", "Quist"), ("Joan", "Renner"), ("Eric", "Sato")]
    )
]


def harold_as(**changes) -> dict:
    """A query for Harold at home, with ``changes`` (query field names)."""
    base = {
        "given": HAROLD["first_name"],
        "middle": HAROLD["middle_name"],
        "family": HAROLD["last_name"],
        "birth_date": HAROLD["birth_date"],
        "sex": "M",
        **HOME,
    }
    return {**base, **changes}


def match(roster: list[dict], **q):
    return match_patient(query(**q), ON, MemoryRoster([*roster, *OTHERS]), load_model(roster_size=20_000))


@pytest.fixture
def harold_only():
    return [member("H-1", **HAROLD)]


# -- relatives are not routed -------------------------------------------------------


def test_a_twin_brother_at_the_members_home_is_not_matched(harold_only):
    """Same surname, birth date, house and phone, another given and middle name: his twin, graded none."""
    m = match(harold_only, **harold_as(given="Gerald", middle="Francis"))
    assert (m.grade, m.member_id) == ("none", None), m.detail
    assert m.detail["household_limited"]


def test_a_twin_sister_is_not_matched(harold_only):
    """A twin of the other sex (another given name, F against M) at his home: none."""
    m = match(harold_only, **harold_as(given="Helen", middle="", sex="F"))
    assert (m.grade, m.member_id) == ("none", None)


def test_a_twin_living_elsewhere_with_a_rhyming_name_is_not_routed():
    """DONALD and RONALD born the same day: one letter apart, but twins' names, wherever the twin lives."""
    donald = member("D-1", **{**HAROLD, "first_name": "Donald", "middle_name": ""})
    m = match([donald], **{**harold_as(given="Ronald", middle=""), "street": "9 Elm Ct", "phone": "3305559911"})
    assert m.grade not in ROUTED and m.member_id is None
    assert m.detail["household_limited"] == {"given name differs, birth date agrees": 1}


def test_twin_sisters_one_letter_apart_with_other_middle_names_are_not_routed():
    """JEAN ELLEN and JOAN MARIE born the same day, in one ZIP: two sisters, not a typo."""
    jean = member("J-1", **{**HAROLD, "first_name": "Jean", "middle_name": "Ellen", "sex": "F"})
    joan = harold_as(given="Joan", middle="Marie", sex="F", street="40 Pine St", phone="3305550007")
    assert match([jean], **joan).grade not in ROUTED


def test_a_spouse_at_the_members_home_is_not_matched(harold_only):
    """His wife: another given name, sex and birth date at his house: none, not a review item."""
    m = match(harold_only, **harold_as(given="Maureen", middle="Ann", sex="F", birth_date="1950-11-02"))
    assert (m.grade, m.candidates) == ("none", ())


def test_a_spouse_who_kept_her_own_surname_is_not_matched(harold_only):
    """Another surname too: the house and the phone alone never make a match."""
    m = match(harold_only, **harold_as(given="Maureen", family="Brandt", sex="F", birth_date="1950-11-02"))
    assert (m.grade, m.member_id) == ("none", None)


def test_a_grown_son_at_the_members_home_is_not_matched(harold_only):
    """His son, 32 years younger, another given name, living with him: none."""
    m = match(harold_only, **harold_as(given="Kevin", middle="James", birth_date="1980-09-23"))
    assert (m.grade, m.member_id) == ("none", None)


@pytest.mark.parametrize("suffix", ["JR", ""], ids=["suffix given", "suffix left out"])
@pytest.mark.parametrize("home", [True, False], ids=["at home", "elsewhere"])
def test_a_junior_with_his_fathers_name_is_not_routed(suffix, home):
    """Harold Eugene Calloway Jr, born 1974, is not his father Harold Sr: the suffixes differ, or (when the
    registration leaves his out) the birth dates are a generation apart."""
    senior = member("H-1", **HAROLD, name_suffix="SR")
    junior = harold_as(birth_date="1974-02-08", family="Calloway " + suffix if suffix else "Calloway")
    if not home:
        junior.update(street="88 Mill Lane", zip="44305", phone="3305550999")
    m = match([senior], **junior)
    assert (m.grade, m.member_id) == ("none", None), m.detail


def test_junior_and_senior_both_on_the_roster_each_get_their_own():
    """Father and son, one name, one house: each query finds its own member, never the other."""
    roster = [
        member("H-SR", **HAROLD, name_suffix="SR"),
        member("H-JR", **{**HAROLD, "birth_date": "1974-02-08"}, name_suffix="JR"),
    ]
    assert match(roster, **harold_as(family="Calloway Sr")).member_id == "H-SR"
    assert match(roster, **harold_as(birth_date="1974-02-08")).member_id == "H-JR"


def test_sex_differing_alone_is_never_routed(harold_only):
    """Everything agrees but F against M: never routed (a reviewer or nobody decides)."""
    m = match(harold_only, **harold_as(sex="F"))
    assert m.grade not in ROUTED


# -- members are still found ----------------------------------------------------------


def test_a_member_whose_wife_is_also_a_member_is_routed_to_himself():
    """Both spouses on the roster at one house: his registration finds him, hers finds her."""
    roster = [
        member("H-1", **HAROLD),
        member(
            "M-1", **{**HAROLD, "first_name": "Maureen", "middle_name": "Ann", "sex": "F", "birth_date": "1950-11-02"}
        ),
    ]
    him = match(roster, **harold_as())
    her = match(roster, **harold_as(given="Maureen", middle="Ann", sex="F", birth_date="1950-11-02"))
    assert (him.grade, him.member_id) == ("certain", "H-1")
    assert (her.grade, her.member_id) == ("certain", "M-1")


@pytest.mark.parametrize(
    "changes",
    [
        {"given": "Hal"},  # a nickname
        {"family": "Calowey"},  # a typo in the surname
        {"birth_date": "1948-05-18"},  # a day off
        {"birth_date": "1948-05-16", "given": "Harlod"},  # a day off, and a typo
        {"given": "Calloway", "family": "Harold"},  # given and family swapped
        {"middle": "", "phone": ""},  # no middle name, no phone
        {"given": "Harry", "middle": "E"},  # another nickname, the middle initial
    ],
    ids=["nickname", "surname typo", "day off", "day off and typo", "swapped", "no middle or phone", "initial"],
)
def test_a_member_at_home_with_registration_errors_is_routed(harold_only, changes):
    """The household test weighs who someone is, so the member's own slips still route him."""
    m = match(harold_only, **harold_as(**changes))
    assert (m.grade in ROUTED, m.member_id) == (True, "H-1"), m.detail


def test_a_day_off_across_the_end_of_a_month_is_a_slip():
    """30 April for 1 May differs in three digits but by one day: the same slip as the 16th for the 17th."""
    model = load_model()
    q, c = make_person(birth_date="1948-04-30"), make_person(birth_date="1948-05-01")
    assert compare(q, c, model)["birth_date"] == "one_digit"
    assert compare(q, make_person(birth_date="1948-05-02"), model)["birth_date"] == "disagree"


def test_a_given_name_nobody_has_is_a_slip_not_a_twin():
    """NTEPHANIE for STEPHANIE (a first letter mistyped) is routed; RONALD for DONALD, a name people have, is not."""
    stephanie = member("S-1", **{**HAROLD, "first_name": "Stephanie", "middle_name": "", "sex": "F"})
    assert match([stephanie], **harold_as(given="Ntephanie", middle="", sex="F")).member_id == "S-1"
    assert rhymes("RONALD", "DONALD") and rhymes("NTEPHANIE", "STEPHANIE")
    assert not rhymes("CATHY", "KATHY") and not rhymes("HILIP", "PHILIP")


# -- names, suffixes, frequencies ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Jr.", "JR"),
        ("jnr", "JR"),
        ("SENIOR", "SR"),
        ("3rd", "III"),
        ("IV", "IV"),
        ("MD", ""),
        ("", ""),
        ("PhD Jr", "JR"),
    ],
)
def test_a_generational_suffix_is_normalised(raw, expected):
    """XPN-4 and a roster's suffix column, as written, to JR/SR/II/III/...; a degree is not generational."""
    assert normalise_suffix(raw) == expected


def test_a_suffix_typed_into_the_name_is_read_from_it():
    """'Calloway Jr' in the family name is the name Calloway with the suffix JR; 'Harold III' likewise."""
    assert (make_person(family="Calloway, Jr.").family, make_person(family="Calloway, Jr.").suffix) == (
        "CALLOWAY",
        "JR",
    )
    assert make_person(given="Harold III").suffix == "III"
    assert make_person(given="Mary V").given == "MARY V"  # an initial as often as a suffix: left alone


def test_a_rare_name_weighs_more_than_a_common_one():
    """Term frequency: an exact agreement on a surname few members carry says more than on a common one,
    and on a roster of a handful of members the weights stay near the model's."""
    model = load_model(roster_size=20_000)
    q = make_person(given="Mary", family="Quist", birth_date="1950-01-01")
    terms = frequency_terms(q)
    assert terms == ["given:MARY", "family:QUIST", "birth_date:1950-01-01"]
    common = term_weights(q, {"given:MARY": 600, "family:QUIST": 1, "birth_date:1950-01-01": 3}, 20_000, model)
    assert common["family"] > model.weight("family", "exact") + 4 > common["given"] + 4
    tiny = term_weights(q, {"given:MARY": 1, "family:QUIST": 1}, 5, model)
    assert tiny["given"] == pytest.approx(model.weight("given", "exact"), abs=0.05)
    assert term_weights(q, {}, 0, model) == {}


def test_the_roster_keeps_its_term_counts(tmp_path):
    """An import counts each current member's normalised names and birth date; the lookups return them."""
    from test_roster import HEADER, ROW_MBI, ROW_MRN, ROW_NAME, csv_text, import_text

    from gateway.store.roster_file import StoredRoster, open_roster_snapshot

    import_text(tmp_path, csv_text(ROW_MBI, ROW_MRN, ROW_NAME, header=HEADER))
    lookups = StoredRoster(open_roster_snapshot(tmp_path / "herald.db"))
    counts, total = lookups.term_counts(["family:OBRIENSMITH", "given:ALEX", "given:NOBODY", "birth_date:1960-01-02"])
    assert (counts, total) == ({"family:OBRIENSMITH": 1, "given:ALEX": 1, "birth_date:1960-01-02": 1}, 3)


# -- the model file ---------------------------------------------------------------------


def test_the_shipped_household_model_is_fitted_and_loads():
    """mappings/household.toml is bench/fit_household.py's output: every relation and level is there."""
    model, raw = load_household(MAPPINGS_DIR / "household.toml")
    assert b"GENERATED by bench/fit_household.py" in raw
    assert set(model.shares) == {"spouse", "twin", "parent_child", "jr_sr", "sibling"}
    assert sum(model.shares.values()) == pytest.approx(1.0, abs=1e-3)
    # What the fit must have learned: a relative shares a given name and a birth date far less than the member.
    assert model.m["given"]["same"] > 100 * model.h["spouse"]["given"]["same"]
    assert model.h["jr_sr"]["birth_date"]["generation"] > 0.9 > model.m["birth_date"]["exact"] - 0.1


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda t: t.replace("prior_odds = ", "prior_odds = -1 #"), "prior_odds"),
        (lambda t: t.replace("possible_posterior = ", "possible_posterior = 0.9999 #"), "possible_posterior"),
        (lambda t: t.replace('another_person_grade = "none"', 'another_person_grade = "probable"'), "never routed"),
        (lambda t: t.replace("[relations]", "[kin]"), "[relations]"),
        (lambda t: t.replace("member = { same = ", "member = { alike = ", 1), "needs exactly the levels"),
        (lambda t: t.replace("moved_phone = { exact", "moved_phone = { same"), "moved_phone"),
    ],
)
def test_a_bad_household_model_names_the_problem(tmp_path, edit, reason):
    """A malformed household.toml (beside a matching.toml) is refused, naming the key."""
    (tmp_path / "matching.toml").write_text((MAPPINGS_DIR / "matching.toml").read_text())
    (tmp_path / "household.toml").write_text(edit((MAPPINGS_DIR / "household.toml").read_text()))
    with pytest.raises(ConfigError) as e:
        load_model(tmp_path / "matching.toml")
    assert reason in str(e.value)


def test_what_the_household_evidence_records_names_nobody(harold_only):
    """The match detail says why a member was held back in words and numbers, never a name or a date."""
    m = match(harold_only, **harold_as(given="Gerald", middle="Francis"))
    text = json.dumps(m.detail)
    for value in ("GERALD", "HAROLD", "CALLOWAY", "1948", "WRENFIELD", "5550142"):
        assert value not in text.upper()
    assert m.detail["household_limited"]
