"""MLLP framing, the server protocol and the client, driven without a reactor."""

from __future__ import annotations

import pytest
from twisted.internet import defer, error, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mllp import (
    DEFAULT_MAX_LENGTH,
    AckTimeout,
    MLLPClientFactory,
    MLLPClientProtocol,
    MLLPReceiver,
    MLLPServerFactory,
    MLLPServerProtocol,
    frame,
    send_message,
)

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
MSG1 = b"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1\rPID|1\r"
MSG2 = b"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A03|MSG2|P|2.5.1\rPID|1\r"

# successResultOf / failureResultOf / assertNoResult for plain pytest functions.
_sync = SynchronousTestCase()
success, failure, no_result = _sync.successResultOf, _sync.failureResultOf, _sync.assertNoResult


# -- framing -------------------------------------------------------------------


class FrameCollector(MLLPReceiver):
    """An MLLPReceiver that records what it is handed."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, idle: float | None = None) -> None:
        super().__init__()
        self.MAX_LENGTH = max_length
        self.idleTimeout = idle
        self.frames: list[bytes] = []
        self.refused: list[bytes] = []

    def frameReceived(self, message: bytes) -> None:
        self.frames.append(message)

    def frameLengthExceeded(self, prefix: bytes) -> None:
        self.refused.append(prefix)
        super().frameLengthExceeded(prefix)


def connect(proto, clock: task.Clock | None = None) -> StringTransport:
    """Attach ``proto`` to a StringTransport, its timers on ``clock``."""
    proto.callLater = (clock or task.Clock()).callLater
    transport = StringTransport()
    proto.makeConnection(transport)
    return transport


def test_frame_wraps_a_message():
    """frame() puts VT before and FS CR after the message."""
    assert frame(b"abc") == b"\x0babc\x1c\x0d"


def test_one_frame_in_one_read():
    """A whole frame in one read is handed over once, without its framing bytes."""
    p = FrameCollector()
    connect(p)
    p.dataReceived(frame(MSG1))
    assert p.frames == [MSG1]
    assert p.skippedBytes == 0
    assert p.partialFrameLength == 0


def test_frame_split_byte_by_byte():
    """A frame arriving one byte per read is handed over once, when its FS CR is complete."""
    p = FrameCollector()
    connect(p)
    data = frame(MSG1)
    for i in range(len(data)):
        assert p.frames == []
        p.dataReceived(data[i : i + 1])
    assert p.frames == [MSG1]


def test_frame_split_between_fs_and_cr():
    """A read ending on FS does not end the frame; the CR in the next read does."""
    p = FrameCollector()
    connect(p)
    p.dataReceived(VT + MSG1 + FS)
    assert p.frames == []
    assert p.partialFrameLength == len(MSG1) + 1
    p.dataReceived(CR)
    assert p.frames == [MSG1]


def test_two_frames_split_at_every_position():
    """Two frames cut into two reads at any byte are both delivered intact."""
    data = frame(MSG1) + frame(MSG2)
    for cut in range(len(data) + 1):
        p = FrameCollector()
        connect(p)
        p.dataReceived(data[:cut])
        p.dataReceived(data[cut:])
        assert p.frames == [MSG1, MSG2], cut


def test_several_frames_in_one_read():
    """Frames packed in one read are delivered in order."""
    p = FrameCollector()
    connect(p)
    p.dataReceived(frame(MSG1) + frame(b"") + frame(MSG2))
    assert p.frames == [MSG1, b"", MSG2]


def test_fs_not_followed_by_cr_is_part_of_the_message():
    """A lone FS inside a message does not end the frame; only FS CR does."""
    p = FrameCollector()
    connect(p)
    p.dataReceived(frame(b"a\x1cb\x1c\x1cc"))
    assert p.frames == [b"a\x1cb\x1c\x1cc"]


def test_bytes_outside_frames_are_skipped_and_counted():
    """Bytes before VT (and between frames) are dropped, counted in skippedBytes, and the next frame still arrives."""
    p = FrameCollector()
    connect(p)
    p.dataReceived(b"junk")
    assert p.skippedBytes == 4
    p.dataReceived(b"\r\n" + frame(MSG1) + b"\n" + frame(MSG2))
    assert p.frames == [MSG1, MSG2]
    assert p.skippedBytes == 7


def test_frame_over_max_length_is_refused_with_a_prefix_and_closes():
    """A frame one byte over MAX_LENGTH calls frameLengthExceeded with its start, and the connection closes."""
    p = FrameCollector(max_length=10)
    p.PREFIX_KEPT = 4
    t = connect(p)
    p.dataReceived(frame(b"0123456789X"))
    assert p.frames == []
    assert p.refused == [b"0123"]
    assert t.disconnecting


def test_frame_growing_past_max_length_is_refused_before_it_ends():
    """A frame still arriving is refused as soon as it passes MAX_LENGTH, without waiting for FS CR."""
    p = FrameCollector(max_length=10)
    t = connect(p)
    p.dataReceived(VT + b"0123456789")
    p.dataReceived(b"A")  # FS could still come: 11 bytes may be 10 + FS
    assert p.refused == []
    p.dataReceived(b"B")
    assert p.refused == [b"0123456789AB"]
    assert t.disconnecting


@pytest.mark.parametrize("step", [1, 3, 100])
def test_frame_of_exactly_max_length_is_accepted(step):
    """A frame of exactly MAX_LENGTH bytes is delivered, whatever the reads' sizes."""
    p = FrameCollector(max_length=10)
    t = connect(p)
    data = frame(b"0123456789") + frame(b"x")
    for i in range(0, len(data), step):
        p.dataReceived(data[i : i + step])
    assert p.frames == [b"0123456789", b"x"]
    assert p.refused == []
    assert not t.disconnecting


def test_input_after_an_oversized_frame_is_discarded():
    """Once a frame is refused, the rest of the input (even what looks like a frame) is not delivered."""

    class KeepOpen(FrameCollector):
        def frameLengthExceeded(self, prefix: bytes) -> None:
            self.refused.append(prefix)  # answers later, like the server: does not close yet

    p = KeepOpen(max_length=10)
    connect(p)
    p.dataReceived(frame(b"0123456789X") + frame(b"after"))
    p.dataReceived(frame(b"later"))
    assert p.frames == []
    assert p.refused == [b"0123456789X"]
    assert p.partialFrameLength == 0


def test_frames_after_a_callback_closes_the_connection_are_not_delivered():
    """When frameReceived closes the connection, later frames in the same read are left alone."""

    class CloseAfterFirst(FrameCollector):
        def frameReceived(self, message: bytes) -> None:
            super().frameReceived(message)
            self.transport.loseConnection()

    p = CloseAfterFirst()
    connect(p)
    p.dataReceived(frame(MSG1) + frame(MSG2))
    assert p.frames == [MSG1]


def test_idle_connection_is_closed_after_the_timeout():
    """A connection that sends nothing for idleTimeout seconds is closed; any data resets the timer."""
    clock = task.Clock()
    p = FrameCollector(idle=30)
    t = connect(p, clock)
    clock.advance(29)
    p.dataReceived(b"\x0bpart")
    clock.advance(29)
    assert not t.disconnecting
    clock.advance(1)
    assert t.disconnecting


def test_no_idle_timeout_when_disabled():
    """idleTimeout None leaves a quiet connection open and schedules nothing."""
    clock = task.Clock()
    p = FrameCollector(idle=None)
    t = connect(p, clock)
    assert clock.getDelayedCalls() == []
    clock.advance(10**6)
    assert not t.disconnecting


def test_idle_timer_is_cancelled_when_the_connection_is_lost():
    """Losing the connection cancels the idle timer instead of leaving it pending."""
    clock = task.Clock()
    p = FrameCollector(idle=30)
    connect(p, clock)
    p.connectionLost(Failure(error.ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_partial_frame_length():
    """partialFrameLength counts bytes of a begun frame (not skipped bytes) and is 0 between frames."""
    p = FrameCollector()
    connect(p)
    p.dataReceived(b"noise")
    assert p.partialFrameLength == 0
    p.dataReceived(VT + b"abc")
    assert p.partialFrameLength == 3
    p.dataReceived(b"de" + FS + CR + VT + b"x")
    assert p.frames == [b"abcde"]
    assert p.partialFrameLength == 1


def test_send_frame_writes_a_framed_message():
    """sendFrame writes the message with MLLP framing on the transport."""
    p = FrameCollector()
    t = connect(p)
    p.sendFrame(b"ACK")
    assert t.value() == frame(b"ACK")


# -- server ----------------------------------------------------------------------


class ScriptedReceiver:
    """A FrameReceiver whose answers the test supplies (bytes, None, or Deferreds it fires itself)."""

    def __init__(self, answers=None, nak=None) -> None:
        self.answers = list(answers or [])
        self.nak = nak
        self.frames: list[tuple[bytes, str]] = []
        self.too_long: list[tuple[bytes, str]] = []
        self.incomplete: list[tuple[bytes, str]] = []

    def frameReceived(self, message: bytes, peer: str):
        self.frames.append((message, peer))
        return self.answers.pop(0) if self.answers else b"ACK:" + message[:3]

    def frameTooLong(self, prefix: bytes, peer: str):
        self.too_long.append((prefix, peer))
        return self.nak

    def frameIncomplete(self, partial: bytes, peer: str) -> None:
        self.incomplete.append((partial, peer))


def server_for(receiver, **factory_args) -> tuple[MLLPServerProtocol, StringTransport, task.Clock]:
    reactor = MemoryReactorClock()
    factory = MLLPServerFactory(receiver, reactor=reactor, **factory_args)
    p = factory.buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    return p, t, reactor


def written_frames(t: StringTransport) -> list[bytes]:
    """The frames written to ``t`` so far."""
    p = FrameCollector()
    connect(p)
    p.dataReceived(t.value())
    return p.frames


def test_factory_configures_its_protocols():
    """The factory gives each protocol its receiver, size limit, idle timeout and the injected reactor's clock."""
    receiver = ScriptedReceiver()
    p, t, reactor = server_for(receiver, maxLength=1234, idleTimeout=5)
    assert (p.receiver, p.MAX_LENGTH, p.idleTimeout, p.factory.receiver) == (receiver, 1234, 5, receiver)
    reactor.advance(5)
    assert t.disconnecting


def test_server_answers_with_the_receivers_bytes_and_peer():
    """Each frame goes to the receiver with the peer's address, and its answer is written framed."""
    receiver = ScriptedReceiver()
    p, t, _ = server_for(receiver)
    p.dataReceived(frame(MSG1))
    assert receiver.frames == [(MSG1, "192.168.1.1:54321")]
    assert t.value() == frame(b"ACK:MSH")


def test_acks_are_written_in_frame_order_when_deferreds_fire_out_of_order():
    """Answers go out in the order frames arrived, even if later Deferreds fire first."""
    d1, d2, d3 = defer.Deferred(), defer.Deferred(), defer.Deferred()
    receiver = ScriptedReceiver([d1, d2, d3])
    p, t, _ = server_for(receiver)
    p.dataReceived(frame(b"one") + frame(b"two") + frame(b"three"))
    d3.callback(b"ack3")
    d2.callback(b"ack2")
    assert t.value() == b""
    d1.callback(b"ack1")
    assert written_frames(t) == [b"ack1", b"ack2", b"ack3"]
    assert [m for m, _ in receiver.frames] == [b"one", b"two", b"three"]


def test_one_frame_at_a_time_reaches_the_receiver():
    """The next frame is handed over only once the previous one is answered."""
    d1 = defer.Deferred()
    receiver = ScriptedReceiver([d1])
    p, t, _ = server_for(receiver)
    p.dataReceived(frame(b"one") + frame(b"two"))
    assert [m for m, _ in receiver.frames] == [b"one"]
    d1.callback(b"ack1")
    assert [m for m, _ in receiver.frames] == [b"one", b"two"]
    assert written_frames(t) == [b"ack1", b"ACK:two"]


def test_many_already_fired_answers_do_not_recurse():
    """Thousands of frames queued behind a slow one, answered by fired Deferreds, are all answered in order."""
    count = 5000
    slow = defer.Deferred()
    receiver = ScriptedReceiver([slow] + [defer.succeed(b"%d" % i) for i in range(1, count)])
    p, t, _ = server_for(receiver)
    p.MAX_PENDING = count * 2
    p.dataReceived(b"".join(frame(b"m") for _ in range(count)))
    slow.callback(b"0")
    assert written_frames(t) == [b"%d" % i for i in range(count)]


def test_receiver_returning_none_writes_nothing():
    """An answer of None (MSH-15 asked for no ACK) writes nothing, and later frames are still answered."""
    receiver = ScriptedReceiver([None, defer.succeed(None), b"ack3"])
    p, t, _ = server_for(receiver)
    p.dataReceived(frame(b"one") + frame(b"two") + frame(b"three"))
    assert written_frames(t) == [b"ack3"]
    assert not t.disconnecting


def test_receiver_failure_closes_the_connection_without_answering():
    """A receiver Deferred that fails closes the connection; nothing is written for it or after it."""
    d1 = defer.Deferred()
    receiver = ScriptedReceiver([d1])
    p, t, _ = server_for(receiver)
    p.dataReceived(frame(b"one") + frame(b"two"))
    d1.errback(RuntimeError("boom"))
    assert t.value() == b""
    assert t.disconnecting
    assert [m for m, _ in receiver.frames] == [b"one"]


def test_receiver_raising_closes_the_connection():
    """A receiver that raises closes the connection rather than letting the error into the reactor."""

    class Raising(ScriptedReceiver):
        def frameReceived(self, message, peer):
            raise RuntimeError("boom")

    p, t, _ = server_for(Raising())
    p.dataReceived(frame(b"one"))
    assert t.disconnecting
    assert t.value() == b""


def test_reading_pauses_when_too_many_frames_wait_and_resumes_when_answered():
    """MAX_PENDING unanswered frames pause the transport; answering them resumes it."""
    d1 = defer.Deferred()
    receiver = ScriptedReceiver([d1])
    p, t, _ = server_for(receiver)
    p.MAX_PENDING = 3
    p.dataReceived(frame(b"1") + frame(b"2") + frame(b"3"))
    assert t.producerState == "producing"  # one handed over, two waiting
    p.dataReceived(frame(b"4"))
    assert t.producerState == "paused"
    d1.callback(b"ack1")
    assert t.producerState == "producing"
    assert written_frames(t) == [b"ack1", b"ACK:2", b"ACK:3", b"ACK:4"]


def test_connection_lost_mid_frame_reports_the_partial_bytes():
    """A connection closing inside a frame hands the bytes read so far to frameIncomplete."""
    receiver = ScriptedReceiver()
    p, t, _ = server_for(receiver)
    p.dataReceived(frame(MSG1) + VT + b"MSH|^~\\&|half")
    p.connectionLost(Failure(error.ConnectionLost()))
    assert receiver.incomplete == [(b"MSH|^~\\&|half", "192.168.1.1:54321")]


def test_connection_lost_between_frames_reports_nothing():
    """A connection closing between frames (or after skipped bytes) reports no incomplete frame."""
    receiver = ScriptedReceiver()
    p, t, _ = server_for(receiver)
    p.dataReceived(frame(MSG1) + b"\r\n")
    p.connectionLost(Failure(error.ConnectionDone()))
    assert receiver.incomplete == []


def test_incomplete_frame_hook_failure_is_contained():
    """A frameIncomplete that raises does not escape connectionLost."""

    class Raising(ScriptedReceiver):
        def frameIncomplete(self, partial, peer):
            raise RuntimeError("boom")

    p, t, _ = server_for(Raising())
    p.dataReceived(VT + b"half")
    p.connectionLost(Failure(error.ConnectionLost()))  # does not raise


def test_oversized_frame_gets_the_nak_then_the_connection_closes():
    """A frame over the limit is passed (its start) to frameTooLong; its NAK is written, then the connection closes."""
    receiver = ScriptedReceiver(nak=b"NAK")
    p, t, _ = server_for(receiver, maxLength=10)
    p.dataReceived(frame(b"0123456789X"))
    assert receiver.too_long == [(b"0123456789X", "192.168.1.1:54321")]
    assert receiver.frames == []
    assert written_frames(t) == [b"NAK"]
    assert t.disconnecting


def test_oversized_frame_waits_for_a_deferred_nak_with_reading_paused():
    """While the NAK is being prepared reading is paused and the connection open; it closes after the NAK."""
    nak = defer.Deferred()
    receiver = ScriptedReceiver(nak=nak)
    p, t, _ = server_for(receiver, maxLength=10)
    p.dataReceived(frame(b"0123456789X"))
    assert t.producerState == "paused"
    assert not t.disconnecting
    nak.callback(b"NAK")
    assert written_frames(t) == [b"NAK"]
    assert t.disconnecting


def test_oversized_frame_without_a_nak_just_closes():
    """When frameTooLong gives no NAK (or fails), the connection closes with nothing written."""
    receiver = ScriptedReceiver(nak=defer.fail(RuntimeError("no store")))
    p, t, _ = server_for(receiver, maxLength=10)
    p.dataReceived(frame(b"0123456789X"))
    assert t.value() == b""
    assert t.disconnecting


def test_nak_for_an_oversized_frame_follows_the_acks_of_earlier_frames():
    """A refusal does not overtake the answer to a frame before it, and frames after it are never handled."""
    d1 = defer.Deferred()
    receiver = ScriptedReceiver([d1], nak=b"NAK")
    p, t, _ = server_for(receiver, maxLength=10)
    p.dataReceived(frame(b"small") + frame(b"0123456789X") + frame(b"after"))
    assert receiver.too_long == []
    assert t.value() == b""
    d1.callback(b"ack1")
    assert written_frames(t) == [b"ack1", b"NAK"]
    assert [m for m, _ in receiver.frames] == [b"small"]
    assert t.disconnecting


# -- client ----------------------------------------------------------------------


def client_on_string_transport() -> tuple[MLLPClientProtocol, StringTransport, task.Clock]:
    clock = task.Clock()
    p = MLLPClientFactory(reactor=clock, maxLength=1000).buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    return p, t, clock


def test_client_send_returns_the_ack_over_a_connected_pair():
    """send() through a real server protocol fires with the server's ACK bytes."""
    clock = task.Clock()
    receiver = ScriptedReceiver()

    def on_the_test_clock():
        # The server's idle timer and frame deadline run on the test's clock, not the real
        # reactor, where they would outlive the test and fire in a later one.
        p = MLLPServerProtocol(receiver)
        p.callLater = clock.callLater
        return p

    client, server, pump = iosim.connectedServerAndClient(
        on_the_test_clock,
        lambda: MLLPClientProtocol(reactor=clock),
        clock=clock,
    )
    d1 = client.send(MSG1)
    d2 = client.send(MSG2)
    pump.flush()
    assert [m for m, _ in receiver.frames] == [MSG1, MSG2]
    assert (success(d1), success(d2)) == (b"ACK:MSH", b"ACK:MSH")
    # Both ACK timers cancelled: what is left is the server's idle timer, on the test's clock.
    assert [c for c in clock.getDelayedCalls() if "timedOut" not in c.func.__name__] == []


def test_client_sends_one_message_at_a_time():
    """A second send waits until the first message's ACK has arrived."""
    p, t, _ = client_on_string_transport()
    d1 = p.send(b"one")
    d2 = p.send(b"two")
    assert t.value() == frame(b"one")
    p.dataReceived(frame(b"ack1"))
    assert t.value() == frame(b"one") + frame(b"two")
    p.dataReceived(frame(b"ack2"))
    assert (success(d1), success(d2)) == (b"ack1", b"ack2")


def test_client_times_out_waiting_for_the_ack():
    """No ACK within the timeout fails send() with AckTimeout and closes the connection."""
    p, t, clock = client_on_string_transport()
    d = p.send(b"one", timeout=5)
    clock.advance(4.9)
    no_result(d)
    assert not t.disconnecting
    clock.advance(0.1)
    assert t.disconnecting
    failure(d, AckTimeout)


def test_connection_lost_fails_the_pending_send():
    """Losing the connection fails the message waiting for its ACK with the connection's reason, and later sends."""
    p, t, clock = client_on_string_transport()
    d = p.send(b"one")
    p.connectionLost(Failure(error.ConnectionLost("gone")))
    failure(d, error.ConnectionLost)
    assert clock.getDelayedCalls() == []
    failure(p.send(b"two"), error.ConnectionDone)


def test_unsolicited_frame_is_ignored():
    """A frame arriving when no message waits does not disturb the next send."""
    p, t, _ = client_on_string_transport()
    p.dataReceived(frame(b"stray"))
    d = p.send(b"one")
    p.dataReceived(frame(b"ack1"))
    assert success(d) == b"ack1"


def test_client_factory_sets_the_frame_limit():
    """MLLPClientFactory gives its protocols the configured MAX_LENGTH and no idle timeout."""
    p, t, _ = client_on_string_transport()
    assert (p.MAX_LENGTH, p.idleTimeout) == (1000, None)


class FakeEndpoint:
    """An endpoint that connects a protocol to a StringTransport at once."""

    def __init__(self) -> None:
        self.protocol = None
        self.transport = StringTransport()

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


def test_send_message_returns_the_ack_and_closes():
    """send_message connects, sends, fires with the ACK and closes the connection."""
    endpoint = FakeEndpoint()
    d = send_message(endpoint, MSG1, reactor=task.Clock())
    assert endpoint.transport.value() == frame(MSG1)
    assert not endpoint.transport.disconnecting
    no_result(d)
    endpoint.protocol.dataReceived(frame(b"ACK"))
    assert success(d) == b"ACK"
    assert endpoint.transport.disconnecting


def test_send_message_closes_after_a_timeout():
    """send_message fails with AckTimeout when no ACK comes, and leaves the connection closed."""
    endpoint = FakeEndpoint()
    clock = task.Clock()
    d = send_message(endpoint, MSG1, timeout=2, reactor=clock)
    clock.advance(2)
    failure(d, AckTimeout)
    assert endpoint.transport.disconnecting
