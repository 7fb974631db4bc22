"""Intake over a real Store (a SQLite file, then a PostgreSQL database): stored first, then answered; refusals
logged and answered.

The Store's writer thread hands results back through ``reactor.callFromThread``.
Here that reactor is a queue: the test thread runs the queued calls itself
(``drain``) until the Deferred it waits on has fired, so no reactor runs and
no test sleeps.
"""

from __future__ import annotations

import json
import queue
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.header import ERROR_TEXT, read_header
from gateway.intake.receiver import Intake
from gateway.records import RECEIVED, IntakeRecord
from gateway.store import Store, open_database
from gateway.store import messages as store_messages
from mllp import MLLPServerFactory, frame

STORED_AT = datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC)
PEER = "10.0.0.7:40001"

ADT = (
    b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301115900||ADT^A01^ADT_A01|MSG00001|P|2.5.1\r"
    b"EVN|A01|20260301115900\r"
    b"PID|1||MRN123^^^GENHOSP^MR||TESTPATIENT^ALEX||19800101|F\r"
    b"PV1|1|E\r"
)
ENHANCED = ADT.replace(b"|P|2.5.1\r", b"|P|2.5.1|||AL|NE\r", 1)
AA_FOR_ADT = b"MSH|^~\\&|HERALD|HIE|EPIC|GENHOSP|20260301120000+0000||ACK^A01^ACK|ACK0001|P|2.5.1\rMSA|AA|MSG00001|\r"

_sync = SynchronousTestCase()
success, failure = _sync.successResultOf, _sync.failureResultOf


def accepted_record(raw: bytes) -> IntakeRecord:
    """``raw`` as intake records a frame it accepted (AA, state received), with its MSH fields read."""
    h = read_header(raw)
    return IntakeRecord(
        raw=raw,
        peer="tcp:127.0.0.1:50000",
        state=RECEIVED,
        ack_code="AA",
        sending_application=h.sending_application,
        sending_facility=h.sending_facility,
        message_type=h.message_type,
        trigger_event=h.trigger_event,
        control_id=h.control_id,
        version=h.version,
        charset=h.charset,
    )


class QueueReactor:
    """The part of a reactor the Store uses, with calls from its writer thread queued for the test thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.calls.put((f, args, kwargs))

    def seconds(self) -> float:
        return 1_000_000.0

    def getThreadPool(self):
        return _InlineThreadPool()


class _InlineThreadPool:
    """Runs ``Store.stop``'s wait (a thread join) in the test thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


def run_until(reactor: QueueReactor, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run the store's queued callbacks in this thread until ``done()``; a stuck test fails after ``timeout``."""
    while not done():
        f, args, kwargs = reactor.calls.get(timeout=timeout)
        f(*args, **kwargs)


def drain(reactor: QueueReactor, d: defer.Deferred) -> defer.Deferred:
    """Run the store's queued callbacks until ``d`` has fired; return ``d``."""
    fired = []
    d.addBoth(lambda r: fired.append(True) or r)
    run_until(reactor, lambda: bool(fired))
    return d


@pytest.fixture
def intake(store, pinned_acks):
    stored = []
    i = Intake(store, pinned_acks, on_stored=lambda: stored.append(True), max_length=2048)
    i.stored_calls = stored
    return i


def answer(reactor, d) -> bytes | None:
    """The ACK a Deferred from Intake fires with, once the store has committed."""
    return success(drain(reactor, d))


def commit(reactor, store) -> None:
    """Let a further commit happen (background writes such as ack-sent ride on it)."""
    success(drain(reactor, store.submit(lambda conn: None)))


def rows(store) -> list[dict]:
    conn = open_database(store.path, readonly=True)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM messages ORDER BY id")]
    finally:
        conn.close()


def events(store, message_id: int) -> list[tuple[str, dict | None]]:
    conn = open_database(store.path, readonly=True)
    try:
        found = conn.execute("SELECT kind, detail FROM events WHERE message_id = ? ORDER BY id", (message_id,))
        return [(r["kind"], json.loads(r["detail"]) if r["detail"] else None) for r in found]
    finally:
        conn.close()


def segments(ack: bytes) -> list[bytes]:
    return ack.rstrip(b"\r").split(b"\r")


def frames_written(t: StringTransport) -> list[bytes]:
    """The messages framed in what the server wrote."""
    data = t.value()
    return data[1:-2].split(b"\x1c\r\x0b") if data else []


def test_good_message_is_acknowledged_after_the_commit(reactor, store, intake):
    """A readable message is stored as 'received' with its header fields, then answered AA byte for byte."""
    d = intake.frameReceived(ADT, PEER)
    assert not d.called  # no ACK before the writer thread has committed
    assert answer(reactor, d) == AA_FOR_ADT
    [row] = rows(store)
    assert row["raw"] == ADT
    assert (row["state"], row["ack_code"], row["flag"], row["reason"]) == ("received", "AA", None, None)
    assert (row["sending_application"], row["sending_facility"], row["control_id"]) == ("EPIC", "GENHOSP", "MSG00001")
    assert (row["message_type"], row["trigger_event"], row["version"], row["peer"]) == ("ADT", "A01", "2.5.1", PEER)
    assert row["received_at"] == "2026-03-01T11:59:30.000+00:00"
    assert events(store, row["id"]) == [("received", {"peer": PEER, "bytes": len(ADT)})]
    assert intake.stored_calls == [True]


def test_ack_sent_is_logged_with_the_next_commit(reactor, store, intake):
    """The 'ack-sent' event does not hold up the ACK; it is written with the next commit."""
    answer(reactor, intake.frameReceived(ADT, PEER))
    commit(reactor, store)
    [row] = rows(store)
    assert [kind for kind, _ in events(store, row["id"])] == ["received", "ack-sent"]
    assert events(store, row["id"])[1][1] == {"code": "AA"}


def test_enhanced_mode_message_gets_ca(reactor, store, intake):
    """A message with MSH-15 AL is stored and answered CA; its ack types are kept."""
    ack = answer(reactor, intake.frameReceived(ENHANCED, PEER))
    assert segments(ack)[1] == b"MSA|CA|MSG00001|"
    [row] = rows(store)
    assert (row["ack_code"], row["accept_ack_type"], row["application_ack_type"]) == ("CA", "AL", "NE")


def test_msh_15_ne_stores_without_answering(reactor, store, intake):
    """MSH-15 NE: the message is stored, and no accept ACK is sent."""
    raw = ADT.replace(b"|P|2.5.1\r", b"|P|2.5.1|||NE\r", 1)
    assert answer(reactor, intake.frameReceived(raw, PEER)) is None
    assert [r["state"] for r in rows(store)] == ["received"]


@pytest.mark.parametrize(
    ("raw", "code", "location", "control_id"),
    [
        (b"\x00\x01 garbage \xff", "100", "MSH", ""),
        (b"PID|1||MRN123\rMSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1\r", "100", "MSH", ""),
        (b"MSH|^^\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG9|P|2.5.1\rPID|1\r", "102", "MSH-2", "MSG9"),
    ],
    ids=["garbage", "no-msh", "bad-msh-2"],
)
def test_unreadable_frame_is_rejected_with_ar_and_err_and_logged(
    reactor, store, intake, raw, code, location, control_id
):
    """A frame whose MSH cannot be read gets AR with an ERR naming the 0357 code, and a 'rejected' row."""
    ack = answer(reactor, intake.frameReceived(raw, PEER))
    msh, msa, err = segments(ack)
    assert msh.startswith(b"MSH|^~\\&|HERALD|HIE|||")
    assert msa.startswith(b"MSA|AR|" + control_id.encode() + b"|")
    field = location.partition("-")[2]
    erl = f"MSH^1^{field}" if field else "MSH^1"
    assert err.split(b"|")[2:5] == [erl.encode(), f"{code}^{ERROR_TEXT[code]}^HL70357".encode(), b"E"]
    [row] = rows(store)
    assert row["raw"] == raw
    assert (row["state"], row["ack_code"], row["control_id"]) == ("rejected", "AR", control_id)
    assert row["reason"].startswith(location + ": ")
    assert [kind for kind, _ in events(store, row["id"])] == ["received", "rejected"]
    assert intake.stored_calls == []  # nothing for the pipeline


def test_missing_control_id_is_rejected_with_code_101_and_empty_msa_2(reactor, store, intake):
    """A message with no MSH-10 gets AR, an empty MSA-2 and ERR code 101 at MSH-10, addressed to its sender."""
    raw = ADT.replace(b"|MSG00001|", b"||", 1)
    ack = answer(reactor, intake.frameReceived(raw, PEER))
    assert segments(ack) == [
        b"MSH|^~\\&|HERALD|HIE|EPIC|GENHOSP|20260301120000+0000||ACK^A01^ACK|ACK0001|P|2.5.1",
        b"MSA|AR||MSH-10 message control id is empty",
        b"ERR|MSH^1^10^101&Required field missing&HL70357|MSH^1^10|101^Required field missing^HL70357|E||||"
        b"MSH-10 message control id is empty",
    ]
    [row] = rows(store)
    assert (row["state"], row["ack_code"], row["control_id"]) == ("rejected", "AR", "")
    assert (row["sending_application"], row["sending_facility"], row["message_type"]) == ("EPIC", "GENHOSP", "ADT")


def test_enhanced_mode_rejection_gets_cr_in_the_senders_separators(reactor, store, intake):
    """A rejected message whose MSH is readable enough (MSH-15 AL) gets CR, written in its own separators."""
    raw = b"MSH#!@$%#EPIC#GENHOSP#HERALD#HIE#20260301##ADT!A01#MSG5#P#2.5.1###AL\r"
    raw = raw.replace(b"##ADT!A01#", b"###", 1)  # MSH-9 missing
    ack = answer(reactor, intake.frameReceived(raw, PEER))
    msh, msa, err = segments(ack)
    assert msh.startswith(b"MSH#!@$%#HERALD#HIE#EPIC#GENHOSP#")
    assert msa == b"MSA#CR#MSG5#MSH-9 message type is empty"
    assert err.split(b"#")[2:4] == [b"MSH!1!9", b"101!Required field missing!HL70357"]
    assert rows(store)[0]["ack_code"] == "CR"


def test_oversized_frame_is_refused_with_code_104_and_its_prefix_logged(reactor, store, pinned_acks):
    """Through the server: an oversized frame gets AR with ERR code 104, is logged as rejected keeping its start."""
    intake = Intake(store, pinned_acks, max_length=200)
    p = MLLPServerFactory(intake, maxLength=200, reactor=Clock()).buildProtocol(None)
    p.PREFIX_KEPT = 120
    t = StringTransport()
    p.makeConnection(t)
    big = ADT + b"NTE|1||" + b"x" * 400 + b"\r"
    p.dataReceived(frame(big))
    assert t.value() == b""  # not answered before the refusal is logged
    assert t.producerState == "paused"
    run_until(reactor, lambda: t.disconnecting)
    [nak] = frames_written(t)
    msh, msa, err = segments(nak)
    assert msh.startswith(b"MSH|^~\\&|HERALD|HIE|EPIC|GENHOSP|")
    assert msa == b"MSA|AR|MSG00001|the frame exceeds the 200-byte limit; it was not accepted"
    assert err.startswith(b"ERR|^^^104&Value too long&HL70357||104^Value too long^HL70357|E||||")
    [row] = rows(store)
    assert row["raw"] == big[:120]
    assert (row["state"], row["ack_code"], row["control_id"], row["sending_facility"]) == (
        "rejected",
        "AR",
        "MSG00001",
        "GENHOSP",
    )
    assert row["reason"].endswith("(first 120 bytes kept)")


def test_oversized_frame_without_a_readable_msh_is_still_refused(reactor, store, intake):
    """frameTooLong on bytes with no MSH answers AR code 104 in default separators and logs the prefix."""
    nak = answer(reactor, intake.frameTooLong(b"\x00" * 50, PEER))
    assert segments(nak)[1].startswith(b"MSA|AR||the frame exceeds the 2048-byte limit")
    assert b"|104^Value too long^HL70357|" in segments(nak)[2]
    assert rows(store)[0]["raw"] == b"\x00" * 50


def test_incomplete_frame_is_logged_as_rejected(reactor, store, intake):
    """Through the server: a connection lost mid-frame leaves a 'rejected' row with the partial bytes, no ACK code."""
    p = MLLPServerFactory(intake, reactor=Clock()).buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    partial = ADT[:60]
    p.dataReceived(b"\x0b" + partial)
    p.connectionLost(Failure(error.ConnectionLost()))
    commit(reactor, store)
    [row] = rows(store)
    assert row["raw"] == partial
    assert (row["state"], row["ack_code"]) == ("rejected", "")
    assert "closed in the middle of a frame after 60 bytes" in row["reason"]
    assert t.value() == b""


def test_retransmission_is_acknowledged_again_and_stored_once(reactor, store, intake):
    """The same message (sender, MSH-10, bytes) sent twice gets AA twice, one row and a 'retransmission' event."""
    first = answer(reactor, intake.frameReceived(ADT, PEER))
    second = answer(reactor, intake.frameReceived(ADT, "10.0.0.7:40002"))
    assert segments(first)[1] == segments(second)[1] == b"MSA|AA|MSG00001|"
    commit(reactor, store)
    [row] = rows(store)
    kinds = [kind for kind, _ in events(store, row["id"])]
    assert kinds.count("received") == 1
    assert ("retransmission", {"peer": "10.0.0.7:40002"}) in events(store, row["id"])
    assert intake.stored_calls == [True]  # the pipeline is woken once


def test_reused_control_id_with_other_content_is_stored_and_flagged(reactor, store, intake):
    """Same sender and MSH-10 with different bytes: both stored, the second flagged 'control-id-reused'."""
    answer(reactor, intake.frameReceived(ADT, PEER))
    other = ADT.replace(b"TESTPATIENT^ALEX", b"OTHERPATIENT^SAM")
    ack = answer(reactor, intake.frameReceived(other, PEER))
    assert segments(ack)[1] == b"MSA|AA|MSG00001|"
    first, second = rows(store)
    assert (first["flag"], second["flag"]) == (None, "control-id-reused")
    assert second["raw"] == other and second["state"] == "received"
    assert intake.stored_calls == [True, True]


def test_same_control_id_from_another_sender_is_not_a_retransmission(reactor, store, intake):
    """MSH-10 is unique per sender only: the same id and bytes from another facility is a new message."""
    answer(reactor, intake.frameReceived(ADT, PEER))
    other = ADT.replace(b"|GENHOSP|", b"|NORTHCLINIC|", 1)
    answer(reactor, intake.frameReceived(other, PEER))
    assert [r["flag"] for r in rows(store)] == [None, None]


@pytest.mark.parametrize(("raw", "code"), [(ADT, b"AE"), (ENHANCED, b"CE")], ids=["original", "enhanced"])
def test_store_failure_answers_ae_with_code_207_and_stores_nothing(reactor, store, intake, monkeypatch, raw, code):
    """If the insert fails, the sender gets AE (CE in enhanced mode) with ERR code 207, and no row remains."""

    def fail(conn, record, now):
        conn.execute("INSERT INTO events (at, actor, kind) VALUES ('x', 'test', 'partial write')")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store_messages, "record_frame", fail)
    ack = answer(reactor, intake.frameReceived(raw, PEER))
    msh, msa, err = segments(ack)
    assert msa == b"MSA|" + code + b"|MSG00001|the message could not be stored; it was not accepted, send it again"
    assert b"|207^Application internal error^HL70357|E|" in err
    assert rows(store) == []
    conn = open_database(store.path, readonly=True)
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0  # the job's savepoint was undone
    conn.close()
    assert intake.stored_calls == []


def test_rejection_is_answered_even_if_logging_it_fails(reactor, store, intake, monkeypatch):
    """A rejected frame gets its AR even when the store cannot log it."""
    monkeypatch.setattr(store_messages, "record_frame", lambda conn, record, now: 1 / 0)
    ack = answer(reactor, intake.frameReceived(b"garbage", PEER))
    assert segments(ack)[1].startswith(b"MSA|AR||")


def test_stored_message_is_acknowledged_even_if_the_wake_hook_fails(reactor, store, pinned_acks):
    """A failing on_stored hook does not cost a committed message its ACK."""

    def broken():
        raise RuntimeError("pipeline gone")

    intake = Intake(store, pinned_acks, on_stored=broken)
    assert answer(reactor, intake.frameReceived(ADT, PEER)) == AA_FOR_ADT


def test_store_not_running_answers_ae(database, reactor, pinned_acks):
    """A store that is not running fails the write at once: the sender gets AE, never silence."""
    stopped = Store(database, reactor=reactor, clock=lambda: STORED_AT)
    try:
        ack = success(Intake(stopped, pinned_acks).frameReceived(ADT, PEER))
        assert segments(ack)[1].startswith(b"MSA|AE|MSG00001|")
    finally:
        success(stopped.stop())


def test_acks_follow_frame_order_through_the_server(reactor, store, intake):
    """Several frames on one connection are stored and answered in order, each ACK echoing its own MSH-10."""
    p = MLLPServerFactory(intake, reactor=Clock()).buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    messages = [ADT.replace(b"MSG00001", b"MSG%05d" % i) for i in range(1, 6)]
    p.dataReceived(b"".join(frame(m) for m in messages))
    run_until(reactor, lambda: len(frames_written(t)) == len(messages))
    acks = frames_written(t)
    assert [segments(a)[1] for a in acks] == [b"MSA|AA|MSG%05d|" % i for i in range(1, 6)]
    assert [r["control_id"] for r in rows(store)] == [f"MSG{i:05d}" for i in range(1, 6)]


def test_a_rejection_log_line_names_the_field_once(reactor, store, intake):
    """The log said "MSH-10 MSH-10 message control id is empty"; it names the field once (issue 15)."""
    from twisted.logger import capturedLogs, formatEvent

    raw = ADT.replace(b"|MSG00001|", b"||", 1)
    with capturedLogs() as logged:
        answer(reactor, intake.frameReceived(raw, PEER))
    lines = [formatEvent(e) for e in logged if "rejected a frame" in formatEvent(e)]
    assert lines == [f"rejected a frame from {PEER}: MSH-10 message control id is empty"]
