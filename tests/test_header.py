"""Reading the MSH on intake: what is read, and what is refused with which HL7 table 0357 code."""

from __future__ import annotations

import pytest

from gateway.errors import MessageError
from gateway.header import (
    ERR_DATA_TYPE,
    ERR_REQUIRED_FIELD_MISSING,
    ERR_SEGMENT_SEQUENCE,
    control_id_guess,
    first_segment,
    read_header,
    read_header_leniently,
)

ADT = (
    b"MSH|^~\\&|EPIC|GENHOSP^1.2.3^ISO|HERALD|HIE|20260301115900||ADT^A01^ADT_A01|MSG00001|P|2.5.1\r"
    b"EVN|A01|20260301115900\r"
    b"PID|1||MRN123^^^GENHOSP^MR||TESTPATIENT^ALEX\r"
)


def refusal(raw: bytes) -> MessageError:
    with pytest.raises(MessageError) as info:
        read_header(raw)
    return info.value


def test_reads_the_msh_fields_intake_needs():
    """A v2.5.1 MSH yields sender, type, event, structure, control id, processing id and version."""
    h = read_header(ADT)
    assert (h.field_separator, h.encoding_characters) == ("|", "^~\\&")
    assert (h.sending_application, h.sending_facility) == ("EPIC", "GENHOSP")
    assert (h.receiving_application, h.receiving_facility) == ("HERALD", "HIE")
    assert h.message_time == "20260301115900"
    assert (h.message_type, h.trigger_event, h.message_structure) == ("ADT", "A01", "ADT_A01")
    assert (h.control_id, h.processing_id, h.version) == ("MSG00001", "P", "2.5.1")
    assert h.accept_ack_type == h.application_ack_type == h.charset == ""
    assert h.sender == "EPIC|GENHOSP"
    assert h.separators == "|^~\\&"
    assert h.enhanced_mode is False


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\xff\xfe garbage \x01\x02",
        b"",
        b"\r\n",
        b"PID|1||MRN123^^^GENHOSP^MR\rMSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1\r",
        b"msh|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1\r",
        b"FHS|^~\\&|EPIC\r",
    ],
    ids=["garbage", "empty", "blank-lines", "pid-first", "lower-case-msh", "batch-header"],
)
def test_frame_without_msh_first_is_a_segment_sequence_error(raw):
    """A frame whose first segment is not MSH is refused with code 100 at MSH."""
    e = refusal(raw)
    assert (e.code, e.location) == (ERR_SEGMENT_SEQUENCE, "MSH") == ("100", "MSH")


@pytest.mark.parametrize(
    "msh2",
    [
        b"^^\\&",  # duplicate characters
        b"^~\\",  # too few
        b"^~",  # far too few
        b"",  # none
        b"^~\\&#!",  # too many
        b"^~A&",  # alphanumeric
        b"^~1&",  # digit
        b"^ \\&",  # space
    ],
    ids=["duplicate", "three", "two", "empty", "six", "letter", "digit", "space"],
)
def test_bad_encoding_characters_are_a_data_type_error_at_msh_2(msh2):
    """MSH-2 must be four (or five) distinct non-alphanumeric characters: otherwise code 102 at MSH-2."""
    e = refusal(b"MSH|" + msh2 + b"|EPIC|GENHOSP|HERALD|HIE|20260301||ADT^A01|MSG1|P|2.5.1\r")
    assert (e.code, e.location) == (ERR_DATA_TYPE, "MSH-2") == ("102", "MSH-2")


@pytest.mark.parametrize("fs", [b"A", b"7", b" "])
def test_alphanumeric_or_space_field_separator_is_refused_at_msh_1(fs):
    """MSH-1 cannot be a letter, a digit or a space: code 102 at MSH-1."""
    raw = b"MSH" + fs + b"^~\\&" + fs + b"EPIC" + fs + b"GENHOSP" + fs * 5 + b"ADT^A01" + fs + b"MSG1\r"
    e = refusal(raw)
    assert (e.code, e.location) == ("102", "MSH-1")


def test_msh_too_short_to_hold_its_separators_is_refused():
    """An MSH cut off inside MSH-2 is refused with code 102 at MSH-2."""
    e = refusal(b"MSH|^~\\\r")
    assert (e.code, e.location) == ("102", "MSH-2")


@pytest.mark.parametrize(
    "msh",
    [
        b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301||ADT^A01||P|2.5.1",
        b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301||ADT^A01|   |P|2.5.1",
        b'MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301||ADT^A01|""|P|2.5.1',
        b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301||ADT^A01",
    ],
    ids=["empty", "blank", "explicit-null", "absent"],
)
def test_missing_control_id_is_a_required_field_error_at_msh_10(msh):
    """An empty, blank, null or absent MSH-10 is refused with code 101 at MSH-10."""
    e = refusal(msh + b"\rPID|1\r")
    assert (e.code, e.location) == (ERR_REQUIRED_FIELD_MISSING, "MSH-10") == ("101", "MSH-10")


@pytest.mark.parametrize("msh9", [b"", b"^A01", b'""'], ids=["empty", "event-only", "explicit-null"])
def test_missing_message_type_is_a_required_field_error_at_msh_9(msh9):
    """An MSH-9 without a message type is refused with code 101 at MSH-9."""
    e = refusal(b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301||" + msh9 + b"|MSG1|P|2.5.1\r")
    assert (e.code, e.location) == ("101", "MSH-9")


def test_refusal_reasons_carry_no_field_values():
    """A refusal's reason says what is wrong in plain words, without echoing the message's content."""
    e = refusal(b"MSH|^^\\&|SECRETAPP|SECRETFAC|||20260301||ADT^A01|SECRETID|P|2.5.1\r")
    assert "SECRET" not in str(e)
    assert str(e).startswith("MSH-2: ")


def test_v27_five_encoding_characters_are_accepted():
    """v2.7's fifth encoding character (truncation, #) is accepted and kept in MSH-2."""
    h = read_header(b"MSH|^~\\&#|EPIC|GENHOSP|HERALD|HIE|20260301||ADT^A04^ADT_A01|MSG27|P|2.7\r")
    assert h.encoding_characters == "^~\\&#"
    assert (h.control_id, h.version, h.trigger_event) == ("MSG27", "2.7", "A04")


def test_other_separators_declared_by_the_message_are_honoured():
    """A message declaring # and !@$% as separators is split on those, not on the defaults."""
    h = read_header(b"MSH#!@$%#EPIC!X#GENHOSP#HERALD#HIE#20260301##ADT!A03!ADT_A03#ID|^7#P#2.4\r")
    assert (h.sending_application, h.sending_facility) == ("EPIC", "GENHOSP")
    assert (h.message_type, h.trigger_event) == ("ADT", "A03")
    assert h.control_id == "ID|^7"
    assert h.separators == "#!@$%"


def test_byte_order_mark_is_skipped():
    """A UTF-8 BOM before MSH does not hide the header."""
    assert read_header(b"\xef\xbb\xbf" + ADT).control_id == "MSG00001"


def test_leading_blank_lines_are_skipped():
    """Blank lines before MSH (some senders emit them) do not hide the header."""
    assert read_header(b"\r\n\r\n" + ADT).control_id == "MSG00001"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_lf_line_endings_end_the_msh(eol):
    """LF or CRLF segment ends are read like CR: the next segment does not run into MSH."""
    raw = ADT.replace(b"\r", eol)
    h = read_header(raw)
    assert h.version == "2.5.1"
    assert first_segment(raw) == ADT.split(b"\r")[0]


@pytest.mark.parametrize("msh15", ["AL", "NE", "ER", "SU"])
def test_msh_15_switches_to_enhanced_mode(msh15):
    """Each table 0155 value in MSH-15 (AL, NE, ER, SU) selects enhanced mode."""
    h = read_header(f"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1|||{msh15}|AL\r".encode())
    assert h.enhanced_mode is True
    assert (h.accept_ack_type, h.application_ack_type) == (msh15, "AL")


@pytest.mark.parametrize("msh15", ["XX", "Y", "A", "ALWAYS", '""'])
def test_msh_15_outside_table_0155_keeps_original_mode(msh15):
    """Only a table 0155 value (AL, NE, ER, SU) in MSH-15 selects enhanced mode; anything else is original."""
    h = read_header(f"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1|||{msh15}\r".encode())
    assert h.enhanced_mode is False


@pytest.mark.parametrize("msh15", ["al", " NE ", "Su"])
def test_msh_15_is_read_without_case_or_padding(msh15):
    """A table 0155 value in lower case or padded with spaces still selects enhanced mode."""
    h = read_header(f"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1|||{msh15}\r".encode())
    assert h.enhanced_mode is True


def test_only_msh_16_keeps_original_mode():
    """MSH-16 alone (MSH-15 empty) keeps original mode, as ARCHITECTURE.md specifies."""
    h = read_header(b"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1||||AL\r")
    assert h.enhanced_mode is False


def test_charset_is_the_first_repetition_of_msh_18():
    """MSH-18 is read as its first repetition (the character set the message is written in)."""
    h = read_header(b"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1||||||UNICODE UTF-8~8859/1\r")
    assert h.charset == "UNICODE UTF-8"


def test_leniently_read_header_keeps_separators_when_required_fields_are_missing():
    """The lenient reader returns the MSH of a message missing MSH-10, and None when there is no MSH."""
    h = read_header_leniently(b"MSH#!@$%#EPIC#GENHOSP#####ADT!A01##P#2.5.1###AL\r")
    assert h is not None
    assert (h.separators, h.control_id, h.enhanced_mode) == ("#!@$%", "", True)
    assert read_header_leniently(b"PID|1\r") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"MSH|^^^^|EPIC|GENHOSP|||20260301||ADT^A01|MSG9|P|2.5.1\r", "MSG9"),
        (b"MSH|^~\\&|EPIC\r", ""),
        (b"PID|1|MSG9\r", ""),
        (b"MSH", ""),
    ],
)
def test_control_id_guess(raw, expected):
    """The MSH-10 of a header that failed to read is still found when the fields can be counted."""
    assert control_id_guess(raw) == expected
