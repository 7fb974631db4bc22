"""SMART Backend Services: access tokens for FHIR delivery, got with a signed JWT client assertion.

Per SMART App Launch 2, "Backend Services": the client asks the token
endpoint for ``grant_type=client_credentials`` with a ``client_assertion``, a
JWT it signs with its private key (RS384 or ES384, ``kid`` in the header)
whose ``iss`` and ``sub`` are its client id, ``aud`` the token URL, ``exp`` no
more than five minutes ahead and ``jti`` unique. The server checks the
signature with the client's registered public key and answers with a bearer
token and its lifetime (``expires_in``).

:class:`SmartTokens` keeps one token per destination until shortly before it
expires; concurrent sends share one token request; a 401 from the FHIR
server calls :meth:`SmartTokens.invalidate`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.delivery.channels import (
    DEFAULT_TIMEOUT,
    DeliveryFailed,
    HttpAnswer,
    HttpConnections,
    SmartAuth,
    connection_failure,
    host_of,
    http_post,
    parse_retry_after,
)
from gateway.errors import ConfigError

__all__ = ["ASSERTION_LIFETIME", "SmartTokens", "key_thumbprint", "load_signing_key"]

#: Seconds a client assertion is valid: under the spec's five-minute ceiling, leaving room for clock skew.
ASSERTION_LIFETIME = 240
#: The lifetime assumed when a token response gives no ``expires_in``.
DEFAULT_TOKEN_LIFETIME = 300
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def key_thumbprint(key) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256) of ``key``'s public half: the ``kid`` when none is configured."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        members = {"e": _b64(_int_bytes(numbers.e)), "kty": "RSA", "n": _b64(_int_bytes(numbers.n))}
    else:
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        members = {
            "crv": "P-384",
            "kty": "EC",
            "x": _b64(numbers.x.to_bytes(size, "big")),
            "y": _b64(numbers.y.to_bytes(size, "big")),
        }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("ascii")
    return _b64(hashlib.sha256(canonical).digest())


def load_signing_key(auth: SmartAuth):
    """Read ``auth.key_file``; check it suits ``auth.alg`` (RSA of 2048 bits or more for RS384, P-384 for ES384)."""
    key_name = f"{auth.where}.key_file" if auth.where else "key_file"
    try:
        data = auth.key_file.read_bytes()
    except OSError as e:
        raise ConfigError(key_name, f"cannot read {auth.key_file}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(key_name, f"{auth.key_file} is not an unencrypted PEM private key") from None
    if auth.alg == "RS384" and not (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048):
        raise ConfigError(key_name, "RS384 needs an RSA key of 2048 bits or more")
    if auth.alg == "ES384" and not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"):
        raise ConfigError(key_name, "ES384 needs an EC key on the P-384 curve")
    return key


class SmartTokens:
    """Access tokens for one SMART Backend Services client, cached until shortly before they expire.

    ``reactor`` makes the connections and keeps the cache's time
    (``reactor.seconds``); ``clock`` is the wall clock the assertion's
    ``exp`` and ``iat`` are read from. ``tls`` is the TLS client of the
    destination (:func:`gateway.delivery.channels.client_tls`), also used for
    the token endpoint; ``connections``, the destination's kept-alive
    connections (None: a connection a request). A bad key raises
    :class:`ConfigError` here, at start.
    """

    _log = Logger()

    def __init__(
        self,
        auth: SmartAuth,
        reactor,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.time,
        new_jti: Callable[[], str] = lambda: str(uuid.uuid4()),
        connections: HttpConnections | None = None,
    ) -> None:
        self.auth = auth
        self.reactor = reactor
        self.timeout = timeout
        self.tls = tls
        self.clock = clock
        self.new_jti = new_jti
        self.connections = connections
        self._key = load_signing_key(auth)
        self.kid = auth.kid or key_thumbprint(self._key)
        self._token: str | None = None
        self._refresh_at = 0.0
        self._fetching: defer.Deferred | None = None
        self._waiting: list[defer.Deferred[str]] = []
        #: Token requests made (each one a POST to the token endpoint).
        self.requests = 0

    def client_assertion(self) -> str:
        """A fresh signed JWT client assertion for the token endpoint."""
        now = int(self.clock())
        claims = {
            "iss": self.auth.client_id,
            "sub": self.auth.client_id,
            "aud": self.auth.token_url,
            "exp": now + ASSERTION_LIFETIME,
            "iat": now,
            "jti": self.new_jti(),
        }
        return jwt.encode(claims, self._key, algorithm=self.auth.alg, headers={"kid": self.kid, "typ": "JWT"})

    def token(self) -> defer.Deferred[str]:
        """The current access token, asking the token endpoint for one when none is fresh.

        Concurrent callers share one request. The Deferred fails with
        :class:`DeliveryFailed` (permanent when the server refused the client);
        cancelling it stops only this caller's wait.
        """
        if self._token is not None and self.reactor.seconds() < self._refresh_at:
            return defer.succeed(self._token)

        def stop_waiting(d: defer.Deferred) -> None:
            if d in self._waiting:
                self._waiting.remove(d)

        waiter: defer.Deferred[str] = defer.Deferred(stop_waiting)
        self._waiting.append(waiter)
        if self._fetching is None:
            self._fetching = self._fetch()
            self._fetching.addBoth(self._fetched)
        return waiter

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (the server answered 401). Given ``token``, only if it is still the cached one."""
        if token is None or token == self._token:
            self._token = None
            self._refresh_at = 0.0

    def _fetched(self, outcome) -> None:
        self._fetching = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(outcome, str):
                d.callback(outcome)
            else:
                d.errback(outcome)

    @defer.inlineCallbacks
    def _fetch(self):
        self.requests += 1
        where = host_of(self.auth.token_url)
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "scope": self.auth.scope,
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": self.client_assertion(),
            }
        ).encode("ascii")
        headers = {
            b"Content-Type": [b"application/x-www-form-urlencoded"],
            b"Accept": [b"application/json"],
            b"User-Agent": [b"Herald"],
        }
        try:
            answer = yield http_post(
                self.reactor, self.auth.token_url, headers, form, self.timeout, self.tls, self.connections
            )
        except defer.CancelledError:
            raise
        except Exception:
            raise connection_failure(Failure(), f"token endpoint {where}") from None
        token, lifetime = self._read_answer(answer, where)
        self._token = token
        # Renew shortly before it runs out: a tenth of its life, at most a minute.
        self._refresh_at = self.reactor.seconds() + lifetime - min(60.0, lifetime / 10)
        self._log.info(
            "got an access token from {where} for client {client} (expires in {lifetime:g} s)",
            where=where,
            client=self.auth.client_id,
            lifetime=lifetime,
        )
        return token

    def _read_answer(self, answer: HttpAnswer, where: str) -> tuple[str, float]:
        try:
            doc = json.loads(answer.body.decode("utf-8")) if answer.body else {}
        except (UnicodeDecodeError, ValueError):
            doc = None
        if answer.code == 200:
            if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str) or not doc["access_token"]:
                raise DeliveryFailed(f"token endpoint {where} answered 200 without an access_token", permanent=False)
            if str(doc.get("token_type", "bearer")).lower() != "bearer":
                raise DeliveryFailed(
                    f"token endpoint {where} gave a {doc.get('token_type')!r} token, not a bearer token", permanent=True
                )
            lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
            if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
                lifetime = DEFAULT_TOKEN_LIFETIME
            return doc["access_token"], float(lifetime)
        error = doc.get("error") if isinstance(doc, dict) else None
        said = f" ({error})" if isinstance(error, str) and error.replace("_", "").isalnum() else ""
        if answer.code == 429 or answer.code >= 500:
            raise DeliveryFailed(
                f"token endpoint {where} answered HTTP {answer.code}{said}",
                permanent=False,
                retry_after=parse_retry_after(answer.header("Retry-After"), self.clock()),
                status=answer.code,
            )
        # 400 invalid_client / invalid_scope / unauthorized_client, 401, 403...: the registration needs fixing.
        raise DeliveryFailed(
            f"token endpoint {where} refused client {self.auth.client_id}: HTTP {answer.code}{said}",
            permanent=True,
            status=answer.code,
        )
