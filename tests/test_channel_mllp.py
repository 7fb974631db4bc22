"""The MLLP forward channel against a real MLLP receiver on 127.0.0.1 (an HIE's listener, played by the test).

The receiver answers each frame as the test says: AA, AE, AR (or CA, CE,
CR), an ACK for another message, garbage, or nothing at all.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_channel_fhir import patient_family_name, sample_item
from test_smart import make_pki
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.trial import unittest

from gateway.delivery.channels import DeliveryFailed, MllpDestination, OutboundNotification, TlsClient
from gateway.delivery.mllp_forward import MllpForwardChannel, ack_outcome, read_ack
from gateway.errors import ConfigError
from gateway.header import read_msh
from mllp.framing import MLLPReceiver


def ack(code: str, control_id: str, error: str = "") -> bytes:
    """An ACK as an HIE sends it (ERR-3 from HL7 table 0357 when ``error``)."""
    text = f"MSH|^~\\&|HIE|HIE|HERALD|HERALD|20260301120000||ACK^A04^ACK|HIE0001|P|2.5.1\rMSA|{code}|{control_id}\r"
    if error:
        text += f"ERR|||{error}^Application internal error^HL70357|E\r"
    return text.encode("ascii")


class HieListener(MLLPReceiver):
    """Answers each frame as its factory's ``answer`` says; records frames and connections."""

    idleTimeout = None
    frameTimeout = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections += 1

    def frameReceived(self, message: bytes) -> None:
        self.factory.frames.append(message)
        peer = getattr(self.transport, "getPeerCertificate", lambda: None)()
        if peer is not None:
            self.factory.peers.append(peer.to_cryptography().subject.rfc4514_string())
        answer = self.factory.answer
        control_id = read_msh(message).control_id
        if answer == "silent":
            return
        if answer == "garbage":
            self.sendFrame(b"this is not HL7")
        elif answer == "wrong-id":
            self.sendFrame(ack("AA", "SOMEONE-ELSES-ID"))
        else:
            self.sendFrame(ack(answer, control_id, "207" if answer in ("AE", "CE", "AR", "CR") else ""))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.connections -= 1
        self.factory.closed.append(reason.type.__name__)


class HieFactory(protocol.Factory):
    protocol = HieListener

    def __init__(self) -> None:
        self.answer = "AA"
        self.frames: list[bytes] = []
        self.peers: list[str] = []
        self.connections = 0
        self.closed: list[str] = []


class MllpChannelTests(unittest.TestCase):
    def setUp(self):
        self.hie = HieFactory()
        self.port = reactor.listenTCP(0, self.hie, interface="127.0.0.1")

    @defer.inlineCallbacks
    def tearDown(self):
        yield self.port.stopListening()
        deadline = time.monotonic() + 3
        while self.hie.connections and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.01, lambda: None)

    def channel(self, **kw) -> MllpForwardChannel:
        kw.setdefault("timeout", 5.0)
        return MllpForwardChannel(MllpDestination("127.0.0.1", self.port.getHost().port, **kw), reactor)

    @defer.inlineCallbacks
    def failure_of(self, d) -> DeliveryFailed:
        with self.assertRaises(DeliveryFailed) as e:
            yield d
        self.assertNotIn(patient_family_name(), e.exception.reason)
        return e.exception

    @defer.inlineCallbacks
    def test_aa_for_our_control_id_is_success(self):
        """The message goes out byte for byte in one frame; AA with MSA-2 = our MSH-10 is a sent notification."""
        item = sample_item()
        result = yield self.channel().send(item)
        self.assertEqual(self.hie.frames, [item.original])
        self.assertEqual(result.detail, f"AA from 127.0.0.1:{self.port.getHost().port}")
        self.assertIsNone(result.status)

    @defer.inlineCallbacks
    def test_ca_is_success(self):
        """An enhanced-mode commit accept (CA) is a sent notification too."""
        self.hie.answer = "CA"
        result = yield self.channel().send(sample_item())
        self.assertTrue(result.detail.startswith("CA from"))

    @defer.inlineCallbacks
    def test_ae_is_retryable_by_default(self):
        """AE with on_error = retry (the default): retryable, with the ERR-3 code."""
        self.hie.answer = "AE"
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertIn("AE from", failed.reason)
        self.assertIn("ERR-3 207", failed.reason)

    @defer.inlineCallbacks
    def test_ce_with_on_error_dead_is_permanent(self):
        """CE with on_error = dead: permanent."""
        self.hie.answer = "CE"
        failed = yield self.failure_of(self.channel(on_error="dead").send(sample_item()))
        self.assertTrue(failed.permanent)
        self.assertIn("on_error = dead", failed.reason)

    @defer.inlineCallbacks
    def test_ar_is_permanent(self):
        """AR (the receiver refuses the message) is permanent whatever on_error says."""
        self.hie.answer = "AR"
        failed = yield self.failure_of(self.channel(on_error="retry").send(sample_item()))
        self.assertTrue(failed.permanent)
        self.assertIn("refuses", failed.reason)

    @defer.inlineCallbacks
    def test_an_ack_for_another_message_is_retryable(self):
        """AA whose MSA-2 is not our MSH-10 is not our answer: retryable, both ids named."""
        self.hie.answer = "wrong-id"
        item = sample_item()
        failed = yield self.failure_of(self.channel().send(item))
        self.assertFalse(failed.permanent)
        self.assertIn("SOMEONE-ELSES-ID", failed.reason)
        self.assertIn(read_msh(item.original).control_id, failed.reason)

    @defer.inlineCallbacks
    def test_garbage_is_retryable(self):
        """A frame that is not an ACK: retryable."""
        self.hie.answer = "garbage"
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertIn("not an HL7 ACK", failed.reason)

    @defer.inlineCallbacks
    def test_no_ack_times_out_and_the_connection_is_closed(self):
        """A listener that never answers: the attempt fails in about the timeout, and the connection is gone."""
        self.hie.answer = "silent"
        start = time.monotonic()
        failed = yield self.failure_of(self.channel(timeout=0.5).send(sample_item()))
        self.assertTrue(0.45 <= time.monotonic() - start < 1.5)
        self.assertFalse(failed.permanent)
        self.assertIn("no ACK from 127.0.0.1:", failed.reason)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((self.hie.connections, len(self.hie.closed)), (0, 1))

    @defer.inlineCallbacks
    def test_cancelling_a_send_closes_its_connection_at_once(self):
        """A send cancelled while it waits for the ACK (the worker stopping) fails now and its connection closes."""
        self.hie.answer = "silent"
        sending = self.channel(timeout=5).send(sample_item())
        while not self.hie.frames:
            yield task.deferLater(reactor, 0.01, lambda: None)
        sending.cancel()
        self.failureResultOf(sending, defer.CancelledError)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((self.hie.connections, len(self.hie.closed)), (0, 1))

    @defer.inlineCallbacks
    def test_a_listener_that_is_down_is_retryable(self):
        """Connection refused: retryable."""
        channel = self.channel()
        yield self.port.stopListening()
        failed = yield self.failure_of(channel.send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertIn("connection failed", failed.reason)
        self.port = reactor.listenTCP(0, self.hie, interface="127.0.0.1")

    @defer.inlineCallbacks
    def test_each_send_closes_its_connection(self):
        """Three sends, three connections, each closed after its ACK."""
        channel = self.channel()
        for n in range(3):
            yield channel.send(sample_item(f"n{n}"))
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((len(self.hie.frames), self.hie.connections, len(self.hie.closed)), (3, 0, 3))

    def test_a_message_without_a_readable_msh_is_permanent(self):
        """Nothing to forward (no MSH): a permanent failure, no connection made."""
        item = OutboundNotification("n1", b"{}", "", b"PID|1||X\r")
        failure = self.failureResultOf(self.channel().send(item), DeliveryFailed)
        self.assertTrue(failure.value.permanent)
        self.assertEqual(self.hie.frames, [])


class MllpTlsTests(MllpChannelTests):
    """The same answers over TLS, the listener asking for a client certificate from the test CA."""

    def setUp(self):
        self.hie = HieFactory()
        self.certs = make_pki(_scratch(self) / "certs")
        server = ssl.PrivateCertificate.loadPEM(
            (self.certs / "server.pem").read_bytes() + (self.certs / "server-key.pem").read_bytes()
        )
        ca = ssl.Certificate.loadPEM((self.certs / "ca.pem").read_bytes())
        self.port = reactor.listenSSL(0, self.hie, server.options(ca), interface="127.0.0.1")

    def channel(self, **kw) -> MllpForwardChannel:
        kw.setdefault(
            "tls",
            TlsClient(self.certs / "ca.pem", self.certs / "client.pem", self.certs / "client-key.pem"),
        )
        return super().channel(**kw)

    @defer.inlineCallbacks
    def test_the_client_certificate_is_shown(self):
        """Over TLS the listener sees Herald's client certificate."""
        yield self.channel().send(sample_item())
        self.assertEqual(self.hie.peers, ["CN=herald-test-client"])

    @defer.inlineCallbacks
    def test_a_listener_that_is_down_is_retryable(self):
        """Connection refused over TLS: retryable."""
        channel = self.channel()
        port = self.port
        yield port.stopListening()
        failed = yield self.failure_of(channel.send(sample_item()))
        self.assertFalse(failed.permanent)
        self.port = reactor.listenTCP(0, self.hie, interface="127.0.0.1")


# -- reading ACKs, and the settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "permanent"),
    [("AE", False), ("CE", False), ("AR", True), ("CR", True)],
)
def test_error_and_reject_codes(code, permanent):
    """With on_error = retry, AE/CE are retryable and AR/CR permanent."""
    with pytest.raises(DeliveryFailed) as e:
        ack_outcome(ack(code, "C1"), "C1", "retry", "hie:2575")
    assert e.value.permanent is permanent


@pytest.mark.parametrize(
    "answer",
    [b"", b"MSH|^~\\&|X\r", b"MSA|AA|C1\r", ack("ZZ", "C1"), ack("AA", "")],
)
def test_answers_that_are_not_our_ack_are_retryable(answer):
    """No MSH, no MSA, an unknown code or an empty MSA-2: retryable."""
    with pytest.raises(DeliveryFailed) as e:
        ack_outcome(answer, "C1", "dead", "hie:2575")
    assert not e.value.permanent


def test_read_ack_takes_the_separators_the_ack_declares():
    """An ACK with other separators (# and $), LF segment ends, is read too."""
    answer = b"MSH#$~\\&#HIE#HIE#HERALD#HERALD#20260301##ACK#1#P#2.5.1\nMSA#AE#C1\nERR###101$Required$HL70357#E\n"
    assert read_ack(answer) == ("AE", "C1", "101")


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"port": 2575}, "hie.host"),
        ({"host": "hie.example.org", "port": 70000}, "hie.port"),
        ({"host": "hie.example.org", "port": "2575"}, "hie.port"),
        ({"host": "hie.example.org", "port": 2575, "on_error": "drop"}, "hie.on_error"),
        ({"host": "hie.example.org", "port": 2575, "timeout": -1}, "hie.timeout"),
        ({"host": "hie.example.org", "port": 2575, "client_key": "k.pem"}, "hie.client_cert"),
    ],
)
def test_mllp_settings_are_checked_naming_the_key(settings, key):
    """Bad MLLP channel settings raise ConfigError naming the key."""
    with pytest.raises(ConfigError) as e:
        MllpDestination.from_settings(settings, "hie")
    assert e.value.key == key


def test_tls_is_on_when_any_tls_file_is_named():
    """A channel table with ca (or a client certificate) forwards over TLS; without, over plain TCP."""
    assert MllpDestination.from_settings({"host": "h", "port": 1}).tls is None
    tls = MllpDestination.from_settings({"host": "h", "port": 1, "ca": "ca.pem"}).tls
    assert tls == TlsClient(ca=Path("ca.pem"))


def _scratch(case) -> Path:
    """A folder of the system's temporary space for one test, removed after it (trial's
    ``mktemp`` would make it under the working directory)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="herald-test-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder
