"""What every delivery channel is given and answers, and each destination's settings.

A channel (:mod:`~gateway.delivery.fhir`, :mod:`~gateway.delivery.mllp_forward`,
:mod:`~gateway.delivery.direct`) sends one :class:`OutboundNotification` and
fires with a :class:`SendResult`, or fails with :class:`DeliveryFailed`, which
says whether trying again can help (``permanent``) and, when the receiver
said so, how long to wait (``retry_after``). Every attempt is bounded by its
destination's ``timeout``, the whole exchange included (connecting, TLS,
the answer and its body), so a stalled receiver never holds a delivery slot.

The destination settings are checked when they are made: a bad value raises
:class:`~gateway.errors.ConfigError` naming the key (``channels[0].port``).
``from_settings`` reads a channel table of the recipient directory
(:data:`gateway.delivery.directory.CHANNEL_KINDS`).

Also here, because both the FHIR channel and the SMART token client use it:
:func:`http_post`, one HTTP request bounded as a whole by its timeout, on a
connection of its own or one kept alive in :class:`HttpConnections`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, protocol, ssl
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from gateway.config import Config
from gateway.errors import ConfigError, HeraldError

__all__ = [
    "Channel",
    "DeliveryFailed",
    "DirectDestination",
    "FhirDestination",
    "HttpAnswer",
    "HttpConnections",
    "MllpDestination",
    "OutboundNotification",
    "SendResult",
    "SmartAuth",
    "TlsClient",
    "client_tls",
    "connection_failure",
    "describe_cause",
    "host_of",
    "http_post",
    "parse_retry_after",
    "same_public_key",
]

DEFAULT_TIMEOUT = Config.delivery_timeout
#: SMART Backend Services signing algorithms (SMART App Launch 2, "Backend Services").
SMART_ALGORITHMS = ("RS384", "ES384")
#: The scope asked for when a destination names none: write access for a system client.
DEFAULT_SCOPE = "system/*.write"
ON_ERROR = ("retry", "dead")
#: How much of an HTTP answer's body is kept (enough for an OperationOutcome).
MAX_BODY = 64 * 1024
_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


# -- what a channel is given and answers ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboundNotification:
    """One notification to send over one channel.

    ``id`` is the notification id: the Bundle's id, and the MessageHeader's,
    and the Direct message's Message-ID, the same on every attempt so a
    receiver can drop duplicates. The other fields hold PHI and are kept out
    of ``repr`` (a logged object shows only the id).
    """

    id: str
    #: The Bundle (JSON) as sent to a FHIR endpoint and attached to a Direct message.
    payload: bytes = field(repr=False)
    #: The human-readable summary (:func:`gateway.delivery.summary.notification_summary`).
    summary: str = field(default="", repr=False)
    #: The v2 message as received, for an MLLP forward.
    original: bytes = field(default=b"", repr=False)
    #: A digest's Bundles, ``(file name, JSON)`` each, attached instead of ``payload`` (Direct).
    attachments: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class SendResult:
    """A delivered notification: what the receiver said, in words safe to log."""

    detail: str
    #: HTTP status, SMTP reply code, or None (an MLLP ACK has none).
    status: int | None
    #: Seconds the attempt took, from start to the receiver's answer.
    elapsed: float


class DeliveryFailed(HeraldError):
    """One attempt failed; the message names hosts, codes and ids only (no PHI).

    ``permanent``: trying again will not help until someone acts (a 404, a
    refused ACK, a 5xx SMTP reply). ``retry_after``: seconds the receiver
    asked to wait (HTTP ``Retry-After``), or None. ``status``: the HTTP status
    or SMTP reply code, when there was one.
    """

    def __init__(
        self, message: str, *, permanent: bool, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason = message
        self.permanent = permanent
        self.retry_after = retry_after
        self.status = status

    def __repr__(self) -> str:
        return (
            f"DeliveryFailed({self.reason!r}, permanent={self.permanent}, "
            f"retry_after={self.retry_after}, status={self.status})"
        )

    def __reduce__(self):
        # The keyword-only arguments are not in ``args``: copy and pickle by the attributes.
        return (_delivery_failed, (self.reason, self.permanent, self.retry_after, self.status))


def _delivery_failed(reason: str, permanent: bool, retry_after: float | None, status: int | None) -> DeliveryFailed:
    return DeliveryFailed(reason, permanent=permanent, retry_after=retry_after, status=status)


class Channel(Protocol):
    """A way of telling a recipient: the FHIR, MLLP forward and Direct channels all have this shape."""

    def send(self, item: OutboundNotification) -> defer.Deferred[SendResult]:
        """Send ``item``; fire with a :class:`SendResult` or fail with :class:`DeliveryFailed`."""
        ...


# -- destination settings ------------------------------------------------------------------------


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check_timeout(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(_key(where, "timeout"), "must be a positive number of seconds")


def _check_url(value: Any, key: str) -> None:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(key, "must be an https:// (or, for testing, http://) URL with a host")


def _path(value: Any) -> Path | None:
    return None if value in (None, "") else Path(value)


@dataclass(frozen=True, slots=True)
class TlsClient:
    """TLS as a client: whom to trust and which certificate to show.

    ``ca``: PEM file of the certificates to trust (None: the platform's trust
    store). ``client_cert`` and ``client_key``: PEM files of the certificate
    presented for mutual TLS (both or neither).
    """

    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    where: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        _paths(self, "ca", "client_cert", "client_key")
        if (self.client_cert is None) != (self.client_key is None):
            missing = "client_key" if self.client_key is None else "client_cert"
            raise ConfigError(_key(self.where, missing), "a client certificate needs both client_cert and client_key")

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any], where: str = "") -> TlsClient | None:
        """The TLS settings of a channel table (``ca``, ``client_cert``, ``client_key``), or None when it has none."""
        values = {k: _path(raw.get(k)) for k in ("ca", "client_cert", "client_key")}
        if not any(values.values()):
            return None
        return cls(**values, where=where)


def same_public_key(private_key, certificate: x509.Certificate) -> bool:
    """Whether ``private_key`` is the key of ``certificate``."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return private_key.public_key().public_bytes(der, spki) == certificate.public_key().public_bytes(der, spki)


def _paths(settings, *names: str) -> None:
    # Frozen dataclasses: a str given for a file becomes a Path once, here.
    for name in names:
        value = getattr(settings, name)
        if value is not None and not isinstance(value, Path):
            object.__setattr__(settings, name, Path(value))


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None


def client_tls(tls: TlsClient | None) -> Callable[[str], Any]:
    """Load ``tls`` once; return a function giving the TLS client options for a host name.

    The server's certificate is checked against ``tls.ca`` (or the platform's
    trust store) and its name against the host; the client certificate, when
    configured, is presented. Unreadable files raise :class:`ConfigError`
    naming the key.
    """
    tls = tls or TlsClient()
    trust = None
    if tls.ca is not None:
        key = _key(tls.where, "ca")
        try:
            certs = x509.load_pem_x509_certificates(_read(tls.ca, key))
        except ValueError:
            raise ConfigError(key, f"{tls.ca} holds no PEM certificate") from None
        pem = serialization.Encoding.PEM
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(c.public_bytes(pem)) for c in certs])
    mine = None
    if tls.client_cert is not None and tls.client_key is not None:
        cert_key, key_key = _key(tls.where, "client_cert"), _key(tls.where, "client_key")
        cert_pem, key_pem = _read(tls.client_cert, cert_key), _read(tls.client_key, key_key)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ConfigError(cert_key, f"{tls.client_cert} is not a PEM certificate") from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(key_key, f"{tls.client_key} is not an unencrypted PEM private key") from None
        if not same_public_key(private, cert):
            raise ConfigError(key_key, "the key does not match client_cert")
        mine = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)

    def options(hostname: str):
        return ssl.optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=mine)

    return options


@dataclass(frozen=True, slots=True)
class SmartAuth:
    """SMART Backend Services: who we are to the receiver's authorization server.

    ``key_file``: the PEM private key whose public half the server holds
    (RSA for RS384, EC P-384 for ES384). ``kid``: the key's id in our JWKS
    (empty: the key's RFC 7638 thumbprint).
    """

    token_url: str
    client_id: str
    key_file: Path
    kid: str = ""
    alg: str = "RS384"
    scope: str = DEFAULT_SCOPE
    where: str = field(default="auth", repr=False, compare=False)

    def __post_init__(self) -> None:
        _paths(self, "key_file")
        _check_url(self.token_url, _key(self.where, "token_url"))
        if not isinstance(self.client_id, str) or not self.client_id.strip():
            raise ConfigError(_key(self.where, "client_id"), "SMART Backend Services needs the registered client_id")
        if self.alg not in SMART_ALGORITHMS:
            raise ConfigError(_key(self.where, "alg"), f"{self.alg!r} is not one of {', '.join(SMART_ALGORITHMS)}")
        if not isinstance(self.scope, str) or not self.scope.strip():
            raise ConfigError(_key(self.where, "scope"), "must name at least one scope")

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any], where: str = "auth") -> SmartAuth:
        """Read a channel's ``auth`` table (token_url, client_id, key_file; kid, alg, scope)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(where, "must be a table (SMART Backend Services settings)")
        for name in ("token_url", "client_id", "key_file"):
            if not raw.get(name):
                raise ConfigError(_key(where, name), f"SMART Backend Services needs {name}")
        return cls(
            token_url=raw["token_url"],
            client_id=raw["client_id"],
            key_file=Path(raw["key_file"]),
            kid=str(raw.get("kid") or ""),
            alg=str(raw.get("alg") or "RS384"),
            scope=str(raw.get("scope") or DEFAULT_SCOPE),
            where=where,
        )


@dataclass(frozen=True, slots=True)
class FhirDestination:
    """A FHIR endpoint: ``POST [url]/$process-message``, over HTTPS with optional mutual TLS and SMART auth."""

    url: str
    timeout: float = DEFAULT_TIMEOUT
    tls: TlsClient | None = None
    auth: SmartAuth | None = None
    where: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_url(self.url, _key(self.where, "url"))
        _check_timeout(self.timeout, self.where)
        if self.tls is not None and not self.url.startswith("https://"):
            raise ConfigError(_key(self.where, "url"), "TLS settings (ca, client_cert) need an https:// URL")

    @property
    def process_message_url(self) -> str:
        """The URL posted to: the base URL with ``/$process-message`` (unless it already ends so)."""
        base = self.url.rstrip("/")
        return base if base.endswith("$process-message") else base + "/$process-message"

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any], where: str = "") -> FhirDestination:
        """Read a ``fhir`` channel table: url; ca, client_cert, client_key, timeout, auth."""
        if not raw.get("url"):
            raise ConfigError(_key(where, "url"), "a fhir channel needs url")
        auth = raw.get("auth")
        return cls(
            url=raw["url"],
            timeout=raw.get("timeout", DEFAULT_TIMEOUT),
            tls=TlsClient.from_settings(raw, where),
            auth=None if auth is None else SmartAuth.from_settings(auth, _key(where, "auth")),
            where=where,
        )


@dataclass(frozen=True, slots=True)
class MllpDestination:
    """An HIE's MLLP listener. ``on_error``: what an AE/CE answer does (``retry`` or ``dead``)."""

    host: str
    port: int
    tls: TlsClient | None = None
    timeout: float = DEFAULT_TIMEOUT
    on_error: str = "retry"
    where: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError(_key(self.where, "host"), "an mllp channel needs host")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(_key(self.where, "port"), "must be a TCP port number")
        _check_timeout(self.timeout, self.where)
        if self.on_error not in ON_ERROR:
            raise ConfigError(_key(self.where, "on_error"), "must be 'retry' or 'dead' (what an AE/CE answer does)")

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any], where: str = "") -> MllpDestination:
        """Read an ``mllp`` channel table: host, port; ca, client_cert, client_key, timeout, on_error.

        TLS is on when any of ``ca``, ``client_cert``, ``client_key`` is given.
        """
        return cls(
            host=raw.get("host", ""),
            port=raw.get("port", 0),
            tls=TlsClient.from_settings(raw, where),
            timeout=raw.get("timeout", DEFAULT_TIMEOUT),
            on_error=raw.get("on_error", "retry"),
            where=where,
        )


@dataclass(frozen=True, slots=True)
class DirectDestination:
    """A Direct address, reached through our SMTP relay (a HISP), with the certificates to sign and encrypt.

    ``sign_cert``/``sign_key``: our Direct certificate and key (PEM).
    ``recipient_cert``: the recipient's Direct certificate (PEM, RSA: S/MIME
    key transport). ``starttls``: refuse to send unless the relay offers
    STARTTLS; ``smtp_ca`` is then the trust root for the relay's certificate
    (None: the platform's). Without it, plain SMTP: the message itself is
    encrypted end to end either way.
    """

    smtp_host: str
    smtp_port: int
    starttls: bool
    sender: str
    recipient: str
    sign_cert: Path
    sign_key: Path
    recipient_cert: Path
    timeout: float = DEFAULT_TIMEOUT
    smtp_ca: Path | None = None
    where: str = field(default="", repr=False, compare=False)
    #: The setting each field came from, for error messages (filled by :meth:`from_settings`).
    keys: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def key_for(self, name: str) -> str:
        """The settings key that field ``name`` came from (``channels[0].to`` for ``recipient``)."""
        return self.keys.get(name) or _key(self.where, name)

    def __post_init__(self) -> None:
        _paths(self, "sign_cert", "sign_key", "recipient_cert", "smtp_ca")
        if not isinstance(self.smtp_host, str) or not self.smtp_host.strip():
            raise ConfigError(self.key_for("smtp_host"), "a direct channel needs the SMTP relay's host")
        port = self.smtp_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(self.key_for("smtp_port"), "must be a TCP port number")
        if not isinstance(self.starttls, bool):
            raise ConfigError(self.key_for("starttls"), "must be true or false")
        for name in ("sender", "recipient"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
                raise ConfigError(self.key_for(name), "must be a Direct address (name@direct.example.org)")
        _check_timeout(self.timeout, self.where)

    @property
    def sender_domain(self) -> str:
        return self.sender.rsplit("@", 1)[1]

    @classmethod
    def from_settings(
        cls, raw: Mapping[str, Any], relay: Mapping[str, Any], where: str = "", relay_where: str = "direct"
    ) -> DirectDestination:
        """Read a ``direct`` channel table (to, certificate; timeout) and our relay's settings.

        ``relay`` (found at ``relay_where`` in the configuration) holds what is
        the same for every Direct recipient: ``smtp_host``, ``smtp_port`` (25),
        ``starttls`` (true), ``sender``, ``sign_cert``, ``sign_key``, ``ca``.
        """
        keys = {
            "recipient": _key(where, "to"),
            "recipient_cert": _key(where, "certificate"),
            **{name: _key(relay_where, name) for name in ("smtp_host", "smtp_port", "starttls", "sender")},
            **{name: _key(relay_where, name) for name in ("sign_cert", "sign_key")},
            "smtp_ca": _key(relay_where, "ca"),
        }
        for name in ("to", "certificate"):
            if not raw.get(name):
                raise ConfigError(_key(where, name), f"a direct channel needs {name}")
        for name in ("smtp_host", "sender", "sign_cert", "sign_key"):
            if not relay.get(name):
                raise ConfigError(_key(relay_where, name), f"sending Direct messages needs {name}")
        return cls(
            smtp_host=relay["smtp_host"],
            smtp_port=relay.get("smtp_port", 25),
            starttls=relay.get("starttls", True),
            sender=relay["sender"],
            recipient=raw["to"],
            sign_cert=Path(relay["sign_cert"]),
            sign_key=Path(relay["sign_key"]),
            recipient_cert=Path(raw["certificate"]),
            timeout=raw.get("timeout", DEFAULT_TIMEOUT),
            smtp_ca=_path(relay.get("ca")),
            where=where,
            keys=keys,
        )


# -- one HTTP exchange, bounded as a whole -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An HTTP answer: status, headers, and the body's first :data:`MAX_BODY` bytes."""

    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class HttpTimeout(Exception):
    """The whole exchange did not finish in time; the connection was aborted."""


class _BodyCollector(protocol.Protocol):
    """Keeps the first MAX_BODY bytes of a body; fires when the body ends."""

    def __init__(self, finished: defer.Deferred) -> None:
        self.finished = finished
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size < MAX_BODY:
            self.parts.append(data[: MAX_BODY - self.size])
        self.size += len(data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


#: Seconds a kept-alive connection may sit idle before Herald closes it. Below the keep-alive timeout
#: of the servers FHIR receivers commonly run on or behind (Tomcat 20 s, Jetty 30 s, AWS ALB 60 s,
#: nginx 75 s, IIS 120 s), so Herald, not the server, usually closes an idle connection: a server's
#: close that crosses a POST on the wire fails that attempt (see :func:`http_post`).
IDLE_TIMEOUT = 15.0


class HttpConnections:
    """Kept-alive HTTP/1.1 connections for the requests of one delivery worker.

    A connection a request (a getaddrinfo in the thread pool, TCP and TLS
    set up and torn down) cost the server a third of its CPU a notification
    (bench/delivery.py, a backlog of 2000 over plain HTTP: 6.3-6.6 ms of
    server CPU a notification, 4.4-4.6 ms with kept connections); here a
    connection serves one request after another. One is reused only
    for the same scheme, host, port and TLS client (the ``tls`` callable of
    :func:`http_post`), so a connection made with one client certificate
    never carries a request meant for another identity. At most
    ``per_host`` idle connections are kept for each (the worker's slots per
    destination: more would only sit idle), each for ``idle_timeout``
    seconds. A connection whose exchange failed, timed out or was cancelled
    is aborted, never kept.

    :meth:`close` (the worker stopping) closes the idle ones; from then on
    each request has a connection of its own again.
    """

    def __init__(self, reactor, per_host: int = Config.delivery_per_destination, idle_timeout: float = IDLE_TIMEOUT):
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = per_host
        self._pool.cachedConnectionTimeout = idle_timeout
        # Twisted retries only requests without a body (GET, HEAD...) on a reused connection; a POST
        # is never sent twice behind our back.
        self._pool.retryAutomatically = False
        self._reactor = reactor
        # Every connection handed out and not yet known lost, so close() can reach the idle ones.
        self._live: set = set()
        #: Connections opened (a TCP connect each, and a TLS handshake for https).
        self.opened = 0
        self.closed = False

    def pool(self) -> HTTPConnectionPool:
        """The pool a request takes its connection from: the shared one, or once closed a one-off."""
        return HTTPConnectionPool(self._reactor, persistent=False) if self.closed else self._pool

    def handed_out(self, connection) -> None:
        """Note a connection given to a request (a new one, or a kept one again)."""
        if connection not in self._live:
            self.opened += 1
            self._live = {c for c in self._live if c.state != "CONNECTION_LOST"}
            self._live.add(connection)

    def close(self) -> defer.Deferred[None]:
        """Close the idle connections, and keep none from now on; fires when they are closed.

        A request under way keeps its connection until its answer, then that
        connection closes too (:func:`http_post` calls this again). The idle
        ones are aborted, not closed politely: a polite TLS close waits for
        the server's own close_notify, and a stopping worker waits on no server.
        """
        self.closed = True
        for connection in self._live:
            if connection.state == "QUIESCENT":
                connection.transport.abortConnection()
        self._live = {c for c in self._live if c.state not in ("QUIESCENT", "CONNECTION_LOST")}
        return self._pool.closeCachedConnections()


def _endpoint_for(reactor, uri, timeout: float, tls: Callable[[str], Any] | None):
    """The endpoint that opens a connection to ``uri``'s host: TCP (and TLS for https).

    An IP address is connected to as it is: HostnameEndpoint would resolve
    it all the same, with a getaddrinfo call in the reactor's thread pool.
    """
    host = uri.host.decode("utf-8", "replace").strip("[]")  # an IPv6 address comes in brackets
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        endpoint = HostnameEndpoint(reactor, uri.host, uri.port, timeout=timeout)
        host = uri.host.decode("idna")
    else:
        tcp = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
        endpoint = tcp(reactor, host, uri.port, timeout=timeout)
    if uri.scheme == b"https":
        endpoint = wrapClientTLS((tls or client_tls(None))(host), endpoint)
    return endpoint


class _Endpoint:
    """Makes the real endpoint only when a new connection is needed (a kept one needs none)."""

    def __init__(self, exchange: _Exchange, uri) -> None:
        self.exchange = exchange
        self.uri = uri

    def connect(self, factory):
        x = self.exchange
        return _endpoint_for(x.reactor, self.uri, x.timeout, x.tls).connect(factory)

    def __repr__(self) -> str:
        return f"<{self.uri.scheme.decode()}://{self.uri.host.decode('utf-8', 'replace')}:{self.uri.port}>"


@implementer(IAgentEndpointFactory)
class _Exchange:
    """One request's connection, as Agent's endpoint factory and pool: kept so a timeout can abort it.

    It comes from ``connections`` (None: a connection for this request
    alone). (Cancelling ``readBody`` does not close the connection: the
    body's transport is a proxy without ``abortConnection``.)
    """

    def __init__(self, reactor, tls: Callable[[str], Any] | None, timeout: float, connections) -> None:
        self.reactor = reactor
        self.tls = tls
        self.timeout = timeout
        self.connections = connections
        self._pool = HTTPConnectionPool(reactor, persistent=False) if connections is None else connections.pool()
        #: Whether the request asks to keep the connection (Agent reads this of its pool).
        self.persistent = self._pool.persistent
        self.protocol = None

    def endpointForURI(self, uri):
        return _Endpoint(self, uri)

    def getConnection(self, key, endpoint):
        # The TLS client is part of the key: a connection is never reused for another identity. The
        # callable itself, not its id(): an id may be a dead callable's, reused.
        d = self._pool.getConnection((*key, self.tls), endpoint)
        return d.addCallback(self._got)

    def _got(self, connection):
        self.protocol = connection
        if self.persistent:
            self.connections.handed_out(connection)
        return connection

    def abort(self) -> None:
        transport = getattr(self.protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()


def http_post(
    reactor,
    url: str,
    headers: Mapping[bytes, list[bytes]],
    body: bytes,
    timeout: float,
    tls: Callable[[str], Any] | None = None,
    connections: HttpConnections | None = None,
) -> defer.Deferred[HttpAnswer]:
    """POST ``body`` to ``url``; fire with the :class:`HttpAnswer`, or fail.

    ``timeout`` bounds the whole exchange: connecting, TLS, sending, the
    status line and headers, and the body. When it runs out the connection
    is aborted and the Deferred fails with :class:`HttpTimeout`. ``tls`` is
    what :func:`client_tls` returns (None: the platform's trust store).
    ``connections``: kept-alive connections to take one from and return it
    to (None: a connection for this request alone, closed after it).
    Connection problems fail with Twisted's errors (see :func:`connection_failure`).

    A kept connection the server closed while it was idle is not used: the
    reactor has seen it close. A close that crosses the POST on the wire
    fails this exchange (``ResponseNeverReceived``), and it is not sent again
    here: the server may have had the whole request. The delivery worker
    retries it later with the same Bundle id (receivers drop duplicates by
    it); Twisted's ``RequestNotSent``, the one proof that nothing was sent,
    does not arise, as the pool hands out only connections ready for a request.
    """
    exchange = _Exchange(reactor, tls, timeout, connections)
    agent = Agent.usingEndpointFactory(reactor, exchange, pool=exchange)
    reading_body = False

    def stop() -> None:
        # Before the answer's headers, cancelling the request aborts the
        # connection (or the connecting); after them, only an abort ends the body.
        if reading_body:
            exchange.abort()
        else:
            request.cancel()

    # Cancelling the result (the worker stopping) ends the exchange the same way.
    result: defer.Deferred[HttpAnswer] = defer.Deferred(lambda _: stop())

    def expire() -> None:
        if not result.called:
            result.errback(HttpTimeout(f"no complete answer within {timeout:g} s"))
        stop()

    def got_response(response):
        nonlocal reading_body
        reading_body = True
        finished: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(_BodyCollector(finished))
        return finished.addCallback(lambda data: HttpAnswer(response.code, response.headers, data))

    def finish(outcome):
        if timer.active():
            timer.cancel()
        if exchange.persistent and connections.closed:
            # Closed while this request was under way: its connection went back to the pool.
            connections.close()
        if not result.called:
            if isinstance(outcome, HttpAnswer):
                result.callback(outcome)
            else:
                result.errback(outcome)
        # else: timed out already; a late error is the abort's echo.

    timer = reactor.callLater(timeout, expire)
    request = agent.request(b"POST", url.encode("utf-8"), Headers(dict(headers)), FileBodyProducer(BytesIO(body)))
    request.addCallback(got_response)
    request.addBoth(finish)
    return result


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` (delta-seconds or an HTTP-date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def host_of(url: str) -> str:
    """``host:port`` of a URL, for messages (URLs of endpoints carry no PHI, but their queries might)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def describe_cause(error: BaseException) -> str:
    """A failed connection's cause in words with no data in them: the error's type, or OpenSSL's reason."""
    reasons = getattr(error, "reasons", None)  # ResponseFailed, ResponseNeverReceived: Failures inside
    if reasons:
        error = getattr(reasons[0], "value", reasons[0])
    if type(error).__module__.startswith("OpenSSL"):
        # OpenSSL's error queue: (library, function, reason) tuples, e.g. "certificate verify failed".
        found = [r[2] for r in (error.args[0] if error.args and isinstance(error.args[0], list) else ()) if len(r) > 2]
        return f"TLS: {found[0]}" if found else "TLS failed"
    return type(error).__name__


def connection_failure(failure, where: str) -> DeliveryFailed:
    """A retryable :class:`DeliveryFailed` for a failed exchange with ``where`` (a host:port), naming the cause."""
    if failure.check(HttpTimeout):
        return DeliveryFailed(f"{where}: {failure.getErrorMessage()}", permanent=False)
    return DeliveryFailed(f"{where}: connection failed ({describe_cause(failure.value)})", permanent=False)
