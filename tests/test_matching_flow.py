"""Matching grades end to end: roster import, the pipeline's match step, the review queue, opt-outs.

Messages are stored by intake's SQL and processed by the production batch
function (``gateway.pipeline.workers.process_batch_here``) on a real SQLite file; the
review queue and ``herald match`` are driven through the CLI.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cli import explain
from test_intake import accepted_record

from gateway.app.cli import main
from gateway.app.roster import import_roster_file
from gateway.config import load_config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.pipeline.workers import process_batch_here
from gateway.store import RosterReader, Store, message_detail, open_database, stored_match
from gateway.store.keys import KeyRing
from gateway.store.messages import apply_outcomes, pending_messages, record_frame

NOW = datetime(2026, 11, 20, 8, 0, 0, tzinfo=UTC)
HEADER = (
    "member_id,mbi,mrn,mrn_authority,last_name,first_name,birth_date,sex,address_line,city,state,zip,phone,"
    "aco_id,pcp_npi,pcp_name,care_manager,effective_start,effective_end,opted_out"
)
# Synthetic people; MBIs in the CMS format, never issued to anyone.
ROSALIND = (
    "F-1,1EG4TE5MK73,,,Pemberton,Rosalind,1950-04-11,F,12 Orchard Lane,Springfield,IL,62701,217-555-0123,"
    "ACO-FLOW,1234567893,Dr. Test,care@aco.example,2026-01-01,,N"
)
DESMOND = (
    "F-2,2EG4TE5MK74,,,Okonkwo-Hale,Desmond,1944-09-23,M,8 Birch Road,Peoria,IL,61602,3095550188,"
    "ACO-FLOW,1234567893,Dr. Test,care@aco.example,2026-01-01,,Y"
)
CORNELIUS = (
    "F-3,3EG4TE5MK75,,,Vasquez-Thornbury,Cornelius,1938-12-02,M,400 Elm Street,Decatur,IL,62521,2175550999,"
    "ACO-FLOW,1234567893,Dr. Test,care@aco.example,2026-01-01,,N"
)
ROSALIND_FULL = dict(
    family="PEMBERTON",
    given="ROSALIND",
    dob="19500411",
    sex="F",
    street="12 Orchard Lane",
    city="Springfield",
    state="IL",
    zip="62701",
    phone="2175550123",
)


def adt(
    control_id: str, pid3: str, family="", given="", dob="", sex="", street="", city="", state="", zip="", phone=""
):
    """A synthetic ADT^A01 of 2026-11-20 with the given patient."""
    addr = f"{street}^^{city}^{state}^{zip}^USA^H" if street or zip else ""
    tel = f"^PRN^PH^^1^{phone[:3]}^{phone[3:]}" if phone else ""
    return (
        "\r".join(
            [
                f"MSH|^~\\&|FLOWEHR|FLOWHOSP|HERALD|ACO|20261120080000||ADT^A01^ADT_A01|{control_id}|P|2.5.1",
                "EVN|A01|20261120080000",
                f"PID|1||{pid3}||{family}^{given}^^^^^L||{dob}|{sex}|||{addr}||{tel}",
                "PV1|1|I|4N^401^A^FLOWHOSP||||1112223334^JONES^ROBERT^^^^^^NPI|||MED||||7|||"
                "1112223334^JONES^ROBERT^^^^^^NPI|IN|V1^^^FLOWHOSP^VN|MCR|||||||||||||||||01||||FLOWHOSP||||"
                "20261120080000",
            ]
        )
        + "\r"
    ).encode("utf-8")


class Gateway:
    """A data folder with a config and a roster, and the pipeline's batch function over it."""

    def __init__(self, root: Path, route_probable: bool = True) -> None:
        self.root = root
        self.data = root / "data"
        self.config_file = root / "herald.toml"
        self.config_file.write_text(
            f'[server]\ndata_dir = "{self.data}"\n\n[matching]\nroute_probable = {str(route_probable).lower()}\n'
            # Fixed thresholds: with a three-member roster the size-scaled ones would call nearly anything certain.
            "certain = 35.0\nprobable = 24.0\npossible = 14.0\n"
        )
        self.config = load_config(self.config_file)
        self.data.mkdir(parents=True, exist_ok=True)
        self.keys = KeyRing.load(None)  # the ring the CLI reads too ($HERALD_KEYS, set by conftest)

    def roster(self, *rows: str, name: str = "roster.csv", **kwargs):
        path = self.root / name
        path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
        now = kwargs.pop("now", NOW)
        return import_roster_file(self.config.database, path, by="tests", now=now, keys=self.keys, **kwargs)

    def deliver(self, *raws: bytes) -> list[int]:
        """Store each message as intake does and run the pipeline over them; return their ids."""
        store = Store(self.config.database, reactor=object(), clock=lambda: NOW, keys=self.keys)  # SQL only
        conn = store._conn
        now = NOW.isoformat(timespec="milliseconds")
        ids = []
        for raw in raws:
            ids.append(record_frame(conn, accepted_record(raw), now).message_id)
        pending = pending_messages(conn, 0, 100)
        reader = open_database(self.config.database, readonly=True, keys=self.keys)
        roster = RosterReader(self.config.database, self.keys)
        recipients = {role: self.config.recipient(role) for role in ("pcp", "care_team", "hie")}
        outcomes = process_batch_here(pending, reader, roster, self.config, load_vocabulary(), recipients, UTC)
        roster.close()
        reader.close()
        apply_outcomes(conn, outcomes, now, 0.0)
        conn.close()
        return ids

    def detail(self, message_id: int) -> dict:
        conn = open_database(self.config.database, readonly=True, keys=self.keys)
        try:
            detail = message_detail(conn, message_id)
            detail["match"] = stored_match(conn, message_id)
            detail["roles"] = sorted(n["recipient_role"] for n in detail["notifications"])
            detail["kinds"] = [e["kind"] for e in detail["events"]]
            return detail
        finally:
            conn.close()

    def cli(self, *args: str):
        return CliRunner().invoke(main, [*map(str, args), "--config", str(self.config_file)])


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(tmp_path)
    gw.roster(ROSALIND, DESMOND, CORNELIUS)
    return gw


# -- grades --------------------------------------------------------------------


def test_mbi_match_is_certain_and_routed(gateway):
    """A message with a roster MBI matches certain by MBI and goes to PCP, care team and HIE."""
    (mid,) = gateway.deliver(adt("C-MBI", "1EG4TE5MK73^^^CMS^MB", "PEMBERTON", "ROSALIND", "19500411", "F"))
    d = gateway.detail(mid)
    assert d["message"]["state"] == "routed"
    assert (d["match"]["grade"], d["match"]["method"], d["match"]["member_id"]) == ("certain", "mbi", "F-1")
    assert d["roles"] == ["care_team", "hie", "pcp"]


def test_full_demographics_match_certain_without_identifiers(gateway):
    """Name, birth date, sex, address and phone with no MBI or roster MRN score certain and route."""
    (mid,) = gateway.deliver(adt("C-DEM", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL))
    d = gateway.detail(mid)
    assert (d["match"]["grade"], d["match"]["method"], d["match"]["member_id"]) == ("certain", "probabilistic", "F-1")
    assert d["match"]["score"] >= 35
    assert d["roles"] == ["care_team", "hie", "pcp"]


def probable_message(control_id: str = "C-PROB") -> bytes:
    """Name, birth date and sex only: a probable match for Rosalind."""
    return adt(control_id, "E200^^^FLOWHOSP^MR", "PEMBERTON", "ROSALIND", "19500411", "F")


def test_probable_match_is_routed_when_configured(gateway):
    """With route_probable = true a probable match is routed like a certain one."""
    (mid,) = gateway.deliver(probable_message())
    d = gateway.detail(mid)
    assert (d["match"]["grade"], d["match"]["member_id"], d["message"]["state"]) == ("probable", "F-1", "routed")
    assert d["roles"] == ["care_team", "hie", "pcp"]


def test_probable_match_goes_to_review_when_not_routed(tmp_path):
    """With route_probable = false a probable match waits in the review queue; only the HIE is told."""
    gw = Gateway(tmp_path, route_probable=False)
    gw.roster(ROSALIND)
    (mid,) = gw.deliver(probable_message())
    d = gw.detail(mid)
    assert (d["match"]["grade"], d["message"]["state"]) == ("probable", "review")
    assert d["roles"] == ["hie"]
    assert "review-queued" in d["kinds"]


def possible_message(control_id: str = "C-POSS", mrn: str = "E300") -> bytes:
    """A short given name and a misspelt family name: a possible match for Rosalind."""
    return adt(control_id, f"{mrn}^^^FLOWHOSP^MR", "PEMBERTIN", "ROS", "19500411", "F")


def test_possible_match_waits_for_review_with_the_hie_told(gateway):
    """A possible match holds the PCP and care team notifications; the HIE gets its notification now."""
    (mid,) = gateway.deliver(possible_message())
    d = gateway.detail(mid)
    assert (d["match"]["grade"], d["message"]["state"]) == ("possible", "review")
    assert d["roles"] == ["hie"]
    result = gateway.cli("review", "list")
    assert result.exit_code == 0, explain(result)
    assert f"message {mid}" in result.output and "candidate F-1 of ACO ACO-FLOW" in result.output
    assert "PEMBERTIN" in result.output  # the message's patient, for the reviewer


def test_review_accept_routes_the_held_notifications_and_remembers_the_link(gateway):
    """Accepting a review routes PCP and care team, audits who, and the MRN then matches certain."""
    (mid,) = gateway.deliver(possible_message())
    result = gateway.cli("review", "accept", "1", "--by", "alice")
    assert result.exit_code == 0, explain(result)
    assert "review 1 accepted by alice" in result.output and "pcp, care_team" in result.output
    d = gateway.detail(mid)
    assert d["message"]["state"] == "routed"
    assert d["roles"] == ["care_team", "hie", "pcp"]
    assert (d["match"]["member_id"], d["match"]["method"]) == ("F-1", "review")
    accepted = [e for e in d["events"] if e["kind"] == "review-accepted"]
    assert json.loads(accepted[0]["detail"])["by"] == "alice" and accepted[0]["at"]
    # The next message with the same MRN, and even weaker demographics, is certain by the remembered link.
    (again,) = gateway.deliver(adt("C-AGAIN", "E300^^^FLOWHOSP^MR", "PEMBERTON", "R", "", ""))
    d2 = gateway.detail(again)
    assert (d2["match"]["grade"], d2["match"]["method"], d2["match"]["member_id"]) == ("certain", "mrn", "F-1")
    assert d2["roles"] == ["care_team", "hie", "pcp"]


def test_review_reject_leaves_the_message_unmatched(gateway):
    """Rejecting a review keeps the HIE notification only, audits who, and cannot be decided twice."""
    (mid,) = gateway.deliver(possible_message())
    result = gateway.cli("review", "reject", "1", "--by", "bob", "--reason", "different person")
    assert result.exit_code == 0, explain(result)
    d = gateway.detail(mid)
    assert (d["message"]["state"], d["match"]["grade"], d["match"]["member_id"]) == ("routed", "none", None)
    assert d["roles"] == ["hie"]
    rejected = [json.loads(e["detail"]) for e in d["events"] if e["kind"] == "review-rejected"]
    assert rejected == [{"review": 1, "by": "bob", "reason": "different person"}]
    again = gateway.cli("review", "accept", "1", "--by", "alice")
    assert again.exit_code == 1 and "already rejected" in again.output, explain(again)
    listed = gateway.cli("review", "list", "--state", "rejected")
    assert "rejected by bob" in listed.output, explain(listed)


def test_review_accept_of_a_member_who_is_not_a_candidate_exits_2(gateway):
    """A reviewer can only accept one of the review's candidates."""
    gateway.deliver(possible_message())
    result = gateway.cli("review", "accept", "1", "--member", "F-3")
    assert result.exit_code == 2, explain(result)
    assert "F-3 is not a candidate of review 1" in result.output


def test_review_of_an_unknown_id_is_a_clean_error(gateway):
    """Accepting or rejecting a review that does not exist says so (exit 1)."""
    gateway.deliver(possible_message())
    for command in ("accept", "reject"):
        result = gateway.cli("review", command, "99")
        assert result.exit_code == 1 and "no review with id 99" in result.output, explain(result)


# -- opt-outs and roster versions -------------------------------------------------


def test_opted_out_member_gets_no_pcp_or_care_team_notification(gateway):
    """A member who opted out is matched, but only the HIE is told, and the audit says why."""
    (mid,) = gateway.deliver(adt("C-OPT", "2EG4TE5MK74^^^CMS^MB", "OKONKWO-HALE", "DESMOND", "19440923", "M"))
    d = gateway.detail(mid)
    assert (d["match"]["grade"], d["match"]["member_id"]) == ("certain", "F-2")
    assert d["roles"] == ["hie"]
    (event,) = [json.loads(e["detail"]) for e in d["events"] if e["kind"] == "opt-out-honoured"]
    assert event["withheld"] == ["pcp", "care_team"] and "opted out of data sharing" in event["reason"]
    # The HIE learns nothing of the attribution: its outbox row names only the HIE.
    assert [(n["recipient_role"], n["recipient"]) for n in d["notifications"]] == [("hie", "HIE")]


def test_a_member_ended_by_a_new_roster_is_unmatched_later(gateway):
    """A roster version without a member end-dates it; a later admit of that patient is unmatched."""
    report = gateway.roster(ROSALIND, DESMOND, name="november.csv", effective="2026-11-01")
    assert (report.ended, report.unchanged) == (1, 2)
    (mid,) = gateway.deliver(
        adt(
            "C-END",
            "3EG4TE5MK75^^^CMS^MB",
            "VASQUEZ-THORNBURY",
            "CORNELIUS",
            "19381202",
            "M",
            "400 Elm Street",
            "Decatur",
            "IL",
            "62521",
            "2175550999",
        )
    )
    d = gateway.detail(mid)
    assert (d["match"]["grade"], d["match"]["member_id"]) == ("none", None)
    assert d["roles"] == ["hie"]


# -- herald match ----------------------------------------------------------------


def test_herald_match_json_prints_one_object_per_message(gateway):
    """--json gives control id, grade, score, member id (or null) and the top candidates with field weights."""
    path = gateway.root / "two.hl7"
    path.write_bytes(
        adt("C-J1", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL)
        + adt("C-J2", "Z1^^^FLOWHOSP^MR", "NOBODY", "KNOWN", "19010101", "M")
    )
    result = gateway.cli("match", path, "--json")
    assert result.exit_code == 0, explain(result)
    first, second = (json.loads(line) for line in result.output.splitlines())
    assert (first["control_id"], first["grade"], first["member_id"], first["routing"]) == (
        "C-J1",
        "certain",
        "F-1",
        "route",
    )
    assert first["score"] >= 35
    fields = {f["field"]: f["level"] for f in first["candidates"][0]["fields"]}
    assert fields["family"] == "exact" and fields["birth_date"] == "exact"
    assert (second["control_id"], second["grade"], second["member_id"]) == ("C-J2", "none", None)


def test_herald_match_explains_each_field(gateway):
    """The text output names each candidate, each field's level and weight, the total and the grade."""
    path = gateway.root / "one.hl7"
    path.write_bytes(possible_message())
    result = gateway.cli("match", path)
    assert result.exit_code == 0, explain(result)
    assert "result: possible by probabilistic" in result.output
    assert "member F-1 of ACO ACO-FLOW" in result.output
    assert "family" in result.output and "birth_date" in result.output and "total" in result.output


def test_herald_match_of_an_unconvertible_message_exits_2(gateway):
    """A message that cannot be converted is reported with its location; the exit code is 2."""
    path = gateway.root / "bad.hl7"
    path.write_bytes(b"MSH|^~\\&|A|B|C|D|20261120||ADT^A01|X1|P|2.5.1\rEVN|A01\r")
    result = gateway.cli("match", path, "--json")
    assert result.exit_code == 2, explain(result)
    assert "PID" in json.loads(result.output.splitlines()[0])["error"]


def test_herald_match_with_a_roster_file_from_a_newer_herald_is_a_clean_error(gateway):
    """A roster file this Herald cannot read is reported in one line (exit 1), not as a traceback."""
    import sqlite3

    from gateway.store import roster_path

    roster_file = roster_path(gateway.config.database)
    conn = sqlite3.connect(roster_file)
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()
    path = gateway.root / "one.hl7"
    path.write_bytes(possible_message())
    result = gateway.cli("match", path)
    assert result.exit_code == 1, explain(result)
    assert "upgrade Herald" in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_thresholds_follow_the_roster_size_until_the_config_sets_them(tmp_path):
    """The workers' policy scales the thresholds with the roster, recounted after each import."""
    from gateway.pipeline.workers import policy_for

    gw = Gateway(tmp_path)
    default = load_config(None, data_dir=gw.data)
    gw.roster(ROSALIND)
    roster = RosterReader(gw.config.database)
    small = policy_for(roster.current(), default).model.certain
    assert policy_for(roster.current(), gw.config).model.certain == 35.0  # set in the config
    gw.roster(ROSALIND, DESMOND, CORNELIUS)
    assert policy_for(roster.current(), default).model.certain > small
    roster.close()
