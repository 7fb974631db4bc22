"""Build HL7 v2 acknowledgements (ACK) in original and enhanced mode."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.config import Config
from gateway.header import DEFAULT_SEPARATORS, ERROR_TEXT, MessageHeader

#: Acceptance outcomes, named for what they mean.
ACCEPTED = "accepted"  # stored: AA / CA
ERROR = "error"  # could not be stored or processed: AE / CE
REJECTED = "rejected"  # unreadable or refused: AR / CR

_ORIGINAL = {ACCEPTED: "AA", ERROR: "AE", REJECTED: "AR"}
_ENHANCED = {ACCEPTED: "CA", ERROR: "CE", REJECTED: "CR"}


def ack_code(outcome: str, enhanced: bool) -> str:
    """MSA-1 for ``outcome`` in original or enhanced mode."""
    return (_ENHANCED if enhanced else _ORIGINAL)[outcome]


def should_acknowledge(header: MessageHeader | None, outcome: str) -> bool:
    """Whether MSH-15 asks for an accept acknowledgement in this case.

    Original mode (MSH-15 empty, or not a table 0155 value) always gets one. In enhanced mode AL asks for
    all, NE for none, ER only for errors and SU only for successes.
    """
    if header is None or not header.enhanced_mode:
        return True
    kind = header.accept_ack_type.strip().upper()
    if kind == "NE":
        return False
    if kind == "ER":
        return outcome != ACCEPTED
    if kind == "SU":
        return outcome == ACCEPTED
    return True


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AckBuilder:
    """Makes ACK messages; the clock and control-id source are injected so tests can pin them."""

    def __init__(
        self,
        application: str = Config.application,
        facility: str = Config.facility,
        clock: Callable[[], datetime] = _utc_now,
        next_control_id: Callable[[], str] | None = None,
        control_id_length: int = Config.limits.control_id_length,
    ) -> None:
        self.application = application
        #: The most of any one value from the message an ACK echoes (MSA-2 included): a
        #: 900 KB MSH-10 must not come back as a 900 KB ACK.
        self.echo_length = control_id_length
        self.facility = facility
        self.clock = clock
        if next_control_id is None:
            prefix = f"H{os.getpid() % 100000:05d}"
            counter = itertools.count(1)
            next_control_id = lambda: f"{prefix}{next(counter):011d}"  # noqa: E731
        self.next_control_id = next_control_id

    def build(
        self,
        header: MessageHeader | None,
        outcome: str,
        *,
        control_id: str = "",
        error_code: str = "",
        error_location: str = "",
        error_sequence: int = 1,
        reason: str = "",
    ) -> bytes:
        """The ACK for a message with ``header`` (``None`` when it could not be read).

        ``control_id`` is echoed in MSA-2 when the header is unreadable but the
        id could still be found. An ERR segment is added whenever ``error_code``
        is given; ``error_sequence`` is which occurrence of the located segment
        (ERR-2's sequence). No value from the message is echoed longer than
        ``control_id_length``.
        """
        if header is not None:
            seps = header.separators
            fs, comp, rep, esc, sub = seps[0], seps[1], seps[2], seps[3], seps[4]
            enc = header.encoding_characters
            trunc = enc[4] if len(enc) > 4 else ""
            echo_id = header.control_id
            enhanced = header.enhanced_mode
            receiver_app, receiver_fac = header.sending_application, header.sending_facility
            processing = header.processing_id or "P"
            version = header.version or "2.5.1"
            event = header.trigger_event
        else:
            fs, comp, rep, esc, sub = DEFAULT_SEPARATORS
            enc = DEFAULT_SEPARATORS[1:]
            trunc = ""
            # A guess read with separators the ACK does not share: escape it.
            echo_id = _Escaper(fs, comp, rep, esc, sub)(control_id)
            enhanced = False
            receiver_app = receiver_fac = ""
            processing, version, event = "P", "2.5.1", ""
        n = self.echo_length
        echo_id = _truncate(echo_id, n, esc)
        receiver_app, receiver_fac = _truncate(receiver_app, n, esc), _truncate(receiver_fac, n, esc)
        processing, version, event = _truncate(processing, n, esc), _truncate(version, n, esc), _truncate(event, n, esc)
        code = ack_code(outcome, enhanced)
        stamp = self.clock().astimezone(UTC).strftime("%Y%m%d%H%M%S") + "+0000"
        msg_type = f"ACK{comp}{event}{comp}ACK" if event else "ACK"
        clean = _Escaper(fs, comp, rep, esc, sub, trunc)
        # Values taken from the message's MSH are already encoded with the
        # separators this ACK uses: they are echoed as sent (MSA-2 must match
        # MSH-10 exactly), only Herald's own text is escaped.
        msh = fs.join(
            [
                "MSH",
                enc,
                clean(self.application),
                clean(self.facility),
                receiver_app,
                receiver_fac,
                stamp,
                "",
                msg_type,
                self.next_control_id(),
                processing,
                version,
            ]
        )
        text = clean(reason)
        segments = [msh, fs.join(["MSA", code, echo_id, _truncate(text, MSA_TEXT_LENGTH, esc)])]
        if error_code:
            err_text = ERROR_TEXT.get(error_code, "")
            segment, _, field = error_location.partition("-")
            # ERL: segment^sequence^field; e.g. MSH^1^10.
            seq = str(max(1, error_sequence))
            erl = comp.join([segment, seq, field] if field else [segment, seq]) if segment else ""
            code_ce = comp.join([error_code, err_text, "HL70357"])
            # ERR-1 (pre-2.5 form: segment^sequence^field^code) and ERR-2..8
            # (2.5+ form) together, so either reader finds the code.
            err1 = comp.join([segment, seq if segment else "", field, sub.join([error_code, err_text, "HL70357"])])
            segments.append(fs.join(["ERR", err1, erl, code_ce, "E", "", "", "", text]))
        return ("\r".join(segments) + "\r").encode("ascii", "replace")


#: MSA-3 (text message) is 80 characters long.
MSA_TEXT_LENGTH = 80


def _truncate(text: str, limit: int, esc: str) -> str:
    """Cut escaped ``text`` to ``limit`` characters without splitting an escape sequence."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    # Escape sequences come in pairs of escape characters: an odd count means one is cut open.
    if cut.count(esc) % 2:
        cut = cut[: cut.rindex(esc)]
    return cut


class _Escaper:
    """Escape separator characters in a value per HL7 v2 escape sequences."""

    def __init__(self, fs: str, comp: str, rep: str, esc: str, sub: str, trunc: str = "") -> None:
        table = {
            esc: f"{esc}E{esc}",
            fs: f"{esc}F{esc}",
            comp: f"{esc}S{esc}",
            rep: f"{esc}R{esc}",
            sub: f"{esc}T{esc}",
            "\r": " ",
            "\n": " ",
        }
        if trunc:  # v2.7's fifth encoding character
            table[trunc] = f"{esc}P{esc}"
        self.table = str.maketrans(table)

    def __call__(self, value: str) -> str:
        return value.translate(self.table)
