"""Mutual TLS on the listener: who is let in, who is refused, and what is written down.

The refusals run on real sockets (127.0.0.1) against the gateway as
``make_service`` builds it, with certificates made by ``herald certs init``'s
code. Each refused client must leave a clear log line and a
``connection-refused`` audit event, and nothing in the message log.
"""

from __future__ import annotations

import datetime
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import test_end_to_end as e2e
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from twisted.internet import defer, reactor, ssl, utils
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import TLSVersion
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from gateway.app.certs import Issued, describe, issue, make_ca, make_dev_certs
from gateway.app.cli import main
from gateway.app.replay import read_ack
from gateway.app.service import Listener, tls_server_options
from gateway.config import load_config, parse_listen
from gateway.errors import ConfigError
from mllp import Peer, connect
from mllp.client import client_endpoint, client_options
from mllp.tls import PeerCertificate

ROOT = Path(__file__).resolve().parent.parent

#: A message with no MSH-15: answered in original mode (AA), from a sender the test config allows.
ORIGINAL_MODE = (
    b"MSH|^~\\&|EPIC|LSR|HERALD|ACO|20261120031522-0500||ADT^A01^ADT_A01|TLS0001|P|2.5.1\r"
    b"EVN||20261120031500-0500\r"
    b"PID|1||E2249017^^^LSR^MR||BRIGHTWATER^OSWALD^J||19520704|M\r"
    b"PV1|1|I|CARD^4104^A^LSR\r"
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class _Captured:
    """Log lines (formatted) published while a test runs."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event) -> None:
        self.lines.append(formatEvent(event))

    def matching(self, *words: str) -> list[str]:
        return [line for line in self.lines if all(w in line for w in words)]


class _Tls11Client(ssl.ContextFactory):
    """A client that offers TLS 1.1 at most (security level 0, so OpenSSL offers it at all), with a good certificate."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.cert_pem, self.key_pem = cert_pem, key_pem

    def getContext(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.use_certificate(x509.load_pem_x509_certificate(self.cert_pem))
        ctx.use_privatekey(serialization.load_pem_private_key(self.key_pem, None))
        return ctx


@implementer(IHandshakeListener)
class _Hello(Protocol):
    """Client side of a bare TLS connection: closes once the handshake completes, noting that it did."""

    def __init__(self) -> None:
        self.closed: defer.Deferred = defer.Deferred()
        self.handshake = False

    def handshakeCompleted(self) -> None:
        self.handshake = True
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.closed.callback(reason.value)


class MutualTlsGateway(e2e.GatewayTestCase):
    """Herald on a tls: listener, as deployed; EPIC|LSR may be sent by the client certificate ``e2e-client``."""

    tls = True
    senders = '[[senders]]\napplication = "EPIC"\nfacility = "LSR"\nidentities = ["e2e-client"]\n'

    def ca(self) -> Issued:
        """The test CA (its key, to issue more certificates)."""
        d = self.certs.directory
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), None)
        return Issued(cert, key)

    def client_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certs.client("e2e-client")[0].read_bytes())

    def options_for(self, issued: Issued | None):
        """Client TLS trusting the server's CA and presenting ``issued`` (None: no certificate)."""
        ca = self.certs.ca.read_bytes()
        if issued is None:
            return client_options("localhost", ca)
        return client_options("localhost", ca, issued.certificate_pem(), issued.key_pem())

    @defer.inlineCallbacks
    def refused(self, options, reason_words: str):
        """Connect with ``options`` and try to send; return the audit event and the log lines of the refusal."""
        logs = _Captured(self)
        try:
            client = yield connect(client_endpoint(reactor, "127.0.0.1", self.port, options), reactor)
            # TLS 1.3: the client finishes its handshake first; the server's refusal arrives as an alert.
            yield client.send(ORIGINAL_MODE, timeout=10)
        except Exception as e:
            lost = e
        else:
            self.fail("the refused client got an ACK")
        yield self.wait_for("SELECT COUNT(*) FROM events WHERE kind = 'connection-refused'", expected=1)
        conn = self.db()
        try:
            event = dict(conn.execute("SELECT * FROM events WHERE kind = 'connection-refused'").fetchone())
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0], 0)
        finally:
            conn.close()
        detail = json.loads(event["detail"])
        self.assertEqual((event["actor"], event["message_id"]), ("tls", None))
        self.assertIn(reason_words, detail["reason"])
        self.assertEqual(detail["peer"].rpartition(":")[0], "127.0.0.1")
        self.assertTrue(detail["tls"])
        lines = logs.matching("refused TLS connection from 127.0.0.1:", reason_words)
        self.assertEqual(len(lines), 1, logs.lines)
        return detail, lines[0], lost

    @defer.inlineCallbacks
    def test_a_client_with_a_certificate_from_the_ca_gets_AA(self):
        """A client presenting a certificate the CA issued gets AA; the peer is stored as host:port as before."""
        client = yield self.client()
        ack = yield client.send(ORIGINAL_MODE, timeout=10)
        self.assertEqual(read_ack(ack)[:2], ("AA", "TLS0001"))
        conn = self.db()
        try:
            peer = conn.execute("SELECT peer FROM messages").fetchone()[0]
            received = conn.execute("SELECT detail FROM events WHERE kind = 'received'").fetchone()[0]
            refused = conn.execute("SELECT COUNT(*) FROM events WHERE kind LIKE '%refused'").fetchone()[0]
        finally:
            conn.close()
        host, _, port = peer.rpartition(":")
        self.assertEqual((host, port.isdigit(), refused), ("127.0.0.1", True, 0))
        certificate = json.loads(received)["certificate"]
        self.assertEqual(certificate["subject"], "CN=e2e-client,O=Herald development")
        self.assertEqual(certificate["fingerprint"], PeerCertificate.of(self.client_certificate()).fingerprint)

    @defer.inlineCallbacks
    def test_a_client_without_a_certificate_is_refused(self):
        """No client certificate: the handshake is refused, logged and audited; nothing is read."""
        detail, line, lost = yield self.refused(self.options_for(None), "no client certificate")
        self.assertNotIn("certificate", detail)
        self.assertIn("certificate required", str(lost))

    @defer.inlineCallbacks
    def test_a_certificate_from_another_ca_is_refused(self):
        """A certificate another CA issued (same CN as a good one) is refused; the audit names it and its issuer."""
        other = issue(make_ca("Another CA"), "e2e-client", "client")
        detail, line, _ = yield self.refused(self.options_for(other), "not issued by a trusted CA")
        presented = PeerCertificate.of(other.certificate)
        self.assertEqual(detail["certificate"]["fingerprint"], presented.fingerprint)
        self.assertIn("CN=Another CA", detail["certificate"]["issuer"])
        self.assertIn(presented.fingerprint, line)

    @defer.inlineCallbacks
    def test_an_expired_certificate_is_refused(self):
        """A certificate from the right CA whose not_valid_after has passed is refused as expired."""
        now = _now()
        expired = issue(
            self.ca(),
            "e2e-client",
            "client",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
        detail, line, lost = yield self.refused(self.options_for(expired), "has expired")
        self.assertEqual(detail["certificate"]["subject"], "CN=e2e-client,O=Herald development")
        self.assertIn("expired", str(lost))  # the server's alert, as the client saw it

    @defer.inlineCallbacks
    def test_tls_1_1_is_refused_by_the_server(self):
        """A client offering at most TLS 1.1 is refused by the server (protocol_version alert), though it can do 1.1."""
        cert, key = self.certs.client("e2e-client")
        old = _Tls11Client(cert.read_bytes(), key.read_bytes())
        # Control: the same client completes a TLS 1.1 handshake with a server that allows 1.1, so it
        # really offers 1.1 and the refusal below is the listener's minimum, not the client's OpenSSL.
        lax = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(
                serialization.load_pem_private_key(self.certs.server_key.read_bytes(), None)
            ),
            certificate=crypto.X509.from_cryptography(x509.load_pem_x509_certificate(self.certs.server.read_bytes())),
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_1,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_1,
        )
        lax.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        port = yield SSL4ServerEndpoint(reactor, 0, lax, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        try:
            hello = _Hello()
            yield SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, old).connect(
                Factory.forProtocol(lambda: hello)
            )
            yield hello.closed
            self.assertTrue(hello.handshake, "the TLS 1.1 client could not do TLS 1.1 at all")
        finally:
            yield port.stopListening()

        detail, line, lost = yield self.refused(old, "below the listener's minimum")
        self.assertIn("protocol version", str(lost))  # the server's alert: it refused the version

    @defer.inlineCallbacks
    def test_herald_send_talks_mutual_tls(self):
        """`herald send --ca --cert --key` reaches a tls: listener; without --cert it is refused, and says why."""
        cert, key = self.certs.client("e2e-client")
        base = [
            "-m",
            "gateway.app.cli",
            "send",
            f"127.0.0.1:{self.port}",
            str(e2e.SAMPLES / e2e.ADMIT),
            "--quiet",
            "--server-name",
            "localhost",
            "--ca",
            str(self.certs.ca),
        ]
        env = dict(os.environ)
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [*base, "--cert", str(cert), "--key", str(key)], env=env, path=str(ROOT)
        )
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"accepted 1", out)
        out, err, code = yield utils.getProcessOutputAndValue(sys.executable, base, env=env, path=str(ROOT))
        self.assertEqual(code, 1, out + err)
        self.assertIn(b"TLS: tlsv13 alert certificate required", err)


class EndToEndOverMutualTls(e2e.GatewayTestCase):
    """The whole path (ACK, conversion, matching, delivery) with the client on mutual TLS."""

    tls = True

    @defer.inlineCallbacks
    def test_an_admit_over_mutual_tls_is_routed(self):
        """An admit sent over mutual TLS is acknowledged, routed and delivered to every recipient."""
        c = yield self.client()
        ack = yield c.send(e2e.sample(e2e.ADMIT), timeout=10)
        self.assertEqual(read_ack(ack)[:2], ("CA", "LSR8841200377"))
        yield self.settled()
        conn = self.db()
        try:
            self.assertEqual(conn.execute("SELECT state FROM messages").fetchone()[0], "routed")
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0], 3)
        finally:
            conn.close()


# -- configuration ---------------------------------------------------------------------


def test_a_plain_listener_needs_allow_plain(tmp_path):
    """A tcp: listener without server.allow_plain is refused at load, naming the key and what to set."""
    path = tmp_path / "herald.toml"
    path.write_text('[server]\nlisten = ["tcp:2575:interface=127.0.0.1"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "server.listen"
    assert "server.allow_plain = true" in str(caught.value) and "tls:2575" in str(caught.value)
    path.write_text('[server]\nlisten = ["tcp:2575:interface=127.0.0.1"]\nallow_plain = true\n')
    assert load_config(path).listen == ("tcp:2575:interface=127.0.0.1",)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("ssl:2576:privateKey=k.pem:certKey=c.pem", "cannot require client certificates"),
        ("unix:/tmp/herald.sock", "only tls:"),
        ("tls:notaport", "expected tls:PORT"),
        ("tls:2575:interface=nowhere", "not an IP address"),
        ("tls:2575:privateKey=x", "interface= and backlog= only"),
    ],
)
def test_listeners_herald_does_not_accept(spec, words):
    """ssl: endpoints (no client certificates), other kinds and malformed tls: strings fail at load."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, listen=[spec], allow_plain=True)
    assert caught.value.key == "server.listen" and words in caught.value.reason


def test_tls_listener_strings_are_read():
    """tls:PORT with interface and backlog; loopback is told apart from every interface."""
    default, explicit = (
        parse_listen("tls:2575:interface=127.0.0.1"),
        parse_listen("tls:2575:interface=127.0.0.1:backlog=50"),
    )
    assert (default.port, default.interface, default.backlog) == (explicit.port, explicit.interface, explicit.backlog)
    listen = parse_listen("tls:2575:interface=\\:\\:1:backlog=10")
    assert (listen.tls, listen.port, listen.interface, listen.backlog, listen.loopback) == (True, 2575, "::1", 10, True)
    assert not parse_listen("tls:2575").loopback
    assert not parse_listen("tcp:2575:interface=0.0.0.0").loopback


def test_tls_paths_are_relative_to_the_config_file(tmp_path):
    """[tls] cert/key/ca are read relative to the config file; unset, they are <data_dir>/certs/*."""
    path = tmp_path / "etc" / "herald.toml"
    path.parent.mkdir()
    path.write_text('[tls]\ncert = "pki/gw.pem"\nkey = "/abs/gw-key.pem"\nca = "pki/ca.pem"\nmin_version = "1.3"\n')
    cfg = load_config(path, data_dir=tmp_path / "data")
    assert cfg.tls_files == (path.parent / "pki/gw.pem", Path("/abs/gw-key.pem"), path.parent / "pki/ca.pem")
    assert cfg.tls_min_version == "1.3"
    assert load_config(None, data_dir=tmp_path / "d").tls_files[2] == tmp_path / "d" / "certs" / "ca.pem"
    path.write_text('[tls]\nmin_version = "1.1"\n')
    with pytest.raises(ConfigError, match="tls.min_version"):
        load_config(path)


def test_missing_certificates_fail_at_start_telling_how_to_make_them(tmp_path):
    """The default listener (tls: on 127.0.0.1) without certificates: ConfigError naming the file and `certs init`."""
    cfg = load_config(None, data_dir=tmp_path)
    with pytest.raises(ConfigError) as caught:
        tls_server_options(cfg)
    assert caught.value.key == "tls.cert"
    assert f"herald certs init --dir {tmp_path / 'certs'}" in caught.value.reason
    result = CliRunner().invoke(main, ["serve", "--data", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "tls.cert" in result.output and "herald certs init" in result.output


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path):
    """A server key that does not belong to the server certificate fails at start, naming [tls]."""
    made = make_dev_certs(tmp_path / "certs")
    made.server_key.write_bytes(made.client()[1].read_bytes())
    with pytest.raises(ConfigError) as caught:
        tls_server_options(load_config(None, data_dir=tmp_path))
    assert caught.value.key == "tls" and "does not belong" in caught.value.reason


class _NoSocket:
    """An endpoint that 'listens' without a socket (to start a Listener in a unit test)."""

    def listen(self, factory):
        return defer.succeed(self)


@pytest.mark.parametrize(
    ("spec", "warned"),
    [("tcp:2575", True), ("tcp:2575:interface=10.1.2.3", True), ("tcp:2575:interface=127.0.0.1", False)],
)
def test_a_plain_listener_reachable_from_other_machines_is_warned_about(spec, warned):
    """Starting a plain listener not bound to loopback logs a warning naming it; a loopback one does not."""
    seen: list[str] = []
    observer = lambda e: seen.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        Listener(spec, _NoSocket(), Factory(), parse_listen(spec)).startService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("plain (unencrypted)" in line and spec in line for line in seen) == warned


# -- herald certs ----------------------------------------------------------------------


def test_certs_init_writes_keys_readable_by_the_owner_only(tmp_path):
    """`herald certs init` writes a CA, a server and each client certificate, every key 0600, and prints the config."""
    d = tmp_path / "certs"
    result = CliRunner().invoke(main, ["certs", "init", "--dir", str(d), "--client", "epic-prod", "--client", "lab"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(
        ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "epic-prod.pem", "epic-prod-key.pem"]
        + ["lab.pem", "lab-key.pem"]
    )
    for p in d.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.name.endswith("-key.pem"):
            assert mode == 0o600, (p.name, oct(mode))
        assert b"PRIVATE KEY" not in p.read_bytes() or p.name.endswith("-key.pem")
    assert 'listen = ["tls:2575:interface=127.0.0.1"]' in result.output
    assert f'ca = "{(d / "ca.pem").resolve()}"' in result.output
    assert 'identities = ["epic-prod"]' in result.output and "herald send --ca" in result.output
    again = CliRunner().invoke(main, ["certs", "init", "--dir", str(d)])
    assert again.exit_code == 1 and "--force" in again.output


def test_certs_init_makes_material_the_listener_accepts(tmp_path):
    """What `certs init` writes is a working listener configuration: the options load, the client is its CA's."""
    made = make_dev_certs(tmp_path / "certs", clients=("a",))
    tls_server_options(load_config(None, data_dir=tmp_path))
    client = x509.load_pem_x509_certificate(made.client("a")[0].read_bytes())
    ca = x509.load_pem_x509_certificate(made.ca.read_bytes())
    client.verify_directly_issued_by(ca)


def test_certs_show_prints_what_the_allowlist_matches(tmp_path):
    """`herald certs show` prints subject, SANs, issuer, validity, the SHA-256 fingerprint and the kind."""
    made = make_dev_certs(tmp_path / "certs", hostnames=("gw.example.org", "127.0.0.1"), clients=("epic-prod",))
    runner = CliRunner()
    server = runner.invoke(main, ["certs", "show", str(made.server)])
    assert server.exit_code == 0, server.output
    der = x509.load_pem_x509_certificate(made.server.read_bytes())
    fingerprint = "sha256:" + der.fingerprint(hashes.SHA256()).hex()
    lines = dict(line.split(":", 1) for line in server.output.splitlines())
    assert lines["subject"].strip() == "CN=gw.example.org,O=Herald development"
    assert lines["SANs"].strip() == "DNS:gw.example.org, IP:127.0.0.1"
    assert lines["issuer"].strip() == "CN=Herald development CA,O=Herald development"
    assert "valid, 364 days left" in lines["valid"] or "valid, 365 days left" in lines["valid"]
    assert lines["SHA-256"].strip() == fingerprint
    assert lines["kind"].strip() == "server"
    client = runner.invoke(main, ["certs", "show", str(made.client("epic-prod")[0])])
    assert "kind:        client" in client.output and "identities:  epic-prod, sha256:" in client.output
    ca = runner.invoke(main, ["certs", "show", str(made.ca)])
    assert "kind:        CA" in ca.output and "(self-signed)" in ca.output
    key = runner.invoke(main, ["certs", "show", str(made.server_key)])
    assert key.exit_code == 1 and "no PEM certificate" in key.output and "PRIVATE" not in key.output


def test_certs_show_says_expired():
    """An expired certificate is shown as EXPIRED."""
    now = _now()
    old = issue(make_ca(), "old", "client", not_before=now - datetime.timedelta(days=9), not_after=now)
    [facts] = describe(old.certificate_pem())
    assert "(EXPIRED)" in facts.lines(now + datetime.timedelta(seconds=1))[3]


def test_peer_is_its_address_as_text():
    """A Peer reads as host:port (what is logged and stored) and carries the certificate beside it."""
    cert = PeerCertificate.of(issue(make_ca(), "epic-prod", "client", ("epic.example.org",)).certificate)
    peer = Peer("10.0.0.7", 40001).verified(cert)
    assert peer == "10.0.0.7:40001" and str(peer) == "10.0.0.7:40001" and peer.tls
    assert cert.identities == ("epic-prod", "epic.example.org", cert.fingerprint)
    assert peer.audit()["certificate"]["subject"] == "CN=epic-prod,O=Herald development"
    assert json.dumps({"peer": peer}) == '{"peer": "10.0.0.7:40001"}'
