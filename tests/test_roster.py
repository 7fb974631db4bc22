"""The ACO roster: CSV checks by line and column, and deterministic matching."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.convert import PatientKeys
from gateway.errors import RosterError
from gateway.roster import (
    load_roster_file,
    match_patient,
    name_key,
    normalise_name,
    read_roster,
)

HEADER = (
    "member_id,mbi,mrn,mrn_authority,last_name,first_name,birth_date,sex,aco_id,"
    "pcp_npi,pcp_name,care_manager,effective_start,effective_end"
)
# Synthetic members: CMS's example MBI format, made-up names.
ROW_MBI = "M-001,1EG4TE5MK73,,,Testpatient,Alex,1960-01-02,F,ACO-TEST,1234567893,Dr. Test,care@aco.example,2026-01-01,"
ROW_MRN = "M-002,,MRN456,TESTFAC,O'Brien-Smith,Zoë,1955-07-04,M,ACO-TEST,,,,2026-01-01,2026-06-30"
ROW_NAME = "M-003,2EG4TE5MK74,,,Desrosiers,Hélène,1956-01-22,F,ACO-TEST,,,,,"


def csv_text(*rows: str, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def keys(**overrides) -> PatientKeys:
    """Match keys of a message patient; empty unless given."""
    base = {"mbi": "", "mrns": (), "family": "", "given": "", "birth_date": "", "sex": ""}
    base.update(overrides)
    return PatientKeys(**base)


def lookups(members):
    """In-memory versions of the store's three roster lookups over RosterMembers."""
    rows = [{**dataclasses.asdict(m), "name_key": m.name_key} for m in members]
    return (
        lambda mbi: [r for r in rows if r["mbi"] == mbi],
        lambda mrn, authority: [r for r in rows if r["mrn"] == mrn and r["mrn_authority"] == authority],
        lambda key: [r for r in rows if r["name_key"] == key],
    )


@pytest.fixture
def members():
    parsed = read_roster(csv_text(ROW_MBI, ROW_MRN, ROW_NAME))
    assert parsed.problems == []
    return parsed.members


# -- reading -----------------------------------------------------------------


def test_good_file_reads_every_member_normalised():
    """A clean file gives one member per row, dates ISO, sex and MBI normalised, no problems."""
    text = csv_text(
        "M-001,1eg4-te5-mk73,,,Testpatient,Alex,01/02/1960,female,ACO-TEST,1234567893,Dr. Test,,20260101,",
        ROW_MRN,
    )
    parsed = read_roster(text)
    assert parsed.problems == []
    assert parsed.rows == 2
    first, second = parsed.members
    assert (first.mbi, first.birth_date, first.sex, first.effective_start) == (
        "1EG4TE5MK73",
        "1960-01-02",
        "F",
        "2026-01-01",
    )
    assert (second.mrn, second.mrn_authority, second.effective_end) == ("MRN456", "TESTFAC", "2026-06-30")


def test_alternative_header_spellings_and_bom_are_accepted(tmp_path):
    """CMS-style column names and a UTF-8 BOM are read."""
    header = "MEMBER ID,BENE_MBI_ID,BENE_LAST_NAME,BENE_1ST_NAME,BENE_BRTH_DT,BENE_SEX_CD,ACO"
    path = tmp_path / "cms.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{header}\nM-9,1EG4TE5MK73,Test,Alex,1960-01-02,2,ACO-TEST\n".encode())
    parsed = load_roster_file(path)
    assert [(m.member_id, m.mbi, m.sex) for m in parsed.members] == [("M-9", "1EG4TE5MK73", "F")]


def test_blank_lines_and_empty_trailing_cells_are_harmless():
    """Empty rows are neither members nor problems; empty cells beyond the header are ignored."""
    parsed = read_roster(csv_text(ROW_MBI + ",,", "", ",,,,", ROW_MRN))
    assert parsed.problems == []
    assert len(parsed.members) == 2


@pytest.mark.parametrize("column", ["member_id", "last_name", "first_name", "birth_date", "sex", "aco_id"])
def test_missing_required_column_is_reported_on_line_1(column):
    """A header without a required column is one problem on line 1 naming the column."""
    header = ",".join(c for c in HEADER.split(",") if c != column)
    parsed = read_roster(csv_text(header=header))
    assert parsed.problems == [(1, column, "required column is missing from the header")]
    assert parsed.members == []


def test_missing_both_mbi_and_mrn_columns_is_reported():
    """A roster needs an MBI or an MRN column."""
    header = ",".join(c for c in HEADER.split(",") if c not in ("mbi", "mrn", "mrn_authority"))
    parsed = read_roster(csv_text(header=header))
    assert parsed.problems == [(1, "mbi or mrn", "required column is missing from the header")]


def test_empty_file_is_a_problem():
    """An empty file is reported, not silently accepted."""
    assert read_roster("").problems == [(1, "-", "the file is empty")]


@pytest.mark.parametrize(
    ("row", "column", "words"),
    [
        (ROW_MBI.replace("1960-01-02", "1960-02-30"), "birth_date", "not a date"),
        (ROW_MBI.replace("1960-01-02", "02/01/60"), "birth_date", "not a date"),
        (ROW_MBI.replace("1960-01-02", ""), "birth_date", "is empty"),
        (ROW_MBI.replace(",F,", ",X,"), "sex", "not one of M, F, O, U"),
        (ROW_MBI.replace("1EG4TE5MK73", "1SG4TE5MK73"), "mbi", "not a valid MBI"),
        (ROW_MBI.replace("1EG4TE5MK73", "1EG4TE5MK7"), "mbi", "not a valid MBI"),
        (ROW_MBI.replace("1EG4TE5MK73", ""), "mbi", "neither an MBI nor an MRN"),
        (ROW_MRN.replace("TESTFAC", ""), "mrn_authority", "MRN is given"),
        (ROW_MBI.replace("1234567893", "12345"), "pcp_npi", "10-digit NPI"),
        (ROW_MBI.replace("2026-01-01,", "2026-01-01,2025-12-31"), "effective_end", "before effective_start"),
        (ROW_MBI.replace("2026-01-01,", "2026-13-01,"), "effective_start", "not a date"),
        (ROW_MBI.replace("M-001", ""), "member_id", "is empty"),
        (ROW_MBI.replace("ACO-TEST", ""), "aco_id", "is empty"),
        (ROW_MBI + ",Dr. Test", "-", "the row has 15 cells but the header has 14"),
    ],
)
def test_bad_row_is_reported_by_line_and_column(row, column, words):
    """Each bad value is a problem on its own line naming the column; good rows still load."""
    parsed = read_roster(csv_text(ROW_MRN, row))
    assert [(line, col) for line, col, _ in parsed.problems] == [(3, column)]
    assert words in parsed.problems[0][2]
    assert [m.member_id for m in parsed.members] == ["M-002"]


def test_every_problem_of_a_row_is_reported():
    """A row with several bad values lists each one, in line order."""
    bad = ROW_MBI.replace("1960-01-02", "soon").replace(",F,", ",Q,")
    parsed = read_roster(csv_text(bad, ROW_MRN, bad))
    assert [(line, col) for line, col, _ in parsed.problems] == [
        (2, "birth_date"),
        (2, "sex"),
        (4, "birth_date"),
        (4, "sex"),
    ]


def test_duplicate_member_is_reported_on_each_line_and_not_loaded():
    """A member listed twice is a problem on both lines and neither copy is kept."""
    other = ROW_MBI.replace("Alex", "Alexandra")
    parsed = read_roster(csv_text(ROW_MBI, ROW_MRN, other))
    assert [(line, col) for line, col, _ in parsed.problems] == [(2, "member_id"), (4, "member_id")]
    assert "appears on lines 2, 4" in parsed.problems[0][2]
    assert [m.member_id for m in parsed.members] == ["M-002"]


def test_same_member_id_in_two_acos_is_not_a_duplicate():
    """Member ids are unique per ACO only."""
    parsed = read_roster(csv_text(ROW_MBI, ROW_MBI.replace("ACO-TEST", "ACO-OTHER")))
    assert parsed.problems == []
    assert len(parsed.members) == 2


# -- load_roster_file and --skip-bad-rows ------------------------------------


def test_load_rejects_a_file_with_bad_rows(tmp_path):
    """Without skip_bad_rows any bad row rejects the whole file with every problem listed."""
    path = tmp_path / "roster.csv"
    path.write_text(csv_text(ROW_MBI, ROW_MRN.replace("1955-07-04", "bad")), encoding="utf-8")
    with pytest.raises(RosterError) as caught:
        load_roster_file(path)
    assert caught.value.problems == [(3, "birth_date", "'bad' is not a date (use YYYY-MM-DD)")]
    assert "line 3, column birth_date" in str(caught.value)


def test_load_with_skip_bad_rows_keeps_the_good_rows(tmp_path):
    """With skip_bad_rows the good rows load and the bad ones come back as problems."""
    path = tmp_path / "roster.csv"
    path.write_text(csv_text(ROW_MBI, ROW_MRN.replace("1955-07-04", "bad"), ROW_NAME), encoding="utf-8")
    parsed = load_roster_file(path, skip_bad_rows=True)
    assert [m.member_id for m in parsed.members] == ["M-001", "M-003"]
    assert [(line, col) for line, col, _ in parsed.problems] == [(3, "birth_date")]


def test_skip_bad_rows_does_not_excuse_a_broken_header(tmp_path):
    """A header problem rejects the file even with skip_bad_rows."""
    path = tmp_path / "roster.csv"
    path.write_text(csv_text(ROW_MBI, header=HEADER.replace("sex", "gender_code")), encoding="utf-8")
    with pytest.raises(RosterError) as caught:
        load_roster_file(path, skip_bad_rows=True)
    assert caught.value.problems == [(1, "sex", "required column is missing from the header")]


def test_load_reads_a_windows_1252_file(tmp_path):
    """A roster saved as windows-1252 (Excel) is read, accents intact."""
    path = tmp_path / "roster.csv"
    path.write_bytes(csv_text(ROW_NAME).encode("cp1252"))
    assert load_roster_file(path).members[0].first_name == "Hélène"


def test_roster_error_message_summarises_many_problems():
    """RosterError's text gives the first five problems and a count of the rest."""
    problems = [(n, "sex", "bad") for n in range(2, 10)]
    text = str(RosterError(problems))
    assert text.startswith("8 problem(s) in roster: line 2, column sex: bad")
    assert "(and 3 more)" in text


# -- matching ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("O'Brien-Smith", "OBRIENSMITH"), ("Hélène", "HELENE"), ("zoë", "ZOE"), ("Van der Berg", "VANDERBERG")],
)
def test_normalise_name_folds_case_accents_and_punctuation(value, expected):
    """Names compare after upper-casing, removing accents and dropping non-letters."""
    assert normalise_name(value) == expected


def test_match_by_mbi_is_certain(members):
    """An MBI on the roster is a certain match."""
    match = match_patient(keys(mbi="1EG4TE5MK73"), "2026-03-01", *lookups(members))
    assert (match.grade, match.method, match.member_id, match.aco_id) == ("certain", "mbi", "M-001", "ACO-TEST")
    assert match.matched


def test_match_by_mrn_and_authority_is_certain(members):
    """An MRN with its assigning authority is a certain match."""
    match = match_patient(keys(mrns=(("MRN456", "TESTFAC"),)), "2026-03-01", *lookups(members))
    assert (match.grade, match.method, match.member_id) == ("certain", "mrn", "M-002")


def test_mrn_from_another_authority_does_not_match(members):
    """The same MRN from a different facility is a different patient."""
    match = match_patient(keys(mrns=(("MRN456", "OTHERFAC"),)), "2026-03-01", *lookups(members))
    assert not match.matched


def test_mrn_without_authority_is_not_tried(members):
    """An MRN with no assigning authority is too weak to match on."""
    match = match_patient(keys(mrns=(("MRN456", ""),)), "2026-03-01", *lookups(members))
    assert not match.matched
    assert match.detail == {"rules_tried": []}


@pytest.mark.parametrize(
    ("family", "given"),
    [("DESROSIERS", "HELENE"), ("desrosiers", "hélène"), ("Des-Rosiers", "Hélène")],
)
def test_match_by_demographics_is_probable_and_ignores_case_and_accents(members, family, given):
    """Last name + first name + birth date + sex match (probably) regardless of case, accents, hyphens."""
    k = keys(family=family, given=given, birth_date="1956-01-22", sex="F")
    match = match_patient(k, "2026-03-01", *lookups(members))
    assert (match.grade, match.method, match.member_id) == ("probable", "demographics", "M-003")


@pytest.mark.parametrize(
    "change",
    [{"birth_date": "1956-01-23"}, {"sex": "M"}, {"given": "HELEN"}, {"birth_date": ""}],
)
def test_demographics_must_all_agree(members, change):
    """A different birth date, sex or first name, or a missing one, is no demographic match."""
    k = keys(**{"family": "DESROSIERS", "given": "HELENE", "birth_date": "1956-01-22", "sex": "F", **change})
    assert not match_patient(k, "2026-03-01", *lookups(members)).matched


def test_mbi_is_tried_before_demographics(members):
    """When the MBI finds a member, demographics pointing elsewhere are not used."""
    k = keys(mbi="1EG4TE5MK73", family="DESROSIERS", given="HELENE", birth_date="1956-01-22", sex="F")
    assert match_patient(k, "2026-03-01", *lookups(members)).member_id == "M-001"


@pytest.mark.parametrize(
    ("on", "matched"),
    [("2025-12-31", False), ("2026-01-01", True), ("2026-06-30", True), ("2026-07-01", False)],
)
def test_match_only_within_the_effective_period(members, on, matched):
    """A member counts only on dates inside effective_start..effective_end (both inclusive)."""
    match = match_patient(keys(mrns=(("MRN456", "TESTFAC"),)), on, *lookups(members))
    assert match.matched is matched


def test_ended_membership_does_not_match_without_an_encounter_date(members):
    """With no encounter date, a membership that has ended does not count."""
    assert not match_patient(keys(mrns=(("MRN456", "TESTFAC"),)), "", *lookups(members)).matched
    assert match_patient(keys(mbi="1EG4TE5MK73"), "", *lookups(members)).matched


def test_ambiguous_match_matches_nobody():
    """Two active members found by the same rule is no match, with the rule and count given."""
    twin = ROW_NAME.replace("M-003", "M-004").replace("2EG4TE5MK74", "3EG4TE5MK75")
    parsed = read_roster(csv_text(ROW_NAME, twin))
    k = keys(family="Desrosiers", given="Helene", birth_date="1956-01-22", sex="F")
    match = match_patient(k, "2026-03-01", *lookups(parsed.members))
    assert (match.grade, match.method, match.member) == ("none", "ambiguous", None)
    assert match.detail == {"rule": "demographics", "candidates": 2}


def test_no_match_lists_the_rules_tried(members):
    """An unknown patient is no match, saying which rules were tried."""
    k = keys(mbi="9EG4TE5MK79", mrns=(("X", "FAC"),), family="NOBODY", given="NONE", birth_date="1999-01-01", sex="M")
    match = match_patient(k, "2026-03-01", *lookups(members))
    assert (match.grade, match.method) == ("none", "none")
    assert match.detail == {"rules_tried": ["mbi", "mrn", "demographics"]}


def test_name_key_is_what_members_store():
    """name_key of message keys equals the member's key for the same person."""
    member = read_roster(csv_text(ROW_NAME)).members[0]
    assert name_key("DESROSIERS", "HELENE", "1956-01-22", "f") == member.name_key
