"""Intake: the MLLP receiver behind the listener.

For each frame: read the MSH, store the raw bytes and header fields, wait for
the commit, then answer. Nothing else happens on the connection's path; the
pipeline picks stored messages up later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger

from gateway.config import Config
from gateway.errors import MessageError
from gateway.header import (
    ERR_INTERNAL,
    ERR_VALUE_TOO_LONG,
    MessageHeader,
    control_id_guess,
    read_header,
    read_header_leniently,
)
from gateway.intake.ack import ACCEPTED, ERROR, REJECTED, AckBuilder, ack_code, should_acknowledge
from gateway.intake.rejections import RejectionSampler
from gateway.intake.senders import SenderPolicy, SenderRefused, peer_detail
from gateway.limits import LimitExceeded, Limits, scan
from gateway.records import RECEIVED, IntakeRecord, IntakeResult
from gateway.records import REJECTED as STATE_REJECTED
from gateway.store import Store


class IntakeWatch(Protocol):
    """What intake tells the metrics of (``gateway.app.metrics.GatewayMetrics``); no patient data passes."""

    def message_received(self, header: MessageHeader, duplicate: bool = False) -> None: ...

    def ack_sent(self, header: MessageHeader | None, code: str) -> None: ...

    def frame_rejected(self, header: MessageHeader | None, error: str) -> None: ...

    def tls_refused(self, reason: str) -> None: ...


class Intake:
    """Stores each frame durably before it is acknowledged (provides ``mllp.FrameReceiver``).

    Every accepted message is logged (id, control id, sender, type, state, ACK
    code): header fields and codes, never the message's content.

    With a ``reactor``, what follows a stored message's ACK (the log line, the
    metrics, waking the pipeline) is done in the reactor's next turn, after
    the ACK has gone out: at one connection the sender's next message is then
    already on its way while it is done. Without one (a test, a tool), it is
    done before the ACK is returned. The ``ack-sent`` audit event is queued
    at once either way (it rides the store's next commit): it must not be
    lost to a stop between the two turns.
    """

    _log = Logger()

    def __init__(
        self,
        store: Store,
        acks: AckBuilder | None = None,
        on_stored: Callable[[], None] | None = None,
        max_length: int = Config.max_frame_bytes,
        limits: Limits = Config.limits,
        rejections: RejectionSampler | None = None,
        rejected_bytes_kept: int = Config.rejected_bytes_kept,
        senders: SenderPolicy | None = None,
        watch: IntakeWatch | None = None,
        reactor=None,
    ) -> None:
        self.store = store
        self.acks = acks or AckBuilder()
        self.on_stored = on_stored or (lambda: None)
        self.max_length = max_length
        self.limits = limits
        #: Which rejected frames are stored and logged (all of them unless the sampler runs).
        self.rejections = rejections or RejectionSampler(store)
        self.rejected_bytes_kept = rejected_bytes_kept
        #: The sender allowlist (None: any connection may send as any sender; make_service always sets it).
        self.senders = senders
        #: Told of every message, ACK and refusal (the gateway's metrics); None: nobody.
        self.watch = watch
        self._reactor = reactor
        #: Stored messages answered in this turn whose bookkeeping waits for the next (see the class).
        self._answered: list[tuple[IntakeResult, MessageHeader, str | None]] = []
        self._bookkeeping = None

    def frameReceived(self, message: bytes, peer: str) -> defer.Deferred[bytes | None]:
        """Store ``message``; fire with the ACK (or ``None`` when MSH-15 asks for none)."""
        try:
            header = read_header(message)
            scan(message, self.limits, header)
            self._check_sender(header, peer)  # after the limits: the sender's fields are bounded
        except MessageError as e:
            return self._reject(message, peer, e)
        enhanced = header.enhanced_mode
        record = IntakeRecord(
            raw=message,
            peer=peer,
            state=RECEIVED,
            ack_code=ack_code(ACCEPTED, enhanced),
            sending_application=header.sending_application,
            sending_facility=header.sending_facility,
            message_type=header.message_type,
            trigger_event=header.trigger_event,
            control_id=header.control_id,
            version=header.version,
            processing_id=header.processing_id,
            accept_ack_type=header.accept_ack_type,
            application_ack_type=header.application_ack_type,
            charset=header.charset,
        )
        d = self.store.record_frame(record)
        d.addCallbacks(self._stored, self._not_stored, callbackArgs=(header,), errbackArgs=(header,))
        return d

    def _stored(self, result: IntakeResult, header: MessageHeader) -> bytes | None:
        # The ACK's code, None when MSH-15 asks for no ACK.
        code = ack_code(ACCEPTED, header.enhanced_mode) if should_acknowledge(header, ACCEPTED) else None
        ack = None
        if code is not None:
            ack = self.acks.build(header, ACCEPTED)
            self.store.record_ack_sent(result.message_id, code)
        if self._reactor is None:
            self._after_ack(result, header, code)
        else:
            self._answered.append((result, header, code))
            if self._bookkeeping is None:
                self._bookkeeping = self._reactor.callLater(0, self._after_acks)
        return ack

    def _after_acks(self) -> None:
        self._bookkeeping = None
        answered, self._answered = self._answered, []
        for result, header, code in answered:
            try:
                self._after_ack(result, header, code)
            except Exception:  # one message's bookkeeping does not cost the others theirs
                self._log.failure("intake's bookkeeping failed for message {id}", id=result.message_id)

    def _after_ack(self, result: IntakeResult, header: MessageHeader, code: str | None) -> None:
        """A stored message's log line and metrics (``code``: its ACK's, None for none), and the pipeline woken."""
        duplicate = result.duplicate_of is not None
        if not duplicate:
            try:
                self.on_stored()
            except Exception:
                # The message is committed: it must still be acknowledged.
                self._log.failure("on_stored hook failed after message {id} was stored", id=result.message_id)
        self._log.info(
            "{kind} message {message_id}: control id {control_id} from {sender} ({message_type}), {state}; {code}",
            kind="retransmitted" if duplicate else "accepted",
            message_id=result.message_id,
            control_id=header.control_id,
            sender=header.sender,
            message_type=_message_type(header),
            state=RECEIVED,
            code=f"ACK {code}" if code is not None else "no ACK asked (MSH-15)",
        )
        self._tell("message_received", header, duplicate)
        if code is not None:
            self._tell("ack_sent", header, code)

    def _tell(self, what: str, *args) -> None:
        """Tell :attr:`watch` (the metrics); a failing watcher never costs a message its answer."""
        if self.watch is None:
            return
        try:
            getattr(self.watch, what)(*args)
        except Exception:
            self._log.failure("the intake watcher failed on {kind}", kind=what)

    def _not_stored(self, failure, header: MessageHeader) -> bytes | None:
        self._log.error(
            "could not store message {control_id} from {sender}: {error}",
            control_id=header.control_id,
            sender=header.sender,
            error=failure.getErrorMessage(),
        )
        if not should_acknowledge(header, ERROR):
            return None
        self._tell("ack_sent", header, ack_code(ERROR, header.enhanced_mode))
        return self.acks.build(
            header,
            ERROR,
            error_code=ERR_INTERNAL,
            reason="the message could not be stored; it was not accepted, send it again",
        )

    def _reject(self, message: bytes, peer: str, error: MessageError) -> defer.Deferred[bytes]:
        # When only a required field is missing (or a limit is passed), the
        # separators and MSH-15 can still be read: answer in the sender's
        # separators and mode (CR in enhanced mode), and keep who sent it.
        header = read_header_leniently(message)
        guess = header.control_id if header else control_id_guess(message)
        nak = self.acks.build(
            header,
            REJECTED,
            control_id=guess,
            error_code=error.code,
            error_location=error.location,
            error_sequence=error.sequence if isinstance(error, LimitExceeded) else 1,
            reason=error.reason,
        )
        self._tell("frame_rejected", header, error.code)
        self._tell("ack_sent", header, ack_code(REJECTED, header.enhanced_mode if header else False))
        if not self.rejections.admit(peer, f"{error.code} {error.location}".strip()):
            return defer.succeed(nak)
        self._log.warn(
            "rejected a frame from {peer}: {reason}",
            peer=peer,
            # Reasons mostly name their field already ("MSH-10 message control id is empty"): said once.
            reason=error.reason
            if not error.location or error.reason.startswith(error.location)
            else f"{error.location}: {error.reason}",
        )
        record = self._rejected_record(message, peer, header, guess, str(error))
        d = self.store.record_frame(record)
        # The rejection is logged before the sender hears of it; it is answered even if logging fails.
        d.addErrback(lambda f: self._log.error("could not log a rejected frame: {e}", e=f.getErrorMessage()))
        d.addCallback(lambda _: nak)
        return d

    def _rejected_record(
        self, raw: bytes, peer: str, header: MessageHeader | None, guess: str, reason: str, answered: bool = True
    ) -> IntakeRecord:
        """A rejected frame as stored: its first ``rejected_bytes_kept`` bytes, header fields cut to the limits."""
        kept = self.rejected_bytes_kept
        if len(raw) > kept:
            reason += f" (first {kept} of {len(raw)} bytes kept)"
        n, m = self.limits.header_field_length, self.limits.control_id_length
        return IntakeRecord(
            raw=raw[:kept],
            peer=peer,
            state=STATE_REJECTED,
            ack_code=ack_code(REJECTED, header.enhanced_mode if header else False) if answered else "",
            control_id=guess[:m],
            sending_application=header.sending_application[:n] if header else "",
            sending_facility=header.sending_facility[:n] if header else "",
            message_type=header.message_type[:n] if header else "",
            trigger_event=header.trigger_event[:n] if header else "",
            reason=reason,
        )

    def frameTooLong(self, prefix: bytes, peer: str) -> defer.Deferred[bytes | None]:
        """Refuse an oversized frame: log its start and answer AR/CR naming the limit."""
        reason = f"the frame exceeds the {self.max_length}-byte limit; it was not accepted"
        header = read_header_leniently(prefix)
        guess = header.control_id if header else control_id_guess(prefix)
        nak = self.acks.build(
            header,
            REJECTED,
            control_id=control_id_guess(prefix),
            error_code=ERR_VALUE_TOO_LONG,
            reason=reason,
        )
        self._tell("frame_rejected", header, ERR_VALUE_TOO_LONG)
        self._tell("ack_sent", header, ack_code(REJECTED, header.enhanced_mode if header else False))
        if not self.rejections.admit(peer, f"{ERR_VALUE_TOO_LONG} frame"):
            return defer.succeed(nak)
        record = self._rejected_record(prefix, peer, header, guess, reason + f" (first {len(prefix)} bytes kept)")
        d = self.store.record_frame(record)
        d.addErrback(lambda f: self._log.error("could not log an oversized frame: {e}", e=f.getErrorMessage()))
        d.addCallback(lambda _: nak)
        return d

    def frameIncomplete(self, partial: bytes, peer: str) -> None:
        """Log a frame cut off by the connection closing (no answer is possible)."""
        if not self.rejections.admit(peer, "incomplete frame"):
            return
        self._log.warn("connection from {peer} closed in the middle of a frame", peer=peer)
        reason = f"the connection closed in the middle of a frame after {len(partial)} bytes; nothing was acknowledged"
        record = self._rejected_record(partial, peer, None, control_id_guess(partial), reason, answered=False)
        self.store.record_frame(record).addErrback(
            lambda f: self._log.error("could not log an incomplete frame: {e}", e=f.getErrorMessage())
        )

    # -- transport security (gateway.intake.senders) ---------------------------------

    def _check_sender(self, header: MessageHeader, peer: str) -> None:
        """Raise :class:`SenderRefused` (logged and audited) when ``peer`` may not send as MSH-3/MSH-4."""
        refusal = self.senders.check(header, peer) if self.senders is not None else None
        if refusal is None:
            return
        self._log.warn("refused a message from {peer}: {reason}", peer=peer, reason=refusal.reason)
        detail = {**peer_detail(peer), "sender": refusal.sender, "control_id": header.control_id[:64]}
        self._audit("intake", "sender-refused", {**detail, "reason": refusal.reason})
        raise SenderRefused(refusal)

    def connectionRefused(self, peer: str, reason: str, certificate=None) -> None:
        """Audit a TLS client refused in the handshake (``connection-refused``; nothing was read from it).

        Sampled per peer host like rejected frames, so a flood of bad
        handshakes is summarised rather than written down one by one.
        """
        self._tell("tls_refused", reason)
        if not self.rejections.admit(peer, f"TLS: {reason}"):
            return
        detail = {**peer_detail(peer), "reason": reason}
        if certificate is not None:
            detail["certificate"] = certificate.audit()
        self._audit("tls", "connection-refused", detail)

    def _audit(self, actor: str, kind: str, detail: dict) -> None:
        self.store.record_connection_event(kind, detail, actor).addErrback(
            lambda f: self._log.error("could not audit {kind}: {e}", kind=kind, e=f.getErrorMessage())
        )


def _message_type(header: MessageHeader) -> str:
    """MSH-9 as analysts say it: ``ADT^A01``."""
    return header.message_type + (f"^{header.trigger_event}" if header.trigger_event else "")
