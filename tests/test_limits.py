"""Bounded input: every limit on what one frame, one peer and one connection may cost Herald.

First the attacker's findings against the running gateway (real sockets,
``make_service``), then each limit on its own: the scanner, intake's answer
and what it stores, the rejection sampler on a ``task.Clock``, the frame
deadline and the connection caps.
"""

from __future__ import annotations

import json
import random
from datetime import UTC

import pytest
import test_end_to_end as e2e
from test_intake import ADT, PEER, answer, commit, drain, rows, run_until, segments, success
from test_mllp import FrameCollector, ScriptedReceiver, server_for
from test_mllp import connect as connect_receiver
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from gateway.app.replay import read_ack, split_messages
from gateway.config import load_config
from gateway.conversion.v2 import V2Message
from gateway.errors import ConfigError
from gateway.header import read_msh
from gateway.intake.ack import AckBuilder
from gateway.intake.receiver import Intake
from gateway.intake.rejections import MAX_PEERS, OTHER_PEERS, RejectionSampler, peer_host
from gateway.limits import HEADER_FIELDS, LimitExceeded, Limits, scan
from gateway.pipeline.process import process_message
from gateway.records import PendingMessage
from gateway.store import open_database
from mllp import MLLPServerFactory, MLLPServerProtocol, Peer, connect, frame

ADMIT = e2e.sample(e2e.ADMIT)
SAMPLES = e2e.SAMPLES


def with_pid3_repetitions(raw: bytes, count: int) -> bytes:
    """``raw`` with PID-3 repeated ``count`` times (the attacker's 60,000-repetition frame)."""
    segs = raw.rstrip(b"\r").split(b"\r")
    out = []
    for s in segs:
        if s.startswith(b"PID|"):
            f = s.split(b"|")
            f[3] = b"~".join([f[3].split(b"~")[0]] + [b"X%d^^^H^MR" % i for i in range(1, count)])
            s = b"|".join(f)
        out.append(s)
    return b"\r".join(out) + b"\r"


def with_obx(raw: bytes, count: int) -> bytes:
    """``raw`` followed by ``count`` OBX segments."""
    obx = b"".join(b"OBX|%d|NM|8867-4^Heart rate^LN||%d|/min|||||F\r" % (i + 1, 60 + i % 40) for i in range(count))
    return raw + obx


def with_control_id(raw: bytes, control_id: bytes) -> bytes:
    f = raw.split(b"|", 10)
    f[9] = control_id
    return b"|".join(f)


class FrameFlood(protocol.Protocol):
    """Writes many frames at once and counts the framed answers that come back."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.answers: list[bytes] = []
        self._buf = b""
        self.all_answered: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"".join(b"\x0b" + f + b"\x1c\r" for f in self.frames))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while b"\x1c\r" in self._buf:
            one, self._buf = self._buf.split(b"\x1c\r", 1)
            self.answers.append(one.lstrip(b"\x0b"))
        if len(self.answers) == len(self.frames) and not self.all_answered.called:
            self.all_answered.callback(self.answers)

    def connectionLost(self, reason=None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class AttackerFindings(e2e.GatewayTestCase):
    """What the attacker found against main, each now bounded."""

    # Converted on the server's pipeline thread: no worker processes to start for a few messages.
    extra_config = "\n[pipeline]\nworkers = 0\n"

    @defer.inlineCallbacks
    def rejected_and_not_expanded(self, raw: bytes, code: bytes, location: bytes):
        c = yield self.client()
        ack = yield c.send(raw, timeout=30)
        self.assertEqual(read_ack(ack)[0], "CR")  # the sample asks for enhanced mode
        self.assertIn(b"|" + code + b"^", ack.split(b"\rERR|")[1])
        self.assertIn(location, ack)
        self.assertLess(len(ack), 600)
        # A good message after it, so the pipeline has run past the refused one.
        ok = yield c.send(e2e.sample(e2e.UNMATCHED), timeout=30)
        self.assertEqual(read_ack(ok)[0], "AA")
        yield self.settled()
        conn = self.db()
        try:
            rows = conn.execute("SELECT state, length(raw) AS n, fhir, reason FROM messages ORDER BY id").fetchall()
            self.assertEqual(len(rows), 2)
            self.assertEqual(rows[0]["state"], "rejected")
            self.assertLessEqual(rows[0]["n"], 4096 + 64)  # 4 KB kept, and the sealing's few bytes at rest
            self.assertIsNone(rows[0]["fhir"])
            self.assertIn("kept", rows[0]["reason"])
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM notifications WHERE message_id = 1").fetchone()[0], 0)
        finally:
            conn.close()
        return ack

    def test_60000_pid_3_repetitions_are_refused_stored_once_truncated_and_never_converted(self):
        """The 60,000-repetition PID-3 frame gets CR naming PID-3, is stored once (<= 4 KB) and makes no Bundle."""
        raw = with_pid3_repetitions(ADMIT, 60_000)
        self.assertLess(len(raw), 1024 * 1024)
        return self.rejected_and_not_expanded(raw, b"102", b"PID^1^3")

    def test_20000_obx_segments_are_refused(self):
        """20,000 OBX segments get CR naming the segment count; nothing is converted."""
        return self.rejected_and_not_expanded(with_obx(ADMIT, 20_000), b"100", b"OBX")

    @defer.inlineCallbacks
    def test_900_kb_control_id_gets_a_short_ack(self):
        """A 900 KB MSH-10 is refused (104 at MSH-10) with an ACK of a few hundred bytes and is not stored whole."""
        ack = yield self.rejected_and_not_expanded(with_control_id(ADMIT, b"C" * 900_000), b"104", b"MSH^1^10")
        msa2 = read_ack(ack)[1]
        self.assertEqual(msa2, "C" * 199)

    @defer.inlineCallbacks
    def test_a_flood_of_garbage_frames_is_answered_but_sampled_in_storage(self):
        """2,000 random frames from one peer: every one is answered AR; only a sample is stored, the rest counted."""
        rng = random.Random(11)
        frames = [bytes(rng.randrange(256) for _ in range(40)).replace(b"\x1c", b"x") for _ in range(2000)]
        flood = FrameFlood(frames)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), flood)
        answers = yield flood.all_answered
        flood.transport.loseConnection()
        yield flood.closed
        self.assertEqual({read_ack(a)[0] for a in answers}, {"AR"})
        yield self.settled()
        conn = self.db()
        try:
            stored = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        finally:
            conn.close()
        self.assertLessEqual(stored, 20)
        # The summary of the rest is written when the window closes (the service's stop closes it).
        yield self.gw.service.stopService()
        conn = self.db()
        try:
            events = conn.execute("SELECT detail FROM events WHERE kind = 'rejections-not-stored'").fetchall()
        finally:
            conn.close()
        self.assertEqual(sum(json.loads(e["detail"])["count"] for e in events), 2000 - stored)


# -- the scanner -------------------------------------------------------------------------

SMALL = Limits(
    segments=8, fields=30, repetitions=3, components=12, field_length=300, control_id_length=20, header_field_length=64
)


def msh_with(**fields: bytes) -> bytes:
    """test_intake's ADT with MSH fields replaced, by number: ``msh_with(f10=b"X")``."""
    msh, rest = ADT.split(b"\r", 1)
    f = msh.split(b"|")
    for key, value in fields.items():
        f[int(key[1:]) - 1] = value
    return b"|".join(f) + b"\r" + rest


def over(raw: bytes, limits: Limits = SMALL) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        scan(raw, limits)
    return caught.value


@pytest.mark.parametrize("name", sorted(str(p.relative_to(SAMPLES)) for p in SAMPLES.rglob("*.hl7")))
def test_every_sample_message_is_within_the_default_limits(name):
    """The sample messages of every dialect pass the default limits (and the scan returns None)."""
    for raw in split_messages((SAMPLES / name).read_bytes()):
        assert scan(raw, Limits()) is None


def test_a_message_at_every_limit_passes():
    """Exactly at each limit is within it: 8 segments, 3 repetitions, 12 components, 300-byte field, 20-char MSH-10."""
    raw = msh_with(f10=b"C" * 20, f3=b"A" * 64)
    raw += b"NK1|1|" + b"~".join([b"N"] * 3) + b"|" + b"^" * 11 + b"|" + b"x" * 300 + b"|" * 25 + b"\r"
    raw += b"OBX|1\r" * (8 - raw.count(b"\r"))
    assert raw.count(b"\r") == 8
    assert scan(raw, SMALL) is None


def test_too_many_segments_is_error_100_at_the_first_segment_over():
    """One segment over the count: code 100, located at that segment and its sequence (the 6th OBX)."""
    e = over(ADT + b"OBX|1\r" * 6)  # ADT has 4 segments: the 9th segment is the 5th OBX... count them
    assert (e.code, e.limit) == ("100", "segments")
    assert (e.location, e.sequence) == ("OBX", 5)
    assert "more than 8 segments" in e.reason


def test_blank_lines_are_not_segments():
    """Blank lines between segments (CR LF pairs, stray LFs) do not count against the segment limit."""
    raw = ADT.replace(b"\r", b"\r\n\n") + b"OBX|1\r\n" * 4
    assert scan(raw, SMALL) is None


def test_too_many_repetitions_is_error_102_at_the_field():
    """Four repetitions of PID-3 against a limit of three: 102 at PID-3."""
    raw = ADT.replace(b"MRN123^^^GENHOSP^MR", b"~".join([b"M^^^H^MR"] * 4))
    e = over(raw)
    assert (e.code, e.location, e.limit, e.sequence) == ("102", "PID-3", "repetitions", 1)


def test_too_many_components_is_error_102_at_the_field():
    """13 components in one repetition of PID-5 against 12: 102 at PID-5."""
    raw = ADT.replace(b"TESTPATIENT^ALEX", b"^".join([b"N"] * 13))
    e = over(raw)
    assert (e.code, e.location, e.limit) == ("102", "PID-5", "components")


def test_components_are_counted_per_repetition():
    """Components spread over repetitions (3 x 10) are within a limit of 12 per repetition."""
    raw = ADT.replace(b"MRN123^^^GENHOSP^MR", b"~".join([b"^".join([b"c"] * 10)] * 3))
    assert scan(raw, SMALL) is None


def test_too_many_fields_is_error_102_at_the_first_field_over():
    """A segment with 31 fields against 30: 102 at its 31st field."""
    e = over(ADT + b"ZXX" + b"|" * 31 + b"\r")
    assert (e.code, e.location, e.limit) == ("102", "ZXX-31", "fields")


def test_over_long_field_is_error_104_at_the_field_of_the_right_segment():
    """A 301-byte NTE-3 in the second NTE: 104 at NTE-3, sequence 2."""
    raw = ADT + b"NTE|1||short\rNTE|2||" + b"x" * 301 + b"\r"
    e = over(raw)
    assert (e.code, e.location, e.limit, e.sequence) == ("104", "NTE-3", "field_length", 2)


def test_over_long_control_id_is_error_104_at_msh_10():
    """MSH-10 one character over its limit: 104 at MSH-10."""
    e = over(msh_with(f10=b"C" * 21))
    assert (e.code, e.location, e.limit) == ("104", "MSH-10", "control_id_length")


@pytest.mark.parametrize("n", HEADER_FIELDS)
def test_over_long_header_field_is_error_104_at_that_msh_field(n):
    """Each MSH field Herald reads and echoes (MSH-3 to MSH-12) is held to header_field_length."""
    e = over(msh_with(**{f"f{n}": b"A" * 65}))
    assert (e.code, e.location, e.limit) == ("104", f"MSH-{n}", "header_field_length")


def test_msh_2_is_not_counted_as_components_or_repetitions():
    """MSH-2 holds the separators themselves: a limit of one repetition and component still reads it."""
    tight = Limits(repetitions=1, components=10, fields=30, segments=8)
    assert scan(b"MSH|^~\\&|A|B|C|D|20260301||ADT^A01|1|P|2.5.1\r", tight) is None


def test_the_message_s_own_separators_are_used():
    """Separators other than |^~ are honoured: '#' fields and '!' components are counted as such."""
    raw = b"MSH#!@$%#EPIC#GENHOSP#HERALD#HIE#20260301##ADT!A01#MSG5#P#2.5.1\rPID#1##" + b"@".join([b"x"] * 4) + b"\r"
    e = over(raw)
    assert (e.location, e.limit) == ("PID-3", "repetitions")


def test_reasons_name_the_limit_and_place_never_a_value():
    """No field value (patient data) appears in the reason or location."""
    raw = ADT.replace(b"TESTPATIENT^ALEX", b"SECRETNAME~" * 5)
    e = over(raw)
    assert "SECRET" not in str(e) and "SECRET" not in e.location


def test_a_segment_id_that_is_not_one_is_located_as_a_question_mark():
    """A garbage segment name is not quoted back: its location is '?'."""
    e = over(ADT + b"\x01x|" + b"~" * 5 + b"\r")
    assert e.location == "?-1"


def test_limits_check_names_the_value_too_small():
    """Limits below their floors are reported by name (the config refuses them at start)."""
    assert Limits().check() == []
    assert Limits(repetitions=0, control_id_length=5).check() == [
        ("repetitions", "must be at least 1"),
        ("control_id_length", "must be at least 20"),
    ]


# -- the [limits] section ---------------------------------------------------------------------


def test_limits_section_sets_every_limit(tmp_path):
    """Every key of [limits] reaches the Config: the message limits as one Limits, the rest as settings."""
    f = tmp_path / "herald.toml"
    f.write_text(
        "[limits]\nsegments = 50\nfields = 40\nrepetitions = 5\ncomponents = 20\nfield_length = 1000\n"
        "control_id_length = 20\nheader_field_length = 100\nframe_timeout = 5\nmax_connections = 10\n"
        "max_connections_per_peer = 4\nrejected_sample = 2\nrejected_window = 30.5\nrejected_bytes_kept = 1024\n"
    )
    cfg = load_config(f)
    assert cfg.limits == Limits(50, 40, 5, 20, 1000, 20, 100)
    assert (cfg.frame_timeout, cfg.max_connections, cfg.max_connections_per_peer) == (5, 10, 4)
    assert (cfg.rejected_sample, cfg.rejected_window, cfg.rejected_bytes_kept) == (2, 30.5, 1024)
    assert load_config(None).limits == Limits()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("repetitions = 0", "limits.repetitions"),
        ("control_id_length = 10", "limits.control_id_length"),
        ("frame_timeout = 0", "limits.frame_timeout"),
        ("max_connections = 0", "limits.max_connections"),
        ("max_connections = 4\nmax_connections_per_peer = 5", "limits.max_connections_per_peer"),
        ("rejected_sample = 0", "limits.rejected_sample"),
        ("rejected_window = -1", "limits.rejected_window"),
        ("rejected_bytes_kept = 10", "limits.rejected_bytes_kept"),
        ("segments = 1.5", "limits.segments"),
        ("connections = 3", "limits.connections"),
    ],
)
def test_a_bad_limit_fails_at_start_naming_its_key(tmp_path, text, key):
    """An impossible, mistyped or unknown [limits] value is a ConfigError naming the key."""
    f = tmp_path / "herald.toml"
    f.write_text(f"[limits]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(f)
    assert caught.value.key == key


# -- the converter refuses too -------------------------------------------------------------


def test_v2message_refuses_a_message_over_the_limits():
    """The converter's reader runs the same scan: a message over a limit is never split into fields."""
    with pytest.raises(LimitExceeded):
        V2Message(ADT.replace(b"MRN123^^^GENHOSP^MR", b"~".join([b"M"] * 101)))
    assert V2Message(ADT.replace(b"MRN123^^^GENHOSP^MR", b"~".join([b"M"] * 101)), limits=None).segments


def test_the_pipeline_fails_a_message_over_the_limits_without_converting_it(vocab, sample_roster):
    """process_message on a stored message over the configured limits: failed at parse, no Bundle, no notification."""
    raw = with_pid3_repetitions(ADMIT, 200)
    pending = PendingMessage(1, raw, "2026-03-01T12:00:00+00:00", "")
    outcome = process_message(pending, vocab, UTC, sample_roster, {}, validate=False)
    assert outcome.state == "failed"
    assert (outcome.fhir_json, outcome.notifications) == (None, [])
    assert outcome.events[0][0] == "failed" and outcome.events[0][1]["stage"] == "parse"
    assert "PID-3" in outcome.reason
    # Raised limits let it through (the configured limits reach the pipeline).
    lifted = process_message(pending, vocab, UTC, sample_roster, {}, validate=False, limits=Limits(repetitions=500))
    assert lifted.state != "failed"


# -- the ACK echoes no more than the MSH-10 limit -------------------------------------------------


def test_ack_echoes_at_most_the_control_id_limit(pinned_acks):
    """MSA-2 and every other value echoed from the MSH are cut to control_id_length."""
    header = read_msh(msh_with(f10=b"C" * 5000, f3=b"A" * 5000, f12=b"2" * 5000))
    ack = pinned_acks.build(header, "rejected", error_code="104", error_location="MSH-10", reason="too long")
    assert len(ack) < 1100
    assert ack.split(b"\r")[1].split(b"|")[2] == b"C" * 199
    assert max(len(v) for seg in ack.split(b"\r") for v in seg.split(b"|")) <= 199


def test_ack_truncation_never_splits_an_escape_sequence():
    """A guessed control id escaped for the ACK is cut before an escape sequence, never inside one."""
    acks = AckBuilder(control_id_length=20)
    ack = acks.build(None, "rejected", control_id="x" * 18 + "|" * 10)
    msa2 = ack.split(b"\r")[1].split(b"|")[2]
    assert msa2 == b"x" * 18


def test_err_names_the_sequence_of_the_segment(pinned_acks):
    """ERR-2 (and ERR-1) carry the occurrence of the segment the error is in: the second NTE is NTE^2^3."""
    ack = pinned_acks.build(read_msh(ADT), "rejected", error_code="104", error_location="NTE-3", error_sequence=2)
    err = ack.split(b"\r")[2].split(b"|")
    assert err[1].startswith(b"NTE^2^3^104") and err[2] == b"NTE^2^3"


# -- intake: refused, answered, stored once and truncated -----------------------------------------


@pytest.fixture
def limited_intake(store, pinned_acks):
    return Intake(store, pinned_acks, limits=SMALL, rejected_bytes_kept=512)


def test_message_over_a_limit_is_refused_and_stored_once_truncated(reactor, store, limited_intake):
    """Over a limit: AR with ERR at the place and limit, one 'rejected' row of its first bytes, no pipeline."""
    raw = ADT + b"NTE|1||" + b"x" * 2000 + b"\r"
    ack = answer(reactor, limited_intake.frameReceived(raw, PEER))
    msh, msa, err = segments(ack)
    assert msa.startswith(b"MSA|AR|MSG00001|NTE-3 is longer than 300 bytes")
    assert err.split(b"|")[2:4] == [b"NTE^1^3", b"104^Value too long^HL70357"]
    [row] = rows(store)
    assert (row["state"], row["ack_code"], row["control_id"]) == ("rejected", "AR", "MSG00001")
    assert row["raw"] == raw[:512]
    assert (
        row["reason"]
        == f"NTE-3: NTE-3 is longer than 300 bytes (limits.field_length) (first 512 of {len(raw)} bytes kept)"
    )
    assert row["fhir"] is None


def test_huge_control_id_is_stored_cut_to_its_limit(reactor, store, limited_intake):
    """The stored control id of a refused message is at most control_id_length characters."""
    ack = answer(reactor, limited_intake.frameReceived(msh_with(f10=b"C" * 9000), PEER))
    assert len(ack) < 600
    assert rows(store)[0]["control_id"] == "C" * 20


def test_rejected_garbage_is_stored_truncated(reactor, store, limited_intake):
    """An unreadable frame is kept only up to rejected_bytes_kept."""
    answer(reactor, limited_intake.frameReceived(b"\x00" * 5000, PEER))
    [row] = rows(store)
    assert len(row["raw"]) == 512 and "(first 512 of 5000 bytes kept)" in row["reason"]


def test_incomplete_frame_is_stored_truncated(reactor, store, limited_intake):
    """A frame cut off by the connection is kept only up to rejected_bytes_kept."""
    limited_intake.frameIncomplete(b"MSH|" + b"y" * 3000, PEER)
    commit(reactor, store)
    assert len(rows(store)[0]["raw"]) == 512


# -- rejections sampled per peer --------------------------------------------------------------------


def audit(store, kind: str) -> list[dict]:
    conn = open_database(store.path, readonly=True)
    try:
        found = conn.execute("SELECT detail FROM events WHERE kind = ? ORDER BY id", (kind,))
        return [json.loads(r["detail"]) for r in found]
    finally:
        conn.close()


@pytest.fixture
def sampled(store, pinned_acks):
    """An Intake whose rejections are sampled: 3 per peer per 60 s window, on a task.Clock."""
    clock = Clock()
    sampler = RejectionSampler(store, sample=3, window=60.0, clock=clock)
    sampler.startService()
    intake = Intake(store, pinned_acks, rejections=sampler)
    intake.clock = clock
    yield intake
    if sampler.running:
        sampler.stopService()


def test_only_a_sample_of_a_peer_s_rejections_is_stored_and_every_one_is_answered(reactor, store, sampled):
    """10 garbage frames from one host (any port): all answered AR, 3 stored and logged, 7 counted."""
    with capturedLogs() as logged:
        acks = [answer(reactor, sampled.frameReceived(b"garbage %d" % i, f"10.0.0.9:{4000 + i}")) for i in range(10)]
    assert [segments(a)[1][:7] for a in acks] == [b"MSA|AR|"] * 10
    assert len(rows(store)) == 3
    assert sum("rejected a frame" in e.get("log_format", "") for e in logged) == 3
    assert sampled.rejections._peers["10.0.0.9"].not_stored == 7


def test_the_window_closes_with_one_summary_line_and_one_audit_event(reactor, store, sampled):
    """When the window ends: one log line and audit event per peer with count and reasons; then it samples afresh."""
    for _ in range(10):
        answer(reactor, sampled.frameReceived(b"garbage", "10.0.0.9:4000"))
    answer(reactor, sampled.frameTooLong(b"MSH|^~\\&|", "10.0.0.9:4000"))
    for _ in range(5):
        answer(reactor, sampled.frameReceived(b"garbage", "10.0.0.10:4000"))
    with capturedLogs() as logged:
        sampled.clock.advance(60)
        run_until(reactor, lambda: len(audit(store, "rejections-not-stored")) == 2)
    lines = [formatEvent(e) for e in logged if "not stored" in e.get("log_format", "")]
    assert lines == [
        "peer 10.0.0.9: 8 more rejected frames not stored in the last 60 s (the first 3 were); "
        "reasons: 100 MSH x7, 104 frame x1",
        "peer 10.0.0.10: 2 more rejected frames not stored in the last 60 s (the first 3 were); reasons: 100 MSH x2",
    ]
    first, second = audit(store, "rejections-not-stored")
    assert first == {
        "peer": "10.0.0.9",
        "count": 8,
        "stored": 3,
        "window_seconds": 60.0,
        "reasons": {"100 MSH": 7, "104 frame": 1},
    }
    assert second["peer"] == "10.0.0.10" and second["count"] == 2
    assert len(rows(store)) == 6
    # A new window: the next rejections are sampled afresh.
    answer(reactor, sampled.frameReceived(b"garbage", "10.0.0.9:4000"))
    assert len(rows(store)) == 7


def test_a_window_without_rejections_over_the_sample_writes_no_summary(reactor, store, sampled):
    """A peer under its sample leaves nothing to summarise: no log line, no event, no timer left."""
    answer(reactor, sampled.frameReceived(b"garbage", PEER))
    sampled.clock.advance(60)
    commit(reactor, store)
    assert audit(store, "rejections-not-stored") == []
    assert sampled.clock.getDelayedCalls() == []


def test_stopping_the_sampler_writes_the_open_window_s_summary(reactor, store, sampled):
    """Stopping the service (the gateway stopping) closes the window: its count is not lost, no timer is left."""
    for _ in range(5):
        answer(reactor, sampled.frameReceived(b"garbage", PEER))
    success(drain(reactor, sampled.rejections.stopService()))
    assert audit(store, "rejections-not-stored")[0]["count"] == 2
    assert sampled.clock.getDelayedCalls() == []


def test_incomplete_frames_are_sampled_too(reactor, store, sampled):
    """Frames cut off by a closing connection count as rejections of the peer."""
    for _ in range(5):
        sampled.frameIncomplete(b"MSH|partial", PEER)
    commit(reactor, store)
    assert len(rows(store)) == 3
    assert dict(sampled.rejections._peers["10.0.0.7"].reasons) == {"incomplete frame": 2}


def test_good_messages_are_never_sampled(reactor, store, sampled):
    """Sampling is for rejections only: every accepted message from a noisy peer is stored."""
    for _ in range(5):
        answer(reactor, sampled.frameReceived(b"garbage", PEER))
    for i in range(5):
        raw = ADT.replace(b"MSG00001", b"MSG%05d" % i)
        assert segments(answer(reactor, sampled.frameReceived(raw, PEER)))[1].startswith(b"MSA|AA|")
    assert [r["state"] for r in rows(store)].count("received") == 5


def test_many_peers_share_one_tally_past_the_table_size(store):
    """The table of peers is bounded: hosts beyond MAX_PEERS in one window share the '(other peers)' tally."""
    sampler = RejectionSampler(store, sample=1, window=60.0, clock=Clock())
    sampler.startService()
    for i in range(MAX_PEERS + 50):
        sampler.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:1", "100 MSH")
    assert len(sampler._peers) == MAX_PEERS + 1
    assert sampler._peers[OTHER_PEERS].seen == 50
    sampler._timer.cancel()


def test_without_the_service_running_every_rejection_is_stored(store):
    """A sampler that is not running (Intake used on its own) admits everything: nothing is lost silently."""
    sampler = RejectionSampler(store, sample=1, window=60.0, clock=Clock())
    assert all(sampler.admit(PEER, "100 MSH") for _ in range(5))


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("10.0.0.7:40001", "10.0.0.7"),
        ("::1:2575", "::1"),
        ("unix-socket", "unix-socket"),
        ("?", "?"),
        (Peer("10.0.0.8", 2575, tls=True), "10.0.0.8"),
    ],
)
def test_peer_host_drops_the_port(peer, host):
    """Tallies are per host: the port of each new connection is dropped."""
    assert peer_host(peer) == host


# -- the frame deadline ---------------------------------------------------------------------------


def test_a_frame_trickled_past_its_deadline_is_aborted_and_reported_incomplete():
    """A byte every 10 s keeps the idle timer alive, but 60 s after its start byte the frame's connection is aborted."""
    receiver = ScriptedReceiver()
    p, t, clock = server_for(receiver, idleTimeout=30.0, frameTimeout=60.0)
    with capturedLogs() as logged:
        p.dataReceived(b"\x0bMSH|")
        for _ in range(5):
            clock.advance(10)
            p.dataReceived(b"x")
        assert not t.disconnecting
        clock.advance(10)
    assert t.disconnecting and getattr(t, "aborted", True)
    p.connectionLost(Failure(error.ConnectionAborted()))
    assert receiver.incomplete == [(b"MSH|xxxxx", "192.168.1.1:54321")]  # StringTransport's peer
    assert any("not finished 60 s after it began (9 bytes)" in formatEvent(e) for e in logged)
    assert clock.getDelayedCalls() == []


def test_a_frame_finished_in_time_cancels_its_deadline():
    """A frame that ends before its deadline is answered and leaves only the idle timer."""
    receiver = ScriptedReceiver()
    p, t, clock = server_for(receiver, idleTimeout=30.0, frameTimeout=60.0)
    p.dataReceived(b"\x0bMSH|^~\\&")
    assert len(clock.getDelayedCalls()) == 2
    clock.advance(20)
    p.dataReceived(b"|rest\x1c\r")
    assert [f for f, _ in receiver.frames] == [b"MSH|^~\\&|rest"]
    assert len(clock.getDelayedCalls()) == 1  # the idle timer
    clock.advance(50)  # past where the deadline was; the idle timer was reset at 20 s
    assert t.disconnecting  # by the idle timeout (30 s after the last byte), not the deadline


def test_a_frame_in_one_read_sets_no_deadline_timer():
    """Most frames arrive whole: they cost no timer at all."""
    receiver = ScriptedReceiver()
    p, t, clock = server_for(receiver, idleTimeout=None, frameTimeout=60.0)
    p.dataReceived(frame(b"MSH|one") + frame(b"MSH|two"))
    assert clock.getDelayedCalls() == []
    assert len(receiver.frames) == 2


def test_skipped_bytes_are_logged_at_the_listener_s_pace_across_connections():
    """Garbage between frames on many connections: counted always, logged at most once an interval, with totals."""
    clock = Clock()
    factory = MLLPServerFactory(ScriptedReceiver(), reactor=clock, idleTimeout=None)
    with capturedLogs() as logged:
        for port in range(50):
            p = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", port))
            p.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", port)))
            for _ in range(10):
                p.dataReceived(b"noise")
            assert p.skippedBytes == 50
        clock.advance(10)
        p.dataReceived(b"more")
    lines = [formatEvent(e) for e in logged if "skipped" in e.get("log_format", "")]
    assert lines == [
        "skipped 5 bytes outside MLLP frames from 10.0.0.5",
        "skipped 2499 bytes outside MLLP frames from 10.0.0.5",
    ]


def test_a_receiver_without_a_counting_factory_logs_skips_once_a_connection():
    """The client side (no server factory): the first skip of a connection is logged, the rest only counted."""
    p = FrameCollector()
    connect_receiver(p)
    with capturedLogs() as logged:
        for _ in range(100):
            p.dataReceived(b"noise")
    assert p.skippedBytes == 500
    assert sum("skipped" in e.get("log_format", "") for e in logged) == 1


# -- connection caps ------------------------------------------------------------------------------


def test_factory_caps_connections_per_peer_and_in_all():
    """buildProtocol hands out an MLLP protocol under the caps, a protocol that aborts at once over them."""
    factory = MLLPServerFactory(ScriptedReceiver(), reactor=Clock(), maxConnections=3, maxConnectionsPerPeer=2)
    a1 = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    a2 = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 2))
    a3 = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 3))
    b1 = factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 1))
    c1 = factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", 1))
    assert [isinstance(p, MLLPServerProtocol) for p in (a1, a2, a3, b1, c1)] == [True, True, False, True, False]
    t = StringTransport()
    a3.makeConnection(t)
    assert t.disconnecting
    assert (factory.connections, factory.connectionsByPeer) == (3, {"10.0.0.1": 2, "10.0.0.2": 1})
    a1.makeConnection(StringTransport())
    a1.connectionLost(Failure(error.ConnectionDone()))
    a1.connectionLost(Failure(error.ConnectionDone()))  # counted once however often it is told
    assert (factory.connections, factory.connectionsByPeer) == (2, {"10.0.0.1": 1, "10.0.0.2": 1})
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", 2)), MLLPServerProtocol)


def test_refusals_are_logged_at_most_once_per_interval_with_their_count():
    """A flood of refused connections is a few log lines, each with the count since the last."""
    clock = Clock()
    factory = MLLPServerFactory(ScriptedReceiver(), reactor=clock, maxConnections=1)
    factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    with capturedLogs() as logged:
        for i in range(1000):
            factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", i))
        clock.advance(10)
        factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 0))
        factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 0))
        factory.stopFactory()
    lines = [formatEvent(e) for e in logged]
    assert lines == [
        "refused 1 MLLP connection(s) from 10.0.0.5: over the cap of 1 connections in all",
        "refused 1000 MLLP connection(s) from 10.0.0.5: over the cap of 1 connections in all",
        "refused 1 MLLP connection(s) from 10.0.0.5: over the cap of 1 connections in all",
    ]


# -- on real sockets: the caps and the deadline as make_service wires them ------------------------


class ConnectionLimits(e2e.GatewayTestCase):
    """Herald with small caps and a short frame deadline, from [limits] in its config file."""

    extra_config = """
[pipeline]
workers = 0

[limits]
max_connections = 3
max_connections_per_peer = 2
frame_timeout = 0.5
"""

    @defer.inlineCallbacks
    def raw_connection(self, source: str = "127.0.0.1", frames=()):
        flood = FrameFlood(list(frames))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0))
        yield connectProtocol(endpoint, flood)
        return flood

    @defer.inlineCallbacks
    def mllp_client(self, source: str):
        c = yield connect(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0)), reactor)
        self.clients.append(c)
        return c

    def closed_soon(self, flood: FrameFlood, seconds: float = 5.0):
        return flood.closed.addTimeout(seconds, reactor)

    @defer.inlineCallbacks
    def test_connections_over_the_caps_are_closed_at_once_and_the_rest_served(self):
        """Two from one host are served, a third is closed at once; another host is served up to three in all."""
        a1 = yield self.mllp_client("127.0.0.1")
        a2 = yield self.mllp_client("127.0.0.1")
        a3 = yield self.raw_connection("127.0.0.1")
        yield self.closed_soon(a3)
        b1 = yield self.mllp_client("127.0.0.2")
        c1 = yield self.raw_connection("127.0.0.3")
        yield self.closed_soon(c1)
        for i, c in enumerate((a1, a2, b1)):
            ack = yield c.send(with_control_id(ADMIT, b"CAP%d" % i), timeout=10)
            self.assertEqual(read_ack(ack)[0], "CA")
        # A closed connection no longer counts.
        a1.transport.loseConnection()
        yield task.deferLater(reactor, 0.1, lambda: None)
        c2 = yield self.mllp_client("127.0.0.3")
        ack = yield c2.send(with_control_id(ADMIT, b"CAP9"), timeout=10)
        self.assertEqual(read_ack(ack)[0], "CA")
        [factory] = {lst.factory for lst in self.gw.listeners}
        self.assertEqual((factory.maxConnections, factory.maxConnectionsPerPeer), (3, 2))

    @defer.inlineCallbacks
    def test_a_frame_trickled_past_the_deadline_is_closed_and_logged_incomplete(self):
        """A frame still unfinished 0.5 s after its start byte is cut off, though bytes keep coming; it is logged."""
        flood = yield self.raw_connection()
        flood.transport.write(b"\x0bMSH|^~\\&|")
        drip = task.LoopingCall(lambda: flood.transport.write(b"x"))
        drip.start(0.05, now=False)
        try:
            yield self.closed_soon(flood, 5.0)
        finally:
            drip.stop()
        yield self.wait_for("SELECT COUNT(*) FROM messages WHERE state = 'rejected'", expected=1)
        conn = self.db()
        try:
            reason = conn.execute("SELECT reason FROM messages").fetchone()["reason"]
        finally:
            conn.close()
        self.assertIn("closed in the middle of a frame", reason)
        # A well-behaved client is served afterwards.
        c = yield self.client()
        ack = yield c.send(ADMIT, timeout=10)
        self.assertEqual(read_ack(ack)[0], "CA")
