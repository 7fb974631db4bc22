"""The MLLP forward channel: the v2 message as received, sent on to an HIE's MLLP listener.

One connection per attempt (optionally TLS with a client certificate); the
message goes out in one MLLP frame and the attempt waits for the ACK. What
the ACK means:

==========================  =============================================
answer                      what the attempt becomes
==========================  =============================================
AA / CA, MSA-2 = our MSH-10 sent
AE / CE                     retryable, or permanent with ``on_error = "dead"``
AR / CR                     permanent (the receiver refuses the message)
MSA-2 not our MSH-10        retryable (not the answer to this message)
not an ACK, no answer       retryable
==========================  =============================================

The destination's ``timeout`` bounds the whole exchange (connecting, TLS,
the ACK); when it runs out the connection is aborted.
"""

from __future__ import annotations

import re

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

from gateway.delivery.channels import (
    DeliveryFailed,
    MllpDestination,
    OutboundNotification,
    SendResult,
    client_tls,
    describe_cause,
)
from gateway.errors import MessageError
from gateway.header import read_msh
from mllp.framing import MLLPReceiver

__all__ = ["MllpForwardChannel", "ack_outcome", "read_ack"]

ACCEPTED = ("AA", "CA")
ERROR = ("AE", "CE")
REJECTED = ("AR", "CR")
_SEGMENTS = re.compile(r"\r\n|\r|\n")
_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,20}")


def read_ack(ack: bytes) -> tuple[str, str, str] | None:
    """(MSA-1, MSA-2, ERR-3.1 error code) of an ACK, or None when it is not one."""
    segments = [s for s in _SEGMENTS.split(ack.decode("latin-1")) if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        return None
    fs, component = segments[0][3], segments[0][4]
    msa = None
    error = ""
    for segment in segments[1:]:
        fields = segment.split(fs)
        if fields[0] == "MSA" and msa is None:
            msa = (fields[1] if len(fields) > 1 else "", fields[2] if len(fields) > 2 else "")
        elif fields[0] == "ERR" and not error and len(fields) > 3:
            error = fields[3].split(component, 1)[0]
    if msa is None:
        return None
    return msa[0].strip().upper(), msa[1].strip(), error


def ack_outcome(ack: bytes, control_id: str, on_error: str, where: str) -> str:
    """What the answer to the message with MSH-10 ``control_id`` means: a detail, or :class:`DeliveryFailed`."""
    read = read_ack(ack)
    if read is None:
        raise DeliveryFailed(f"the answer from {where} is not an HL7 ACK (no MSH and MSA)", permanent=False)
    code, acked, error = read
    if code not in ACCEPTED + ERROR + REJECTED:
        raise DeliveryFailed(f"the ACK from {where} has no known MSA-1 code", permanent=False)
    if acked != control_id:
        shown = acked if _SAFE.fullmatch(acked) else "another message"
        raise DeliveryFailed(f"the ACK from {where} is for {shown} (MSA-2), not {control_id} (MSH-10)", permanent=False)
    err = f", ERR-3 {error}" if error and _SAFE.fullmatch(error) else ""
    if code in ACCEPTED:
        return f"{code} from {where}"
    if code in ERROR:
        dead = on_error == "dead"
        raise DeliveryFailed(f"{code} from {where}{err}" + (" (on_error = dead)" if dead else ""), permanent=dead)
    raise DeliveryFailed(f"{code} from {where}{err}: the receiver refuses the message", permanent=True)


class _AckReader(MLLPReceiver):
    """The sending side of one forward: the first frame back is the answer."""

    # The channel's deadline bounds the exchange; the framer's own timers stay off.
    idleTimeout = None
    frameTimeout = None

    def __init__(self, answered: defer.Deferred[bytes]) -> None:
        super().__init__()
        self.answered = answered

    def frameReceived(self, message: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(message)

    def frameLengthExceeded(self, prefix: bytes) -> None:
        if not self.answered.called:
            self.answered.errback(DeliveryFailed("the answer is longer than an ACK can be", permanent=False))
        self.transport.abortConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        super().connectionLost(reason)
        if not self.answered.called:
            self.answered.errback(reason)


class MllpForwardChannel:
    """Forwards notifications' v2 messages to one MLLP destination (see the module docstring).

    Unreadable TLS files raise :class:`~gateway.errors.ConfigError` here.
    """

    def __init__(self, destination: MllpDestination, reactor) -> None:
        self.destination = destination
        self.reactor = reactor
        self.where = f"{destination.host}:{destination.port}"
        self._tls = client_tls(destination.tls) if destination.tls is not None else None

    def send(self, item: OutboundNotification) -> defer.Deferred[SendResult]:
        """Send ``item.original``; fire with a :class:`SendResult` or fail with :class:`DeliveryFailed`."""
        try:
            control_id = read_msh(item.original).control_id.strip()
        except MessageError as e:
            return defer.fail(DeliveryFailed(f"the message to forward cannot be read: {e}", permanent=True))
        if not control_id:
            return defer.fail(DeliveryFailed("the message to forward has no MSH-10", permanent=True))
        start = self.reactor.seconds()
        timeout = self.destination.timeout
        endpoint = HostnameEndpoint(self.reactor, self.destination.host, self.destination.port, timeout=timeout)
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls(self.destination.host), endpoint)
        answered: defer.Deferred[bytes] = defer.Deferred()
        connected: list[_AckReader] = []

        def stop() -> None:
            if connected:
                connected[0].transport.abortConnection()
            else:
                connecting.cancel()

        # Cancelling the result (the worker stopping) ends the exchange the same way.
        result: defer.Deferred[SendResult] = defer.Deferred(lambda _: stop())

        def expire() -> None:
            if not result.called:
                result.errback(DeliveryFailed(f"no ACK from {self.where} within {timeout:g} s", permanent=False))
            stop()

        def made(p: _AckReader):
            connected.append(p)
            p.sendFrame(item.original)
            return answered

        def judge(ack: bytes) -> SendResult:
            connected[0].transport.loseConnection()
            detail = ack_outcome(ack, control_id, self.destination.on_error, self.where)
            return SendResult(detail, None, self.reactor.seconds() - start)

        def failed(failure):
            if failure.check(DeliveryFailed):
                return failure
            cause = describe_cause(failure.value)
            return DeliveryFailed(f"{self.where}: connection failed before the ACK ({cause})", permanent=False)

        def finish(outcome):
            if timer.active():
                timer.cancel()
            if not result.called:
                if isinstance(outcome, SendResult):
                    result.callback(outcome)
                else:
                    result.errback(outcome)
            # else: timed out already; a late error is the abort's echo.

        timer = self.reactor.callLater(timeout, expire)
        connecting = endpoint.connect(protocol.Factory.forProtocol(lambda: _AckReader(answered)))
        connecting.addCallback(made)
        connecting.addCallback(judge)
        connecting.addErrback(failed)
        connecting.addBoth(finish)
        return result
