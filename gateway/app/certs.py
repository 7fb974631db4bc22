"""Development TLS material: a private CA, a server certificate and client certificates.

For trying mutual TLS on one machine (``herald certs init``, the demo, the
tests). Never for production: real deployments use certificates from the
hospital's PKI. :func:`describe` reads any certificate (``herald certs show``)
and names it the way the sender allowlist does.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mllp.tls import PeerCertificate

__all__ = [
    "CERTS_DIR",
    "CertificateFacts",
    "DevCerts",
    "Issued",
    "describe",
    "issue",
    "make_ca",
    "make_dev_certs",
    "tls_config_lines",
]

#: Where ``herald certs init`` writes by default (the repository's certs/ holds only its README).
CERTS_DIR = Path("certs")
#: The client certificate made when no ``--client`` is given.
DEFAULT_CLIENT = "client"
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Herald development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(
    common_name: str = "Herald development CA", days: int = 365, now: datetime.datetime | None = None
) -> Issued:
    """A self-signed CA (ECDSA P-256) valid from five minutes before ``now`` for ``days``."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    common_name: str,
    role: str,
    names: tuple[str, ...] = (),
    days: int = 365,
    now: datetime.datetime | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by ``ca`` for ``role`` "server" or "client".

    ``names`` become subject alternative names (IP addresses or DNS names).
    ``not_before``/``not_after`` override the validity (tests make expired
    certificates with them).
    """
    usage = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}[role]
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class DevCerts:
    """The files ``make_dev_certs`` wrote."""

    directory: Path
    clients: tuple[str, ...]

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    def client(self, name: str = DEFAULT_CLIENT) -> tuple[Path, Path]:
        """(certificate, key) of the client certificate ``name``."""
        return self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"

    @property
    def files(self) -> list[Path]:
        found = [self.ca, self.directory / "ca-key.pem", self.server, self.server_key]
        for name in self.clients:
            found += self.client(name)
        return found


def planned_files(directory: Path, clients: tuple[str, ...] = (DEFAULT_CLIENT,)) -> list[Path]:
    """The files ``make_dev_certs`` would write (to check for ones it would replace)."""
    return DevCerts(directory, tuple(clients)).files


def make_dev_certs(
    directory: Path,
    hostnames: tuple[str, ...] = DEFAULT_HOSTNAMES,
    clients: tuple[str, ...] = (DEFAULT_CLIENT,),
    days: int = 365,
) -> DevCerts:
    """Write a CA, a server certificate for ``hostnames`` and one client certificate per name into ``directory``.

    Each client certificate's subject CN is its name, the identity a
    ``[[senders]]`` entry names. Keys are written with mode 0600.
    """
    for name in clients:
        if not _CLIENT_NAME.fullmatch(name) or name in ("ca", "ca-key", "server", "server-key"):
            raise ValueError(f"{name!r} is not a usable client name (letters, digits, '.', '_', '-'; not ca/server)")
    if not hostnames:
        raise ValueError("the server certificate needs at least one hostname")
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()
    ca = make_ca(days=days, now=now)
    made = DevCerts(directory, tuple(dict.fromkeys(clients)))
    _write(made.ca, ca.certificate_pem())
    _write_key(directory / "ca-key.pem", ca.key_pem())
    server = issue(ca, hostnames[0], "server", tuple(hostnames), days=days, now=now)
    _write(made.server, server.certificate_pem())
    _write_key(made.server_key, server.key_pem())
    for name in made.clients:
        client = issue(ca, name, "client", days=days, now=now)
        cert_path, key_path = made.client(name)
        _write(cert_path, client.certificate_pem())
        _write_key(key_path, client.key_pem())
    return made


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _write_key(path: Path, data: bytes) -> None:
    # Created 0600 (never readable by others, not even for a moment); an existing file is made 0600 too.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def tls_config_lines(made: DevCerts, port: int = 2575) -> list[str]:
    """The config a gateway and its senders need to use ``made`` (printed by ``herald certs init``)."""
    d = made.directory.resolve()
    lines = [
        "[server]",
        f'listen = ["tls:{port}:interface=127.0.0.1"]',
        "",
        "[tls]  # client certificates must be issued by ca",
        f'cert = "{d / "server.pem"}"',
        f'key = "{d / "server-key.pem"}"',
        f'ca = "{d / "ca.pem"}"',
    ]
    for name in made.clients:
        lines += [
            "",
            f"[[senders]]  # the sender (MSH-3, MSH-4) {name} may send as: edit to yours",
            'application = "EPIC"',
            'facility = "GENHOSP"',
            f'identities = ["{name}"]',
        ]
    return lines


# -- herald certs show ----------------------------------------------------------------


@dataclass(frozen=True)
class CertificateFacts:
    """What ``herald certs show`` prints about one certificate."""

    subject: str
    issuer: str
    names: tuple[str, ...]  # subject alternative names: "DNS:host", "IP:1.2.3.4", ...
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str
    kinds: tuple[str, ...]  # "CA", "server", "client"
    identities: tuple[str, ...]  # what a [[senders]] entry may name

    def lines(self, now: datetime.datetime | None = None) -> list[str]:
        now = now or _now()
        if now > self.not_after:
            status = "EXPIRED"
        elif now < self.not_before:
            status = "NOT YET VALID"
        else:
            status = f"valid, {(self.not_after - now).days} days left"
        return [
            f"subject:     {self.subject}",
            f"SANs:        {', '.join(self.names) or '(none)'}",
            f"issuer:      {self.issuer}" + ("  (self-signed)" if self.issuer == self.subject else ""),
            f"valid:       {self.not_before:%Y-%m-%d %H:%M:%S} to {self.not_after:%Y-%m-%d %H:%M:%S} UTC ({status})",
            f"SHA-256:     {self.fingerprint}",
            f"kind:        {' and '.join(self.kinds) or 'none stated (no CA flag, no server or client usage)'}",
            f"identities:  {', '.join(self.identities)}  (for [[senders]] identities)",
        ]


def describe(pem: bytes) -> list[CertificateFacts]:
    """The facts of each certificate in a PEM file (a chain or a bundle may hold several)."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError("no PEM certificate in the file") from None
    return [_facts(c) for c in certificates]


def _facts(cert: x509.Certificate) -> CertificateFacts:
    identity = PeerCertificate.of(cert)
    names: list[str] = []
    try:
        for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value:
            kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email"}.get(type(n), "URI")
            names.append(f"{kind}:{n.value}")
    except x509.ExtensionNotFound:
        pass
    kinds = []
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            kinds.append("CA")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH in usage:
            kinds.append("server")
        if ExtendedKeyUsageOID.CLIENT_AUTH in usage:
            kinds.append("client")
    except x509.ExtensionNotFound:
        if "CA" not in kinds:
            kinds += ["server", "client"]  # no EKU: good for any purpose
    return CertificateFacts(
        subject=identity.subject,
        issuer=identity.issuer,
        names=tuple(names),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=identity.fingerprint,
        kinds=tuple(kinds),
        identities=identity.identities,
    )
