"""Intake: the MLLP receiver behind the listener.

For each frame: read the MSH, store the raw bytes and header fields, wait for
the commit, then answer. Nothing else happens on the connection's path; the
pipeline picks stored messages up later.
"""

from __future__ import annotations

from collections.abc import Callable

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
from gateway.records import RECEIVED, IntakeRecord, IntakeResult
from gateway.records import REJECTED as STATE_REJECTED
from gateway.store import Store


class Intake:
    """Stores each frame durably before it is acknowledged (provides ``mllp.FrameReceiver``)."""

    _log = Logger()

    def __init__(
        self,
        store: Store,
        acks: AckBuilder | None = None,
        on_stored: Callable[[], None] | None = None,
        max_length: int = Config.max_frame_bytes,
    ) -> None:
        self.store = store
        self.acks = acks or AckBuilder()
        self.on_stored = on_stored or (lambda: None)
        self.max_length = max_length

    def frameReceived(self, message: bytes, peer: str) -> defer.Deferred[bytes | None]:
        """Store ``message``; fire with the ACK (or ``None`` when MSH-15 asks for none)."""
        try:
            header = read_header(message)
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
        if result.duplicate_of is None:
            try:
                self.on_stored()
            except Exception:
                # The message is committed: it must still be acknowledged.
                self._log.failure("on_stored hook failed after message {id} was stored", id=result.message_id)
        if not should_acknowledge(header, ACCEPTED):
            return None
        self.store.record_ack_sent(result.message_id, ack_code(ACCEPTED, header.enhanced_mode))
        return self.acks.build(header, ACCEPTED)

    def _not_stored(self, failure, header: MessageHeader) -> bytes | None:
        self._log.error(
            "could not store message {control_id} from {sender}: {error}",
            control_id=header.control_id,
            sender=header.sender,
            error=failure.getErrorMessage(),
        )
        if not should_acknowledge(header, ERROR):
            return None
        return self.acks.build(
            header,
            ERROR,
            error_code=ERR_INTERNAL,
            reason="the message could not be stored; it was not accepted, send it again",
        )

    def _reject(self, message: bytes, peer: str, error: MessageError) -> defer.Deferred[bytes]:
        # When only a required field is missing, the separators and MSH-15 can
        # still be read: answer in the sender's separators and mode (CR in
        # enhanced mode), and keep who sent it in the log.
        header = read_header_leniently(message)
        guess = header.control_id if header else control_id_guess(message)
        self._log.warn(
            "rejected a frame from {peer}: {location} {reason}",
            peer=peer,
            location=error.location,
            reason=error.reason,
        )
        nak = self.acks.build(
            header,
            REJECTED,
            control_id=guess,
            error_code=error.code,
            error_location=error.location,
            reason=error.reason,
        )
        record = IntakeRecord(
            raw=message,
            peer=peer,
            state=STATE_REJECTED,
            ack_code=ack_code(REJECTED, header.enhanced_mode if header else False),
            control_id=guess,
            sending_application=header.sending_application if header else "",
            sending_facility=header.sending_facility if header else "",
            message_type=header.message_type if header else "",
            trigger_event=header.trigger_event if header else "",
            reason=str(error),
        )
        d = self.store.record_frame(record)
        # The rejection is logged before the sender hears of it; it is answered even if logging fails.
        d.addErrback(lambda f: self._log.error("could not log a rejected frame: {e}", e=f.getErrorMessage()))
        d.addCallback(lambda _: nak)
        return d

    def frameTooLong(self, prefix: bytes, peer: str) -> defer.Deferred[bytes | None]:
        """Refuse an oversized frame: log its start and answer AR/CR naming the limit."""
        reason = f"the frame exceeds the {self.max_length}-byte limit; it was not accepted"
        header = read_header_leniently(prefix)
        nak = self.acks.build(
            header,
            REJECTED,
            control_id=control_id_guess(prefix),
            error_code=ERR_VALUE_TOO_LONG,
            reason=reason,
        )
        record = IntakeRecord(
            raw=prefix,
            peer=peer,
            state=STATE_REJECTED,
            ack_code=ack_code(REJECTED, header.enhanced_mode if header else False),
            control_id=header.control_id if header else control_id_guess(prefix),
            sending_application=header.sending_application if header else "",
            sending_facility=header.sending_facility if header else "",
            message_type=header.message_type if header else "",
            trigger_event=header.trigger_event if header else "",
            reason=reason + f" (first {len(prefix)} bytes kept)",
        )
        d = self.store.record_frame(record)
        d.addErrback(lambda f: self._log.error("could not log an oversized frame: {e}", e=f.getErrorMessage()))
        d.addCallback(lambda _: nak)
        return d

    def frameIncomplete(self, partial: bytes, peer: str) -> None:
        """Log a frame cut off by the connection closing (no answer is possible)."""
        self._log.warn("connection from {peer} closed in the middle of a frame", peer=peer)
        record = IntakeRecord(
            raw=partial,
            peer=peer,
            state=STATE_REJECTED,
            ack_code="",
            control_id=control_id_guess(partial),
            reason=(
                f"the connection closed in the middle of a frame after {len(partial)} bytes; nothing was acknowledged"
            ),
        )
        self.store.record_frame(record).addErrback(
            lambda f: self._log.error("could not log an incomplete frame: {e}", e=f.getErrorMessage())
        )
