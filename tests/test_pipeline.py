"""The pipeline stage and routing: one stored message in, one outcome out."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC
from pathlib import Path

import pytest

from gateway.app.replay import split_messages
from gateway.config import Recipient, default_recipients
from gateway.delivery.routing import notification_payload
from gateway.pipeline import process as pipeline
from gateway.pipeline.process import MATCHED, UNMATCHED, process_message
from gateway.records import FAILED, IGNORED, ROUTED, PendingMessage

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
MATCHED_ADMIT = "epic-v251-a01-admit-from-ed.hl7"  # on the sample roster by MBI
UNMATCHED_VISIT = "meditech-v24-a04-outpatient-unmatched.hl7"
RECEIVED_AT = "2026-11-20T08:00:00.000+00:00"

ORU = (
    "MSH|^~\\&|LAB|TESTFAC|HERALD|ACO|20260301120000||ORU^R01|LAB0001|P|2.5.1\r"
    "PID|1||MRN123^^^TESTFAC^MR||TESTPATIENT^ALEX\r"
    "OBR|1|||GLU^Glucose\r"
)


@pytest.fixture
def roster_lookups(sample_roster):
    """The sample roster in a real store, through the production lookups."""
    return sample_roster


class Lookups:
    """Roster lookups over rows in memory (for a member the sample roster does not have)."""

    def __init__(self, rows=(), fail=None):
        self.rows = list(rows)
        self.fail = fail

    def _rows(self, keep):
        if self.fail is not None:
            raise self.fail
        return [r for r in self.rows if keep(r)]

    def by_mbi(self, mbi):
        return self._rows(lambda r: r.get("mbi") == mbi)

    def by_mrn(self, mrn, authority):
        return self._rows(lambda r: (r.get("mrn"), r.get("mrn_authority")) == (mrn, authority))

    def blocking_buckets(self, keys, cap):
        self._rows(lambda r: False)  # raises self.fail, as every lookup does
        return {}

    def persons(self, refs):
        return {}

    def members(self, refs):
        return self._rows(lambda r: False)

    def term_counts(self, terms):
        return {}, 0


@pytest.fixture
def recipients(tmp_path):
    """Every role enabled, file drops under a temporary folder."""
    return default_recipients(tmp_path)


def pending(raw: bytes | str, message_id: int = 7, charset: str = "") -> PendingMessage:
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    return PendingMessage(message_id, raw, RECEIVED_AT, charset)


def sample(name: str) -> bytes:
    return split_messages((SAMPLES / name).read_bytes())[0]


def kinds(outcome) -> list[str]:
    return [kind for kind, _ in outcome.events]


# -- outcomes ----------------------------------------------------------------


def test_matched_admit_is_routed_to_pcp_care_team_and_hie(vocab, roster_lookups, recipients):
    """A matched A01 is routed with three notifications: the PCP, the care team and the HIE."""
    outcome = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == ROUTED, outcome.reason
    assert outcome.reason is None
    assert [n.recipient_role for n in outcome.notifications] == ["pcp", "care_team", "hie"]
    assert {n.message_id for n in outcome.notifications} == {7}
    assert {n.event_code for n in outcome.notifications} == {"notification-admit"}
    assert (outcome.match.grade, outcome.match.method, outcome.match.member_id) == ("certain", "mbi", "SHR-000102")
    assert kinds(outcome) == ["parsed", "converted", "matched"]
    assert json.loads(outcome.fhir_json)["type"] == "message"


def test_notifications_name_their_recipient_in_the_message_header(vocab, roster_lookups, recipients):
    """Each notification's Bundle carries MessageHeader.destination for its recipient and its own id."""
    outcome = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, roster_lookups, recipients)
    base = json.loads(outcome.fhir_json)
    assert "destination" not in base["entry"][0]["resource"]
    for n in outcome.notifications:
        assert n.payload is None  # built from the stored Bundle when sent
        bundle = json.loads(notification_payload(outcome.fhir_json, n))
        assert bundle["id"] == n.id
        header = bundle["entry"][0]["resource"]
        assert header["destination"] == [{"name": n.recipient, "endpoint": f"file://{n.target}"}]
        assert bundle["entry"][1:] == base["entry"][1:]
    pcp = outcome.notifications[0]
    assert pcp.recipient == "Dr. Priya Halvorsen (NPI 1987654328)"
    assert pcp.target == str(recipients["pcp"].directory)
    assert (outcome.match.aco_id, outcome.match.grade) == ("ACO-SHORELINE", "certain")


def test_outbox_rows_carry_no_patient_data(vocab, roster_lookups, recipients):
    """A notification row says who is told, where and how; the patient's name is only in the message's Bundle."""
    outcome = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, roster_lookups, recipients)
    patient = next(
        e["resource"] for e in json.loads(outcome.fhir_json)["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    family = patient["name"][0]["family"]
    for n in outcome.notifications:
        assert not hasattr(n, "summary")
        assert family not in repr(n)


def test_notification_ids_are_stable_and_distinct(vocab, roster_lookups, recipients):
    """The same message gives the same notification ids every time, one different id per recipient."""
    first = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, roster_lookups, recipients)
    again = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, roster_lookups, recipients)
    ids = [n.id for n in first.notifications]
    assert ids == [n.id for n in again.notifications]
    assert len(set(ids)) == 3
    assert first.fhir_json == again.fhir_json
    assert [notification_payload(first.fhir_json, n) for n in first.notifications] == [
        notification_payload(again.fhir_json, n) for n in again.notifications
    ]


def test_unmatched_patient_is_routed_to_the_hie_only(vocab, roster_lookups, recipients):
    """A patient not on the roster is still sent to the HIE, and the match says none."""
    outcome = process_message(pending(sample(UNMATCHED_VISIT)), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == ROUTED
    assert [n.recipient_role for n in outcome.notifications] == ["hie"]
    assert not outcome.match.matched
    assert kinds(outcome) == ["parsed", "converted", "unmatched"]
    assert outcome.match.aco_id is None


def test_unmatched_with_no_hie_is_unmatched_with_no_notifications(vocab, roster_lookups, recipients):
    """With no HIE configured, an unmatched patient ends 'unmatched' with nothing to send."""
    no_hie = {**recipients, "hie": None}
    outcome = process_message(pending(sample(UNMATCHED_VISIT)), vocab, UTC, roster_lookups, no_hie)
    assert outcome.state == UNMATCHED
    assert outcome.notifications == []
    assert outcome.fhir_json is not None


def test_matched_with_no_recipient_enabled_is_not_called_unmatched(vocab, roster_lookups):
    """A matched patient with every recipient disabled ends 'matched', keeping the match."""
    nobody = {"pcp": None, "care_team": None, "hie": None}
    outcome = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, roster_lookups, nobody)
    assert outcome.state == MATCHED
    assert outcome.notifications == []
    assert outcome.match.member_id == "SHR-000102"


def test_oru_is_ignored_with_a_reason(vocab, roster_lookups, recipients):
    """A message that is not ADT A01/A03/A04 is ignored, saying what it was."""
    outcome = process_message(pending(ORU), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == IGNORED
    assert "ORU^R01" in outcome.reason
    assert outcome.notifications == []
    assert kinds(outcome) == ["parsed", "ignored"]


def test_unsupported_adt_event_is_ignored(vocab, roster_lookups, recipients):
    """An ADT event Herald does not notify on (A28, add person) is ignored, not failed."""
    raw = sample(MATCHED_ADMIT).replace(b"ADT^A01^ADT_A01", b"ADT^A28^ADT_A05")
    outcome = process_message(pending(raw), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == IGNORED
    assert "ADT^A28" in outcome.reason


def test_trigger_in_evn1_only_is_processed(vocab, roster_lookups, recipients):
    """An ADT with MSH-9.2 empty but EVN-1 = A01 is converted, as `herald convert` does."""
    raw = sample(MATCHED_ADMIT).replace(b"ADT^A01^ADT_A01", b"ADT").replace(b"EVN||", b"EVN|A01|")
    outcome = process_message(pending(raw), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == ROUTED, outcome.reason


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\x00\x01garbage that is not HL7", "MSH"),
        (b"", "MSH"),
        (b"MSH|^~|APP", "MSH-2"),
    ],
)
def test_unreadable_message_fails_with_a_reason(vocab, roster_lookups, recipients, raw, words):
    """Bytes that cannot be parsed end 'failed' with the reason, at the parse stage."""
    outcome = process_message(pending(raw), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == FAILED
    assert words in outcome.reason
    assert outcome.events == [("failed", {"stage": "parse", "reason": outcome.reason})]


def test_unconvertible_adt_fails_with_the_hl7_location(vocab, roster_lookups, recipients):
    """An ADT without PID fails at the convert stage with code and location in the event."""
    raw = b"\r".join(s for s in sample(MATCHED_ADMIT).split(b"\r") if not s.startswith(b"PID")) + b"\r"
    outcome = process_message(pending(raw), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == FAILED
    assert outcome.reason.startswith("PID: ")
    assert outcome.events[-1] == (
        "failed",
        {"stage": "convert", "code": "100", "location": "PID", "reason": "the ADT message has no PID segment"},
    )


def test_invalid_bundle_fails_validation(vocab, roster_lookups, recipients, monkeypatch):
    """A Bundle that fhir.resources rejects fails the message (unless validation is off)."""
    real_convert = pipeline.convert

    def convert_with_a_bad_code(*args, **kwargs):
        # Failure injection: the converter has no input that makes an invalid
        # Bundle (tests/test_convert_properties.py), so break one on purpose.
        conversion = real_convert(*args, **kwargs)
        conversion.bundle["entry"][1]["resource"]["class"]["code"] = "O  P"
        return conversion

    monkeypatch.setattr(pipeline, "convert", convert_with_a_bad_code)
    raw = sample(UNMATCHED_VISIT)
    outcome = process_message(pending(raw), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == FAILED
    assert "not valid R4" in outcome.reason
    unchecked = process_message(pending(raw), vocab, UTC, roster_lookups, recipients, validate=False)
    assert unchecked.state == ROUTED


def test_charset_from_intake_is_used(vocab, roster_lookups, recipients, sample_policy):
    """The stored charset decodes the message (the patient's accented name matches the roster)."""
    raw = sample("meditech-v24-a01-admit-cp1252.hl7")
    outcome = process_message(
        pending(raw, charset="WINDOWS-1252"), vocab, UTC, roster_lookups, recipients, policy=sample_policy
    )
    assert outcome.state == ROUTED
    assert (outcome.match.method, outcome.match.member_id) == ("probabilistic", "SHR-000104")


def test_unreadable_receipt_time_does_not_fail_the_message(vocab, roster_lookups, recipients):
    """A stored received_at that is not ISO 8601 does not stop the conversion."""
    message = PendingMessage(3, sample(MATCHED_ADMIT), "not a time", "")
    assert process_message(message, vocab, UTC, roster_lookups, recipients).state == ROUTED


def test_a_bug_in_conversion_fails_one_message_without_patient_data(vocab, roster_lookups, recipients, monkeypatch):
    """An unexpected exception in a stage becomes 'failed' naming only its type, never its text."""

    def broken(*args, **kwargs):
        raise KeyError("QUILLFEATHER")

    monkeypatch.setattr(pipeline, "convert", broken)
    outcome = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == FAILED
    assert outcome.reason == "internal error in stage convert (KeyError)"
    assert "QUILLFEATHER" not in json.dumps(outcome.events)


def test_roster_lookup_errors_propagate_so_the_batch_is_retried(vocab, recipients):
    """A database error in a roster lookup is not a message problem: it is raised, not recorded."""

    lookups = Lookups(fail=sqlite3.OperationalError("database is locked"))
    with pytest.raises(sqlite3.OperationalError):
        process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, lookups, recipients)


# -- routing -----------------------------------------------------------------


def test_pcp_is_skipped_for_a_member_without_a_pcp(vocab, recipients):
    """A matched member with no PCP NPI or name gets the care team and HIE only."""
    row = {
        "aco_id": "ACO-TEST",
        "member_id": "M-1",
        "mbi": "2HX7RA1PK83",
        "effective_start": "",
        "effective_end": "",
        "pcp_npi": "",
        "pcp_name": "",
        "care_manager": "",
    }
    lookups = Lookups([row])
    outcome = process_message(pending(sample(MATCHED_ADMIT)), vocab, UTC, lookups, recipients)
    assert [(n.recipient_role, n.recipient) for n in outcome.notifications] == [
        ("care_team", "ACO ACO-TEST care team"),
        ("hie", "HIE"),
    ]


def test_fhir_recipient_gets_the_process_message_endpoint(vocab, roster_lookups, recipients):
    """A fhir-channel recipient's notification targets [base]/$process-message, also in the header."""
    hie = Recipient("hie", True, "fhir", None, "https://hie.example/fhir")
    outcome = process_message(pending(sample(UNMATCHED_VISIT)), vocab, UTC, roster_lookups, {**recipients, "hie": hie})
    (note,) = outcome.notifications
    assert (note.channel, note.target) == ("fhir", "https://hie.example/fhir/$process-message")
    header = json.loads(notification_payload(outcome.fhir_json, note))["entry"][0]["resource"]
    assert header["destination"][0]["endpoint"] == "https://hie.example/fhir/$process-message"


def test_spliced_payload_is_exactly_the_full_encoding(vocab, roster_lookups, recipients):
    """Each recipient's Bundle, joined from parts encoded once, is byte for byte json.dumps of the whole Bundle."""
    for name in (MATCHED_ADMIT, UNMATCHED_VISIT):
        outcome = process_message(pending(sample(name)), vocab, UTC, roster_lookups, recipients)
        for n in outcome.notifications:
            whole = json.loads(outcome.fhir_json)
            whole["id"] = n.id
            header = whole["entry"][0]["resource"]
            header["destination"] = [{"name": n.recipient, "endpoint": f"file://{n.target}"}]
            assert notification_payload(outcome.fhir_json, n) == json.dumps(whole, separators=(",", ":"))


def test_the_event_filter_reads_the_trigger_as_the_converter_does(vocab, roster_lookups, recipients):
    """One event filter: a trigger written in lower case or padded is the event the converter maps, not ignored."""
    raw = sample(UNMATCHED_VISIT).replace(b"ADT^A04", b"ADT^ a04 ", 1)
    assert raw != sample(UNMATCHED_VISIT)
    outcome = process_message(pending(raw), vocab, UTC, roster_lookups, recipients)
    assert outcome.state == ROUTED, outcome.reason
    assert kinds(outcome)[:2] == ["parsed", "converted"]
