"""MLLP server protocol and factory.

The server hands each frame to a *receiver* (an object providing
:class:`FrameReceiver`) and writes back whatever acknowledgement the receiver's
Deferred fires with. Frames on one connection are answered in the order they
arrived, one at a time, so a receiver may take its time (a disk commit) without
reordering ACKs.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol as TypingProtocol

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

from mllp.framing import DEFAULT_FRAME_TIMEOUT, DEFAULT_MAX_LENGTH, MLLPReceiver
from mllp.tls import Peer, PeerCertificate, handshake_refusal, peer_of, verified_certificate


class FrameReceiver(TypingProtocol):
    """What the MLLP server needs from the application behind it.

    ``peer`` is a :class:`~mllp.tls.Peer`: the text ``host:port``, with the
    verified client certificate on a TLS connection. A receiver may also
    have ``connectionRefused(peer, reason, certificate)``, called when a TLS
    client is refused during the handshake (no frame was read).
    """

    def frameReceived(self, message: bytes, peer: str) -> defer.Deferred[bytes] | bytes:
        """Handle one framed message; return (a Deferred of) the ACK bytes."""

    def frameTooLong(self, prefix: bytes, peer: str) -> defer.Deferred[bytes | None] | bytes | None:
        """A frame passed the size limit; return a NAK to send before closing, or None."""

    def frameIncomplete(self, partial: bytes, peer: str) -> None:
        """The connection closed in the middle of a frame."""


class _Oversized:
    """Stands in the answer queue for a frame refused for its size."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix


@implementer(IHandshakeListener)
class MLLPServerProtocol(MLLPReceiver):
    """One MLLP connection on the listening side (plain, or TLS under a ``TLSMemoryBIOProtocol``).

    On TLS, no frame arrives before the handshake completes; the peer then
    carries the verified client certificate. A handshake that fails (no
    certificate, an untrusted or expired one, an old TLS version) is logged
    with the reason and reported to the receiver's ``connectionRefused``.
    """

    #: Frames read but not yet answered before reading is paused.
    MAX_PENDING = 64

    _log = Logger()

    def __init__(self, receiver: FrameReceiver) -> None:
        super().__init__()
        self.receiver = receiver
        self._pending: deque[bytes | _Oversized] = deque()
        self._busy = False
        self._running = False
        self._paused = False
        self._peer = Peer("?")
        self._handshakeDone = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._peer = peer_of(self.transport)
        self._handshakeDone = not self._peer.tls

    def handshakeCompleted(self) -> None:
        """The TLS handshake succeeded: the peer's certificate was verified against the listener's CAs."""
        self._handshakeDone = True
        self._peer = self._peer.verified(verified_certificate(self.transport))

    def frameReceived(self, message: bytes) -> None:
        self._pending.append(message)
        if len(self._pending) >= self.MAX_PENDING and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._next()

    def _next(self) -> None:
        # A loop, not recursion: a receiver whose Deferreds have already fired
        # answers inside addCallbacks, which calls back into _next.
        if self._running:
            return
        self._running = True
        try:
            while self._pending and not self._busy and not self.transport.disconnecting:
                item = self._pending.popleft()
                if isinstance(item, _Oversized):
                    self._refuse(item.prefix)
                    return
                try:
                    result = self.receiver.frameReceived(item, self._peer)
                except Exception:
                    self._log.failure("MLLP receiver raised; closing connection")
                    self.transport.loseConnection()
                    return
                if isinstance(result, defer.Deferred):
                    self._busy = True
                    result.addCallbacks(self._answer, self._failed)
                else:
                    self._write(result)
        finally:
            self._running = False
        if not self._pending and self._paused and not self.transport.disconnecting:
            self._paused = False
            self.transport.resumeProducing()

    def _write(self, ack: bytes | None) -> None:
        if ack is not None and not self.transport.disconnecting:
            self.sendFrame(ack)

    def _answer(self, ack: bytes | None) -> None:
        self._write(ack)
        self._busy = False
        self._next()

    def _failed(self, failure) -> None:
        self._log.failure("MLLP receiver failed; closing connection", failure)
        self._busy = False
        self.transport.loseConnection()

    def frameLengthExceeded(self, prefix: bytes) -> None:
        self._log.warn(
            "MLLP frame from {peer} exceeds {limit} bytes; refusing it and closing",
            peer=self._peer,
            limit=self.MAX_LENGTH,
        )
        # Stop reading the rest of the oversized frame. The refusal waits its
        # turn behind the frames before it, so their ACKs still go out first.
        self.transport.pauseProducing()
        self._pending.append(_Oversized(prefix))
        self._next()

    def _refuse(self, prefix: bytes) -> None:
        self._busy = True
        d = defer.maybeDeferred(self.receiver.frameTooLong, prefix, self._peer)

        def close(nak: bytes | None) -> None:
            self._write(nak)
            self.transport.loseConnection()

        def failed(failure) -> None:
            self._log.failure("refusing an oversized frame failed; closing connection", failure)
            self.transport.loseConnection()

        d.addCallbacks(close, failed)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        super().connectionLost(reason)
        if not self._handshakeDone:
            self._handshakeFailed(reason)
        if self.factory is not None:
            self.factory.connectionClosed(self)
        if self.partialFrameLength:
            try:
                self.receiver.frameIncomplete(bytes(self._buffer), self._peer)
            except Exception:
                self._log.failure("recording an incomplete frame failed")

    def _handshakeFailed(self, reason) -> None:
        refusal = handshake_refusal(self.transport, reason)
        if refusal is None:
            # Gone before a TLS error: a port check, a client that gave up, or our idle timeout.
            self._log.info("TLS connection from {peer} closed before its handshake completed", peer=self._peer)
            return
        why, certificate, _ = refusal
        self._log.warn(
            "refused TLS connection from {peer}: {reason}{certificate}",
            peer=self._peer,
            reason=why,
            certificate=_described(certificate),
        )
        report = getattr(self.receiver, "connectionRefused", None)
        if report is not None:
            try:
                report(self._peer, why, certificate)
            except Exception:
                self._log.failure("recording a refused TLS connection failed")


def _described(certificate: PeerCertificate | None) -> str:
    if certificate is None:
        return ""
    return f" (certificate {certificate.subject}, issuer {certificate.issuer}, {certificate.fingerprint})"


class _Refused(protocol.Protocol):
    """A connection over a cap: closed as soon as it is made (under TLS too, where None cannot be returned)."""

    def connectionMade(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()


class MLLPServerFactory(protocol.Factory):
    """Builds :class:`MLLPServerProtocol` instances sharing one receiver.

    At most ``maxConnections`` connections are open at once, and at most
    ``maxConnectionsPerPeer`` from one peer host (``None``: no cap); a
    connection over either is closed at once. Refusals (and bytes skipped
    outside frames) are logged at most once every
    :attr:`REFUSAL_LOG_INTERVAL` seconds, with the counts since the last line.
    """

    protocol = MLLPServerProtocol
    REFUSAL_LOG_INTERVAL = 10.0

    _log = Logger()

    def __init__(
        self,
        receiver: FrameReceiver,
        maxLength: int = DEFAULT_MAX_LENGTH,
        idleTimeout: float | None = 300.0,
        reactor=None,
        frameTimeout: float | None = DEFAULT_FRAME_TIMEOUT,
        maxConnections: int | None = None,
        maxConnectionsPerPeer: int | None = None,
    ) -> None:
        self.receiver = receiver
        self.maxLength = maxLength
        self.idleTimeout = idleTimeout
        self.reactor = reactor
        self.frameTimeout = frameTimeout
        self.maxConnections = maxConnections
        self.maxConnectionsPerPeer = maxConnectionsPerPeer
        #: Open connections, in all and per peer host.
        self.connections = 0
        self.connectionsByPeer: dict[str, int] = {}
        self._open: dict[protocol.Protocol, str] = {}
        #: Refused connections and skipped bytes not yet logged: {(what, peer host, cap): count}.
        self._unlogged: dict[tuple[str, str, str], int] = {}
        self._loggedAt: float | None = None

    def buildProtocol(self, addr) -> protocol.Protocol:
        host = getattr(addr, "host", None) or str(addr)
        cap = None
        perPeer = self.maxConnectionsPerPeer
        if self.maxConnections is not None and self.connections >= self.maxConnections:
            cap = f"{self.maxConnections} connections in all"
        elif perPeer is not None and self.connectionsByPeer.get(host, 0) >= perPeer:
            cap = f"{perPeer} connections from one peer"
        if cap is not None:
            self._refused(host, cap)
            p = _Refused()
            p.factory = self
            return p
        p = self.protocol(self.receiver)
        p.factory = self
        p.MAX_LENGTH = self.maxLength
        p.idleTimeout = self.idleTimeout
        p.frameTimeout = self.frameTimeout
        if self.reactor is not None:
            p.callLater = self.reactor.callLater
        self.connections += 1
        self.connectionsByPeer[host] = self.connectionsByPeer.get(host, 0) + 1
        self._open[p] = host
        return p

    def connectionClosed(self, p: protocol.Protocol) -> None:
        """A connection this factory built has ended: it no longer counts against the caps."""
        host = self._open.pop(p, None)
        if host is None:
            return
        self.connections -= 1
        left = self.connectionsByPeer[host] - 1
        if left:
            self.connectionsByPeer[host] = left
        else:
            del self.connectionsByPeer[host]

    def _seconds(self) -> float:
        if self.reactor is not None:
            return self.reactor.seconds()
        from twisted.internet import reactor

        return reactor.seconds()

    def _refused(self, host: str, cap: str) -> None:
        self._note(("refused", host, cap), 1)

    def bytesSkipped(self, host: str, count: int) -> None:
        """Bytes outside a frame on a connection from ``host``: counted, and logged at the refusals' pace."""
        self._note(("skipped", host, ""), count)

    def _note(self, key: tuple[str, str, str], count: int) -> None:
        # One rate for all of the listener's noise: the first line at once, then
        # at most one a REFUSAL_LOG_INTERVAL, each with the counts since the last.
        self._unlogged[key] = self._unlogged.get(key, 0) + count
        now = self._seconds()
        if self._loggedAt is None or now - self._loggedAt >= self.REFUSAL_LOG_INTERVAL:
            self._loggedAt = now
            self._logNoise()

    def _logNoise(self) -> None:
        noise, self._unlogged = self._unlogged, {}
        for (what, host, cap), count in sorted(noise.items()):
            if what == "refused":
                self._log.warn(
                    "refused {count} MLLP connection(s) from {peer}: over the cap of {cap}",
                    count=count,
                    peer=host,
                    cap=cap,
                )
            else:
                self._log.warn("skipped {count} bytes outside MLLP frames from {peer}", count=count, peer=host)

    def stopFactory(self) -> None:
        # What was counted since the last line is not lost when the listener stops.
        if self._unlogged:
            self._logNoise()
