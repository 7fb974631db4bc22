"""The FHIR channel against a real FHIR endpoint and token endpoint on 127.0.0.1 (twisted.web).

The endpoint validates each posted Bundle with fhir.resources and checks the
bearer token against the ones its token endpoint issued (whose assertions it
verified with the client's public key: test_smart.TokenEndpoint). What each
answer means follows the Da Vinci Notifications IG's "Reliable Delivery".
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from email.utils import formatdate
from functools import cache
from pathlib import Path

import pytest
from cryptography.x509.oid import NameOID
from fhir.resources.R4B.bundle import Bundle
from test_smart import CountingSite, TokenEndpoint, make_pki, rsa_key, smart_auth, write_key
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.trial import unittest
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gateway.app.replay import split_messages
from gateway.conversion.convert import convert
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import load_vocabulary
from gateway.delivery.channels import (
    DeliveryFailed,
    FhirDestination,
    HttpAnswer,
    OutboundNotification,
    TlsClient,
    parse_retry_after,
)
from gateway.delivery.fhir import FhirChannel, fhir_outcome
from gateway.delivery.routing import notification_payload
from gateway.delivery.summary import notification_summary
from gateway.errors import ConfigError
from gateway.records import Notification

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
ED_VISIT = "epic-v251-a04-ed-registration.hl7"
RECEIVED = datetime(2026, 3, 1, 17, 0, 0, tzinfo=UTC)


# -- a notification Herald built, shared with the other channel tests ----------------------------


@cache
def _conversion():
    raw = split_messages((SAMPLES / ED_VISIT).read_bytes())[0]
    return raw, convert(V2Message(raw), load_vocabulary(), UTC, RECEIVED)


def sample_item(nid: str = "5a1c7e0e-2f4b-5d7a-9c1e-000000000001") -> OutboundNotification:
    """The sample ED registration as Herald sends it: its Bundle (id = ``nid``), summary and v2 message."""
    raw, conversion = _conversion()
    n = Notification(
        id=nid,
        message_id=1,
        recipient_role="hie",
        recipient="HIE",
        channel="fhir",
        target="https://hie.example.org/fhir/$process-message",
        event_code=conversion.event_code,
    )
    payload = notification_payload(conversion.bundle, n).encode("utf-8")
    return OutboundNotification(nid, payload, notification_summary(conversion.bundle), raw)


def patient_family_name() -> str:
    """The sample patient's family name: it must appear in no error message."""
    _, conversion = _conversion()
    for entry in conversion.bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            return entry["resource"]["name"][0]["family"]
    raise AssertionError("no Patient")


# -- the FHIR endpoint ------------------------------------------------------------------------------


class ProcessMessage(Resource):
    """``[base]/$process-message`` that validates the Bundle and the bearer token.

    ``script``: what to do with the next requests, in order (a status code,
    ``"stall"``: headers then no body, ``"silent"``: nothing at all); then 200.
    ``stall_ids``: the Bundles (by id) whose POSTs stall, whenever they come.
    """

    isLeaf = True

    def __init__(self, tokens: TokenEndpoint | None) -> None:
        super().__init__()
        self.tokens = tokens
        self.script: list = []
        self.stall_ids: set[str] = set()
        self.headers: dict[str, str] = {}
        self.body = b""
        self.received: list[dict] = []
        self.stalled: list[defer.Deferred] = []
        self.peer_names: list[tuple[bytes, str]] = []  # (path, client certificate's CN), over TLS

    def render_POST(self, request):
        body = request.content.read()
        auth = request.getHeader("authorization") or ""
        self.received.append({"path": request.path, "authorization": auth, "type": request.getHeader("content-type")})
        step = self.script.pop(0) if self.script else 200
        if json.loads(body).get("id") in self.stall_ids:
            step = "stall"
        if step == "stall":
            request.setHeader("Content-Type", "application/fhir+json")
            request.setHeader("Content-Length", "1000")
            request.write(b"{")
            self.stalled.append(request.notifyFinish())
            return NOT_DONE_YET
        if step == "silent":
            self.stalled.append(request.notifyFinish())
            return NOT_DONE_YET
        if self.tokens is not None and auth.removeprefix("Bearer ") not in self.tokens.valid:
            request.setResponseCode(401)
            request.setHeader("WWW-Authenticate", 'Bearer error="invalid_token"')
            return b""
        if step == 200:
            if request.getHeader("content-type") != "application/fhir+json":
                step = 415
            else:
                try:
                    bundle = Bundle.model_validate_json(body)
                except ValueError:
                    step = 422
                else:
                    self.received[-1]["bundle"] = bundle
        request.setResponseCode(step)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        request.setHeader("Content-Type", "application/fhir+json")
        return self.body


class Root(Resource):
    """``/token`` and ``/fhir/$process-message`` on one server."""

    isLeaf = True

    def __init__(self, token: TokenEndpoint | None, fhir: ProcessMessage) -> None:
        super().__init__()
        self.token = token
        self.fhir = fhir

    def render_POST(self, request):
        cert = getattr(request.transport, "getPeerCertificate", lambda: None)()
        if cert is not None:
            subject = cert.to_cryptography().subject
            self.fhir.peer_names.append((request.path, subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value))
        if request.path == b"/token" and self.token is not None:
            return self.token.render_POST(request)
        if request.path == b"/fhir/$process-message":
            return self.fhir.render_POST(request)
        request.setResponseCode(404)
        return b""


class FhirChannelTestCase(unittest.TestCase):
    """A FHIR endpoint with SMART Backend Services on 127.0.0.1."""

    auth = True
    #: The receiver's site (a subclass may count more).
    site_factory = CountingSite

    def setUp(self):
        self.folder = _scratch(self)
        self.token = TokenEndpoint(rsa_key().public_key()) if self.auth else None
        self.fhir = ProcessMessage(self.token)
        self.site = self.site_factory(Root(self.token, self.fhir))
        self.port = self.listen()
        self.base = f"{self.scheme}://127.0.0.1:{self.port.getHost().port}"
        if self.token is not None:
            self.token.url = f"{self.base}/token"

    scheme = "http"

    def listen(self):
        return reactor.listenTCP(0, self.site, interface="127.0.0.1")

    @defer.inlineCallbacks
    def tearDown(self):
        for finished in self.fhir.stalled:
            finished.addErrback(lambda _: None)
        yield self.port.stopListening()
        yield self.site.closed()

    def channel(self, timeout: float = 5.0, **kw) -> FhirChannel:
        auth = smart_auth(write_key(self.folder, rsa_key()), self.token.url) if self.token is not None else None
        destination = FhirDestination(url=f"{self.base}/fhir", timeout=timeout, auth=auth, **kw)
        return FhirChannel(destination, reactor)

    @defer.inlineCallbacks
    def failure_of(self, d) -> DeliveryFailed:
        with self.assertRaises(DeliveryFailed) as e:
            yield d
        self.assertNotIn(patient_family_name(), e.exception.reason)
        return e.exception


class SendTests(FhirChannelTestCase):
    @defer.inlineCallbacks
    def test_the_bundle_is_posted_to_process_message_with_a_bearer_token(self):
        """A valid Bundle (fhir.resources) goes to [base]/$process-message as application/fhir+json with a token."""
        item = sample_item()
        result = yield self.channel().send(item)
        self.assertEqual((result.detail, result.status), ("HTTP 200", 200))
        self.assertGreaterEqual(result.elapsed, 0)
        (got,) = self.fhir.received
        self.assertEqual(got["path"], b"/fhir/$process-message")
        self.assertEqual(got["type"], "application/fhir+json")
        self.assertEqual(got["authorization"], "Bearer token-1")
        self.assertEqual(got["bundle"].id, item.id)
        self.assertEqual(got["bundle"].type, "message")
        self.assertEqual(self.token.problems, [])

    @defer.inlineCallbacks
    def test_the_token_is_reused_across_sends(self):
        """Four sends, one after another and two at once, make one token request."""
        channel = self.channel()
        yield channel.send(sample_item("n1"))
        yield channel.send(sample_item("n2"))
        yield defer.gatherResults([channel.send(sample_item("n3")), channel.send(sample_item("n4"))])
        self.assertEqual(len(self.token.issued), 1)
        self.assertEqual([r["authorization"] for r in self.fhir.received], ["Bearer token-1"] * 4)

    @defer.inlineCallbacks
    def test_a_401_refreshes_the_token_once_and_succeeds(self):
        """A revoked token: 401, a new token at once, the POST again: sent, in one attempt."""
        channel = self.channel()
        yield channel.send(sample_item("n1"))
        self.token.valid.clear()
        result = yield channel.send(sample_item("n2"))
        self.assertEqual(result.status, 200)
        self.assertEqual(self.token.issued, ["token-1", "token-2"])
        self.assertEqual([r["authorization"] for r in self.fhir.received][1:], ["Bearer token-1", "Bearer token-2"])

    @defer.inlineCallbacks
    def test_a_401_that_persists_is_permanent(self):
        """401 again with a fresh token: a permanent failure naming the reason; two POSTs, no more."""
        self.fhir.script = [401, 401]
        self.token.valid = _RejectsAll()
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertTrue(failed.permanent)
        self.assertEqual(failed.status, 401)
        self.assertIn("invalid_token", failed.reason)
        self.assertIn("fresh access token", failed.reason)
        self.assertEqual(len(self.fhir.received), 2)
        self.assertEqual(len(self.token.issued), 2)

    @defer.inlineCallbacks
    def test_404_is_permanent(self):
        """No $process-message at the URL: permanent, status 404."""
        self.fhir.script = [404]
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertEqual((failed.permanent, failed.status, failed.retry_after), (True, 404, None))
        self.assertIn("HTTP 404 from 127.0.0.1:", failed.reason)

    @defer.inlineCallbacks
    def test_503_with_retry_after_is_retryable_after_that_long(self):
        """503 with Retry-After: 7 is retryable with retry_after 7."""
        self.fhir.script = [503]
        self.fhir.headers = {"Retry-After": "7"}
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertEqual((failed.permanent, failed.status, failed.retry_after), (False, 503, 7.0))

    @defer.inlineCallbacks
    def test_an_operation_outcome_gives_its_codes_not_its_text(self):
        """A 500 with an OperationOutcome: the reason has the issue code, never the diagnostics (PHI may be there)."""
        self.fhir.script = [500]
        name = patient_family_name()
        self.fhir.body = json.dumps(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": f"cannot file {name}"}],
            }
        ).encode()
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertIn("(OperationOutcome: exception)", failed.reason)

    @defer.inlineCallbacks
    def test_a_body_that_stalls_is_cut_off_at_the_timeout_and_other_sends_carry_on(self):
        """Headers then no body: the attempt fails in about the timeout, the connection is closed; a send
        made meanwhile succeeds."""
        channel = self.channel(timeout=0.5)
        yield channel.send(sample_item("warm-up"))  # the token, so the timing is the POST's alone
        self.fhir.stall_ids = {"stalls"}
        start = time.monotonic()
        stalled = self.failure_of(channel.send(sample_item("stalls")))
        other = yield channel.send(sample_item("carries-on"))
        self.assertEqual(other.status, 200)
        self.assertLess(time.monotonic() - start, 0.5)
        failed = yield stalled
        elapsed = time.monotonic() - start
        self.assertTrue(0.45 <= elapsed < 1.5, elapsed)
        self.assertFalse(failed.permanent)
        self.assertIn("no complete answer within 0.5 s", failed.reason)
        # The server sees the connection go: the slot is free, nothing is left open.
        lost = yield self.fhir.stalled[0].addCallbacks(lambda _: None, lambda f: f.type)
        self.assertIn(lost, (ConnectionLost, ConnectionDone))

    @defer.inlineCallbacks
    def test_cancelling_a_send_closes_its_connection_at_once(self):
        """A send cancelled while its body stalls (the worker stopping) fails now and its connection closes."""
        channel = self.channel(timeout=5)
        yield channel.send(sample_item("warm-up"))
        self.fhir.stall_ids = {"stalls"}
        sending = channel.send(sample_item("stalls"))
        while not self.fhir.stalled:
            yield task.deferLater(reactor, 0.01, lambda: None)
        start = time.monotonic()
        sending.cancel()
        self.failureResultOf(sending, defer.CancelledError)
        lost = yield self.fhir.stalled[0].addCallbacks(lambda _: None, lambda f: f.type)
        self.assertIn(lost, (ConnectionLost, ConnectionDone))
        self.assertLess(time.monotonic() - start, 1)

    @defer.inlineCallbacks
    def test_a_receiver_that_never_answers_is_cut_off_at_the_timeout(self):
        """No status line at all: the attempt fails in about the timeout, retryable."""
        channel = self.channel(timeout=0.5)
        yield channel.send(sample_item("warm-up"))
        self.fhir.script = ["silent"]
        start = time.monotonic()
        failed = yield self.failure_of(channel.send(sample_item()))
        self.assertLess(time.monotonic() - start, 1.5)
        self.assertFalse(failed.permanent)

    @defer.inlineCallbacks
    def test_a_receiver_that_is_down_is_retryable(self):
        """Connection refused: retryable, naming the host."""
        channel = self.channel()
        yield self.port.stopListening()
        channel.tokens = None  # the token endpoint is on the same server
        failed = yield self.failure_of(channel.send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertIn("127.0.0.1:", failed.reason)
        self.port = self.listen()


class _RejectsAll(set):
    """A token set nothing is in: every bearer token is refused."""

    def __contains__(self, item) -> bool:
        return False


class NoAuthTests(FhirChannelTestCase):
    auth = False

    @defer.inlineCallbacks
    def test_without_auth_no_authorization_header_is_sent(self):
        """A destination without auth posts with no Authorization header."""
        yield self.channel().send(sample_item())
        self.assertEqual(self.fhir.received[0]["authorization"], "")

    @defer.inlineCallbacks
    def test_a_401_without_auth_is_permanent_at_once(self):
        """401 when no auth is configured: permanent, one POST, saying auth is missing."""
        self.fhir.script = [401]
        failed = yield self.failure_of(self.channel().send(sample_item()))
        self.assertTrue(failed.permanent)
        self.assertIn("none is configured", failed.reason)
        self.assertEqual(len(self.fhir.received), 1)


class TlsTests(FhirChannelTestCase):
    """HTTPS with mutual TLS: the server asks for a client certificate signed by the development CA."""

    scheme = "https"

    def listen(self):
        certs = self.folder / "certs"
        if not certs.exists():
            make_pki(certs)
        server = ssl.PrivateCertificate.loadPEM(
            (certs / "server.pem").read_bytes() + (certs / "server-key.pem").read_bytes()
        )
        ca = ssl.Certificate.loadPEM((certs / "ca.pem").read_bytes())
        return reactor.listenSSL(0, self.site, server.options(ca), interface="127.0.0.1")

    def tls(self, folder: Path | None = None, client: bool = True) -> TlsClient:
        certs = self.folder / "certs"
        return TlsClient(
            ca=(folder or certs) / "ca.pem",
            client_cert=certs / "client.pem" if client else None,
            client_key=certs / "client-key.pem" if client else None,
        )

    @defer.inlineCallbacks
    def test_https_with_a_client_certificate(self):
        """The channel trusts the configured CA and shows its client certificate; token and POST both over TLS."""
        result = yield self.channel(tls=self.tls()).send(sample_item())
        self.assertEqual(result.status, 200)
        client = "herald-test-client"
        self.assertEqual(self.fhir.peer_names, [(b"/token", client), (b"/fhir/$process-message", client)])

    @defer.inlineCallbacks
    def test_a_server_certificate_from_another_ca_is_not_trusted(self):
        """A server whose certificate the configured CA did not sign: retryable failure, nothing posted."""
        other = self.folder / "other"
        make_pki(other)
        failed = yield self.failure_of(self.channel(tls=self.tls(other)).send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertEqual(self.fhir.received, [])

    @defer.inlineCallbacks
    def test_without_a_client_certificate_the_server_refuses(self):
        """No client certificate for a server that requires one: retryable failure, nothing posted."""
        failed = yield self.failure_of(self.channel(tls=self.tls(client=False)).send(sample_item()))
        self.assertFalse(failed.permanent)
        self.assertEqual(self.fhir.received, [])


# -- what each answer means, and the settings --------------------------------------------------------


def answer(code: int, **headers: str) -> HttpAnswer:
    return HttpAnswer(code, Headers({k.replace("_", "-"): [v] for k, v in headers.items()}), b"")


@pytest.mark.parametrize("code", [200, 202, 204])
def test_2xx_is_success(code):
    """200, 202 and 204 (the IG's success codes) are a sent notification."""
    assert fhir_outcome(answer(code), "h:443", authorized=True, now=0) == f"HTTP {code}"


@pytest.mark.parametrize(
    ("code", "permanent"),
    [(400, True), (403, True), (404, True), (410, True), (422, True), (301, True)]
    + [(408, False), (429, False), (500, False), (502, False), (503, False), (504, False)],
)
def test_failures_are_permanent_or_retryable_by_status(code, permanent):
    """4xx (but 408 and 429) and 3xx are permanent; 408, 429 and 5xx are retryable."""
    with pytest.raises(DeliveryFailed) as e:
        fhir_outcome(answer(code), "h:443", authorized=False, now=0)
    assert (e.value.permanent, e.value.status) == (permanent, code)


def test_429_honours_an_http_date_retry_after():
    """Retry-After as an HTTP-date gives the seconds from now to then."""
    now = 1_780_000_000.0
    with pytest.raises(DeliveryFailed) as e:
        fhir_outcome(answer(429, Retry_After=formatdate(now + 90, usegmt=True)), "h:443", authorized=False, now=now)
    assert e.value.retry_after == 90.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("0", 0.0), (None, None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_retry_after_values(value, seconds):
    """Delta-seconds, an HTTP-date (in the past: 0), absent or unreadable (None)."""
    assert parse_retry_after(value, time.time()) == seconds


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"url": "ftp://hie.example.org/fhir"}, "channels[0].url"),
        ({"url": "https://hie.example.org/fhir", "timeout": 0}, "channels[0].timeout"),
        ({"url": "https://hie.example.org/fhir", "client_cert": "c.pem"}, "channels[0].client_key"),
        ({"url": "http://hie.example.org/fhir", "ca": "ca.pem"}, "channels[0].url"),
        ({"url": "https://hie.example.org/fhir", "auth": {"token_url": "https://a/t"}}, "channels[0].auth.client_id"),
    ],
)
def test_fhir_settings_are_checked_naming_the_key(settings, key):
    """Bad FHIR channel settings raise ConfigError naming the key as the directory spells it."""
    with pytest.raises(ConfigError) as e:
        FhirDestination.from_settings(settings, "channels[0]")
    assert e.value.key == key


def test_fhir_settings_from_a_directory_channel(tmp_path):
    """A directory channel table becomes a destination: $process-message appended, TLS and auth read."""
    d = FhirDestination.from_settings(
        {
            "channel": "fhir",
            "url": "https://hie.example.org/fhir/",
            "ca": "ca.pem",
            "timeout": 10,
            "auth": {"token_url": "https://hie.example.org/token", "client_id": "herald", "key_file": "k.pem"},
        }
    )
    assert d.process_message_url == "https://hie.example.org/fhir/$process-message"
    assert (d.timeout, d.tls.ca, d.tls.client_cert) == (10, Path("ca.pem"), None)
    assert (d.auth.client_id, d.auth.alg, d.auth.scope) == ("herald", "RS384", "system/*.write")


def test_an_unreadable_trust_root_is_refused_when_the_channel_is_made(tmp_path):
    """A missing CA file is a ConfigError naming the key, at start, not at the first send."""
    destination = FhirDestination.from_settings({"url": "https://h.example/fhir", "ca": str(tmp_path / "no.pem")}, "x")
    with pytest.raises(ConfigError) as e:
        FhirChannel(destination, reactor)
    assert e.value.key == "x.ca"


def _scratch(case) -> Path:
    """A folder of the system's temporary space for one test, removed after it (trial's
    ``mktemp`` would make it under the working directory)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="herald-test-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder
