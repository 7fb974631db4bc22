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
from twisted.logger import Logger

from mllp.framing import DEFAULT_MAX_LENGTH, MLLPReceiver, _peer


class FrameReceiver(TypingProtocol):
    """What the MLLP server needs from the application behind it."""

    def frameReceived(self, message: bytes, peer: str) -> defer.Deferred[bytes] | bytes:
        """Handle one framed message; return (a Deferred of) the ACK bytes."""

    def frameTooLong(self, prefix: bytes, peer: str) -> defer.Deferred[bytes | None] | bytes | None:
        """A frame passed the size limit; return a NAK to send before closing, or None."""

    def frameIncomplete(self, partial: bytes, peer: str) -> None:
        """The connection closed in the middle of a frame."""


class MLLPServerProtocol(MLLPReceiver):
    """One MLLP connection on the listening side."""

    #: Frames read but not yet answered before reading is paused.
    MAX_PENDING = 64

    _log = Logger()

    def __init__(self, receiver: FrameReceiver) -> None:
        super().__init__()
        self.receiver = receiver
        self._pending: deque[bytes] = deque()
        self._busy = False
        self._paused = False
        self._peer = "?"

    def connectionMade(self) -> None:
        super().connectionMade()
        self._peer = _peer(self.transport)

    def frameReceived(self, message: bytes) -> None:
        self._pending.append(message)
        if len(self._pending) >= self.MAX_PENDING and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        if not self._busy:
            self._next()

    def _next(self) -> None:
        while self._pending and not self.transport.disconnecting:
            message = self._pending.popleft()
            try:
                result = self.receiver.frameReceived(message, self._peer)
            except Exception:
                self._log.failure("MLLP receiver raised; closing connection")
                self.transport.loseConnection()
                return
            if isinstance(result, defer.Deferred):
                self._busy = True
                result.addCallbacks(self._answer, self._failed)
                return
            self._write(result)
        self._busy = False
        if self._paused and not self.transport.disconnecting:
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
        # Stop reading the rest of the oversized frame; answer, then close.
        self.transport.pauseProducing()
        d = defer.maybeDeferred(self.receiver.frameTooLong, prefix, self._peer)

        def close(nak: bytes | None) -> None:
            if nak is not None:
                self.sendFrame(nak)
            self.transport.loseConnection()

        d.addCallbacks(close, lambda f: self.transport.loseConnection())

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.setTimeout(None)
        partial = self.partialFrameLength
        if partial:
            try:
                self.receiver.frameIncomplete(bytes(self._buffer), self._peer)
            except Exception:
                self._log.failure("recording an incomplete frame failed")


class MLLPServerFactory(protocol.Factory):
    """Builds :class:`MLLPServerProtocol` instances sharing one receiver."""

    protocol = MLLPServerProtocol

    def __init__(
        self,
        receiver: FrameReceiver,
        maxLength: int = DEFAULT_MAX_LENGTH,
        idleTimeout: float | None = 300.0,
        reactor=None,
    ) -> None:
        self.receiver = receiver
        self.maxLength = maxLength
        self.idleTimeout = idleTimeout
        self.reactor = reactor

    def buildProtocol(self, addr) -> MLLPServerProtocol:
        p = self.protocol(self.receiver)
        p.factory = self
        p.MAX_LENGTH = self.maxLength
        p.idleTimeout = self.idleTimeout
        if self.reactor is not None:
            p.callLater = self.reactor.callLater
        return p
