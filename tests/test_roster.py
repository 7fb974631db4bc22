"""The ACO roster: file formats, checks by line and column, versions on import, lookups."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from gateway.app.roster import import_members, import_roster_file, opened_store
from gateway.errors import RosterError
from gateway.matching.roster import (
    RosterMember,
    RosterOptions,
    RosterSource,
    open_roster,
    read_opt_out_file,
    read_pcp_file,
    read_roster,
)
from gateway.records import MEMBER_COLUMNS
from gateway.store import (
    StoredRoster,
    migrate,
    open_database,
    open_roster_snapshot,
    roster_count,
    roster_imports,
    roster_member,
    roster_path,
)
from gateway.store.roster_file import key_id

HEADER = (
    "member_id,mbi,mrn,mrn_authority,last_name,first_name,birth_date,sex,aco_id,"
    "pcp_npi,pcp_name,care_manager,effective_start,effective_end"
)
# Synthetic members: CMS's example MBI format, made-up names.
ROW_MBI = "M-001,1EG4TE5MK73,,,Testpatient,Alex,1960-01-02,F,ACO-TEST,1234567893,Dr. Test,care@aco.example,2026-01-01,"
ROW_MRN = "M-002,,MRN456,TESTFAC,O'Brien-Smith,Zoë,1955-07-04,M,ACO-TEST,,,,2026-01-01,2026-06-30"
ROW_NAME = "M-003,2EG4TE5MK74,,,Desrosiers,Hélène,1956-01-22,F,ACO-TEST,,,,,"
NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
TODAY = RosterOptions(today=date(2026, 11, 20))

SSP_HEADER = "BENE_MBI_ID,BENE_HIC_NUM,BENE_1ST_NAME,BENE_LAST_NAME,BENE_SEX_CD,BENE_BRTH_DT,BENE_DEATH_DT"
SSP_ROWS = [
    "1EG4TE5MK73,,ALEX,TESTPATIENT,2,01/02/1960,",
    "2EG4TE5MK74,,HELENE,DESROSIERS,2,01/22/1956,",
    "3EG4TE5MK75,,SAM,SAMPLE,1,05/06/1970,",
]
CCLF8_HEADER = (
    "BENE_MBI_ID|BENE_HIC_NUM|BENE_FIPS_STATE_CD|BENE_FIPS_CNTY_CD|BENE_ZIP_CD|BENE_DOB|BENE_SEX_CD|BENE_RACE_CD|"
    "BENE_1ST_NAME|BENE_MIDL_NAME|BENE_LAST_NAME|BENE_LINE_1_ADR|GEO_ZIP_PLC_NAME|GEO_USPS_STATE_CD|GEO_ZIP5_CD"
)
CCLF8_ROW = "1EG4TE5MK73||17|167|62701|1960-01-02|2|1|ALEX|Q|TESTPATIENT|12 ORCHARD LN|SPRINGFIELD|IL|62701"


def csv_text(*rows: str, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def problems_of(text: str, options: RosterOptions = TODAY) -> list[tuple[int, str, str]]:
    return read_roster(text, options)[1]


def header_problems(text: str, options: RosterOptions = TODAY) -> list[tuple[int, str, str]]:
    with pytest.raises(RosterError) as caught:
        RosterSource.from_text(text, options)
    return caught.value.problems


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- reading -----------------------------------------------------------------


def test_good_file_reads_every_member_normalised():
    """A clean file gives one member per row, dates ISO, sex and MBI normalised, no problems."""
    text = csv_text(
        "M-001,1eg4-te5-mk73,,,Testpatient,Alex,01/02/1960,female,ACO-TEST,1234567893,Dr. Test,,20260101,",
        ROW_MRN,
    )
    members, problems = read_roster(text, TODAY)
    assert problems == []
    first, second = members
    assert (first.mbi, first.birth_date, first.sex, first.effective_start) == (
        "1EG4TE5MK73",
        "1960-01-02",
        "F",
        "2026-01-01",
    )
    assert (second.mrn, second.mrn_authority, second.effective_end) == ("MRN456", "TESTFAC", "2026-06-30")


def test_member_carries_its_blocking_keys():
    """Each member is given the matching engine's blocking keys for its demographics."""
    (member,), _ = read_roster(csv_text(ROW_NAME), TODAY)
    assert "d:19560122" in member.keys
    assert len(member.keys) == len(set(member.keys)) > 1


def test_blank_lines_and_empty_trailing_cells_are_harmless():
    """Empty rows are neither members nor problems; empty cells beyond the header are ignored."""
    members, problems = read_roster(csv_text(ROW_MBI + ",,", "", ",,,,", ROW_MRN), TODAY)
    assert problems == []
    assert len(members) == 2


@pytest.mark.parametrize("column", ["member_id", "last_name", "first_name", "birth_date", "sex"])
def test_missing_required_column_is_reported_on_line_1(column):
    """A header without a required column is a problem on line 1 naming the column."""
    header = ",".join(c for c in HEADER.split(",") if c != column)
    problems = header_problems(csv_text(header=header))
    assert [(line, col) for line, col, _ in problems] == [(1, column)]
    assert "required column is missing from the header" in problems[0][2]


def test_no_aco_column_and_no_aco_option_is_reported():
    """Without an ACO id column the file needs --aco (or [roster] aco_id); the column it has instead is named."""
    header = HEADER.replace("aco_id", "plan")
    problems = header_problems(csv_text(header=header))
    assert problems[0] == (1, "aco_id", "the file has no ACO id column: give --aco or set [roster] aco_id")
    assert [(line, column) for line, column, _ in problems[1:]] == [(1, "'plan'")]


def test_missing_both_mbi_and_mrn_columns_is_reported():
    """A roster needs an MBI or an MRN column."""
    header = ",".join(c for c in HEADER.split(",") if c not in ("mbi", "mrn", "mrn_authority"))
    assert header_problems(csv_text(header=header)) == [(1, "mbi", "the header has neither an MBI nor an MRN column")]


def test_empty_file_is_a_problem():
    """An empty file is reported, not silently accepted."""
    assert header_problems("") == [(1, "-", "the file is empty")]


@pytest.mark.parametrize(
    ("row", "column", "words"),
    [
        (ROW_MBI.replace("1960-01-02", "1960-02-30"), "birth_date", "not a date"),
        (ROW_MBI.replace("1960-01-02", "02/01/60"), "birth_date", "not a date"),
        (ROW_MBI.replace("1960-01-02", "2030-01-02"), "birth_date", "in the future"),
        (ROW_MBI.replace("1960-01-02", ""), "birth_date", "is empty"),
        (ROW_MBI.replace(",F,", ",X,"), "sex", "is not one of"),
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
    """Each bad value is a problem on its own line naming the column; good rows still read."""
    members, problems = read_roster(csv_text(ROW_MRN, row), TODAY)
    assert [(line, col) for line, col, _ in problems] == [(3, column)]
    assert words in problems[0][2]
    assert [m.member_id for m in members] == ["M-002"]


def test_every_problem_of_a_row_is_reported():
    """A row with several bad values lists each one, in line order."""
    bad = ROW_MBI.replace("1960-01-02", "soon").replace(",F,", ",Q,")
    assert [(line, col) for line, col, _ in problems_of(csv_text(bad, ROW_MRN, bad))] == [
        (2, "birth_date"),
        (2, "sex"),
        (4, "birth_date"),
        (4, "sex"),
    ]


def test_a_cp1252_file_is_read_with_its_accents(tmp_path):
    """A roster saved as windows-1252 (Excel) is read, accents intact."""
    path = tmp_path / "roster.csv"
    path.write_bytes(csv_text(ROW_NAME).encode("cp1252"))
    source, _ = open_roster(path, TODAY)
    (row,) = list(source.rows())
    assert row.member.first_name == "Hélène"


def test_roster_error_message_summarises_many_problems():
    """RosterError's text gives the first five problems and a count of the rest."""
    text = str(RosterError([(n, "sex", "bad") for n in range(2, 10)]))
    assert text.startswith("8 problem(s) in roster: line 2, column sex: bad")
    assert "(and 3 more)" in text


def test_demographic_columns_and_opt_out_are_read():
    """Middle name, address, ZIP, phone and the opt-out flag are kept; a bad ZIP or flag is a problem."""
    header = HEADER + ",middle_name,address_line,city,state,zip,phone,opted_out"
    good = ROW_MBI + ",Q,12 Orchard Lane,Springfield,IL,62701-1234,(217) 555-0123,Y"
    (member,), problems = read_roster(csv_text(good, header=header), TODAY)
    assert problems == []
    assert (member.middle_name, member.city, member.state, member.zip, member.opted_out) == (
        "Q",
        "Springfield",
        "IL",
        "62701-1234",
        True,
    )
    bad = ROW_MBI + ",Q,12 Orchard Lane,Springfield,Illinois,6270,555,maybe"
    assert [col for _, col, _ in problems_of(csv_text(bad, header=header))] == ["zip", "state", "phone", "opted_out"]


def test_column_map_from_config_reads_a_site_layout():
    """[roster.columns] maps a site's own header names onto roster columns."""
    text = "Patient No,Medicare ID,Surname,Forename,DOB,Gender\nP-7,1EG4TE5MK73,Test,Alex,1960-01-02,F\n"
    options = RosterOptions(
        aco_id="ACO-SITE",
        columns={
            "member_id": "Patient No",
            "mbi": "Medicare ID",
            "last_name": "Surname",
            "first_name": "Forename",
            "birth_date": "DOB",
            "sex": "Gender",
        },
        today=date(2026, 11, 20),
    )
    (member,), problems = read_roster(text, options)
    assert problems == []
    assert (member.aco_id, member.member_id, member.last_name) == ("ACO-SITE", "P-7", "Test")


# -- CMS formats ---------------------------------------------------------------


def test_ssp_assignment_list_is_recognised_and_read():
    """Table 1-1 of the SSP Assignment List Report: MBI as member id, 0/1/2 sex codes, MM/DD/YYYY dates."""
    source = RosterSource.from_text(csv_text(*SSP_ROWS, header=SSP_HEADER), RosterOptions(aco_id="A1234"))
    assert source.format.name == "ssp"
    members = [r.member for r in source.rows()]
    assert [(m.aco_id, m.member_id, m.sex, m.birth_date) for m in members] == [
        ("A1234", "1EG4TE5MK73", "F", "1960-01-02"),
        ("A1234", "2EG4TE5MK74", "F", "1956-01-22"),
        ("A1234", "3EG4TE5MK75", "M", "1970-05-06"),
    ]


@pytest.mark.parametrize(
    ("row", "column", "words"),
    [
        ("1EG4TE5MK73,,ALEX,TESTPATIENT,3,01/02/1960,", "BENE_SEX_CD", "'3' is not one of 0, 1, 2"),
        ("1EG4TE5MK73,,ALEX,TESTPATIENT,2,13/02/1960,", "BENE_BRTH_DT", "is not a date (MM/DD/YYYY or YYYY-MM-DD)"),
        ("1EG4TE5MKZ3,,ALEX,TESTPATIENT,2,01/02/1960,", "BENE_MBI_ID", "is not a valid MBI"),
    ],
)
def test_ssp_problems_name_the_cms_column(row, column, words):
    """Problems in a CMS file name the file's own column header."""
    problems = problems_of(csv_text(row, header=SSP_HEADER), RosterOptions(aco_id="A1234", today=date(2026, 11, 20)))
    assert [(line, col) for line, col, _ in problems] == [(2, column)]
    assert words in problems[0][2]


def test_ssp_file_without_aco_option_is_rejected_at_the_header():
    """An SSP report carries no ACO id: without --aco the header is refused."""
    assert (1, "aco_id") in [(n, c) for n, c, _ in header_problems(csv_text(*SSP_ROWS, header=SSP_HEADER))]


def test_cclf8_delimited_file_gives_address_and_zip():
    """CCLF8 with field names for a header (pipe-delimited) fills middle name, address, city, state, ZIP."""
    source = RosterSource.from_text(csv_text(CCLF8_ROW, header=CCLF8_HEADER), RosterOptions(aco_id="A1234"))
    assert source.format.name == "cclf8" and not source.fixed
    (row,) = list(source.rows())
    m = row.member
    assert (m.member_id, m.middle_name, m.address_line, m.city, m.state, m.zip) == (
        "1EG4TE5MK73",
        "Q",
        "12 ORCHARD LN",
        "SPRINGFIELD",
        "IL",
        "62701",
    )


def cclf8_record(**fields: str) -> str:
    """One fixed-width CCLF8 record (549 characters) with the given fields at their positions."""
    positions = {
        "mbi": (1, 11),
        "zip_cd": (28, 5),
        "dob": (33, 10),
        "sex": (43, 1),
        "first": (82, 30),
        "middle": (112, 15),
        "last": (127, 40),
        "line1": (189, 45),
        "city": (439, 100),
        "state": (539, 2),
        "zip5": (541, 5),
    }
    record = [" "] * 549
    for name, value in fields.items():
        start, length = positions[name]
        record[start - 1 : start - 1 + length] = list(value.ljust(length)[:length])
    return "".join(record)


def test_cclf8_fixed_width_file_is_recognised_and_read():
    """A fixed-width CCLF8 file (no header) is read by position."""
    record = cclf8_record(
        mbi="1EG4TE5MK73", dob="1960-01-02", sex="2", first="ALEX", last="TESTPATIENT", city="SPRINGFIELD", zip5="62701"
    )
    source = RosterSource.from_text(
        record + "\n" + record.replace("1EG4TE5MK73", "2EG4TE5MK74") + "\n", RosterOptions(aco_id="A1234")
    )
    assert source.format.name == "cclf8" and source.fixed
    members = [r.member for r in source.rows()]
    assert [(m.member_id, m.last_name, m.birth_date, m.sex, m.zip) for m in members] == [
        ("1EG4TE5MK73", "TESTPATIENT", "1960-01-02", "F", "62701"),
        ("2EG4TE5MK74", "TESTPATIENT", "1960-01-02", "F", "62701"),
    ]


def test_cclf8_fixed_width_problem_names_the_positions():
    """A bad field of a fixed-width record is reported with its positions."""
    record = cclf8_record(mbi="1EG4TE5MK73", dob="1960-13-02", sex="2", first="ALEX", last="TESTPATIENT")
    problems = problems_of(record + "\n", RosterOptions(aco_id="A1234", today=date(2026, 11, 20)))
    assert problems == [(1, "birth_date (positions 33-42)", "'1960-13-02' is not a date (YYYY-MM-DD)")]


def test_aco_column_that_disagrees_with_the_option_is_a_problem():
    """--aco must agree with an aco_id column when the file has both."""
    problems = problems_of(csv_text(ROW_MBI), RosterOptions(aco_id="ACO-OTHER", today=date(2026, 11, 20)))
    assert problems == [(2, "aco_id", "is 'ACO-TEST' but --aco says 'ACO-OTHER'")]


# -- second files: PCP and opt-outs --------------------------------------------


def test_pcp_file_supplies_the_pcp_of_an_ssp_member(tmp_path):
    """A --pcp file keyed by MBI fills the PCP of members whose file carries none."""
    pcp = read_pcp_file(write(tmp_path, "pcp.csv", "BENE_MBI_ID,pcp_npi,pcp_name\n1EG4TE5MK73,1234567893,Dr. Test\n"))
    options = RosterOptions(aco_id="A1234", pcp=pcp)
    rows = list(RosterSource.from_text(csv_text(*SSP_ROWS, header=SSP_HEADER), options).rows())
    assert [(r.member.member_id, r.member.pcp_npi, r.member.pcp_name) for r in rows] == [
        ("1EG4TE5MK73", "1234567893", "Dr. Test"),
        ("2EG4TE5MK74", "", ""),
        ("3EG4TE5MK75", "", ""),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mbi,pcp_npi\n1EG4TE5MK73,123\n", (2, "pcp_npi")),
        ("mbi,pcp_npi\n1EG4TE5MK7Z,1234567893\n", (2, "mbi")),
        ("mbi,pcp_npi\n1EG4TE5MK73,1234567893\n1EG4TE5MK73,1987654328\n", (3, "mbi")),
        ("patient,pcp_npi\nX,1234567893\n", (1, "mbi")),
    ],
)
def test_bad_pcp_file_is_reported_by_line_and_column(tmp_path, text, expected):
    """A PCP file's problems name its own line and column; the error says which file."""
    path = write(tmp_path, "pcp.csv", text)
    with pytest.raises(RosterError) as caught:
        read_pcp_file(path)
    assert [(line, col) for line, col, _ in caught.value.problems] == [expected]
    assert caught.value.source == str(path)


def test_opt_out_file_marks_members(tmp_path):
    """Members listed in an --opt-out file are read as opted out of data sharing."""
    opted = read_opt_out_file(write(tmp_path, "optout.csv", "mbi\n2EG4TE5MK74\n"))
    rows = list(
        RosterSource.from_text(
            csv_text(*SSP_ROWS, header=SSP_HEADER), RosterOptions(aco_id="A1234", opted_out=opted)
        ).rows()
    )
    assert [r.member.opted_out for r in rows] == [False, True, False]


# -- import: versions, added / changed / ended / rejected -----------------------


def import_text(where, text: str, name: str = "roster.csv", **kwargs):
    """Import ``text`` into ``where``: a test's folder (its herald.db), or a store (the ``database`` fixture)."""
    database = where / "herald.db" if isinstance(where, Path) and where.is_dir() else where
    path = write(Path(os.fspath(database)).parent, name, text)
    kwargs.setdefault("now", NOW)
    return import_roster_file(database, path, kwargs.pop("options", TODAY), **kwargs)


def test_first_import_adds_every_member_and_records_the_version(database):
    """A first import adds each member, records a version with its counts and file digest."""
    report = import_text(database, csv_text(ROW_MBI, ROW_MRN, ROW_NAME), by="alice")
    assert (report.added, report.changed, report.ended, report.unchanged, report.rejected) == (3, 0, 0, 0, 0)
    conn = open_roster_snapshot(database)
    (version,) = roster_imports(conn)
    assert (version["imported_by"], version["added"], version["format"], version["mode"]) == (
        "alice",
        3,
        "csv",
        "replace",
    )
    assert len(version["sha256"]) == 64


def test_second_import_reports_changed_unchanged_and_ended(database):
    """A new version updates changed members, leaves the same ones, end-dates the missing (never deletes)."""
    import_text(database, csv_text(ROW_MBI, ROW_MRN, ROW_NAME))
    changed = ROW_MBI.replace("Dr. Test", "Dr. Other")
    report = import_text(database, csv_text(changed, ROW_MRN), effective="2026-12-01")
    assert (report.added, report.changed, report.ended, report.unchanged) == (0, 1, 1, 1)
    conn = open_roster_snapshot(database)
    assert roster_member(conn, "ACO-TEST", "M-001")["pcp_name"] == "Dr. Other"
    gone = roster_member(conn, "ACO-TEST", "M-003")
    assert gone is not None and gone["effective_end"] == "2026-11-30"
    assert roster_count(conn) == 3
    assert roster_count(conn, active_on="2026-12-01") == 1  # M-002's own end date passed in June


def test_member_coming_back_starts_again(database):
    """A member ended by one version and listed again by a later one is effective from the new version."""
    import_text(database, csv_text(ROW_MBI, ROW_NAME))
    import_text(database, csv_text(ROW_MBI), effective="2026-12-01")
    report = import_text(database, csv_text(ROW_MBI, ROW_NAME), effective="2027-01-01")
    assert (report.added, report.changed, report.unchanged) == (0, 1, 1)
    back = roster_member(open_roster_snapshot(database), "ACO-TEST", "M-003")
    assert (back["effective_start"], back["effective_end"]) == ("2027-01-01", "")


def test_replacing_one_aco_leaves_the_others_alone(tmp_path):
    """A file of ACO-A ends members of ACO-A only."""
    import_text(tmp_path, csv_text(ROW_MBI, ROW_NAME.replace("ACO-TEST", "ACO-OTHER")))
    report = import_text(tmp_path, csv_text(ROW_MRN))
    assert report.ended == 1
    conn = open_roster_snapshot(tmp_path / "herald.db")
    assert roster_member(conn, "ACO-OTHER", "M-003")["effective_end"] == ""


def test_update_mode_ends_nobody(tmp_path):
    """An update (partial file) adds and changes members without ending the others."""
    import_text(tmp_path, csv_text(ROW_MBI, ROW_NAME))
    report = import_text(tmp_path, csv_text(ROW_MRN), replace=False)
    assert (report.added, report.ended) == (1, 0)


def test_bad_file_changes_nothing(database):
    """A file with a bad row is rejected whole: the roster and its versions stay as they were."""
    import_text(database, csv_text(ROW_MBI, ROW_NAME))
    with pytest.raises(RosterError) as caught:
        import_text(database, csv_text(ROW_MRN, ROW_MBI.replace(",F,", ",Z,")))
    assert [(line, col) for line, col, _ in caught.value.problems] == [(3, "sex")]
    conn = open_roster_snapshot(database)
    assert len(roster_imports(conn)) == 1
    assert roster_count(conn, active_on="2026-11-20") == 2


def test_duplicate_member_is_reported_on_each_line(tmp_path):
    """A member listed twice is a problem on both lines; with skip_bad_rows neither copy loads."""
    text = csv_text(ROW_MBI, ROW_MRN, ROW_MBI.replace("Alex", "Alexandra"))
    with pytest.raises(RosterError) as caught:
        import_text(tmp_path, text)
    assert [(line, col) for line, col, _ in caught.value.problems] == [(2, "member_id"), (4, "member_id")]
    assert "appears on lines 2, 4" in caught.value.problems[0][2]
    report = import_text(tmp_path, text, skip_bad_rows=True)
    assert (report.added, report.rejected) == (1, 2)


def test_same_member_id_in_two_acos_is_not_a_duplicate(tmp_path):
    """Member ids are unique per ACO only."""
    report = import_text(tmp_path, csv_text(ROW_MBI, ROW_MBI.replace("ACO-TEST", "ACO-OTHER")))
    assert report.added == 2


def test_a_skipped_row_does_not_end_its_member(tmp_path):
    """With skip_bad_rows, a member whose new row is bad keeps its current attribution."""
    import_text(tmp_path, csv_text(ROW_MBI, ROW_NAME))
    report = import_text(tmp_path, csv_text(ROW_MBI, ROW_NAME.replace(",F,", ",Z,")), skip_bad_rows=True)
    assert (report.ended, report.rejected, report.unchanged) == (0, 1, 1)


def test_a_file_with_no_good_rows_changes_nothing(database):
    """Even with skip_bad_rows a file with no good row is refused (it would end the whole roster)."""
    import_text(database, csv_text(ROW_MBI))
    with pytest.raises(RosterError):
        import_text(database, csv_text(ROW_MBI.replace("M-001", "M-009").replace(",F,", ",Z,")), skip_bad_rows=True)
    assert roster_count(open_roster_snapshot(database), active_on="2026-11-20") == 1


# -- lookups -------------------------------------------------------------------


def test_lookups_find_members_by_mbi_mrn_and_blocking_key(tmp_path):
    """The store's lookups return roster rows with every contract column (and the normalised person)."""
    import_text(tmp_path, csv_text(ROW_MBI, ROW_MRN, ROW_NAME))
    roster = StoredRoster(open_roster_snapshot(tmp_path / "herald.db"))
    (by_mbi,) = roster.by_mbi("1EG4TE5MK73")
    assert set(by_mbi) == {*MEMBER_COLUMNS, "person"} and by_mbi["member_id"] == "M-001"
    assert by_mbi["effective_end"] == "" and by_mbi["opted_out"] == 0
    assert by_mbi["person"].startswith("ALEX\x1fTESTPATIENT\x1f")
    assert roster.by_mbi("") == []
    assert [r["member_id"] for r in roster.by_mrn("MRN456", "testfac")] == ["M-002"]
    buckets = roster.blocking_buckets(["d:19560122", "nothing"], 10)
    assert list(buckets) == ["d:19560122"]
    assert [r["member_id"] for r in roster.members(buckets["d:19560122"])] == ["M-003"]
    (ref,) = buckets["d:19560122"]
    assert roster.persons([ref]) == {ref: roster.members([ref])[0]["person"]}
    assert roster.blocking_buckets([], 10) == {} and roster.members([]) == [] and roster.persons([]) == {}


def test_a_bucket_is_read_no_further_than_its_cap(tmp_path):
    """blocking_buckets returns at most cap + 1 members of a key (an over-full bucket is recognisable)."""
    # Six members born the same day (one bucket of the birth-date key), each with its own MRN.
    same_day = ROW_NAME.replace("2EG4TE5MK74,,,", "{mbi},MRN{n},TESTFAC,").replace("M-003", "M-{n}")
    import_text(tmp_path, csv_text(*(same_day.format(mbi="", n=n) for n in range(10, 16))))
    roster = StoredRoster(open_roster_snapshot(tmp_path / "herald.db"))
    assert len(roster.blocking_buckets(["d:19560122"], 100)["d:19560122"]) == 6
    assert len(roster.blocking_buckets(["d:19560122"], 3)["d:19560122"]) == 4


def test_confirmed_links_find_members_by_mrn(tmp_path):
    """by_mrn adds the members a reviewer linked to an MRN (main database) to the roster's own MRNs."""
    import_text(tmp_path, csv_text(ROW_MBI, ROW_MRN, ROW_NAME))
    from gateway.store.keys import KeyRing
    from gateway.store.sealing import mrn_hash

    conn = open_database(tmp_path / "herald.db")
    conn.execute(  # a link's MRN is found by its keyed hash (here the disabled ring's: no key given)
        "INSERT INTO confirmed_links VALUES (?, 'OTHERFAC', 'ACO-TEST', 'M-003', 1, 'alice', '2026-11-20', 'L-9')",
        (mrn_hash(KeyRing.disabled(), "L-9"),),
    )
    roster = StoredRoster(open_roster_snapshot(tmp_path / "herald.db"), conn)
    assert [r["member_id"] for r in roster.by_mrn("L-9", "OTHERFAC")] == ["M-003"]
    assert StoredRoster(open_roster_snapshot(tmp_path / "herald.db")).by_mrn("L-9", "OTHERFAC") == []


@pytest.mark.parametrize(
    ("lookup", "args"),
    [
        ("by_mbi", ("1EG4TE5MK73",)),
        ("by_mrn", ("MRN456", "TESTFAC")),
        ("blocking_buckets", (["d:19560122", "n:D262|H450", "x"], 50)),
        ("members", ([1, 2, 3],)),
        ("persons", ([1, 2, 3],)),
    ],
)
def test_lookups_never_scan_the_roster(tmp_path, lookup, args):
    """Every lookup is one statement whose plan uses an index: no full scan of roster_members or roster_keys."""
    import_text(tmp_path, csv_text(ROW_MBI, ROW_MRN, ROW_NAME))
    snapshot = open_roster_snapshot(tmp_path / "herald.db")
    conn = snapshot.conn
    statements = []
    conn.set_trace_callback(statements.append)
    getattr(StoredRoster(snapshot), lookup)(*args)
    conn.set_trace_callback(None)
    (sql,) = statements  # the trace shows the statement with its values bound
    plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
    assert "SEARCH" in plan, plan
    assert "SCAN r" not in plan and "SCAN roster_keys" not in plan and "SCAN roster_members" not in plan, plan


def test_keys_are_stored_as_64_bit_hashes():
    """A blocking key's stored form is a stable signed 64-bit integer."""
    assert key_id("d:19560122") == key_id("d:19560122") != key_id("d:19560123")
    assert -(2**63) <= key_id("d:19560122") < 2**63


def test_import_members_adds_without_ending(database):
    """The in-memory import (benchmarks, tests) adds members and ends nobody."""
    db = database
    members, _ = read_roster(csv_text(ROW_MBI, ROW_MRN), TODAY)
    assert import_members(db, members, "m.csv", now=NOW) == 2
    assert import_members(db, members[:1], "m.csv", now=NOW) == 1
    assert roster_count(open_roster_snapshot(db), active_on="2026-03-01") == 2


def test_members_from_before_version_3_move_to_the_roster_file(tmp_path):
    """Migrating a version-1 database publishes its members in roster.db (with blocking keys) and audits it."""
    from gateway.store.schema import _MIGRATIONS_TABLE, _SCHEMA_V1
    from gateway.store.schema import run_sql as _run_sql

    db = tmp_path / "herald.db"
    conn = open_database(db)
    _run_sql(conn, _MIGRATIONS_TABLE)
    _run_sql(conn, _SCHEMA_V1)
    conn.execute("INSERT INTO migrations VALUES (1, '2026-01-01')")
    conn.execute(
        "INSERT INTO roster_members (aco_id, member_id, mbi, last_name, first_name, birth_date, sex, name_key, "
        "imported_at) VALUES ('ACO-TEST', 'M-003', '', 'Desrosiers', 'Hélène', '1956-01-22', 'F', 'x', 'then')"
    )
    migrate(conn)
    # The store sets the rows aside; the layer above it (which can normalise them) publishes them.
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'roster_members'").fetchone() is None
    conn.close()
    with opened_store(db):
        pass
    conn = open_database(db)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '%roster_members'").fetchone() is None
    assert [r["kind"] for r in conn.execute("SELECT kind FROM events")] == ["roster-imported"]
    roster = StoredRoster(open_roster_snapshot(db))
    (ref,) = roster.blocking_buckets(["d:19560122"], 10)["d:19560122"]
    assert [r["member_id"] for r in roster.members([ref])] == ["M-003"]
    assert roster_imports(open_roster_snapshot(db))[0]["format"] == "migrated"
    assert not roster_path(db).with_name("roster.db.importing").exists()


def test_roster_member_equals_its_row():
    """RosterMember.row() has exactly the contract's columns, opt-out as 0/1."""
    member = RosterMember("A", "M", "", "", "", "L", "F", "1960-01-02", "F", "", "", "", "", "", opted_out=True)
    assert tuple(member.row()) == MEMBER_COLUMNS and member.row()["opted_out"] == 1


def test_a_file_with_many_problems_reports_the_first_and_counts_the_rest(tmp_path, monkeypatch):
    """Problems beyond the report's limit are counted, not listed (a broken million-row file stays small)."""
    import gateway.store.roster_import

    monkeypatch.setattr(gateway.store.roster_import, "MAX_PROBLEMS", 3)
    bad = [ROW_MBI.replace("M-001", f"M-{n:03d}").replace(",F,", ",Z,") for n in range(10)]
    with pytest.raises(RosterError) as caught:
        import_text(tmp_path, csv_text(*bad))
    assert [line for line, _, _ in caught.value.problems] == [2, 3, 4]
    assert caught.value.more == 7


def test_an_import_recomputes_keys_and_persons_stored_under_another_recipe(tmp_path):
    """A roster file written under an older blocking recipe gets every member's keys and normalised
    person recomputed by the next import (matching reads only what the current recipe would store)."""
    import sqlite3

    import_text(tmp_path, csv_text(ROW_MBI, ROW_MRN, ROW_NAME))
    published = roster_path(tmp_path / "herald.db")
    stale = sqlite3.connect(published)  # an older Herald's file, edited here to look like one
    stale.execute("UPDATE roster_meta SET value = 'older' WHERE name = 'blocking_recipe'")
    stale.execute("DELETE FROM roster_keys")
    stale.execute("UPDATE roster_members SET person = ''")
    stale.commit()
    stale.close()
    import_text(tmp_path, csv_text(ROW_MBI), replace=False)
    roster = StoredRoster(open_roster_snapshot(tmp_path / "herald.db"))
    buckets = roster.blocking_buckets(["d:19560122"], 10)
    (member,) = roster.members(buckets["d:19560122"])
    assert member["member_id"] == "M-003" and member["person"].startswith("HELENE\x1fDESROSIERS\x1f")


# -- columns Herald does not read ------------------------------------------------


def test_unknown_column_is_reported_by_name_with_its_nearest_known_name():
    """A header no roster column reads is named as written, with the nearest accepted spelling; the rest loads."""
    source = RosterSource.from_text(csv_text(ROW_MBI + ",62701,12 Orchard Lane", header=HEADER + ",zip5,Address1"))
    assert [u.warning() for u in source.unread] == [
        (1, "'zip5'", "not a roster column Herald reads (nearest: 'zip'); its values are not imported"),
        (
            1,
            "'Address1'",
            "not a roster column Herald reads (nearest: 'address', which feeds address_line); "
            "its values are not imported",
        ),
    ]
    (row,) = list(source.rows())
    assert row.problems == () and row.member.zip == "" and row.member.address_line == ""


def test_nearest_known_name_includes_the_configs_column_names():
    """[roster.columns] names are spellings too: a near miss of one is pointed at it."""
    text = "Patient No,Medicare ID,Surname,Forename,DOB,Gender,Patient Zip\nP-7,1EG4TE5MK73,Test,Alex,1960-01-02,F,1\n"
    columns = {"member_id": "Patient No", "mbi": "Medicare ID", "last_name": "Surname", "zip": "Patient ZIP Code"}
    columns |= {"first_name": "Forename", "birth_date": "DOB", "sex": "Gender"}
    source = RosterSource.from_text(text, RosterOptions(aco_id="ACO-SITE", columns=columns))
    (unread,) = source.unread
    assert (unread.header, unread.nearest, unread.feeds) == ("Patient Zip", "patient zip code", "zip")


def test_strict_refuses_an_unknown_column_and_imports_nothing(tmp_path):
    """With strict, an unread column is a line-1 problem naming it and its nearest name; the roster stays as it was."""
    first = import_text(tmp_path, csv_text(ROW_MBI, ROW_MRN))
    strict = RosterOptions(today=date(2026, 11, 20), strict=True)
    with pytest.raises(RosterError) as caught:
        import_text(tmp_path, csv_text(ROW_MBI + ",x", ROW_NAME + ",y", header=HEADER + ",zip5"), options=strict)
    assert caught.value.problems == [(1, "'zip5'", "not a roster column Herald reads (nearest: 'zip')")]
    roster = open_roster_snapshot(tmp_path / "herald.db")
    assert [v["id"] for v in roster_imports(roster)] == [first.import_id]
    assert roster_count(roster) == 2 and roster_member(roster, "ACO-TEST", "M-003") is None


def test_an_import_reports_its_unread_columns_and_audits_their_names_only(tmp_path):
    """The report carries the unread columns; the audit event names their headers, never a value."""
    report = import_text(tmp_path, csv_text(ROW_MBI + ",62701", header=HEADER + ",zip5"))
    assert [u.header for u in report.unread_columns] == ["zip5"] and report.added == 1
    assert report.warnings == [
        (1, "'zip5'", "not a roster column Herald reads (nearest: 'zip'); its values are not imported")
    ]
    conn = open_database(tmp_path / "herald.db", readonly=True)
    (detail,) = [r[0] for r in conn.execute("SELECT detail FROM events WHERE kind = 'roster-imported'")]
    assert '"header": "zip5"' in detail and '"nearest": "zip"' in detail and "62701" not in detail


def test_columns_the_format_ignores_are_said_once_and_allowed_under_strict():
    """An SSP report's HICN, death date and HCC columns are one informational line, and --strict accepts them."""
    header = SSP_HEADER + "," + ",".join(f"HCC_COL_{n}" for n in range(1, 91))
    rows = [r + "," + ",".join("0" * 90) for r in SSP_ROWS]
    source = RosterSource.from_text(csv_text(*rows, header=header), RosterOptions(aco_id="A1234", strict=True))
    assert source.unread == ()
    assert source.not_read_note() == (
        "not read, as the ssp format says: BENE_HIC_NUM, BENE_DEATH_DT, HCC_COL_1 .. HCC_COL_90 (90 columns)"
    )
    assert len([r for r in source.rows() if r.member]) == 3


def test_cclf8_fields_the_format_ignores_are_not_warnings():
    """A delimited CCLF8's HICN, FIPS codes, race and BENE_ZIP_CD (beside GEO_ZIP5_CD) are the format's, not unknown."""
    source = RosterSource.from_text(csv_text(CCLF8_ROW, header=CCLF8_HEADER), RosterOptions(aco_id="A1", strict=True))
    assert source.unread == ()
    assert source.not_read == ("BENE_HIC_NUM", "BENE_FIPS_STATE_CD", "BENE_FIPS_CNTY_CD", "BENE_ZIP_CD", "BENE_RACE_CD")


def test_a_blank_header_cell_is_reported_by_its_position():
    """A column with no name is said by its position (and refused under strict)."""
    text = csv_text(
        ROW_MBI.replace(",Testpatient,", ",Testpatient,,"), header=HEADER.replace(",last_name,", ",last_name,,")
    )
    (blank,) = RosterSource.from_text(text, TODAY).unread
    assert blank.warning() == (1, "6 (no name)", "the column has no name; its values are not imported")
    assert header_problems(text, RosterOptions(strict=True)) == [(1, "6 (no name)", "the column has no name")]


def test_a_second_column_for_a_roster_column_is_reported():
    """Two headers for one roster column (address and street): the one not read is named with the one that is."""
    source = RosterSource.from_text(csv_text(ROW_MBI + ",12 Orchard Lane,Orchard", header=HEADER + ",address,street"))
    assert [u.warning() for u in source.unread] == [
        (1, "'street'", "a second column for address_line, which is read from 'address'; its values are not imported")
    ]


# -- name suffix -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "kept"),
    [("Jr.", "JR"), ("jr", "JR"), ("Junior", "JR"), ("SR.", "SR"), ("senior", "SR"), ("III", "III"), ("iv", "IV")]
    + [("I I", "II"), ("3rd", "3RD"), ("2ND", "2ND"), ("", "")],
)
def test_name_suffix_is_read_and_normalised(written, kept):
    """A generational suffix loses its dots and spaces, is upper-cased, and JUNIOR/SENIOR become JR/SR."""
    (member,), problems = read_roster(csv_text(ROW_MBI + f",{written}", header=HEADER + ",suffix"), TODAY)
    assert problems == [] and member.name_suffix == kept
    assert member.row()["name_suffix"] == kept


@pytest.mark.parametrize("written", ["Esq", "MD", "5TH", "J"])
def test_a_bad_name_suffix_is_a_problem_naming_line_and_column(written):
    """A suffix that is not generational is a problem of its row, by line and the file's column name."""
    text = csv_text(ROW_MRN + ",", ROW_MBI + f",{written}", header=HEADER + ",Name Suffix")
    problems = problems_of(text)
    assert [(line, column) for line, column, _ in problems] == [(3, "Name Suffix")]
    assert problems[0][2].startswith(f"{written!r} is not a generational suffix (JR, SR, I, II, III")


def test_name_suffix_is_stored_and_looked_up(tmp_path):
    """An imported member's suffix is kept in the roster file and returned by a lookup."""
    import_text(tmp_path, csv_text(ROW_MBI + ",jr.", header=HEADER + ",name_suffix"))
    by_mbi = StoredRoster(open_roster_snapshot(tmp_path / "herald.db")).by_mbi("1EG4TE5MK73")
    assert [m["name_suffix"] for m in by_mbi] == ["JR"]


# The roster file's schema version 1, as Herald wrote it before name_suffix.
ROSTER_SCHEMA_V1 = """
CREATE TABLE roster_members (id INTEGER PRIMARY KEY, aco_id TEXT NOT NULL DEFAULT '',
    member_id TEXT NOT NULL DEFAULT '', mbi TEXT NOT NULL DEFAULT '', mrn TEXT NOT NULL DEFAULT '',
    mrn_authority TEXT NOT NULL DEFAULT '', last_name TEXT NOT NULL DEFAULT '', first_name TEXT NOT NULL DEFAULT '',
    middle_name TEXT NOT NULL DEFAULT '', birth_date TEXT NOT NULL DEFAULT '', sex TEXT NOT NULL DEFAULT '',
    address_line TEXT NOT NULL DEFAULT '', city TEXT NOT NULL DEFAULT '', state TEXT NOT NULL DEFAULT '',
    zip TEXT NOT NULL DEFAULT '', phone TEXT NOT NULL DEFAULT '', pcp_npi TEXT NOT NULL DEFAULT '',
    pcp_name TEXT NOT NULL DEFAULT '', care_manager TEXT NOT NULL DEFAULT '', effective_start TEXT NOT NULL DEFAULT '',
    effective_end TEXT NOT NULL DEFAULT '', opted_out INTEGER NOT NULL DEFAULT 0,
    person TEXT NOT NULL DEFAULT '',
    row_hash BLOB,
    import_id INTEGER NOT NULL,
    ended_by INTEGER,
    UNIQUE (aco_id, member_id)
);
CREATE INDEX roster_mbi ON roster_members (mbi) WHERE mbi != '';
CREATE INDEX roster_mrn ON roster_members (mrn, mrn_authority COLLATE NOCASE) WHERE mrn != '';
CREATE INDEX roster_end ON roster_members (effective_end);
CREATE TABLE roster_keys (
    key INTEGER NOT NULL,
    member INTEGER NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE TABLE roster_imports (
    id INTEGER PRIMARY KEY,
    imported_at TEXT NOT NULL,
    imported_by TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    format TEXT NOT NULL,
    mode TEXT NOT NULL,
    aco_ids TEXT NOT NULL,
    effective_date TEXT,
    rows INTEGER NOT NULL DEFAULT 0,
    added INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0,
    ended INTEGER NOT NULL DEFAULT 0,
    unchanged INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE roster_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)
"""


def write_version_1_roster(db) -> None:
    """A roster.db as schema version 1 wrote it, holding ROW_MBI's member (its v1 row hash, person and keys)."""
    import hashlib
    import sqlite3

    from gateway.matching.roster import DERIVATION

    (member,), _ = read_roster(csv_text(ROW_MBI), TODAY)
    row = {c: v for c, v in member.row().items() if c != "name_suffix"}
    digest = hashlib.blake2b("\x1f".join(str(v) for v in row.values()).encode("utf-8"), digest_size=16).digest()
    conn = sqlite3.connect(roster_path(db), isolation_level=None)
    for statement in ROSTER_SCHEMA_V1.split(";"):
        conn.execute(statement)
    conn.execute("PRAGMA user_version=1")
    conn.execute(
        "INSERT INTO roster_imports (imported_at, imported_by, file, sha256, format, mode, aco_ids, rows, added) "
        "VALUES ('2026-01-01T00:00:00', 'old', 'old.csv', '', 'csv', 'replace', 'ACO-TEST', 1, 1)"
    )
    cols, marks = ", ".join(row), ", ".join("?" * len(row))
    conn.execute(
        f"INSERT INTO roster_members ({cols}, person, row_hash, import_id) VALUES ({marks}, ?, ?, 1)",
        (*row.values(), member.person, digest),
    )
    conn.executemany(
        "INSERT INTO roster_keys VALUES (?, 1)", [(key_id(k),) for k in DERIVATION.derive(member.row())[1]]
    )
    conn.execute("INSERT INTO roster_meta VALUES ('blocking_recipe', ?)", (DERIVATION.recipe,))
    conn.close()


def test_a_version_1_roster_file_is_read_and_then_upgraded_by_an_import(tmp_path):
    """A roster.db from before name_suffix is read as it is (suffix ''), and the next import upgrades it to
    the current version without counting its unchanged members as changed."""
    import sqlite3

    from gateway.store.roster_file import ROSTER_SCHEMA_VERSION

    db = tmp_path / "herald.db"
    write_version_1_roster(db)
    snapshot = open_roster_snapshot(db)
    (member,) = StoredRoster(snapshot).by_mbi("1EG4TE5MK73")
    assert (member["member_id"], member["name_suffix"]) == ("M-001", "")
    assert roster_member(snapshot, "ACO-TEST", "M-001")["name_suffix"] == ""
    snapshot.close()

    report = import_text(tmp_path, csv_text(ROW_MBI + ",", ROW_NAME + ",III", header=HEADER + ",name_suffix"))
    assert (report.added, report.changed, report.unchanged, report.ended) == (1, 0, 1, 0)
    conn = sqlite3.connect(roster_path(db))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == ROSTER_SCHEMA_VERSION
    conn.close()
    roster = open_roster_snapshot(db)
    assert roster_member(roster, "ACO-TEST", "M-003")["name_suffix"] == "III"
    assert roster_member(roster, "ACO-TEST", "M-001")["name_suffix"] == ""


def test_a_rejected_import_leaves_a_version_1_roster_file_as_it_was(tmp_path):
    """The upgrade is made in the import's copy: a refused file publishes nothing, the old file stays readable."""
    import sqlite3

    db = tmp_path / "herald.db"
    write_version_1_roster(db)
    with pytest.raises(RosterError):
        import_text(tmp_path, csv_text(ROW_MBI.replace(",F,", ",Z,")))
    conn = sqlite3.connect(roster_path(db))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    assert roster_count(open_roster_snapshot(db)) == 1
