"""Every MLLP connection in the log: opened (peer, plain or TLS), the TLS client's certificate, closed.

:class:`IntakeServerFactory` is ``mllp.MLLPServerFactory`` building
:class:`LoggedServerProtocol`: the same protocol, with a log line at each end
of a connection and when its TLS handshake names the client. Only peers,
certificate subjects and counts are written; ``mllp/`` itself stays free of
Herald's log policy.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.logger import Logger

from mllp import MLLPServerFactory
from mllp.server import MLLPServerProtocol
from mllp.tls import peer_of, verified_certificate

__all__ = ["IntakeServerFactory", "LoggedServerProtocol"]


class LoggedServerProtocol(MLLPServerProtocol):
    """An MLLP server connection that logs its opening, its TLS client and its closing."""

    _connections = Logger(namespace="gateway.intake.connections")

    def connectionMade(self) -> None:
        super().connectionMade()
        self.frames = 0
        peer = peer_of(self.transport)
        self.peer_name = str(peer)  # said again when it closes, when the transport may no longer tell
        self._connections.info(
            "connection from {peer} opened ({transport})", peer=self.peer_name, transport="TLS" if peer.tls else "plain"
        )

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        certificate = verified_certificate(self.transport)
        self._connections.info(
            "connection from {peer}: TLS client {subject} ({certificate})",
            peer=self.peer_name,
            subject=certificate.common_name if certificate is not None else "(no certificate)",
            certificate=certificate.fingerprint if certificate is not None else "-",
        )

    def frameReceived(self, message: bytes) -> None:
        self.frames = getattr(self, "frames", 0) + 1
        super().frameReceived(message)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._connections.info(
            "connection from {peer} closed after {frames} frame(s)",
            peer=getattr(self, "peer_name", "?"),
            frames=getattr(self, "frames", 0),
        )
        super().connectionLost(reason)


class IntakeServerFactory(MLLPServerFactory):
    """The listeners' factory: :class:`mllp.MLLPServerFactory` with connections logged."""

    protocol = LoggedServerProtocol
    noisy = False  # "Starting factory ...": each connection's own lines say more
