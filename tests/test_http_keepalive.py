"""Kept-alive HTTP connections for FHIR delivery, against a real twisted.web receiver on 127.0.0.1.

The receiver (test_channel_fhir's ``$process-message`` and test_smart's token
endpoint) counts the connections it accepts, so a test sees how many TCP
connections its POSTs took; it can close one, stall an answer mid-body, or
require a client certificate.
"""

from __future__ import annotations

import time
from ipaddress import ip_address

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from test_channel_fhir import FhirChannelTestCase, sample_item
from test_smart import CountingSite, issue, rsa_key, smart_auth, write_key
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock

from gateway.delivery.channels import (
    MAX_BODY,
    DeliveryFailed,
    FhirDestination,
    HttpConnections,
    TlsClient,
    http_post,
)
from gateway.delivery.fhir import FhirChannel
from gateway.delivery.worker import DeliveryWorker

FHIR_JSON = {b"Content-Type": [b"application/fhir+json"]}


class Receiver(CountingSite):
    """The test receiver's site, keeping every connection it accepted (``accepted``)."""

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.accepted: list = []

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        self.accepted.append(p)
        return p

    @defer.inlineCallbacks
    def settled(self, most: int, within: float = 3.0):
        """Wait until at most ``most`` connections are open (closes take a round trip)."""
        deadline = time.monotonic() + within
        while self.open > most and time.monotonic() < deadline:
            yield pause(0.01)
        yield pause(0.01)

    def close_idle(self) -> None:
        """Close, from the server's side, the connections not answering a request (a keep-alive timeout)."""
        for p in self.accepted:
            channel = p._channel
            if channel.transport is not None and channel.connected and not channel.requests:
                channel.transport.loseConnection()


@defer.inlineCallbacks
def pause(seconds: float = 0.05):
    """Let the reactor run a little (a close reaches the other side; a timeout is noticed)."""
    yield task.deferLater(reactor, seconds, lambda: None)


class KeepAliveTestCase(FhirChannelTestCase):
    """test_channel_fhir's receiver (with a token endpoint when ``auth``), counting connections, and one worker's
    kept-alive connections."""

    auth = False
    site_factory = Receiver

    def setUp(self):
        super().setUp()
        self.connections = HttpConnections(reactor)

    @defer.inlineCallbacks
    def tearDown(self):
        for finished in self.fhir.stalled:  # before the close aborts them
            finished.addErrback(lambda _: None)
        yield self.connections.close()
        yield super().tearDown()

    def channel(self, timeout: float = 5.0, kept: bool = True, **kw) -> FhirChannel:
        """A channel to the receiver; ``kept``: on the test's connections (else a connection a request)."""
        auth = smart_auth(write_key(self.folder, rsa_key()), self.token.url) if self.token is not None else None
        destination = FhirDestination(url=f"{self.base}/fhir", timeout=timeout, auth=auth, **kw)
        return FhirChannel(destination, reactor, connections=self.connections if kept else None)


class ReuseTests(KeepAliveTestCase):
    auth = True

    @defer.inlineCallbacks
    def test_sequential_posts_and_the_token_request_share_one_connection(self):
        """The token POST and five notification POSTs, one after another, take one TCP connection."""
        channel = self.channel()
        for i in range(5):
            result = yield channel.send(sample_item(f"n{i}"))
            self.assertEqual(result.status, 200)
        self.assertEqual(len(self.fhir.received), 5)
        self.assertEqual(len(self.token.issued), 1)
        self.assertEqual(len(self.site.accepted), 1)
        self.assertEqual(self.connections.opened, 1)

    @defer.inlineCallbacks
    def test_without_kept_connections_each_post_has_its_own(self):
        """A channel given no connections opens one a request and closes it after (the token's too)."""
        channel = self.channel(kept=False)
        for i in range(3):
            yield channel.send(sample_item(f"n{i}"))
        self.assertEqual(len(self.site.accepted), 4)
        yield self.site.closed()
        self.assertEqual(self.site.open, 0)

    @defer.inlineCallbacks
    def test_posts_at_once_keep_at_most_per_host_connections_idle(self):
        """Six POSTs at once open six connections; two are kept (per_host), and the next POSTs use those."""
        self.connections = HttpConnections(reactor, per_host=2)
        channel = self.channel()
        yield channel.send(sample_item("warm-up"))  # the token, first
        yield defer.gatherResults([channel.send(sample_item(f"n{i}")) for i in range(6)])
        yield self.site.settled(2)
        self.assertEqual(self.site.open, 2)
        accepted = len(self.site.accepted)
        yield channel.send(sample_item("after-1"))
        yield channel.send(sample_item("after-2"))
        self.assertEqual(len(self.site.accepted), accepted)


class FailureTests(KeepAliveTestCase):
    @defer.inlineCallbacks
    def test_a_timeout_mid_body_aborts_the_connection_and_the_next_post_opens_a_fresh_one(self):
        """Headers, then the body stalls: the attempt fails at the timeout, the server sees that connection go,
        and the next POST succeeds on a new connection (the aborted one is never handed out again)."""
        channel = self.channel(timeout=0.5)
        yield channel.send(sample_item("warm-up"))
        self.fhir.stall_ids = {"stalls"}
        with self.assertRaises(DeliveryFailed) as e:
            yield channel.send(sample_item("stalls"))
        self.assertFalse(e.exception.permanent)
        self.assertIn("no complete answer within 0.5 s", e.exception.reason)
        lost = yield self.fhir.stalled[0].addCallbacks(lambda _: None, lambda f: f.type)
        self.assertIn(lost, (ConnectionLost, ConnectionDone))
        result = yield channel.send(sample_item("after"))
        self.assertEqual(result.status, 200)
        self.assertEqual(len(self.site.accepted), 2)
        self.assertEqual(self.connections.opened, 2)
        self.assertEqual(self.site.open, 1)

    @defer.inlineCallbacks
    def test_cancelling_a_post_on_a_kept_connection_aborts_that_connection(self):
        """A send cancelled while its body stalls (the worker stopping) closes its connection; it is not kept."""
        channel = self.channel()
        yield channel.send(sample_item("warm-up"))
        self.fhir.stall_ids = {"stalls"}
        sending = channel.send(sample_item("stalls"))
        while not self.fhir.stalled:
            yield pause(0.01)
        sending.cancel()
        self.failureResultOf(sending, defer.CancelledError)
        yield self.site.closed()
        self.assertEqual((self.site.open, len(self.site.accepted)), (0, 1))
        yield channel.send(sample_item("after"))
        self.assertEqual(len(self.site.accepted), 2)

    @defer.inlineCallbacks
    def test_a_connection_the_server_closed_while_idle_is_not_used(self):
        """The server closes the kept connection between two POSTs (its keep-alive timeout): the second POST
        goes on a new connection and succeeds, in one attempt."""
        channel = self.channel()
        yield channel.send(sample_item("first"))
        self.site.close_idle()
        yield self.site.closed()
        yield pause()
        result = yield channel.send(sample_item("second"))
        self.assertEqual(result.status, 200)
        self.assertEqual(len(self.site.accepted), 2)
        self.assertEqual([r["bundle"].id for r in self.fhir.received], ["first", "second"])

    @defer.inlineCallbacks
    def test_a_long_answer_is_cut_to_max_body_and_its_connection_kept(self):
        """An answer longer than MAX_BODY gives its first MAX_BODY bytes; it is read to its end, so the
        connection serves the next POST."""
        self.fhir.body = b"x" * (3 * MAX_BODY)
        url = f"{self.base}/fhir/$process-message"
        payload = sample_item().payload
        answer = yield http_post(reactor, url, FHIR_JSON, payload, 5, connections=self.connections)
        self.assertEqual((answer.code, len(answer.body)), (200, MAX_BODY))
        answer = yield http_post(reactor, url, FHIR_JSON, payload, 5, connections=self.connections)
        self.assertEqual(answer.code, 200)
        self.assertEqual(len(self.site.accepted), 1)


class CloseTests(KeepAliveTestCase):
    @defer.inlineCallbacks
    def test_stopping_the_worker_closes_its_kept_connections(self):
        """A connection stays open after a delivery (kept alive), and the worker's stop closes it: the
        server sees it go."""
        target = f"{self.base}/fhir"
        worker = DeliveryWorker(None, reactor, fhir_settings={target: {}})
        result = yield worker._fhir[target].send(sample_item())
        self.assertEqual(result.status, 200)
        yield pause(0.1)
        self.assertEqual(self.site.open, 1, "the connection was not kept alive")
        start = time.monotonic()
        yield worker.stopService()
        self.assertLess(time.monotonic() - start, 1.0)
        yield self.site.closed()
        self.assertEqual(self.site.open, 0, "the worker stopped and left its connection open")

    @defer.inlineCallbacks
    def test_a_post_under_way_at_close_closes_its_connection_when_answered(self):
        """Closed while a POST is under way: the POST is answered, then its connection closes; a POST after
        the close still goes, on a connection of its own."""
        channel = self.channel()
        sending = channel.send(sample_item("under-way"))
        yield self.connections.close()
        result = yield sending
        self.assertEqual(result.status, 200)
        yield self.site.closed()
        self.assertEqual(self.site.open, 0)
        result = yield channel.send(sample_item("after"))
        self.assertEqual(result.status, 200)
        yield self.site.closed()
        self.assertEqual((self.site.open, len(self.site.accepted)), (0, 2))


class TlsIdentityTests(KeepAliveTestCase):
    """HTTPS requiring a client certificate; two clinics' certificates from one CA, one server."""

    scheme = "https"

    def listen(self):
        pem = serialization.Encoding.PEM
        certs = self.folder / "certs"
        certs.mkdir()
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = issue("Keep-alive test CA", ca_key, None, ca_key)
        (certs / "ca.pem").write_bytes(ca.public_bytes(pem))
        for name in ("clinic-a", "clinic-b"):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = issue(name, key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
            (certs / f"{name}.pem").write_bytes(cert.public_bytes(pem))
            write_key(certs, key, f"{name}-key.pem")
        server_key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.IPAddress(ip_address("127.0.0.1"))]
        server = issue("127.0.0.1", server_key, (ca, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)
        server_pem = server.public_bytes(pem) + server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        options = ssl.PrivateCertificate.loadPEM(server_pem).options(ssl.Certificate.loadPEM(ca.public_bytes(pem)))
        return reactor.listenSSL(0, self.site, options, interface="127.0.0.1")

    def tls(self, clinic: str) -> TlsClient:
        certs = self.folder / "certs"
        return TlsClient(
            ca=certs / "ca.pem", client_cert=certs / f"{clinic}.pem", client_key=certs / f"{clinic}-key.pem"
        )

    @defer.inlineCallbacks
    def test_a_connection_is_reused_only_for_the_same_client_certificate(self):
        """Two destinations at one host with different client certificates share the worker's connections:
        each POST arrives under its own certificate, and each identity's connection is reused by it alone."""
        a, b = self.channel(tls=self.tls("clinic-a")), self.channel(tls=self.tls("clinic-b"))
        for channel in (a, b, a, b, a):
            result = yield channel.send(sample_item())
            self.assertEqual(result.status, 200)
        names = [name for _, name in self.fhir.peer_names]
        self.assertEqual(names, ["clinic-a", "clinic-b", "clinic-a", "clinic-b", "clinic-a"])
        self.assertEqual(len(self.site.accepted), 2)


def test_an_ip_address_is_connected_to_without_the_resolver():
    """127.0.0.1 and [::1] are connected to at once (TCP4/TCP6 endpoints): no name resolution first."""
    memory = MemoryReactorClock()
    http_post(memory, "http://127.0.0.1:8080/fhir", FHIR_JSON, b"{}", 5, connections=HttpConnections(memory))
    http_post(memory, "http://[::1]:8081/fhir", FHIR_JSON, b"{}", 5, connections=HttpConnections(memory))
    assert [(host, port) for host, port, *_ in memory.tcpClients] == [("127.0.0.1", 8080), ("::1", 8081)]
