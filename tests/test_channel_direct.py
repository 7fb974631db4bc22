"""The Direct channel against a real SMTP server on 127.0.0.1 (aiosmtpd, in its own thread).

The test plays the recipient: it decrypts what the server received with the
recipient's key, checks the signature with ``openssl smime -verify`` against
the test CA (cryptography has no PKCS #7 verification API), and reads the
summary and the Bundle out of the signed content.
"""

from __future__ import annotations

import email
import json
import socket
import ssl as stdlib_ssl
import subprocess
import time
from email import policy
from functools import cache
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID
from test_channel_fhir import patient_family_name, sample_item
from test_smart import issue, make_pki, write_key
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from gateway.delivery.channels import DeliveryFailed, DirectDestination
from gateway.delivery.direct import SUBJECT, DirectChannel, message_id
from gateway.errors import ConfigError

SENDER = "notifications@direct.herald.example.org"
RECIPIENT = "dr.okafor@direct.lakeshore-pcp.example.org"


@cache
def _rsa(name: str):
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_direct_pki(folder: Path) -> Path:
    """A test CA and RSA Direct certificates (emailProtection, the address in the SAN) for sender and recipient."""
    make_pki(folder)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("Herald test Direct CA", ca_key, None, ca_key)
    pem = Encoding.PEM
    (folder / "direct-ca.pem").write_bytes(ca.public_bytes(pem))
    for who, address in (("sender", SENDER), ("recipient", RECIPIENT)):
        key = _rsa(who)
        cert = issue(address, key, (ca, ca_key), usage=ExtendedKeyUsageOID.EMAIL_PROTECTION, email=address)
        (folder / f"{who}.pem").write_bytes(cert.public_bytes(pem))
        write_key(folder, key, f"{who}-key.pem")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """An aiosmtpd handler: keeps what it accepts; ``rcpt_reply``/``data_reply`` refuse instead."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes, bool]] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content, bool(session.ssl)))
        return "250 2.0.0 Accepted"


class DirectTestCase(unittest.TestCase):
    starttls = False

    def setUp(self):
        self.folder = make_direct_pki(_scratch(self) / "pki")
        self.relay = Relay()
        kwargs = {}
        if self.starttls:
            context = stdlib_ssl.create_default_context(stdlib_ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.folder / "server.pem", self.folder / "server-key.pem")
            kwargs = {"tls_context": context, "require_starttls": True}
        self.smtp_port = free_port()
        self.controller = Controller(self.relay, hostname="127.0.0.1", port=self.smtp_port, **kwargs)
        self.controller.start()
        self.addCleanup(self.controller.stop)

    def destination(self, **kw) -> DirectDestination:
        settings = {
            "smtp_host": "127.0.0.1",
            "smtp_port": self.smtp_port,
            "starttls": self.starttls,
            "sender": SENDER,
            "recipient": RECIPIENT,
            "sign_cert": self.folder / "sender.pem",
            "sign_key": self.folder / "sender-key.pem",
            "recipient_cert": self.folder / "recipient.pem",
            "timeout": 5.0,
            "smtp_ca": self.folder / "ca.pem" if self.starttls else None,
        }
        settings.update(kw)
        return DirectDestination(**settings)

    def channel(self, **kw) -> DirectChannel:
        return DirectChannel(self.destination(**kw), reactor)

    @defer.inlineCallbacks
    def failure_of(self, d) -> DeliveryFailed:
        with self.assertRaises(DeliveryFailed) as e:
            yield d
        self.assertNotIn(patient_family_name(), e.exception.reason)
        return e.exception

    def open_as_recipient(self, content: bytes) -> bytes:
        """Decrypt with the recipient's key; return the signed (multipart/signed) entity."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = x509.load_pem_x509_certificate((self.folder / "recipient.pem").read_bytes())
        key = serialization.load_pem_private_key((self.folder / "recipient-key.pem").read_bytes(), None)
        return pkcs7.pkcs7_decrypt_smime(content, cert, key, [])

    def openssl_verify(self, signed: bytes) -> subprocess.CompletedProcess:
        path = self.folder / f"signed-{time.monotonic_ns()}.eml"
        path.write_bytes(signed)
        return subprocess.run(
            ["openssl", "smime", "-verify", "-in", str(path), "-CAfile", str(self.folder / "direct-ca.pem")],
            capture_output=True,
            timeout=30,
        )


class DirectTests(DirectTestCase):
    @defer.inlineCallbacks
    def test_a_signed_and_encrypted_message_reaches_the_recipient(self):
        """The recipient decrypts it, the signature verifies against the CA, and it holds the summary and Bundle."""
        item = sample_item()
        result = yield self.channel().send(item)
        self.assertIn("accepted by 127.0.0.1:", result.detail)
        ((mail_from, rcpt_tos, content, _),) = self.relay.received
        self.assertEqual((mail_from, rcpt_tos), (SENDER, [RECIPIENT]))
        outer = email.message_from_bytes(content, policy=policy.default)
        self.assertEqual(outer.get_content_type(), "application/pkcs7-mime")
        self.assertEqual(outer.get_param("smime-type"), "enveloped-data")
        self.assertEqual(outer["Message-ID"], f"<{item.id}@direct.herald.example.org>")
        self.assertEqual((outer["From"], outer["To"], outer["Subject"]), (SENDER, RECIPIENT, SUBJECT))
        # Nothing about the patient travels in clear.
        self.assertNotIn(patient_family_name().encode(), content)
        self.assertNotIn(b"Chest pain", content)

        signed = self.open_as_recipient(content)
        verified = self.openssl_verify(signed)
        self.assertEqual(verified.returncode, 0, verified.stderr)
        self.assertIn(b"Verification successful", verified.stderr)

        inner = email.message_from_bytes(signed, policy=policy.default)
        self.assertEqual(inner.get_content_type(), "multipart/signed")
        mixed = inner.get_payload()[0]
        self.assertEqual(mixed.get_content_type(), "multipart/mixed")
        text, attachment = mixed.get_payload()
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertEqual(text.get_content().splitlines(), item.summary.splitlines())
        self.assertEqual(attachment.get_content_type(), "application/fhir+json")
        self.assertEqual(attachment.get_filename(), f"{item.id}.json")
        bundle = json.loads(attachment.get_payload(decode=True))
        self.assertEqual((bundle["resourceType"], bundle["id"]), ("Bundle", item.id))
        self.assertEqual(attachment.get_payload(decode=True), item.payload)

    @defer.inlineCallbacks
    def test_a_tampered_message_fails_verification(self):
        """The check above means something: one changed byte in the signed content and openssl refuses it."""
        yield self.channel().send(sample_item())
        signed = self.open_as_recipient(self.relay.received[0][2])
        tampered = signed.replace(b"ED visit", b"ED Visit", 1)
        self.assertNotEqual(tampered, signed)
        self.assertNotEqual(self.openssl_verify(tampered).returncode, 0)

    @defer.inlineCallbacks
    def test_the_message_id_is_the_same_on_every_attempt(self):
        """Two attempts at one notification carry the same Message-ID, so the recipient can drop the second."""
        channel = self.channel()
        yield channel.send(sample_item("n-1"))
        yield channel.send(sample_item("n-1"))
        ids = [email.message_from_bytes(c)["Message-ID"] for _, _, c, _ in self.relay.received]
        self.assertEqual(ids, ["<n-1@direct.herald.example.org>"] * 2)

    @defer.inlineCallbacks
    def test_a_550_reply_is_permanent(self):
        """The relay refuses the address (550 5.1.1): permanent, code and enhanced status named."""
        self.relay.rcpt_reply = "550 5.1.1 No such Direct address"
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertEqual((failed.permanent, failed.status), (True, 550))
        self.assertIn("SMTP 550 5.1.1", failed.reason)

    @defer.inlineCallbacks
    def test_a_451_reply_is_retryable(self):
        """A temporary refusal of the message (451): retryable."""
        self.relay.data_reply = "451 4.3.0 Try again later"
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertEqual((failed.permanent, failed.status), (False, 451))

    @defer.inlineCallbacks
    def test_a_relay_that_is_down_is_retryable(self):
        """Connection refused: retryable, naming the cause."""
        failed = yield self.failure_of(self.channel(smtp_port=free_port()).send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertIn("ConnectionRefusedError", failed.reason)

    def mute_relay(self):
        """A server that accepts connections and says nothing; returns (port, opened, closed)."""
        opened, closed = [], []

        class Mute(protocol.Protocol):
            def connectionMade(self):
                opened.append(self)

            def connectionLost(self, reason=protocol.connectionDone):
                closed.append(self)

        mute = reactor.listenTCP(0, protocol.Factory.forProtocol(Mute), interface="127.0.0.1")
        self.addCleanup(mute.stopListening)
        return mute, opened, closed

    @defer.inlineCallbacks
    def test_a_relay_that_never_greets_is_cut_off_at_the_timeout(self):
        """A server that accepts the connection and says nothing: the attempt fails in about the timeout."""
        mute, opened, closed = self.mute_relay()
        start = time.monotonic()
        failed = yield self.failure_of(self.channel(smtp_port=mute.getHost().port, timeout=0.5).send(sample_item()))
        self.assertTrue(0.45 <= time.monotonic() - start < 1.5)
        self.assertFalse(failed.permanent)
        self.assertIn("in 0.5 s", failed.reason)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((len(opened), len(closed)), (1, 1))

    @defer.inlineCallbacks
    def test_cancelling_a_send_closes_its_connection_at_once(self):
        """A send cancelled while the relay is silent (the worker stopping) fails now and its connection closes."""
        mute, opened, closed = self.mute_relay()
        sending = self.channel(smtp_port=mute.getHost().port).send(sample_item())
        while not opened:
            yield task.deferLater(reactor, 0.01, lambda: None)
        sending.cancel()
        self.failureResultOf(sending, defer.CancelledError)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(closed), 1)

    @defer.inlineCallbacks
    def test_requiring_starttls_from_a_relay_without_it_fails(self):
        """starttls = true and the relay offers no STARTTLS: the message is not sent in clear."""
        failed = yield self.failure_of(self.channel(starttls=True, smtp_ca=self.folder / "ca.pem").send(sample_item()))
        self.assertEqual(self.relay.received, [])
        self.assertIn("offers no STARTTLS", failed.reason)
        self.assertTrue(failed.permanent)


class StartTlsTests(DirectTestCase):
    starttls = True

    @defer.inlineCallbacks
    def test_starttls_with_the_configured_trust_root(self):
        """A relay that requires STARTTLS gets the message over TLS, its certificate checked against smtp_ca."""
        yield self.channel().send(sample_item())
        ((_, _, _, over_tls),) = self.relay.received
        self.assertTrue(over_tls)

    @defer.inlineCallbacks
    def test_an_untrusted_relay_certificate_is_refused(self):
        """A relay certificate the configured CA did not sign: retryable failure, nothing sent."""
        failed = yield self.failure_of(self.channel(smtp_ca=self.folder / "direct-ca.pem").send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertEqual(self.relay.received, [])


# -- certificates and settings ------------------------------------------------------------------------


def _destination(folder: Path, **kw) -> DirectDestination:
    settings = {
        "smtp_host": "127.0.0.1",
        "smtp_port": 25,
        "starttls": False,
        "sender": SENDER,
        "recipient": RECIPIENT,
        "sign_cert": folder / "sender.pem",
        "sign_key": folder / "sender-key.pem",
        "recipient_cert": folder / "recipient.pem",
    }
    settings.update(kw)
    return DirectDestination(**settings)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_direct_pki(tmp_path_factory.mktemp("direct-pki"))


def test_a_recipient_certificate_without_an_rsa_key_is_refused(pki):
    """S/MIME key transport needs RSA: an EC recipient certificate is a ConfigError naming recipient_cert."""
    with pytest.raises(ConfigError) as e:
        DirectChannel(_destination(pki, recipient_cert=pki / "client.pem", where="d"), reactor)
    assert e.value.key == "d.recipient_cert"


def test_a_signing_key_that_does_not_match_its_certificate_is_refused(pki):
    """sign_key from another pair than sign_cert: a ConfigError naming sign_key."""
    with pytest.raises(ConfigError) as e:
        DirectChannel(_destination(pki, sign_key=pki / "recipient-key.pem"), reactor)
    assert e.value.key == "sign_key"


def test_a_missing_certificate_file_is_refused(pki):
    """An unreadable certificate is a ConfigError naming the key, when the channel is made."""
    with pytest.raises(ConfigError) as e:
        DirectChannel(_destination(pki, sign_cert=pki / "nope.pem"), reactor)
    assert e.value.key == "sign_cert"


def test_a_missing_recipient_certificate_is_refused_naming_the_directory_key(pki):
    """Made from a directory channel table, an unreadable recipient certificate names that table's key."""
    relay = {
        "smtp_host": "hisp.example.org",
        "sender": SENDER,
        "sign_cert": str(pki / "sender.pem"),
        "sign_key": str(pki / "sender-key.pem"),
    }
    channel = {"channel": "direct", "to": RECIPIENT, "certificate": str(pki / "nope.pem")}
    with pytest.raises(ConfigError) as e:
        DirectChannel(DirectDestination.from_settings(channel, relay, "channels[1]"), reactor)
    assert e.value.key == "channels[1].certificate"


@pytest.mark.parametrize(
    ("channel", "relay", "key"),
    [
        ({"to": RECIPIENT}, {}, "c.certificate"),
        ({"to": "not an address", "certificate": "r.pem"}, {}, "c.to"),
        ({"to": RECIPIENT, "certificate": "r.pem", "timeout": 0}, {}, "c.timeout"),
        ({"to": RECIPIENT, "certificate": "r.pem"}, {"smtp_port": 0}, "direct.smtp_port"),
        ({"to": RECIPIENT, "certificate": "r.pem"}, {"starttls": "yes"}, "direct.starttls"),
        ({"to": RECIPIENT, "certificate": "r.pem"}, {"sender": "herald"}, "direct.sender"),
        ({"to": RECIPIENT, "certificate": "r.pem"}, {"sign_key": ""}, "direct.sign_key"),
    ],
)
def test_direct_settings_are_checked_naming_the_key(channel, relay, key):
    """Bad Direct settings raise ConfigError naming the key: the channel table's, or the relay section's."""
    base = {"smtp_host": "hisp.example.org", "sender": SENDER, "sign_cert": "s.pem", "sign_key": "k.pem"}
    with pytest.raises(ConfigError) as e:
        DirectDestination.from_settings(channel, {**base, **relay}, "c")
    assert e.value.key == key


def test_message_id_is_made_safe():
    """Characters a Message-ID may not hold are replaced, deterministically."""
    assert message_id("a b<c>@d", "example.org") == "<a-b-c-d@example.org>"


def _scratch(case) -> Path:
    """A folder of the system's temporary space for one test, removed after it (trial's
    ``mktemp`` would make it under the working directory)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="herald-test-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder
