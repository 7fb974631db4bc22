"""Development TLS material: a private CA, a server certificate and a client certificate.

For trying TLS (and mutual TLS) listeners on one machine. Never for
production: real deployments use certificates from the hospital's PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Herald development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_dev_certs(
    directory: Path, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 365
) -> list[Path]:
    """Write a CA, a server and a client certificate (ECDSA P-256) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Herald development CA"))
        .issuer_name(_name("Herald development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key, server_cert = leaf(hostnames[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key, client_cert = leaf("herald-dev-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    _write_key(directory / "ca-key.pem", ca_key)
    (directory / "server.pem").write_bytes(server_cert.public_bytes(pem))
    _write_key(directory / "server-key.pem", server_key)
    (directory / "client.pem").write_bytes(client_cert.public_bytes(pem))
    _write_key(directory / "client-key.pem", client_key)
    return [directory / f for f in FILES]


def server_endpoint(directory: Path, port: int, interface: str = "127.0.0.1") -> str:
    """The ``ssl:`` endpoint string for a listener using the files in ``directory``."""
    d = directory.resolve()
    spec = (
        f"ssl:{port}:interface={interface}:privateKey={_esc(d / 'server-key.pem')}:"
        f"certKey={_esc(d / 'server.pem')}:extraCertChain={_esc(d / 'ca.pem')}"
    )
    return spec


def _esc(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
