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


class _Oversized:
    """Stands in the answer queue for a frame refused for its size."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix


class MLLPServerProtocol(MLLPReceiver):
    """One MLLP connection on the listening side."""

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
        self._peer = "?"

    def connectionMade(self) -> None:
        super().connectionMade()
        self._peer = _peer(self.transport)

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
        if self.partialFrameLength:
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
