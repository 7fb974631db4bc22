"""CLI papercuts found by a new user (issue 15), each with the test that found it."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime

import pytest
from test_cli import ROSTER_HEADER, ROSTER_ROWS, assert_clean_exit, explain, roster_file, run

from gateway.conversion.datatypes import npi_check_digit
from gateway.matching.roster import npi_problem
from gateway.store import open_roster_snapshot, roster_count


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"aco_id,member_id\n\x00\x01\x02\x03PNG", "line 2, column -: a NUL byte"),
        # 0x8d is one of the five bytes Windows-1252 leaves undefined; the file is not UTF-8 either.
        (ROSTER_HEADER.encode() + b"\nA1,M1,\x8d\xff\n", "line 2, column -: byte 0x8d"),
    ],
)
def test_a_binary_roster_file_is_refused_naming_the_line_not_a_traceback(tmp_path, content, said):
    path = tmp_path / "roster.csv"
    path.write_bytes(content)
    data = tmp_path / "data"
    result = run("roster", "import", path, "--data", data)
    assert_clean_exit(result, 2)
    assert said in result.output, explain(result)
    assert "not a text file" in result.output
    assert not (data / "roster.db").exists()


def test_a_random_binary_file_is_refused_cleanly(tmp_path):
    path = tmp_path / "roster.csv"
    path.write_bytes(os.urandom(4096))
    result = run("roster", "import", path, "--data", tmp_path / "data")
    assert_clean_exit(result, 2)
    assert "not a text file" in result.output, explain(result)


def test_a_windows_1252_roster_still_imports(tmp_path):
    path = tmp_path / "roster.csv"
    text = "\n".join([ROSTER_HEADER, ROSTER_ROWS[0].replace("Testpatient", "Testp\u00e4tient")]) + "\n"
    path.write_bytes(text.encode("cp1252"))
    assert b"\xe4" in path.read_bytes()
    result = run("roster", "import", path, "--data", tmp_path / "data")
    assert_clean_exit(result, 0)


@pytest.mark.parametrize("npi", ["1234567893", "1987654328"])
def test_npis_with_their_check_digit_pass(npi):
    assert npi_problem(npi) is None
    assert npi_check_digit(npi[:9]) == npi[9]


def test_a_pcp_npi_with_a_wrong_check_digit_is_refused_naming_the_digit(tmp_path):
    good = ROSTER_ROWS[0]
    assert "1234567893" in good, "the fixture's NPI moved"
    path = roster_file(tmp_path, good.replace("1234567893", "1234567890"))
    result = run("roster", "import", path, "--data", tmp_path / "data")
    assert_clean_exit(result, 2)
    assert "pcp_npi: is not an NPI: its check digit should be 3, not 0" in result.output, explain(result)


def test_a_pcp_file_npi_with_a_wrong_check_digit_is_refused(tmp_path):
    roster = roster_file(tmp_path, *ROSTER_ROWS)
    pcp = tmp_path / "pcp.csv"
    pcp.write_text("member_id,pcp_npi,pcp_name\nM1,1234567894,Dr. Lee\n", encoding="utf-8")
    result = run("roster", "import", roster, "--pcp", pcp, "--data", tmp_path / "data")
    assert_clean_exit(result, 2)
    assert "check digit should be 3, not 4" in result.output, explain(result)


def test_roster_versions_shows_the_effective_date_when_it_defaulted_to_today(tmp_path):
    data = tmp_path / "data"
    result = run("roster", "import", roster_file(tmp_path, *ROSTER_ROWS), "--data", data)
    assert_clean_exit(result, 0)
    assert "effective today" in result.output, explain(result)
    assert roster_count(open_roster_snapshot(data / "herald.db")) == len(ROSTER_ROWS)
    versions = run("roster", "versions", "--data", data)
    assert_clean_exit(versions, 0)
    today = datetime.now(UTC).date().isoformat()
    assert today in versions.output, explain(versions)


# -- herald log -----------------------------------------------------------------------------


def _store_one(data, *, accept_ack_type: str, events: list[tuple[str, str]] = ()):
    """A data folder holding one accepted message with MSH-15 ``accept_ack_type`` and extra ``(at, kind)`` events."""
    from test_cli import NOW, SAMPLES
    from test_intake import accepted_record

    from gateway.app.replay import split_messages
    from gateway.store import Store
    from gateway.store.events import append_event
    from gateway.store.keys import KeyRing
    from gateway.store.messages import record_frame

    raw = split_messages((SAMPLES / "epic-v251-a04-ed-registration.hl7").read_bytes())[0]
    keys = KeyRing.load(None)  # the ring the CLI reads too ($HERALD_KEYS, set by conftest)
    store = Store(data / "herald.db", reactor=object(), clock=lambda: NOW, keys=keys)  # never started: SQL only
    conn = store._conn
    now = NOW.isoformat(timespec="milliseconds")
    # As intake stores an accepted frame, with this MSH-15.
    record = dataclasses.replace(accepted_record(raw), accept_ack_type=accept_ack_type, ack_code="CA")
    result = record_frame(conn, record, now)
    for at, kind in events:
        append_event(conn, at, result.message_id, None, "test", kind, {"code": "CA"} if kind == "ack-sent" else None)
    conn.close()
    return result.message_id


def test_log_show_says_no_ack_was_sent_for_msh15_ne(tmp_path):
    data = tmp_path / "data"
    message_id = _store_one(data, accept_ack_type="NE")
    result = run("log", "show", message_id, "--data", data)
    assert_clean_exit(result, 0)
    assert "no accept ACK sent (MSH-15 NE)" in result.output, explain(result)
    assert "ACK CA" not in result.output


def test_log_show_gives_the_ack_that_was_sent(tmp_path):
    data = tmp_path / "data"
    message_id = _store_one(data, accept_ack_type="AL", events=[("2026-11-20T12:00:01.000+00:00", "ack-sent")])
    result = run("log", "show", message_id, "--data", data)
    assert_clean_exit(result, 0)
    assert "ACK CA" in result.output, explain(result)


def test_log_show_lists_audit_events_in_time_order(tmp_path):
    data = tmp_path / "data"
    # Appended late, stamped early: committed after the later one (a job stamped before it ran).
    message_id = _store_one(
        data,
        accept_ack_type="AL",
        events=[("2026-11-20T12:00:09.000+00:00", "later"), ("2026-11-20T12:00:05.000+00:00", "earlier")],
    )
    result = run("log", "show", message_id, "--data", data)
    assert_clean_exit(result, 0)
    out = result.output
    assert out.index("earlier") < out.index("later"), explain(result)


def test_log_list_refuses_an_unknown_state(tmp_path):
    result = run("log", "list", "--state", "bogus", "--data", tmp_path / "data")
    assert result.exit_code == 2, explain(result)
    assert "'bogus' is not one of" in result.output


# -- herald review ---------------------------------------------------------------------------


def test_review_list_shows_why_a_review_was_rejected():
    from gateway.app.match_report import describe_review

    item = {
        "id": 7,
        "state": "rejected",
        "message_id": 3,
        "control_id": "C1",
        "trigger_event": "A04",
        "received_at": "2026-11-20T12:00:00",
        "grade": "possible",
        "score": 14.2,
        "candidates": [],
        "decided_by": "carol",
        "decided_at": "2026-11-21T09:00:00",
        "member_id": None,
        "aco_id": None,
        "note": "a different person: twin sister",
    }
    lines = describe_review(None, item)
    assert any("rejected by carol" in line and "twin sister" in line for line in lines), lines


# -- a site's own roster columns (issue 10's gap) ---------------------------------------------


def _wider_roster(tmp_path):
    from test_cli import ROSTER_HEADER, ROSTER_ROWS

    path = tmp_path / "wider.csv"
    rows = [r + ",2.1,0.7" for r in ROSTER_ROWS]
    path.write_text("\n".join([ROSTER_HEADER + ",HCC_Score,Risk_Tier", *rows]) + "\n", encoding="utf-8")
    return path


def test_a_sites_own_columns_named_in_config_are_said_once_and_pass_strict(tmp_path):
    """[roster] ignored names the ACO's own extra columns: one line says so, --strict loads the file."""
    config = tmp_path / "herald.toml"
    config.write_text('[roster]\nstrict = true\nignored = ["hcc_*", "Risk_Tier"]\n', encoding="utf-8")
    path = _wider_roster(tmp_path)
    result = run("roster", "import", path, "--config", config, "--data", tmp_path / "data")
    assert_clean_exit(result, 0)
    said = [line for line in result.stderr.splitlines() if "not read" in line]
    assert said == [f"{path}: line 1: not read, as [roster] ignored says: HCC_Score, Risk_Tier"], explain(result)


def test_ignore_on_the_command_line_adds_to_the_config(tmp_path):
    path = _wider_roster(tmp_path)
    refused = run("roster", "import", path, "--strict", "--ignore", "hcc_score", "--data", tmp_path / "d")
    assert_clean_exit(refused, 2)
    assert "column 'Risk_Tier': not a roster column Herald reads" in refused.stderr, explain(refused)
    loaded = run(
        "roster", "import", path, "--strict", "--ignore", "hcc_score", "--ignore", "risk_*", "--data", tmp_path / "d"
    )
    assert_clean_exit(loaded, 0)


def test_a_bad_ignored_setting_names_the_key(tmp_path):
    config = tmp_path / "herald.toml"
    config.write_text('[roster]\nignored = ["ok", ""]\n', encoding="utf-8")
    result = run("roster", "import", _wider_roster(tmp_path), "--config", config, "--data", tmp_path / "d")
    assert result.exit_code != 0
    assert "roster.ignored" in result.output, explain(result)
