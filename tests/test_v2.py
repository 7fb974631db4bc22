"""The v2 reader: decoding, segment splitting, field access, escapes and dates."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.conversion.v2 import V2Message, decode, parse_dtm
from gateway.errors import MessageError
from gateway.header import read_header_leniently

MSH = "MSH|^~\\&|TESTAPP|TESTFAC|HERALD|ACO|20260301120000||ADT^A01^ADT_A01|CTRL0001|P|2.5.1"


def message(*segments: str, msh: str = MSH, end: str = "\r") -> str:
    """A synthetic message text: MSH then ``segments``, each ended by ``end``."""
    return "".join(s + end for s in (msh, *segments))


def with_charset(charset: str) -> str:
    """The test MSH with MSH-18 set to ``charset``."""
    return MSH + "||||||" + charset


def pid_value(raw: bytes, charset: str = "") -> str:
    """PID-5.1 of ``raw`` as the reader decodes it."""
    return V2Message(raw, charset).segment("PID").get(5)


# -- decoding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "codec", "name"),
    [
        ("UNICODE UTF-8", "utf-8", "ZOË"),
        ("UTF-8", "utf-8", "ŁUKASZ"),
        ("8859/1", "latin-1", "HÉLÈNE"),
        ("8859/2", "iso8859-2", "ŁUKASZ"),
        ("8859/15", "iso8859-15", "€URO"),
        ("WINDOWS-1252", "cp1252", "€URO"),
    ],
)
def test_declared_msh18_charset_decodes_the_message(declared, codec, name):
    """A message is decoded with the charset its own MSH-18 declares, with no charset passed in."""
    raw = message(f"PID|1||X1^^^TESTFAC^MR||{name}^ALEX", msh=with_charset(declared)).encode(codec)
    msg = V2Message(raw)
    assert msg.codec == codec
    assert msg.segment("PID").get(5) == name


def test_charset_argument_is_used_when_given():
    """An explicit charset (what intake read from MSH-18) decodes the message."""
    raw = message("PID|1||X1^^^TESTFAC^MR||ŁUKASZ").encode("iso8859-2")
    assert pid_value(raw, "8859/2") == "ŁUKASZ"


def test_undeclared_cp1252_bytes_fall_back_to_windows_1252():
    """Bytes that are not UTF-8, with no MSH-18, are read as windows-1252 (not replaced)."""
    raw = message("PID|1||X1^^^TESTFAC^MR||DESROSIERS^HÉLÈNE").encode("cp1252")
    msg = V2Message(raw)
    assert msg.codec == "cp1252"
    assert msg.segment("PID").get(5, 2) == "HÉLÈNE"


def test_undeclared_utf8_is_read_as_utf8():
    """With no MSH-18, UTF-8 is tried first."""
    raw = message("PID|1||X1^^^TESTFAC^MR||VANTERPOOL^ZOË").encode("utf-8")
    msg = V2Message(raw)
    assert msg.codec == "utf-8"
    assert msg.segment("PID").get(5, 2) == "ZOË"


def test_declared_utf8_that_is_not_utf8_still_decodes():
    """A false UTF-8 declaration falls back to windows-1252 instead of failing."""
    raw = message("PID|1||X1^^^TESTFAC^MR||HÉLÈNE", msh=with_charset("UNICODE UTF-8")).encode("cp1252")
    msg = V2Message(raw)
    assert msg.codec == "cp1252"
    assert msg.segment("PID").get(5) == "HÉLÈNE"


@pytest.mark.parametrize("declared", ["", "8859/1"])
def test_utf8_byte_order_mark_is_dropped_and_means_utf8(declared):
    """A UTF-8 BOM is removed and outweighs any MSH-18 declaration."""
    msh = with_charset(declared) if declared else MSH
    raw = b"\xef\xbb\xbf" + message("PID|1||X1^^^TESTFAC^MR||ZOË", msh=msh).encode("utf-8")
    msg = V2Message(raw)
    assert msg.codec == "utf-8"
    assert msg.msh.name == "MSH"
    assert msg.segment("PID").get(5) == "ZOË"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (message(msh=with_charset("8859/1")).encode(), "8859/1"),
        (message(msh=with_charset("UNICODE UTF-8~8859/1")).encode(), "UNICODE UTF-8"),
        (message().encode(), ""),
        (b"PID|1||X", ""),
        (b"", ""),
    ],
)
def test_the_header_reader_gives_the_first_msh18_repetition(raw, expected):
    """The one MSH reader gives the first MSH-18 repetition ("" when there is none, None when no MSH)."""
    header = read_header_leniently(raw)
    assert (header.charset if header else "") == expected


def test_v2message_reuses_the_header_it_is_given():
    """V2Message takes the MSH intake read instead of reading it again, and exposes it."""
    raw = message("PID|1||X").encode()
    header = read_header_leniently(raw)
    assert V2Message(raw, header=header).header is header


def test_decode_returns_text_and_codec():
    """decode() names the codec it used."""
    assert decode("ü".encode("latin-1"), "8859/1") == ("ü", "latin-1")


# -- segments ----------------------------------------------------------------


@pytest.mark.parametrize("end", ["\r", "\n", "\r\n"])
def test_segment_endings_cr_lf_and_crlf_split_alike(end):
    """CR, LF and CRLF all end segments."""
    raw = message("EVN|A01|20260301120000", "PID|1||X1^^^TESTFAC^MR", "PV1|1|I", end=end).encode()
    msg = V2Message(raw)
    assert [s.name for s in msg.segments] == ["MSH", "EVN", "PID", "PV1"]
    assert msg.segment("PV1").get(2) == "I"


def test_blank_lines_and_leading_whitespace_are_ignored():
    """Empty lines and whitespace before MSH do not make segments."""
    raw = ("\r\n  " + MSH + "\r\r\nPID|1||X1\r\n\r\n").encode()
    assert [s.name for s in V2Message(raw).segments] == ["MSH", "PID"]


@pytest.mark.parametrize(
    ("raw", "location"),
    [
        (b"PID|1||X1\rMSH|^~\\&|A", "MSH"),
        (b"", "MSH"),
        (b"MSH|", "MSH-2"),  # the one MSH reader: too short to hold the encoding characters
        (b"hello world, this is not HL7", "MSH"),
        (b"MSH|^~|APP|FAC", "MSH-2"),
    ],
)
def test_unreadable_message_raises_message_error_with_location(raw, location):
    """A message that does not start with a usable MSH raises MessageError naming where."""
    with pytest.raises(MessageError) as caught:
        V2Message(raw)
    assert caught.value.location == location


def test_all_and_segment_find_segments_by_name():
    """segment() returns the first of a name, all() every one in order, None when absent."""
    msg = V2Message(message("DG1|1||A00^First", "DG1|2||B00^Second").encode())
    assert [d.get(3) for d in msg.all("DG1")] == ["A00", "B00"]
    assert msg.segment("DG1").get(1) == "1"
    assert msg.segment("PV2") is None
    assert msg.all("PV2") == []


# -- fields, components, repetitions -----------------------------------------


def test_msh_fields_are_numbered_as_hl7_numbers_them():
    """MSH-1 is the field separator, MSH-2 the encoding characters, MSH-9.2 the trigger."""
    msh = V2Message(message().encode()).msh
    assert msh.get(1) == "|"
    assert msh.get(2) == "^~\\&"
    assert msh.raw(2) == "^~\\&"
    assert msh.get(3) == "TESTAPP"
    assert (msh.get(9, 1), msh.get(9, 2), msh.get(9, 3)) == ("ADT", "A01", "ADT_A01")
    assert msh.get(10) == "CTRL0001"
    assert V2Message(message().encode()).version == "2.5.1"


def test_field_component_and_repetition_access():
    """get(field, component, repetition) reads by path, 1-based components, 0-based repetitions."""
    pid = V2Message(message("PID|1||MRN1^^^FAC^MR~1EG4TE5MK73^^^CMS^MB||DOE^JANE^Q").encode()).segment("PID")
    assert pid.get(3) == "MRN1"
    assert pid.get(3, 5) == "MR"
    assert pid.get(3, 1, 1) == "1EG4TE5MK73"
    assert pid.get(3, 4, 1) == "CMS"
    assert pid.reps(3) == ["MRN1^^^FAC^MR", "1EG4TE5MK73^^^CMS^MB"]
    assert pid.comps(5) == ["DOE", "JANE", "Q"]


@pytest.mark.parametrize(
    ("field", "comp", "rep"),
    [(3, 9, 0), (3, 1, 5), (40, 1, 0), (4, 1, 0)],
)
def test_absent_parts_read_as_empty(field, comp, rep):
    """A component, repetition or field that is not there reads as ""."""
    pid = V2Message(message("PID|1||MRN1^^^FAC^MR").encode()).segment("PID")
    assert pid.get(field, comp, rep) == ""


def test_trailing_separators_do_not_add_values():
    """Trailing |, ^ and ~ leave no phantom values behind."""
    pid = V2Message(message("PID|1||MRN1^^^FAC^MR^^~||DOE^JANE^^^|||").encode()).segment("PID")
    assert pid.reps(3) == ["MRN1^^^FAC^MR^^"]
    assert pid.get(3, 5) == "MR"
    assert pid.get(3, 6) == ""
    assert pid.get(5, 2) == "JANE"
    assert pid.get(8) == ""


def test_double_quote_null_reads_as_empty():
    """The HL7 null "" reads as empty at field, repetition and component level; raw keeps it."""
    pid = V2Message(message('PID|1|""|""~MRN1^^^FAC^MR||DOE^""^Q||""').encode()).segment("PID")
    assert pid.raw(2) == '""'
    assert pid.reps(2) == []
    assert pid.get(2) == ""
    assert pid.reps(3) == ["MRN1^^^FAC^MR"]
    assert pid.get(5, 2) == ""
    assert pid.get(5, 3) == "Q"
    assert pid.get(7) == ""


def test_segment_repr_holds_no_field_contents():
    """repr(Segment) names the segment and counts fields but shows no values (they may be PHI)."""
    pid = V2Message(message("PID|1||MRN1||DOE^JANE").encode()).segment("PID")
    assert "DOE" not in repr(pid)
    assert "PID" in repr(pid)


# -- escapes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("escaped", "text"),
    [
        ("A\\F\\B", "A|B"),
        ("A\\S\\B", "A^B"),
        ("A\\T\\B", "A&B"),
        ("A\\R\\B", "A~B"),
        ("A\\E\\B", "A\\B"),
        ("LINE1\\.br\\LINE2", "LINE1\nLINE2"),
        ("\\X41\\BC", "ABC"),
        ("\\X4142\\C", "ABC"),
        ("CAF\\XC3A9\\", "CAFé"),
        ("\\H\\BOLD\\N\\", "BOLD"),
        ("A\\.sp\\B", "A\nB"),
        ("A\\Q\\B", "A\\Q\\B"),
        ("TRAILING\\", "TRAILING\\"),
        ("NO ESCAPES", "NO ESCAPES"),
    ],
)
def test_escape_sequences_are_resolved(escaped, text):
    """Every HL7 escape sequence becomes its character; unknown ones stay as written."""
    obx = V2Message(message(f"NTE|1||{escaped}", msh=with_charset("UNICODE UTF-8")).encode()).segment("NTE")
    assert obx.get(3) == text


def test_escaped_separators_do_not_split_the_field():
    """An escaped ^ or ~ is data, not a component or repetition boundary."""
    nte = V2Message(message("NTE|1||A\\S\\B\\R\\C^SECOND").encode()).segment("NTE")
    assert nte.reps(3) == ["A\\S\\B\\R\\C^SECOND"]
    assert nte.comps(3) == ["A^B~C", "SECOND"]


def test_hex_escape_uses_the_message_charset():
    """\\Xhh\\ bytes are decoded with the message's own charset."""
    msg = V2Message(message("NTE|1||\\XC9\\", msh=with_charset("8859/1")).encode("latin-1"))
    assert msg.segment("NTE").get(3) == "É"


def test_declared_separators_are_honoured():
    """A message with its own separators (here # and !) is split and unescaped with them."""
    raw = b"MSH#$%!*#APP#FAC#HERALD#ACO#20260301##ADT$A01#C1#P#2.5\rPID#1##X1$$$FAC$MR%2##A!F!B!S!C\r"
    msg = V2Message(raw)
    pid = msg.segment("PID")
    assert msg.msh.get(9, 2) == "A01"
    assert pid.get(3, 5) == "MR"
    assert pid.reps(3) == ["X1$$$FAC$MR", "2"]
    assert pid.get(5) == "A#B$C"


def test_subcomponents_are_split_and_unescaped():
    """subcomponents() splits on & and resolves escapes in each part."""
    msg = V2Message(message().encode())
    assert msg.subcomponents("HOSP&1.2.3\\T\\4&ISO") == ["HOSP", "1.2.3&4", "ISO"]


# -- dates and times ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024", "2024"),
        ("202403", "2024-03"),
        ("20240315", "2024-03-15"),
        ("20240315-0500", "2024-03-15"),
        ("2024031510", "2024-03-15T10:00:00+00:00"),
        ("202403151030", "2024-03-15T10:30:00+00:00"),
        ("20240315103045", "2024-03-15T10:30:45+00:00"),
        ("20240315103045.1", "2024-03-15T10:30:45.100+00:00"),
        ("20240315103045.1234", "2024-03-15T10:30:45.123+00:00"),
        ("20240315103045-0500", "2024-03-15T10:30:45-05:00"),
        ("202403151030+0530", "2024-03-15T10:30:00+05:30"),
        ("20240315103045.25+0100", "2024-03-15T10:30:45.250+01:00"),
        (" 20240315 ", "2024-03-15"),
        ("20240229", "2024-02-29"),
    ],
)
def test_parse_dtm_keeps_the_precision_of_the_source(value, expected):
    """Each HL7 precision maps to the same FHIR dateTime precision; a time with no offset is UTC."""
    text, moment = parse_dtm(value, "EVN-2")
    assert text == expected
    if "T" in expected:
        assert moment.replace(microsecond=0) == datetime.fromisoformat(expected).replace(microsecond=0)
    else:
        assert moment is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240115103000", "2024-01-15T10:30:00-05:00"),
        ("20240715103000", "2024-07-15T10:30:00-04:00"),
        ("20240715103000+0000", "2024-07-15T10:30:00+00:00"),
        ("20240715", "2024-07-15"),
    ],
)
def test_parse_dtm_applies_the_default_timezone_only_without_an_offset(value, expected):
    """A time with no offset takes the default zone (with its DST); a written offset wins."""
    text, _ = parse_dtm(value, "PV1-44", ZoneInfo("America/New_York"))
    assert text == expected


@pytest.mark.parametrize(
    "value",
    [
        "202413",  # month 13
        "202400",  # month 0
        "20241301",  # month 13 with a day
        "20240230",  # 30 February
        "20230229",  # 29 February in a common year
        "20240431",  # 31 April
        "2024031525",  # hour 25
        "202403151060",  # minute 60
        "20240315103075",  # second 75
        "20240315103000+1500",  # offset beyond +14:00
        "20240315103000+0560",  # offset minutes 60
        "202403151030.5",  # a fraction with no seconds
        "2024AB15",
        "March 2024",
        "24",
        "",
        "2024-03-15",
    ],
)
def test_parse_dtm_rejects_invalid_dates_naming_the_location(value):
    """An impossible or malformed date raises MessageError (code 102) with the given location."""
    with pytest.raises(MessageError) as caught:
        parse_dtm(value, "PID-7")
    assert caught.value.location == "PID-7"
    assert caught.value.code == "102"
    assert str(caught.value).startswith("PID-7: ")
