"""The Direct channel: the notification as secure email, S/MIME signed and encrypted, sent over SMTP.

Direct (the Applicability Statement for Secure Health Transport) sends
ordinary email between health care addresses, each message signed with the
sender's certificate and encrypted to the recipient's. Here the content is a
``multipart/mixed`` of the human-readable summary (``text/plain``) and the
Bundle (``application/fhir+json``, ``<notification id>.json``); it is signed
(SHA-256, detached ``multipart/signed``) and then encrypted (AES-256-CBC,
``application/pkcs7-mime; smime-type=enveloped-data``) to the recipient's
RSA certificate. Only the envelope's headers travel in clear: From, To, a
Subject with no patient data, Date and a Message-ID made from the
notification id, the same on every attempt so the recipient can drop
duplicates.

It goes to our SMTP relay (the HISP) with Twisted's ESMTP client, STARTTLS
required when the destination says so. A 5xx reply is permanent; a 4xx
reply, a refused or lost connection, or no answer within the destination's
``timeout`` (the whole exchange) is retryable.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.utils import formatdate
from io import BytesIO
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7
from twisted.internet import defer
from twisted.mail.smtp import ESMTPSenderFactory, SMTPClientError, TLSRequiredError

from gateway.delivery.channels import (
    DeliveryFailed,
    DirectDestination,
    OutboundNotification,
    SendResult,
    TlsClient,
    client_tls,
    describe_cause,
    same_public_key,
)
from gateway.errors import ConfigError

__all__ = ["SUBJECT", "DirectChannel", "direct_message", "message_id"]

#: The clear-text Subject: the envelope is not encrypted, so it names no patient and no event.
SUBJECT = "Encounter notification"
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ENHANCED = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3})\b")


def message_id(notification_id: str, domain: str) -> str:
    """The Message-ID of a notification's email: ``<notification id@sender's domain>``, stable across attempts."""
    return f"<{_ID_UNSAFE.sub('-', notification_id)}@{domain}>"


def direct_message(
    item: OutboundNotification,
    *,
    sender: str,
    recipient: str,
    sign_cert: x509.Certificate,
    sign_key,
    recipient_cert: x509.Certificate,
    date: float,
) -> bytes:
    """The whole email (headers and S/MIME body, ``\\n`` line ends as Twisted's SMTP client wants them)."""
    content = EmailMessage()
    content.set_content(item.summary or "Encounter notification: see the attached FHIR Bundle.", cte="quoted-printable")
    attachments = item.attachments or ((f"{item.id}.json", item.payload),)
    for name, data in attachments:
        content.add_attachment(
            data,
            maintype="application",
            subtype="fhir+json",
            filename=_ID_UNSAFE.sub("-", name.removesuffix(".json")) + ".json",
        )
    # CRLF line ends: the signature is over the canonical (RFC 5751) form.
    canonical = content.as_bytes(policy=policy.SMTP)
    signed = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(canonical)
        .add_signer(sign_cert, sign_key, hashes.SHA256())
        .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])
    )
    enveloped = (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(signed)
        .add_recipient(recipient_cert)
        .set_content_encryption_algorithm(algorithms.AES256)
        .encrypt(serialization.Encoding.SMIME, [])
    )
    domain = sender.rsplit("@", 1)[1]
    headers = (
        f"From: {sender}\n"
        f"To: {recipient}\n"
        f"Subject: {SUBJECT}\n"
        f"Date: {formatdate(date)}\n"
        f"Message-ID: {message_id(item.id, domain)}\n"
    )
    return headers.encode("ascii") + enveloped.replace(b"\r\n", b"\n")


def _load_cert(path: Path, key: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:
        raise ConfigError(key, f"{path} is not a PEM certificate") from None


def _load_key(path: Path, key: str):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, TypeError):
        raise ConfigError(key, f"{path} is not an unencrypted PEM private key") from None


def smtp_failure(failure, where: str) -> DeliveryFailed:
    """What a failed SMTP exchange means: a 5xx reply is permanent; 4xx and connection problems are retryable."""
    error = failure.value
    if isinstance(error, TLSRequiredError):
        return DeliveryFailed(f"{where} offers no STARTTLS and starttls = true", permanent=True, status=error.code)
    if isinstance(error, SMTPClientError) and 400 <= (error.code or 0) < 600:
        code = error.code
        # The reply's RFC 3463 status (5.1.1 ...); for a refused recipient it is in the RCPT reply.
        replies = [error.resp] + [reply for _, _, reply in error.addresses or ()]
        enhanced = ""
        for reply in replies:
            text = reply if isinstance(reply, bytes) else str(reply or "").encode("utf-8", "replace")
            found = _ENHANCED.match(text.strip())
            if found:
                enhanced = f" {found.group(1).decode('ascii')}"
                break
        return DeliveryFailed(f"SMTP {code}{enhanced} from {where}", permanent=code >= 500, status=code)
    cause = error.__cause__ if error.__cause__ is not None else error
    return DeliveryFailed(f"{where}: SMTP exchange failed ({describe_cause(cause)})", permanent=False)


class DirectChannel:
    """Sends notifications as Direct messages to one address through one SMTP relay (see the module docstring).

    The certificates and key are read here: an unreadable file, a key that
    does not match ``sign_cert``, or a recipient certificate without an RSA
    key raises :class:`~gateway.errors.ConfigError` naming the key.
    ``clock``: the wall clock for the Date header.
    """

    def __init__(self, destination: DirectDestination, reactor, *, clock: Callable[[], float] = time.time) -> None:
        self.destination = destination
        self.reactor = reactor
        self.clock = clock
        self.where = f"{destination.smtp_host}:{destination.smtp_port}"

        self._sign_cert = _load_cert(destination.sign_cert, destination.key_for("sign_cert"))
        self._sign_key = _load_key(destination.sign_key, destination.key_for("sign_key"))
        self._recipient_cert = _load_cert(destination.recipient_cert, destination.key_for("recipient_cert"))
        if not isinstance(self._sign_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(destination.key_for("sign_key"), "S/MIME signing needs an RSA or EC key")
        if not same_public_key(self._sign_key, self._sign_cert):
            raise ConfigError(destination.key_for("sign_key"), "the key does not match sign_cert")
        if not isinstance(self._recipient_cert.public_key(), rsa.RSAPublicKey):
            raise ConfigError(destination.key_for("recipient_cert"), "S/MIME encryption needs an RSA certificate")
        self._tls = None
        if destination.starttls:
            try:
                self._tls = client_tls(TlsClient(ca=destination.smtp_ca))
            except ConfigError as e:
                raise ConfigError(destination.key_for("smtp_ca"), e.reason) from None

    def message(self, item: OutboundNotification) -> bytes:
        """The email this channel sends for ``item`` (signed and encrypted; see :func:`direct_message`)."""
        return direct_message(
            item,
            sender=self.destination.sender,
            recipient=self.destination.recipient,
            sign_cert=self._sign_cert,
            sign_key=self._sign_key,
            recipient_cert=self._recipient_cert,
            date=self.clock(),
        )

    def send(self, item: OutboundNotification) -> defer.Deferred[SendResult]:
        """Sign, encrypt and send ``item``; fire with a :class:`SendResult` or fail with :class:`DeliveryFailed`."""
        start = self.reactor.seconds()
        try:
            data = self.message(item)
        except (ValueError, TypeError) as e:
            return defer.fail(DeliveryFailed(f"cannot build the S/MIME message ({type(e).__name__})", permanent=True))
        dest = self.destination
        timeout = dest.timeout
        factory = None
        connector = None

        def cancel(_: defer.Deferred) -> None:
            # As twisted.mail.smtp.sendmail cancels: no retry, and the connection goes now.
            factory.sendFinished = True
            if factory.currentProtocol is not None and factory.currentProtocol.transport is not None:
                factory.currentProtocol.transport.abortConnection()
            else:
                connector.disconnect()

        sent: defer.Deferred = defer.Deferred(cancel)
        factory = ESMTPSenderFactory(
            None,
            None,
            dest.sender,
            [dest.recipient],
            BytesIO(data),
            sent,
            retries=0,
            contextFactory=self._tls(dest.smtp_host) if self._tls is not None else None,
            heloFallback=True,
            requireAuthentication=False,
            requireTransportSecurity=dest.starttls,
            # Without a hostname Twisted does no opportunistic TLS: starttls = false is plain SMTP
            # (the message itself is encrypted end to end either way).
            hostname=dest.smtp_host if dest.starttls else None,
        )
        factory.domain = dest.sender_domain.encode("idna")
        connector = self.reactor.connectTCP(dest.smtp_host, dest.smtp_port, factory, timeout=timeout)
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            sent.cancel()

        timer = self.reactor.callLater(timeout, expire)

        def done(_):
            return SendResult(f"accepted by {self.where}", None, self.reactor.seconds() - start)

        def failed(failure):
            if failure.check(defer.CancelledError) and not timed_out:
                return failure  # cancelled by the caller (the worker stopping)
            if timed_out:
                raise DeliveryFailed(f"no complete SMTP exchange with {self.where} in {timeout:g} s", permanent=False)
            raise smtp_failure(failure, self.where)

        def settle(outcome):
            if timer.active():
                timer.cancel()
            return outcome

        sent.addCallbacks(done, failed)
        sent.addBoth(settle)
        return sent
