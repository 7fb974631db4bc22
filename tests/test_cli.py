"""The offline CLI commands: convert, roster import, log list and log show."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_intake import accepted_record

from gateway.app.cli import main
from gateway.app.replay import split_messages
from gateway.app.roster import import_roster_file
from gateway.config import default_recipients, load_config
from gateway.conversion.convert import validate_bundle
from gateway.conversion.vocabulary import load_vocabulary
from gateway.pipeline.process import process_message
from gateway.store import Store, StoredRoster, open_database, open_roster_snapshot, roster_count
from gateway.store.keys import KeyRing
from gateway.store.messages import apply_outcomes, pending_messages, record_frame
from gateway.store.sealing import member_pseudonym

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
ADMIT = SAMPLES / "epic-v251-a01-admit-from-ed.hl7"
CP1252_ADMIT = SAMPLES / "meditech-v24-a01-admit-cp1252.hl7"
NOW = datetime(2026, 11, 20, 8, 0, 0, tzinfo=UTC)

ROSTER_HEADER = "member_id,mbi,mrn,mrn_authority,last_name,first_name,birth_date,sex,aco_id,pcp_npi"
ROSTER_ROWS = [
    "T-1,1EG4TE5MK73,,,Testpatient,Alex,1960-01-02,F,ACO-TEST,1234567893",
    "T-2,,MRN2,TESTFAC,Sample,Sam,1970-05-06,M,ACO-TEST,",
    "T-3,2EG4TE5MK74,,,Example,Eve,1980-12-31,F,ACO-TEST,",
]

NO_PID = (
    "MSH|^~\\&|TESTAPP|TESTFAC|HERALD|ACO|20260301120000||ADT^A01|CTRL0001|P|2.5.1\r"
    "EVN|A01|20260301120000\r"
    "PV1|1|I|WARD1^101^A^TESTFAC\r"
)


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def explain(result) -> str:
    """What to print when an assertion on a CLI result fails."""
    return f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def assert_clean_exit(result, code: int) -> None:
    """The command exited with ``code`` through click, not by a traceback."""
    assert result.exit_code == code, explain(result)
    assert isinstance(result.exception, SystemExit | None), explain(result)
    assert "Traceback" not in result.output


def roster_file(tmp_path: Path, *rows: str, name: str = "roster.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([ROSTER_HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def stored_messages(data: Path, paths: list[Path]) -> None:
    """A data folder holding ``paths`` stored by intake and run through the pipeline, roster loaded.

    Its store is where the CLI finds it: ``herald.db``, or the database ``HERALD_STORE`` names."""
    db = load_config(None, data_dir=data).database
    keys = KeyRing.load(None)  # the ring the CLI reads too ($HERALD_KEYS, set by conftest)
    import_roster_file(db, SAMPLES / "roster.csv", now=NOW, keys=keys)
    store = Store(db, reactor=object(), clock=lambda: NOW, keys=keys)  # never started: used for its SQL only
    conn = store._conn
    now = NOW.isoformat(timespec="milliseconds")
    for path in paths:
        raw = split_messages(path.read_bytes())[0]
        record_frame(conn, accepted_record(raw), now)
    lookups = StoredRoster(open_roster_snapshot(db, keys), conn)
    vocab = load_vocabulary()
    recipients = default_recipients(data)
    outcomes = [process_message(p, vocab, UTC, lookups, recipients) for p in pending_messages(conn, 0, 100)]
    apply_outcomes(conn, outcomes, now, 0.0)
    conn.close()


# -- convert -----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.hl7")), ids=lambda p: p.name)
def test_convert_prints_a_valid_bundle(path):
    """`herald convert SAMPLE` exits 0 and prints one valid FHIR message Bundle as JSON."""
    result = run("convert", path)
    assert_clean_exit(result, 0)
    bundle = json.loads(result.stdout)
    assert bundle["type"] == "message"
    assert bundle["entry"][0]["resource"]["resourceType"] == "MessageHeader"
    validate_bundle(bundle)


def test_convert_keeps_accents_of_a_cp1252_message():
    """A windows-1252 sample is decoded, and the JSON is printed unescaped."""
    result = run("convert", CP1252_ADMIT)
    assert_clean_exit(result, 0)
    assert "HÉLÈNE" in result.stdout


def test_convert_honours_the_declared_msh18_charset(tmp_path):
    """A file declaring 8859/2 in MSH-18 is decoded with it (not guessed as windows-1252)."""
    text = (
        "MSH|^~\\&|TESTAPP|TESTFAC|HERALD|ACO|20260301120000||ADT^A01|C1|P|2.5.1||||||8859/2\r"
        "PID|1||MRN1^^^TESTFAC^MR||WĄSIK^ŁUKASZ||19600102|M\r"
        "PV1|1|I|WARD1^101^A^TESTFAC\r"
    )
    path = tmp_path / "latin2.hl7"
    path.write_bytes(text.encode("iso8859-2"))
    result = run("convert", path)
    assert_clean_exit(result, 0)
    patient = json.loads(result.stdout)["entry"][2]["resource"]
    assert patient["name"][0] == {"family": "WĄSIK", "given": ["ŁUKASZ"]}


def test_convert_of_several_messages_prints_a_list(tmp_path):
    """A file holding two messages gives a JSON list of two Bundles."""
    path = tmp_path / "two.hl7"
    path.write_bytes(ADMIT.read_bytes() + b"\r" + (SAMPLES / "cerner-v23-a01-admit.hl7").read_bytes())
    result = run("convert", path)
    assert_clean_exit(result, 0)
    bundles = json.loads(result.stdout)
    assert [b["type"] for b in bundles] == ["message", "message"]


def test_convert_without_pid_exits_2_naming_pid(tmp_path):
    """An ADT with no PID exits 2 with a message naming PID and the HL7 error code, nothing on stdout."""
    path = tmp_path / "no-pid.hl7"
    path.write_text(NO_PID)
    result = run("convert", path)
    assert_clean_exit(result, 2)
    assert "PID: the ADT message has no PID segment (HL7 error 100)" in result.stderr, explain(result)
    assert str(path) in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "content",
    [b"this is a letter, not an HL7 message\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00", b""],
    ids=["text", "binary", "empty"],
)
def test_convert_of_a_non_hl7_file_exits_2(tmp_path, content):
    """A file with no MSH segment exits 2 saying so."""
    path = tmp_path / "not-hl7.txt"
    path.write_bytes(content)
    result = run("convert", path)
    assert_clean_exit(result, 2)
    assert "no HL7 message" in result.stderr, explain(result)


def test_convert_of_an_oru_exits_2_naming_the_type(tmp_path):
    """A message that is not ADT exits 2 saying what it is."""
    path = tmp_path / "oru.hl7"
    path.write_text(NO_PID.replace("ADT^A01", "ORU^R01"))
    result = run("convert", path)
    assert_clean_exit(result, 2)
    assert "ORU is not ADT" in result.stderr, explain(result)


def test_convert_prints_warnings_on_stderr_only(tmp_path):
    """Conversion warnings go to stderr; stdout stays parseable JSON."""
    path = tmp_path / "bad-dob.hl7"
    path.write_bytes(ADMIT.read_bytes().replace(b"|19520704|", b"|19521304|"))
    result = run("convert", path)
    assert_clean_exit(result, 0)
    assert "warning: PID-7" in result.stderr, explain(result)
    assert "birthDate" not in json.loads(result.stdout)["entry"][2]["resource"]


def test_convert_of_a_missing_file_is_a_usage_error(tmp_path):
    """A path that does not exist is rejected by click with exit 2."""
    result = run("convert", tmp_path / "absent.hl7")
    assert_clean_exit(result, 2)
    assert "does not exist" in result.output


# -- roster import -----------------------------------------------------------


def test_roster_import_loads_a_good_file(tmp_path):
    """A clean roster loads every member and says how many."""
    data = tmp_path / "data"
    result = run("roster", "import", roster_file(tmp_path, *ROSTER_ROWS), "--data", data)
    assert_clean_exit(result, 0)
    assert "added 3, changed 0, ended 0, unchanged 0, rejected 0 (of 3 rows)" in result.output, explain(result)
    assert roster_count(open_roster_snapshot(data / "herald.db")) == 3


def test_roster_import_of_a_bad_file_exits_2_and_loads_nothing(tmp_path):
    """A roster with a bad row exits 2 listing FILE: line N, column C, and leaves the roster as it was."""
    data = tmp_path / "data"
    assert_clean_exit(run("roster", "import", roster_file(tmp_path, ROSTER_ROWS[0]), "--data", data), 0)
    bad = roster_file(
        tmp_path,
        ROSTER_ROWS[1],
        ROSTER_ROWS[2].replace("1980-12-31", "31/12/80"),
        ROSTER_ROWS[0].replace("T-1", "T-4").replace(",F,", ",Z,"),
        name="bad.csv",
    )
    result = run("roster", "import", bad, "--data", data)
    assert_clean_exit(result, 2)
    assert f"{bad}: line 3, column birth_date: '31/12/80' is not a date" in result.stderr, explain(result)
    assert f"{bad}: line 4, column sex:" in result.stderr, explain(result)
    assert "nothing was loaded" in result.stderr
    assert roster_count(open_roster_snapshot(data / "herald.db")) == 1


def test_roster_import_with_missing_column_exits_2_naming_it(tmp_path):
    """A header without the sex column is reported on line 1, column sex."""
    path = tmp_path / "no-sex.csv"
    path.write_text("member_id,mbi,last_name,first_name,birth_date,aco_id\nT-1,1EG4TE5MK73,A,B,1960-01-02,X\n")
    result = run("roster", "import", path, "--data", tmp_path / "data")
    assert_clean_exit(result, 2)
    assert f"{path}: line 1, column sex: required column is missing" in result.stderr, explain(result)
    assert not (tmp_path / "data" / "herald.db").exists()


def test_roster_import_skip_bad_rows_loads_the_good_ones(tmp_path):
    """--skip-bad-rows loads the good rows and reports each skipped row by line and column."""
    data = tmp_path / "data"
    path = roster_file(tmp_path, ROSTER_ROWS[0], ROSTER_ROWS[1].replace("TESTFAC", ""), ROSTER_ROWS[2])
    result = run("roster", "import", path, "--skip-bad-rows", "--data", data)
    assert_clean_exit(result, 0)
    assert f"{path}: line 3, column mrn_authority: is empty but an MRN is given (row skipped)" in result.stderr
    assert "added 2, changed 0, ended 0, unchanged 0, rejected 1 (of 3 rows)" in result.stdout, explain(result)
    assert roster_count(open_roster_snapshot(data / "herald.db")) == 2


def test_roster_import_of_duplicates_reports_their_lines(tmp_path):
    """A member listed twice is reported on both lines; with --skip-bad-rows neither copy loads."""
    data = tmp_path / "data"
    path = roster_file(tmp_path, ROSTER_ROWS[0], ROSTER_ROWS[1], ROSTER_ROWS[0].replace("Alex", "Alexa"))
    result = run("roster", "import", path, "--data", data)
    assert_clean_exit(result, 2)
    assert f"{path}: line 2, column member_id:" in result.stderr, explain(result)
    assert f"{path}: line 4, column member_id:" in result.stderr, explain(result)
    skipped = run("roster", "import", path, "--skip-bad-rows", "--data", data)
    assert_clean_exit(skipped, 0)
    conn = open_roster_snapshot(data / "herald.db").conn
    assert [r[0] for r in conn.execute("SELECT member_id FROM roster_members")] == ["T-2"]


SSP_HEADER = "BENE_MBI_ID,BENE_HIC_NUM,BENE_1ST_NAME,BENE_LAST_NAME,BENE_SEX_CD,BENE_BRTH_DT,BENE_DEATH_DT"
SSP_ROWS = ["1EG4TE5MK73,,ALEX,TESTPATIENT,2,01/02/1960,", "2EG4TE5MK74,,SAM,SAMPLE,1,05/06/1970,"]


def ssp_file(tmp_path: Path, *rows: str, header: str = SSP_HEADER, name: str = "ssp.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_roster_import_of_an_ssp_report_with_pcp_and_opt_out_files(tmp_path):
    """An SSP table 1-1 with --aco, --pcp and --opt-out loads; roster versions lists the import."""
    data = tmp_path / "data"
    pcp = tmp_path / "pcp.csv"
    pcp.write_text("mbi,pcp_npi,pcp_name\n1EG4TE5MK73,1234567893,Dr. Test\n", encoding="utf-8")
    opt_out = tmp_path / "optout.csv"
    opt_out.write_text("mbi\n2EG4TE5MK74\n", encoding="utf-8")
    result = run(
        "roster",
        "import",
        ssp_file(tmp_path, *SSP_ROWS),
        "--aco",
        "A1234",
        "--pcp",
        pcp,
        "--opt-out",
        opt_out,
        "--effective",
        "2026-10-01",
        "--by",
        "carol",
        "--data",
        data,
    )
    assert_clean_exit(result, 0)
    assert "roster version 1 of A1234, effective 2026-10-01" in result.stdout, explain(result)
    conn = open_roster_snapshot(data / "herald.db").conn
    rows = conn.execute("SELECT member_id, pcp_npi, opted_out, effective_start FROM roster_members")
    # An SSP report's member id is the MBI: it is stored as a keyed pseudonym, never as the MBI.
    keys = KeyRing.load(None)
    assert sorted(tuple(r) for r in rows) == sorted(
        [
            (member_pseudonym(keys, "1EG4TE5MK73"), "1234567893", 0, "2026-10-01"),
            (member_pseudonym(keys, "2EG4TE5MK74"), "", 1, "2026-10-01"),
        ]
    )
    assert member_pseudonym(keys, "1EG4TE5MK73").startswith("MBI-")
    assert b"1EG4TE5MK73" not in (data / "roster.db").read_bytes()
    versions = run("roster", "versions", "--data", data)
    assert_clean_exit(versions, 0)
    assert "ssp.csv (ssp, replace, by carol)" in versions.stdout, explain(versions)


@pytest.mark.parametrize(
    ("rows", "header", "where"),
    [
        (SSP_ROWS, SSP_HEADER.replace("BENE_SEX_CD", "SEX"), "line 1, column sex: required column is missing"),
        ([SSP_ROWS[0].replace("01/02/1960", "1960/02/01")], SSP_HEADER, "line 2, column BENE_BRTH_DT: '1960/02/01'"),
        ([SSP_ROWS[0].replace("1EG4TE5MK73", "1EG4TE5MK7O")], SSP_HEADER, "line 2, column BENE_MBI_ID: is not a valid"),
        ([SSP_ROWS[0].replace(",2,", ",F,")], SSP_HEADER, "line 2, column BENE_SEX_CD: 'F' is not one of 0, 1, 2"),
        ([SSP_ROWS[0], SSP_ROWS[1], SSP_ROWS[0]], SSP_HEADER, "line 4, column member_id: member MBI-"),
    ],
)
def test_bad_ssp_report_exits_2_naming_line_and_column(tmp_path, rows, header, where):
    """Wrong columns, bad dates, bad MBIs, bad sex codes and duplicates are reported by line and column."""
    data = tmp_path / "data"
    path = ssp_file(tmp_path, *rows, header=header)
    result = run("roster", "import", path, "--aco", "A1234", "--data", data)
    assert_clean_exit(result, 2)
    assert f"{path}: {where}" in result.stderr, explain(result)
    assert "rejected, nothing was loaded" in result.stderr


def test_ssp_report_without_aco_exits_2(tmp_path):
    """A CMS file carries no ACO id: without --aco (or [roster] aco_id) it is refused."""
    path = ssp_file(tmp_path, *SSP_ROWS)
    result = run("roster", "import", path, "--data", tmp_path / "data")
    assert_clean_exit(result, 2)
    assert f"{path}: line 1, column aco_id: the file has no ACO id column: give --aco" in result.stderr


def test_bad_pcp_file_exits_2_naming_that_file(tmp_path):
    """A problem in the --pcp file names the PCP file, its line and column, and loads nothing."""
    pcp = tmp_path / "pcp.csv"
    pcp.write_text("mbi,pcp_npi\n1EG4TE5MK73,42\n", encoding="utf-8")
    result = run("roster", "import", ssp_file(tmp_path, *SSP_ROWS), "--aco", "A1", "--pcp", pcp, "--data", tmp_path)
    assert_clean_exit(result, 2)
    assert f"{pcp}: line 2, column pcp_npi: is not a 10-digit NPI" in result.stderr, explain(result)
    assert not (tmp_path / "herald.db").exists()


def test_roster_aco_from_config(tmp_path):
    """[roster] aco_id gives the ACO of files that carry none."""
    config = tmp_path / "herald.toml"
    config.write_text('[roster]\naco_id = "A7777"\n', encoding="utf-8")
    result = run("roster", "import", ssp_file(tmp_path, *SSP_ROWS), "--config", config, "--data", tmp_path / "d")
    assert_clean_exit(result, 0)
    assert "of A7777" in result.stdout, explain(result)


def test_roster_import_names_an_unknown_column_on_stderr_and_loads_the_rest(tmp_path):
    """A column Herald does not read is said on stderr by name with its nearest known name; the import goes on."""
    data = tmp_path / "data"
    path = tmp_path / "roster.csv"
    path.write_text("\n".join([ROSTER_HEADER + ",zip5", *(r + ",62701" for r in ROSTER_ROWS)]) + "\n")
    result = run("roster", "import", path, "--data", data)
    assert_clean_exit(result, 0)
    assert (
        f"{path}: line 1, column 'zip5': not a roster column Herald reads (nearest: 'zip'); its values are not imported"
    ) in result.stderr, explain(result)
    assert "added 3," in result.stdout, explain(result)


def test_roster_import_strict_refuses_an_unknown_column_and_loads_nothing(tmp_path):
    """--strict: an unknown column exits 2 naming it and its nearest name; the previous roster version stays."""
    data = tmp_path / "data"
    assert_clean_exit(run("roster", "import", roster_file(tmp_path, ROSTER_ROWS[0]), "--data", data), 0)
    path = tmp_path / "wider.csv"
    path.write_text("\n".join([ROSTER_HEADER + ",Address1", *(r + ",12 Elm St" for r in ROSTER_ROWS)]) + "\n")
    result = run("roster", "import", path, "--strict", "--data", data)
    assert_clean_exit(result, 2)
    assert f"{path}: line 1, column 'Address1': not a roster column Herald reads (nearest: 'address'" in result.stderr
    assert "rejected, nothing was loaded" in result.stderr, explain(result)
    roster = open_roster_snapshot(data / "herald.db")
    assert roster_count(roster) == 1 and roster.version == 1


def test_roster_strict_from_config_and_no_strict_overrides_it(tmp_path):
    """[roster] strict = true refuses an unknown column; --no-strict on the command line wins."""
    config = tmp_path / "herald.toml"
    config.write_text("[roster]\nstrict = true\n", encoding="utf-8")
    path = tmp_path / "roster.csv"
    path.write_text("\n".join([ROSTER_HEADER + ",", *(r + "," for r in ROSTER_ROWS)]) + "\n")
    refused = run("roster", "import", path, "--config", config, "--data", tmp_path / "d")
    assert_clean_exit(refused, 2)
    assert f"{path}: line 1, column 11 (no name): the column has no name" in refused.stderr, explain(refused)
    loaded = run("roster", "import", path, "--no-strict", "--config", config, "--data", tmp_path / "d")
    assert_clean_exit(loaded, 0)
    assert "column 11 (no name): the column has no name; its values are not imported" in loaded.stderr


def test_ssp_columns_the_format_ignores_are_said_once_and_pass_strict(tmp_path):
    """An SSP report's HICN and death date are one informational line, and --strict loads the file."""
    path = ssp_file(tmp_path, *SSP_ROWS)
    result = run("roster", "import", path, "--aco", "A1234", "--strict", "--data", tmp_path / "data")
    assert_clean_exit(result, 0)
    said = [line for line in result.stderr.splitlines() if "not read" in line]
    assert said == [f"{path}: line 1: not read, as the ssp format says: BENE_HIC_NUM, BENE_DEATH_DT"], explain(result)


# -- log ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [("log", "list"), ("log", "show", "1")])
def test_log_without_a_database_is_a_clean_error(tmp_path, args):
    """log list/show on a folder with no database exits 1 with a message, not a traceback."""
    result = run(*args, "--data", tmp_path / "empty")
    assert_clean_exit(result, 1)
    assert "no Herald database" in result.output, explain(result)


@pytest.mark.parametrize("content", [b"not a database at all", None], ids=["garbage", "other-sqlite"])
@pytest.mark.parametrize("args", [("log", "list"), ("log", "show", "1")])
def test_log_on_a_file_that_is_not_a_herald_database_is_a_clean_error(tmp_path, args, content):
    """A herald.db that is not SQLite, or is SQLite without Herald's tables, is a clean error."""
    data = tmp_path / "data"
    data.mkdir()
    if content is None:
        sqlite3.connect(data / "herald.db").execute("CREATE TABLE other (x)").connection.close()
    else:
        (data / "herald.db").write_bytes(content)
    result = run(*args, "--data", data)
    assert_clean_exit(result, 1)
    assert "is not a Herald database" in result.output, explain(result)


def test_log_list_shows_stored_messages_newest_first(tmp_path):
    """log list prints one line per message with sender, type, control id, state and notifications."""
    stored_messages(tmp_path, [ADMIT, SAMPLES / "meditech-v24-a04-outpatient-unmatched.hl7"])
    result = run("log", "list", "--data", tmp_path)
    assert_clean_exit(result, 0)
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["ID", "RECEIVED"]
    assert "PCH.A04.000415" in lines[1] and "routed" in lines[1] and "1 notification(s)" in lines[1]
    assert "LSR8841200377" in lines[2] and "ADT^A01" in lines[2] and "3 notification(s)" in lines[2]
    only_routed = run("log", "list", "--state", "failed", "--data", tmp_path)
    assert_clean_exit(only_routed, 0)
    assert len(only_routed.output.splitlines()) == 1


def test_log_show_prints_the_whole_story_of_a_message(tmp_path):
    """log show prints state, raw v2, the match, notifications, audit events and the FHIR Bundle."""
    stored_messages(tmp_path, [ADMIT])
    result = run("log", "show", "1", "--data", tmp_path)
    assert_clean_exit(result, 0)
    out = result.output
    assert out.startswith("Message 1  state: routed")
    assert "control id LSR8841200377" in out
    assert "  MSH|^~\\&|EPIC|LSR|" in out
    assert "certain by mbi: member SHR-000102 of ACO ACO-SHORELINE" in out
    for role in ("pcp", "care_team", "hie"):
        assert f" {role} " in out, role
    for kind in ("received", "parsed", "converted", "matched", "routed"):
        assert f" {kind}" in out, kind
    fhir = json.loads(out.split("\nFHIR:\n", 1)[1])
    assert fhir["entry"][0]["resource"]["eventCoding"]["code"] == "notification-admit"


def test_log_show_decodes_the_raw_message_with_its_charset(tmp_path):
    """The raw v2 of a windows-1252 message is shown with its accents, not replacement characters."""
    stored_messages(tmp_path, [CP1252_ADMIT])
    result = run("log", "show", "1", "--data", tmp_path)
    assert_clean_exit(result, 0)
    assert "DESROSIERS^HÉLÈNE" in result.output
    assert "\ufffd" not in result.output


def test_log_show_of_an_unknown_id_is_a_clean_error(tmp_path):
    """log show N for an id that is not stored exits 1 saying so."""
    stored_messages(tmp_path, [ADMIT])
    result = run("log", "show", "99", "--data", tmp_path)
    assert_clean_exit(result, 1)
    assert "no message with id 99" in result.output


@pytest.mark.parametrize("command", [("review", "accept", "1"), ("review", "reject", "1")])
def test_a_database_from_a_newer_herald_is_a_clean_error_for_review_commands(tmp_path, command):
    """Review commands on a database of a newer schema say so in one line (exit 1), with no traceback."""
    from gateway.store import Store

    data = tmp_path / "data"
    Store(data / "herald.db", reactor=object())._conn.close()
    conn = open_database(data / "herald.db")
    conn.execute("INSERT INTO migrations (version, applied_at) VALUES (99, 'later')")
    conn.close()
    result = run(*command, "--data", data)
    assert_clean_exit(result, 1)
    assert "schema version 99, newer than this Herald's" in result.output, explain(result)
