"""SMART Backend Services: the signed client assertion, and access tokens from a real token endpoint on 127.0.0.1.

The token endpoint here checks each assertion as an authorization server
does: the signature with the client's registered public key (PyJWT, audience
the token URL), iss = sub = client id, exp at most five minutes ahead, a jti
never seen before and the ``kid`` header. The FHIR channel's tests
(test_channel_fhir.py) use the same endpoint.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from gateway.delivery.channels import DeliveryFailed, SmartAuth
from gateway.delivery.smart import ASSERTION_LIFETIME, SmartTokens, key_thumbprint
from gateway.errors import ConfigError

CLIENT_ID = "herald-test-client"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# -- keys and a token endpoint, shared with test_channel_fhir.py ---------------------------------


@cache
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


def make_pki(folder: Path, client_cn: str = "herald-test-client") -> Path:
    """A test CA with a server certificate (127.0.0.1, localhost) and a client certificate, as PEM files.

    ``ca.pem``, ``server.pem``, ``server-key.pem``, ``client.pem``, ``client-key.pem`` in ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("Herald test CA", ca_key, None, ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = issue("127.0.0.1", server_key, (ca, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)
    client = issue(client_cn, client_key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    for name, cert, key in (("ca", ca, None), ("server", server, server_key), ("client", client, client_key)):
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(pem))
        if key is not None:
            write_key(folder, key, f"{name}-key.pem")
    return folder


def issue(common_name: str, key, issuer, ca_key=None, *, usage=None, sans=(), email: str = ""):
    """A certificate for ``key``: self-signed when ``issuer`` is None (a CA), else signed by (issuer cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans or email:
        names = list(sans) + ([x509.RFC822Name(email)] if email else [])
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key if issuer is None else issuer[1], hashes.SHA256())


def write_key(folder: Path, key, name: str = "client-key.pem") -> Path:
    path = folder / name
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


class CountingSite(Site):
    """A Site that counts its open connections, so a test can wait until every one has closed."""

    def __init__(self, resource) -> None:
        super().__init__(resource, timeout=None)
        self.open = 0

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        lost = p.connectionLost
        self.open += 1

        def connection_lost(reason):
            self.open -= 1
            lost(reason)

        p.connectionLost = connection_lost
        return p

    @defer.inlineCallbacks
    def closed(self, within: float = 3.0):
        """Wait until no connection is open (a close takes a TLS round trip)."""
        deadline = time.monotonic() + within
        while self.open and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield task.deferLater(reactor, 0.01, lambda: None)


class TokenEndpoint(Resource):
    """A SMART Backend Services token endpoint that checks each client assertion strictly."""

    isLeaf = True

    def __init__(self, public_key, alg: str = "RS384", kid: str = "test-kid", lifetime: float = 300) -> None:
        super().__init__()
        self.public_key = public_key
        self.alg = alg
        self.kid = kid
        self.lifetime = lifetime
        self.url = ""  # set once the server listens: the audience every assertion must name
        self.status = 200  # anything else: answered with this status and an OAuth error
        self.retry_after: str | None = None
        self.jtis: set[str] = set()
        self.problems: list[str] = []
        self.issued: list[str] = []
        self.valid: set[str] = set()

    def render_POST(self, request):
        form = {k: v[0] for k, v in parse_qs(request.content.read().decode("ascii")).items()}
        if self.status != 200:
            request.setResponseCode(self.status)
            if self.retry_after:
                request.setHeader("Retry-After", self.retry_after)
            return self._json(request, {"error": "temporarily_unavailable"})
        problem = self._check(form)
        if problem:
            self.problems.append(problem)
            request.setResponseCode(400)
            return self._json(request, {"error": "invalid_client", "error_description": problem})
        token = f"token-{len(self.issued) + 1}"
        self.issued.append(token)
        self.valid.add(token)
        answer = {"access_token": token, "token_type": "bearer", "expires_in": self.lifetime, "scope": form["scope"]}
        return self._json(request, answer)

    def _check(self, form: dict) -> str:
        if form.get("grant_type") != "client_credentials":
            return "grant_type"
        if form.get("client_assertion_type") != JWT_BEARER:
            return "client_assertion_type"
        if not form.get("scope"):
            return "scope"
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=[self.alg],
                audience=self.url,
                issuer=CLIENT_ID,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.PyJWTError as e:
            return f"assertion: {type(e).__name__}"
        if header.get("kid") != self.kid:
            return "kid"
        if claims["sub"] != CLIENT_ID:
            return "sub"
        if claims["exp"] > time.time() + 300:
            return "exp more than five minutes ahead"
        if claims["jti"] in self.jtis:
            return "jti reused"
        self.jtis.add(claims["jti"])
        return ""

    @staticmethod
    def _json(request, doc) -> bytes:
        request.setHeader("Content-Type", "application/json")
        return json.dumps(doc).encode("utf-8")


def smart_auth(key_file: Path, token_url: str, alg: str = "RS384", kid: str = "test-kid") -> SmartAuth:
    return SmartAuth(token_url=token_url, client_id=CLIENT_ID, key_file=key_file, kid=kid, alg=alg)


# -- the assertion ------------------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "make_key"), [("RS384", rsa_key), ("ES384", ec_key)])
def test_assertion_carries_the_backend_services_claims_and_verifies(tmp_path, alg, make_key):
    """The JWT is signed with alg, names kid, has iss = sub = client id, aud = token URL, exp <= 5 min, a jti."""
    url = "https://auth.example.org/token"
    now = int(time.time())
    tokens = SmartTokens(smart_auth(write_key(tmp_path, make_key()), url, alg), reactor, clock=lambda: now)
    assertion = tokens.client_assertion()
    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": alg, "kid": "test-kid", "typ": "JWT"}
    claims = jwt.decode(assertion, make_key().public_key(), algorithms=[alg], audience=url)
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == url
    assert claims["exp"] == now + ASSERTION_LIFETIME <= now + 300
    assert (
        claims["jti"]
        != jwt.decode(tokens.client_assertion(), options={"verify_signature": False}, audience=url, algorithms=[alg])[
            "jti"
        ]
    )


def test_kid_defaults_to_the_rfc7638_thumbprint(tmp_path):
    """With no kid configured, the header's kid is the key's JWK thumbprint (SHA-256 of its required members)."""
    import base64
    import hashlib

    key = rsa_key()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    members = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
    expected = base64.urlsafe_b64encode(hashlib.sha256(members.encode()).digest()).rstrip(b"=").decode()
    assert key_thumbprint(key) == expected
    tokens = SmartTokens(smart_auth(write_key(tmp_path, key), "https://a.example/token", kid=""), reactor)
    assert jwt.get_unverified_header(tokens.client_assertion())["kid"] == expected


@pytest.mark.parametrize(
    ("alg", "make_key"),
    [("RS384", ec_key), ("ES384", rsa_key), ("ES384", lambda: ec.generate_private_key(ec.SECP256R1()))],
)
def test_a_key_that_does_not_suit_the_algorithm_is_refused_naming_the_key(tmp_path, alg, make_key):
    """An EC key for RS384, or an RSA or P-256 key for ES384, is a ConfigError naming auth.key_file."""
    with pytest.raises(ConfigError) as e:
        SmartTokens(smart_auth(write_key(tmp_path, make_key()), "https://a.example/token", alg), reactor)
    assert e.value.key == "auth.key_file"


def test_an_unreadable_key_file_is_refused_naming_the_key(tmp_path):
    """A missing key file is a ConfigError naming auth.key_file, at start, not at the first send."""
    with pytest.raises(ConfigError, match="auth.key_file"):
        SmartTokens(smart_auth(tmp_path / "missing.pem", "https://a.example/token"), reactor)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"token_url": "https://a.example/token", "key_file": "k.pem"}, "auth.client_id"),
        ({"token_url": "ftp://a.example/token", "client_id": "c", "key_file": "k.pem"}, "auth.token_url"),
        ({"token_url": "https://a.example/token", "client_id": "c", "key_file": "k.pem", "alg": "HS256"}, "auth.alg"),
        ({"token_url": "https://a.example/token", "client_id": "c"}, "auth.key_file"),
    ],
)
def test_smart_settings_are_checked_naming_the_key(settings, key):
    """Missing or impossible SMART settings raise ConfigError naming the key."""
    with pytest.raises(ConfigError) as e:
        SmartAuth.from_settings(settings)
    assert e.value.key == key


# -- tokens from a real endpoint ------------------------------------------------------------------


class SmartTokensTests(unittest.TestCase):
    def setUp(self):
        folder = _scratch(self)
        self.key_file = write_key(folder, rsa_key())
        self.endpoint = TokenEndpoint(rsa_key().public_key())
        self.site = CountingSite(self.endpoint)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.endpoint.url = f"http://127.0.0.1:{self.port.getHost().port}/token"

    @defer.inlineCallbacks
    def tearDown(self):
        yield self.port.stopListening()
        yield self.site.closed()

    def tokens(self, **kw) -> SmartTokens:
        return SmartTokens(smart_auth(self.key_file, self.endpoint.url), reactor, timeout=5, **kw)

    @defer.inlineCallbacks
    def test_a_token_is_fetched_once_and_cached(self):
        """The first call asks the endpoint (the assertion verifies); later calls get the cached token."""
        tokens = self.tokens()
        first = yield tokens.token()
        second = yield tokens.token()
        self.assertEqual((first, second), ("token-1", "token-1"))
        self.assertEqual((tokens.requests, self.endpoint.problems), (1, []))

    @defer.inlineCallbacks
    def test_concurrent_callers_share_one_request(self):
        """Three sends that need a token at once make one token request."""
        tokens = self.tokens()
        got = yield defer.gatherResults([tokens.token() for _ in range(3)])
        self.assertEqual(got, ["token-1"] * 3)
        self.assertEqual(len(self.endpoint.issued), 1)

    @defer.inlineCallbacks
    def test_a_token_is_renewed_shortly_before_it_expires(self):
        """A token that lives 0.5 s is used until about 0.45 s, then a new one is asked for."""
        self.endpoint.lifetime = 0.5
        tokens = self.tokens()
        first = yield tokens.token()
        again = yield tokens.token()
        self.assertEqual(again, first)
        yield task.deferLater(reactor, 0.5, lambda: None)
        renewed = yield tokens.token()
        self.assertEqual((first, renewed), ("token-1", "token-2"))

    @defer.inlineCallbacks
    def test_invalidate_forgets_the_token(self):
        """After invalidate() (a 401), the next call asks for a new token."""
        tokens = self.tokens()
        first = yield tokens.token()
        tokens.invalidate(first)
        second = yield tokens.token()
        self.assertEqual((first, second), ("token-1", "token-2"))

    @defer.inlineCallbacks
    def test_invalidating_an_old_token_keeps_the_new_one(self):
        """A late 401 for a token already replaced does not drop its replacement."""
        tokens = self.tokens()
        old = yield tokens.token()
        tokens.invalidate()
        new = yield tokens.token()
        tokens.invalidate(old)
        still = yield tokens.token()
        self.assertEqual((new, still, tokens.requests), ("token-2", "token-2", 2))

    @defer.inlineCallbacks
    def test_a_refused_client_is_a_permanent_failure(self):
        """An endpoint that holds another public key answers invalid_client: permanent, reason named."""
        self.endpoint.public_key = ec_key().public_key()
        self.endpoint.alg = "ES384"
        with self.assertRaises(DeliveryFailed) as e:
            yield self.tokens().token()
        self.assertTrue(e.exception.permanent)
        self.assertEqual(e.exception.status, 400)
        self.assertIn("invalid_client", e.exception.reason)
        self.assertIn(CLIENT_ID, e.exception.reason)

    @defer.inlineCallbacks
    def test_an_unavailable_token_endpoint_is_retryable(self):
        """503 with Retry-After from the token endpoint: retryable, retry_after passed on."""
        self.endpoint.status = 503
        self.endpoint.retry_after = "12"
        with self.assertRaises(DeliveryFailed) as e:
            yield self.tokens().token()
        self.assertEqual((e.exception.permanent, e.exception.retry_after, e.exception.status), (False, 12.0, 503))

    @defer.inlineCallbacks
    def test_a_token_endpoint_that_is_down_is_retryable(self):
        """Connection refused at the token endpoint: retryable, naming the host."""
        tokens = self.tokens()
        yield self.port.stopListening()
        with self.assertRaises(DeliveryFailed) as e:
            yield tokens.token()
        self.assertFalse(e.exception.permanent)
        self.assertIn("token endpoint 127.0.0.1:", e.exception.reason)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # for tearDown


def _scratch(case) -> Path:
    """A folder of the system's temporary space for one test, removed after it (trial's
    ``mktemp`` would make it under the working directory)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="herald-test-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder
