"""MLLP client: send a message, wait for its acknowledgement, over TCP or (mutual) TLS."""

from __future__ import annotations

from collections import deque

from OpenSSL import SSL
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint

from mllp.framing import DEFAULT_MAX_LENGTH, MLLPReceiver
from mllp.tls import client_options

__all__ = [
    "AckTimeout",
    "MLLPClientFactory",
    "MLLPClientProtocol",
    "client_endpoint",
    "client_options",
    "connect",
    "describe_loss",
    "send_message",
]


class AckTimeout(Exception):
    """No acknowledgement arrived in time."""


class MLLPClientProtocol(MLLPReceiver):
    """The sending side of one MLLP connection; one message in flight at a time."""

    idleTimeout = None

    def __init__(self, reactor=None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._waiting: deque[tuple[defer.Deferred, object]] = deque()
        self._lock = defer.DeferredLock()
        self._closed = False
        #: Fires (with None) once the connection is closed, e.g. after a TLS close_notify round.
        self.closed: defer.Deferred[None] = defer.Deferred()

    def send(self, message: bytes, timeout: float = 30.0) -> defer.Deferred[bytes]:
        """Send ``message`` and fire with the raw ACK bytes, or fail with :class:`AckTimeout`."""
        return self._lock.run(self._sendOne, message, timeout)

    def _sendOne(self, message: bytes, timeout: float) -> defer.Deferred[bytes]:
        if self._closed:
            return defer.fail(error.ConnectionDone("connection closed before sending"))
        d: defer.Deferred[bytes] = defer.Deferred()

        def expire() -> None:
            for i, (waiting, _) in enumerate(self._waiting):
                if waiting is d:
                    del self._waiting[i]
                    break
            # A late ACK would be taken for the next message's: close instead.
            self.transport.loseConnection()
            d.errback(AckTimeout(f"no ACK within {timeout:g} s"))

        call = self._reactor.callLater(timeout, expire)
        self._waiting.append((d, call))
        self.sendFrame(message)
        return d

    def frameReceived(self, message: bytes) -> None:
        if not self._waiting:
            return
        d, call = self._waiting.popleft()
        call.cancel()
        d.callback(message)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self._closed = True
        while self._waiting:
            d, call = self._waiting.popleft()
            call.cancel()
            d.errback(reason)
        self.closed.callback(None)


class MLLPClientFactory(protocol.Factory):
    """Factory for :class:`MLLPClientProtocol` (for use with endpoints)."""

    def __init__(self, reactor=None, maxLength: int = DEFAULT_MAX_LENGTH) -> None:
        self.reactor = reactor
        self.maxLength = maxLength

    def buildProtocol(self, addr) -> MLLPClientProtocol:
        p = MLLPClientProtocol(self.reactor)
        p.MAX_LENGTH = self.maxLength
        p.factory = self
        return p


def client_endpoint(reactor, host: str, port: int, tls=None, timeout: float = 30.0):
    """An endpoint to ``host:port``: plain TCP, or TLS with ``tls`` (from :func:`~mllp.tls.client_options`)."""
    if tls is None:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return SSL4ClientEndpoint(reactor, host, port, tls, timeout=timeout)


def describe_loss(reason: BaseException) -> str:
    """Why a connection was lost, in words: for a TLS alert, OpenSSL's reason (e.g. our certificate was refused)."""
    if isinstance(reason, SSL.Error):
        reasons = [str(t[-1]) for arg in reason.args if isinstance(arg, list) for t in arg if t]
        return "TLS: " + ("; ".join(reasons) or "handshake failed")
    return reason.__class__.__name__


def connect(endpoint, reactor=None) -> defer.Deferred[MLLPClientProtocol]:
    """Connect to ``endpoint`` (an ``IStreamClientEndpoint``) and fire with the protocol."""
    return endpoint.connect(MLLPClientFactory(reactor))


@defer.inlineCallbacks
def send_message(endpoint, message: bytes, timeout: float = 30.0, reactor=None):
    """Open a connection, send one message, return its ACK bytes, close."""
    client = yield connect(endpoint, reactor)
    try:
        ack = yield client.send(message, timeout)
    finally:
        client.transport.loseConnection()
    return ack
