"""MLLP release 1 framing: ``<VT> message <FS><CR>``.

:class:`MLLPReceiver` has the shape of Twisted's ``LineReceiver``: it buffers in
``dataReceived``, calls :meth:`frameReceived` once per complete frame and
:meth:`frameLengthExceeded` when a frame grows past ``MAX_LENGTH``. It knows
nothing of HL7 beyond the framing bytes.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
FRAME_END = END_BLOCK + CARRIAGE_RETURN

#: Default largest frame accepted (1 MiB), not counting the framing bytes.
DEFAULT_MAX_LENGTH = 1024 * 1024
#: Default seconds from a frame's start byte to its end: 1 MiB at 140 kbit/s.
DEFAULT_FRAME_TIMEOUT = 60.0


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP framing bytes."""
    return START_BLOCK + message + FRAME_END


class MLLPReceiver(protocol.Protocol, TimeoutMixin):
    """Split a byte stream into MLLP frames.

    Bytes outside a frame (before ``<VT>``) are skipped and counted (logged
    once a connection); a frame longer than ``MAX_LENGTH`` ends the connection
    through :meth:`frameLengthExceeded`; a connection that sends nothing for
    ``idleTimeout`` seconds is closed, and so is one whose frame is not
    finished ``frameTimeout`` seconds after its start byte, however steadily
    it trickles in (:meth:`frameTimedOut`; ``None`` disables either).
    """

    MAX_LENGTH = DEFAULT_MAX_LENGTH
    #: How much of an oversized frame is handed to frameLengthExceeded, so the
    #: receiver can still read its MSH and say which message it refused.
    PREFIX_KEPT = 4096
    idleTimeout: float | None = 300.0
    frameTimeout: float | None = DEFAULT_FRAME_TIMEOUT

    _log = Logger()

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._inFrame = False
        self._searchFrom = 0
        # Set once a frame overflowed: the rest of that frame (and anything
        # after it) must not be read as new frames while the refusal goes out.
        self._discarding = False
        self.skippedBytes = 0
        # The deadline of the frame in progress: set only when a frame is
        # still unfinished at the end of a read (most arrive in one).
        self._frameDeadline = None

    def connectionMade(self) -> None:
        self.setTimeout(self.idleTimeout)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._discarding:
            return
        buf = self._buffer
        buf += data
        while buf and not self.transport.disconnecting:
            if not self._inFrame:
                start = buf.find(START_BLOCK)
                if start < 0:
                    self._skip(len(buf))
                    del buf[:]
                    return
                if start:
                    self._skip(start)
                del buf[: start + 1]
                self._inFrame = True
                self._searchFrom = 0
            end = buf.find(FRAME_END, self._searchFrom)
            if end < 0:
                if len(buf) > self.MAX_LENGTH + 1:
                    self._overflow()
                    return
                # The FS may be the last byte, with its CR still to come.
                self._searchFrom = max(0, len(buf) - 1)
                if self._frameDeadline is None and self.frameTimeout is not None:
                    self._frameDeadline = self.callLater(self.frameTimeout, self._frameDeadlinePassed)
                return
            if end > self.MAX_LENGTH:
                self._overflow(end)
                return
            message = bytes(buf[:end])
            del buf[: end + 2]
            self._inFrame = False
            self._cancelFrameDeadline()
            self.frameReceived(message)

    def _skip(self, count: int) -> None:
        # A stream of garbage must not be a stream of log lines: a factory that
        # counts (the server's) is told; otherwise the first skip of a connection is logged.
        noted = getattr(getattr(self, "factory", None), "bytesSkipped", None)
        if noted is not None:
            noted(_host(self.transport), count)
        elif not self.skippedBytes:
            self._log.warn(
                "skipped {count} bytes outside an MLLP frame from {peer} (further skips are counted, not logged)",
                count=count,
                peer=_peer(self.transport),
            )
        self.skippedBytes += count

    def _cancelFrameDeadline(self) -> None:
        if self._frameDeadline is not None:
            if self._frameDeadline.active():
                self._frameDeadline.cancel()
            self._frameDeadline = None

    def _frameDeadlinePassed(self) -> None:
        self._frameDeadline = None
        if not self._inFrame or self.transport.disconnecting:
            return
        self._log.warn(
            "MLLP frame from {peer} not finished {timeout:g} s after it began ({count} bytes); closing",
            peer=_peer(self.transport),
            timeout=self.frameTimeout,
            count=len(self._buffer),
        )
        self.frameTimedOut()

    def _overflow(self, end: int | None = None) -> None:
        # Never past the frame's end: what follows is framing or another message.
        keep = self.PREFIX_KEPT if end is None else min(end, self.PREFIX_KEPT)
        prefix = bytes(self._buffer[:keep])
        self._reset()
        self._discarding = True
        self.frameLengthExceeded(prefix)

    def _reset(self) -> None:
        del self._buffer[:]
        self._inFrame = False
        self._searchFrom = 0
        self._cancelFrameDeadline()

    @property
    def partialFrameLength(self) -> int:
        """Bytes of a frame begun but not ended (0 between frames)."""
        return len(self._buffer) if self._inFrame else 0

    def sendFrame(self, message: bytes) -> None:
        """Send one message, framed."""
        self.transport.write(frame(message))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        # A pending idle timer (or frame deadline) would otherwise outlive the connection.
        self.setTimeout(None)
        self._cancelFrameDeadline()

    def timeoutConnection(self) -> None:
        self._log.info("closing idle MLLP connection from {peer}", peer=_peer(self.transport))
        self.transport.loseConnection()

    def frameReceived(self, message: bytes) -> None:
        """Override: called with the bytes between ``<VT>`` and ``<FS><CR>``."""
        raise NotImplementedError

    def frameTimedOut(self) -> None:
        """Called when a frame is not finished ``frameTimeout`` seconds after its start; aborts by default.

        The frame cannot be answered; its bytes are still buffered
        (:attr:`partialFrameLength`) when the connection is lost. Aborted, not
        closed: a peer that trickles a frame may not read either.
        """
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def frameLengthExceeded(self, prefix: bytes) -> None:
        """Called when a frame grows past ``MAX_LENGTH``; closes by default.

        ``prefix`` is the start of the refused frame (at most ``PREFIX_KEPT``
        bytes); the rest of the connection's input is discarded.
        """
        self.transport.loseConnection()


def _host(transport) -> str:
    """The peer's host alone (a new connection from it is a new port)."""
    try:
        return str(transport.getPeer().host)
    except Exception:  # pragma: no cover - transports without a host
        return _peer(transport)


def _peer(transport) -> str:
    try:
        peer = transport.getPeer()
    except Exception:  # pragma: no cover - transports without a peer
        return "?"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)
