"""Mutual TLS for MLLP: listener and client options, and who is on the other end.

Transports and certificates only (no HL7, nothing of Herald). A listener made
with :func:`server_options` requires a client certificate that chains to the
given authorities, over TLS 1.2 or newer. The connection's verified
certificate reaches the receiver inside a :class:`Peer`; a handshake that fails
is explained by :func:`handshake_refusal` (no certificate, which check it
failed, which TLS version was refused).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

__all__ = [
    "TLS_VERSIONS",
    "Peer",
    "PeerCertificate",
    "client_options",
    "handshake_refusal",
    "peer_of",
    "server_options",
    "tls_connection",
]

#: The lowest TLS versions a listener may be configured to accept.
TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The identity a client certificate states: what a sender allowlist can bind to."""

    subject: str  # RFC 4514, e.g. "CN=epic-prod,O=General Hospital"
    issuer: str
    common_name: str
    dns_names: tuple[str, ...]
    fingerprint: str  # "sha256:" and 64 lowercase hex digits, over the DER certificate

    @classmethod
    def of(cls, certificate: x509.Certificate) -> PeerCertificate:
        """Read the identity of a ``cryptography`` certificate."""
        cns = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        try:
            sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(sans.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            dns = ()
        return cls(
            subject=certificate.subject.rfc4514_string(),
            issuer=certificate.issuer.rfc4514_string(),
            common_name=str(cns[0].value) if cns else "",
            dns_names=dns,
            fingerprint="sha256:" + certificate.fingerprint(hashes.SHA256()).hex(),
        )

    @property
    def identities(self) -> tuple[str, ...]:
        """Every name an allowlist entry may use for this certificate: CN, SAN DNS names, fingerprint."""
        return tuple(n for n in (self.common_name, *self.dns_names, self.fingerprint) if n)

    def audit(self) -> dict:
        """The certificate as an audit detail (no patient data in a certificate)."""
        detail = {"subject": self.subject, "issuer": self.issuer, "fingerprint": self.fingerprint}
        if self.dns_names:
            detail["dns_names"] = list(self.dns_names)
        return detail


class Peer(str):
    """The other end of one connection.

    As text it is ``host:port``, what the server logs and stores, so a Peer
    goes wherever a peer string went. It also says whether the connection is
    TLS and, once the handshake is done, carries the verified client
    certificate.
    """

    __slots__ = ("certificate", "host", "port", "tls")

    host: str
    port: int | None
    tls: bool
    certificate: PeerCertificate | None

    def __new__(
        cls, host: str, port: int | None = None, *, tls: bool = False, certificate: PeerCertificate | None = None
    ) -> Peer:
        self = super().__new__(cls, f"{host}:{port}" if port is not None else host)
        self.host, self.port, self.tls, self.certificate = host, port, tls, certificate
        return self

    def __reduce__(self):
        return _peer, (self.host, self.port, self.tls, self.certificate)

    def verified(self, certificate: PeerCertificate | None) -> Peer:
        """This peer with the certificate its TLS handshake verified."""
        return Peer(self.host, self.port, tls=True, certificate=certificate)

    def audit(self) -> dict:
        """The peer as an audit detail: address, and the certificate's subject and fingerprint when there is one."""
        detail: dict = {"peer": str(self), "tls": self.tls}
        if self.certificate is not None:
            detail["certificate"] = self.certificate.audit()
        return detail


def _peer(host, port, tls, certificate) -> Peer:
    return Peer(host, port, tls=tls, certificate=certificate)


def peer_of(transport) -> Peer:
    """The peer of ``transport`` as known before any TLS handshake (address, and whether it is TLS)."""
    try:
        address = transport.getPeer()
    except Exception:  # pragma: no cover - transports without a peer
        return Peer("?")
    host = getattr(address, "host", None)
    tls = tls_connection(transport) is not None
    if host is None:
        return Peer(str(address), tls=tls)
    return Peer(host, getattr(address, "port", None), tls=tls)


def tls_connection(transport) -> SSL.Connection | None:
    """The OpenSSL connection under ``transport``, or None for a plain one."""
    get = getattr(transport, "getHandle", None)
    try:
        handle = get() if get is not None else None
    except Exception:  # pragma: no cover - a transport without a handle
        return None
    return handle if isinstance(handle, SSL.Connection) else None


def verified_certificate(transport) -> PeerCertificate | None:
    """The client certificate of a TLS transport whose handshake completed."""
    connection = tls_connection(transport)
    cert = connection.get_peer_certificate() if connection is not None else None
    return PeerCertificate.of(cert.to_cryptography()) if cert is not None else None


# -- the listener ------------------------------------------------------------------


def server_options(
    certificate_pem: bytes, key_pem: bytes, authorities_pem: bytes, minimum: str = "1.2"
) -> ssl.CertificateOptions:
    """Options for a listener that requires a client certificate issued by one of ``authorities_pem``.

    ``certificate_pem`` is the server certificate, optionally followed by its
    intermediates; ``authorities_pem`` a bundle of one or more CA certificates.
    TLS versions below ``minimum`` ("1.2" or "1.3") are refused. Raises
    :class:`ValueError` saying what is wrong with the material.
    """
    chain = _certificates(certificate_pem, "the server certificate file")
    authorities = _certificates(authorities_pem, "the CA bundle")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the key file holds no unencrypted PEM private key ({e})") from None
    if minimum not in TLS_VERSIONS:
        raise ValueError(f"{minimum!r} is not a TLS version Herald accepts as the minimum ({', '.join(TLS_VERSIONS)})")
    options = ssl.CertificateOptions(
        # cryptography objects: pyOpenSSL takes them directly (its own X509/PKey are deprecated there).
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        trustRoot=ssl.trustRootFromCertificates(_twisted(authorities)),
        raiseMinimumTo=TLS_VERSIONS[minimum],
    )
    try:
        context = options.getContext()  # the context every connection of this listener shares
    except SSL.Error as e:
        raise ValueError(f"the key does not belong to the server certificate ({_openssl_reasons(e)})") from None
    # Same checks as Twisted's (the mode it set), plus a note of what each connection presented.
    context.set_verify(context.get_verify_mode(), _note_verification)
    return options


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem)
    except ValueError:
        found = []
    if not found:
        raise ValueError(f"{what} holds no PEM certificate")
    return found


def _twisted(certificates: list[x509.Certificate]) -> list[ssl.Certificate]:
    return [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates]


#: What each TLS connection's certificate check saw, until the connection is gone.
_checked: weakref.WeakKeyDictionary[SSL.Connection, dict] = weakref.WeakKeyDictionary()


def _note_verification(connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    seen = _checked.setdefault(connection, {})
    if depth == 0:
        seen["certificate"] = cert.to_cryptography()
    if not ok and "error" not in seen:
        seen["error"] = _VERIFY_ERRORS.get(errno, f"certificate check failed (OpenSSL verify error {errno})")
    return bool(ok)


#: OpenSSL's X509_V_ERR_* codes a client certificate most often fails with, in plain words.
_VERIFY_ERRORS = {
    2: "the issuer's certificate is unknown",
    7: "the certificate's signature does not verify",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed",
    19: "the chain ends in a self-signed certificate that is not a trusted CA",
    20: "the certificate was not issued by a trusted CA",
    21: "the certificate was not issued by a trusted CA",
    22: "the certificate chain is too long",
    23: "the certificate is revoked",
    24: "an issuer in the chain is not a CA",
    26: "the certificate is not for client authentication",
}

#: OpenSSL reasons for a failed handshake, in plain words (matched as substrings, in this order).
_HANDSHAKE_REASONS = (
    ("peer did not return a certificate", "no client certificate was presented"),
    ("certificate required", "no client certificate was presented"),
    ("unsupported protocol", "the client offered only TLS versions below the listener's minimum"),
    ("no protocols available", "the client offered only TLS versions below the listener's minimum"),
    ("protocol version", "the client offered only TLS versions below the listener's minimum"),
    ("http request", "the client spoke plain text (not TLS) to a TLS listener"),
    ("wrong version number", "the client spoke plain text (not TLS) to a TLS listener"),
    ("packet length too long", "the client spoke plain text (not TLS) to a TLS listener"),
    ("no shared cipher", "no cipher suite in common with the client"),
)


def handshake_refusal(transport, reason) -> tuple[str, PeerCertificate | None, str] | None:
    """Why a TLS connection closed before its handshake completed, or None when it was not refused.

    ``reason`` is the Failure its ``connectionLost`` got. Returns (the reason
    in plain words, the certificate the client presented if any, OpenSSL's
    own words). A client that simply went away (no TLS error) is not a
    refusal: None.
    """
    error = getattr(reason, "value", reason)
    if not isinstance(error, SSL.Error):
        return None
    connection = tls_connection(transport)
    seen = _checked.pop(connection, {}) if connection is not None else {}
    raw = _openssl_reasons(error)
    certificate = PeerCertificate.of(seen["certificate"]) if "certificate" in seen else None
    if "error" in seen:
        return f"client certificate refused: {seen['error']}", certificate, raw
    lowered = raw.lower()
    for needle, words in _HANDSHAKE_REASONS:
        if needle in lowered:
            return words, certificate, raw
    return f"TLS handshake failed: {raw or error.__class__.__name__}", certificate, raw


def _openssl_reasons(error: Exception) -> str:
    """OpenSSL's reason strings from an ``SSL.Error`` (its args hold (library, function, reason) tuples)."""
    parts = []
    for arg in error.args:
        if isinstance(arg, list):
            parts += [str(t[-1]) for t in arg if isinstance(t, tuple) and t]
        elif arg:
            parts.append(str(arg))
    return "; ".join(p for p in parts if p)


# -- the client --------------------------------------------------------------------


def client_options(
    server_name: str, authorities_pem: bytes, certificate_pem: bytes | None = None, key_pem: bytes | None = None
):
    """Client TLS for ``server_name`` (checked against the server's certificate), trusting ``authorities_pem``.

    With ``certificate_pem`` and ``key_pem`` the client presents that
    certificate (what a mutual-TLS listener requires).
    """
    trust = ssl.trustRootFromCertificates(_twisted(_certificates(authorities_pem, "the CA file")))
    client = None
    if certificate_pem is not None:
        if key_pem is None:
            raise ValueError("a client certificate needs its key")
        client = ssl.PrivateCertificate.loadPEM(certificate_pem + b"\n" + key_pem)
    return ssl.optionsForClientTLS(server_name, trustRoot=trust, clientCertificate=client)
