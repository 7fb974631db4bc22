"""The sender allowlist: which connections may send as which MSH-3/MSH-4 sender.

Each ``[[senders]]`` entry binds a sender (sending application and facility)
to the client-certificate identities and/or source networks that may send for
it. A message claiming a sender its connection may not send for is rejected
on intake (AR/CR with an ERR segment), stored as rejected with the reason, and
audited. A sender with no entry is an *unknown sender*: rejected or accepted
per ``[security] unknown_senders``; when that is not set, accepted only on a
plain (``tcp:``) connection from a loopback address, rejected on TLS and on
plain connections from anywhere else.

Decisions are data (:class:`SenderRefusal`), never exceptions; this module
does no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.config import Config, SenderRule
from gateway.errors import MessageError
from gateway.header import MessageHeader

__all__ = ["ERR_SENDER_REFUSED", "SenderPolicy", "SenderRefusal", "SenderRefused", "peer_detail"]

#: HL7 table 0357 code for a refused sender: 103 "Table value not found": the
#: MSH-3/MSH-4 pair is not in the table of senders this connection may send for.
ERR_SENDER_REFUSED = "103"


@dataclass(frozen=True, slots=True)
class SenderRefusal:
    """Why a message's claimed sender was refused on its connection.

    ``answer`` goes to the sender in the ERR segment (it names the sender it
    claimed and nothing of the allowlist); ``reason`` is stored and audited.
    """

    sender: str
    answer: str
    reason: str


class SenderRefused(MessageError):
    """A refused sender as intake rejects it: the ERR segment says ``answer``, the log stores ``reason``."""

    def __init__(self, refusal: SenderRefusal) -> None:
        super().__init__(refusal.answer, ERR_SENDER_REFUSED, "MSH-3")
        self.refusal = refusal

    def __str__(self) -> str:
        return f"{self.location}: {self.refusal.reason}"


def peer_detail(peer) -> dict:
    """A connection's peer for an audit event: its address and, on TLS, the certificate's subject and fingerprint."""
    audit = getattr(peer, "audit", None)
    return audit() if audit is not None else {"peer": str(peer)}


class SenderPolicy:
    """Decides whether a connection may send as the sender a message claims."""

    def __init__(self, rules: tuple[SenderRule, ...] = (), unknown: str | None = None) -> None:
        self.rules = rules
        self.unknown = unknown

    @classmethod
    def from_config(cls, config: Config) -> SenderPolicy:
        return cls(config.senders, config.unknown_senders)

    def check(self, header: MessageHeader, peer) -> SenderRefusal | None:
        """None when ``peer`` may send as the message's MSH-3/MSH-4; else why not.

        ``peer`` is an ``mllp.Peer`` (address, TLS or not, the verified
        certificate); a plain string is a plain connection from that address.
        """
        application, facility = header.sending_application, header.sending_facility
        sender = f"{application}|{facility}"
        rules = [r for r in self.rules if _matches(r.application, application) and _matches(r.facility, facility)]
        host = getattr(peer, "host", None) or _host_of(str(peer))
        tls = bool(getattr(peer, "tls", False))
        certificate = getattr(peer, "certificate", None)
        # Words, not "APP|FAC": the ACK would have to escape the field separator.
        answer = f"sending application {application}, facility {facility} is not allowed on this connection"
        if not rules:
            if self._accepts_unknown(tls, host):
                return None
            how = "configured" if self.unknown else "the default on a TLS or non-loopback connection"
            return SenderRefusal(sender, answer, f"unknown sender {sender}: no [[senders]] entry ({how}: reject)")
        identities = {i.casefold() for i in certificate.identities} if certificate is not None else set()
        address = _address(host)
        for rule in rules:
            if rule.identities and not (rule.identities & identities):
                continue
            if rule.networks and (address is None or not any(address in n for n in rule.networks)):
                continue
            return None
        presented = "no certificate"
        if certificate is not None:
            presented = f"certificate {certificate.subject} ({certificate.fingerprint})"
        return SenderRefusal(
            sender,
            answer,
            f"sender {sender} is not allowed for this connection ({presented}, from {host}): "
            "no [[senders]] entry for it lists this identity and network",
        )

    def _accepts_unknown(self, tls: bool, host: str) -> bool:
        if self.unknown is not None:
            return self.unknown == "accept"
        address = _address(host)
        return not tls and address is not None and address.is_loopback


def _matches(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value


def _host_of(peer: str) -> str:
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; match it as IPv4.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address
