"""Read just the MSH segment of a raw message: what intake needs, nothing more.

This is on the connection's path, so it splits one line on the separators the
message declares and does no other parsing.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.errors import MessageError

#: HL7 table 0357 (message error condition codes) used by Herald.
ERR_SEGMENT_SEQUENCE = "100"
ERR_REQUIRED_FIELD_MISSING = "101"
ERR_DATA_TYPE = "102"
ERR_VALUE_TOO_LONG = "104"
ERR_UNSUPPORTED_MESSAGE_TYPE = "200"
ERR_UNSUPPORTED_EVENT = "201"
ERR_INTERNAL = "207"

ERROR_TEXT = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "203": "Unsupported version id",
    "207": "Application internal error",
}

DEFAULT_SEPARATORS = "|^~\\&"
#: HL7 table 0155 (accept/application acknowledgement conditions): MSH-15 values that select enhanced mode.
ENHANCED_ACK_TYPES = frozenset({"AL", "NE", "ER", "SU"})


class MessageHeader(NamedTuple):
    """The MSH fields Herald reads on intake (a NamedTuple: read once per frame, on the ACK path)."""

    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_time: str
    message_type: str
    trigger_event: str
    message_structure: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str
    application_ack_type: str
    charset: str

    @property
    def enhanced_mode(self) -> bool:
        """True when MSH-15 holds a table 0155 value (AL, NE, ER, SU): enhanced-mode acknowledgements (CA/CE/CR).

        Anything else in MSH-15 (a typo, a value from another field) is not a
        request for enhanced mode: the sender gets an original-mode ACK.
        """
        return self.accept_ack_type.strip().upper() in ENHANCED_ACK_TYPES

    @property
    def separators(self) -> str:
        """MSH-1 followed by MSH-2, as written in the message."""
        return self.field_separator + self.encoding_characters

    @property
    def sender(self) -> str:
        """``application|facility`` from MSH-3 and MSH-4: the key for de-duplication."""
        return f"{self.sending_application}|{self.sending_facility}"


def first_segment(raw: bytes) -> bytes:
    """The bytes of the first segment (up to CR or LF), a BOM removed."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    cr, lf = raw.find(b"\r"), raw.find(b"\n")
    end = min(cr, lf) if cr >= 0 and lf >= 0 else max(cr, lf)
    return raw if end < 0 else raw[:end]


def read_header(raw: bytes) -> MessageHeader:
    """Read the MSH segment of ``raw``; raise :class:`MessageError` when it cannot be read."""
    header = read_msh(raw)
    if not header.control_id.strip():
        raise MessageError("MSH-10 message control id is empty", ERR_REQUIRED_FIELD_MISSING, "MSH-10")
    if not header.message_type:
        raise MessageError("MSH-9 message type is empty", ERR_REQUIRED_FIELD_MISSING, "MSH-9")
    return header


def read_header_leniently(raw: bytes) -> MessageHeader | None:
    """The MSH of ``raw`` even when required fields are missing; ``None`` when unreadable.

    For answering a rejected message: with its separators and MSH-15 known, the
    refusal can be addressed to the sender in the mode it asked for.
    """
    try:
        return read_msh(raw)
    except MessageError:
        return None


def read_msh(raw: bytes) -> MessageHeader:
    """The MSH of ``raw`` with none of its fields required; raise :class:`MessageError` when unreadable."""
    line = first_segment(raw.lstrip(b"\r\n \t"))
    # Latin-1 maps every byte, so this never fails; MSH fields that matter are ASCII.
    text = line.decode("latin-1")
    if not text.startswith("MSH"):
        raise MessageError(
            "the message does not start with an MSH segment",
            ERR_SEGMENT_SEQUENCE,
            "MSH",
        )
    if len(text) < 8:
        raise MessageError("the MSH segment is too short to hold its separators", ERR_DATA_TYPE, "MSH-2")
    fs = text[3]
    if fs.isalnum() or fs in " \r\n":
        raise MessageError(f"MSH-1 field separator {fs!r} is not a valid separator", ERR_DATA_TYPE, "MSH-1")
    # Split no further than MSH-18 (fields[17]; the rest lands in fields[18]): a
    # huge MSH costs one pass, not a list of all its fields.
    fields = text.split(fs, 18)
    # fields[0] is "MSH", fields[1] is MSH-2; MSH-n is fields[n - 1].
    enc = fields[1]
    if len(enc) not in (4, 5) or len(set(enc)) != len(enc) or fs in enc or " " in enc or any(map(str.isalnum, enc)):
        raise MessageError(
            "MSH-2 encoding characters must be four (or, from v2.7, five) distinct "
            f"non-alphanumeric characters other than the field separator; got {len(enc)} character(s)",
            ERR_DATA_TYPE,
            "MSH-2",
        )
    comp = enc[0]
    # MSH-n is fields[n - 1]; fields beyond the segment are empty, and "" (null) reads as empty.
    f = ["" if v == '""' else v for v in fields[:18]]
    if len(f) < 18:
        f += [""] * (18 - len(f))
    msg_type = f[8].split(comp)
    return MessageHeader(
        field_separator=fs,
        encoding_characters=enc,
        sending_application=f[2].split(comp, 1)[0],
        sending_facility=f[3].split(comp, 1)[0],
        receiving_application=f[4].split(comp, 1)[0],
        receiving_facility=f[5].split(comp, 1)[0],
        message_time=f[6].split(comp, 1)[0],
        message_type=msg_type[0],
        trigger_event=msg_type[1] if len(msg_type) > 1 else "",
        message_structure=msg_type[2] if len(msg_type) > 2 else "",
        control_id=f[9],
        processing_id=f[10].split(comp, 1)[0],
        version=f[11].split(comp, 1)[0],
        accept_ack_type=f[14],
        application_ack_type=f[15],
        charset=f[17].split(enc[1])[0],
    )


def control_id_guess(raw: bytes) -> str:
    """MSH-10 of a message whose header failed to read, if it can be found at all."""
    line = first_segment(raw.lstrip(b"\r\n \t")).decode("latin-1")
    if line.startswith("MSH") and len(line) > 3:
        fields = line.split(line[3], 10)
        if len(fields) >= 10:
            return fields[9]
    return ""
