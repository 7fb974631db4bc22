"""ACK messages, byte for byte: original and enhanced mode, ERR segments, escaping, MSH-15 rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.header import read_header, read_header_leniently
from gateway.intake.ack import ACCEPTED, ERROR, REJECTED, AckBuilder, ack_code, should_acknowledge

ADT_A01 = b"MSH|^~\\&|EPIC|GENHOSP^1.2.3^ISO|HERALD|HIE|20260301115900||ADT^A01^ADT_A01|MSG00001|P|2.5.1\rPID|1\r"
ENHANCED_A04 = b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301115900||ADT^A04^ADT_A01|MSG00002|T|2.5.1|||AL|NE\rPID|1\r"


def test_aa_in_original_mode_byte_for_byte(pinned_acks):
    """A stored original-mode message gets MSH addressed back to the sender and MSA|AA echoing MSH-10."""
    ack = pinned_acks.build(read_header(ADT_A01), ACCEPTED)
    assert ack == (
        b"MSH|^~\\&|HERALD|HIE|EPIC|GENHOSP|20260301120000+0000||ACK^A01^ACK|ACK0001|P|2.5.1\rMSA|AA|MSG00001|\r"
    )


def test_ca_in_enhanced_mode_byte_for_byte(pinned_acks):
    """A stored message with MSH-15 set gets CA, and MSH-11 echoes the sender's processing id."""
    ack = pinned_acks.build(read_header(ENHANCED_A04), ACCEPTED)
    assert ack == (
        b"MSH|^~\\&|HERALD|HIE|EPIC|GENHOSP|20260301120000+0000||ACK^A04^ACK|ACK0001|T|2.5.1\rMSA|CA|MSG00002|\r"
    )


def test_ar_for_an_unreadable_frame_carries_err_with_the_0357_code(pinned_acks):
    """A frame with no readable MSH gets AR in default separators, an empty MSA-2 and an ERR naming code 100."""
    ack = pinned_acks.build(
        None,
        REJECTED,
        error_code="100",
        error_location="MSH",
        reason="the message does not start with an MSH segment",
    )
    assert ack == (
        b"MSH|^~\\&|HERALD|HIE|||20260301120000+0000||ACK|ACK0001|P|2.5.1\r"
        b"MSA|AR||the message does not start with an MSH segment\r"
        b"ERR|MSH^1^^100&Segment sequence error&HL70357|MSH^1|100^Segment sequence error^HL70357|E||||"
        b"the message does not start with an MSH segment\r"
    )


def test_ar_for_a_missing_control_id_names_the_field_in_both_err_forms(pinned_acks):
    """ERR-1 (pre-2.5) and ERR-2/ERR-3 (2.5+) both locate MSH-10 and carry code 101; MSA-2 stays empty."""
    header = read_header_leniently(b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301||ADT^A01||P|2.5.1\r")
    ack = pinned_acks.build(
        header, REJECTED, error_code="101", error_location="MSH-10", reason="MSH-10 message control id is empty"
    )
    assert ack == (
        b"MSH|^~\\&|HERALD|HIE|EPIC|GENHOSP|20260301120000+0000||ACK^A01^ACK|ACK0001|P|2.5.1\r"
        b"MSA|AR||MSH-10 message control id is empty\r"
        b"ERR|MSH^1^10^101&Required field missing&HL70357|MSH^1^10|101^Required field missing^HL70357|E||||"
        b"MSH-10 message control id is empty\r"
    )


def test_err_without_a_location_still_carries_the_code_in_err_1(pinned_acks):
    """An error with no field to point at (a frame too long) still puts its code in ERR-1's fourth component."""
    ack = pinned_acks.build(read_header(ADT_A01), REJECTED, error_code="104", reason="too long")
    assert ack.split(b"\r")[2] == b"ERR|^^^104&Value too long&HL70357||104^Value too long^HL70357|E||||too long"


def test_ae_and_ce_for_an_internal_error(pinned_acks):
    """A message that could not be stored gets AE in original mode and CE in enhanced mode, with code 207."""
    ae = pinned_acks.build(read_header(ADT_A01), ERROR, error_code="207", reason="not stored")
    ce = pinned_acks.build(read_header(ENHANCED_A04), ERROR, error_code="207", reason="not stored")
    assert ae.split(b"\r")[1] == b"MSA|AE|MSG00001|not stored"
    assert ce.split(b"\r")[1] == b"MSA|CE|MSG00002|not stored"
    for ack in (ae, ce):
        assert b"|207^Application internal error^HL70357|E|" in ack.split(b"\r")[2]


def test_msa_2_echoes_msh_10_exactly_as_sent(pinned_acks):
    """MSH-10 is echoed verbatim, escape sequences included, so the sender can match its ACK."""
    header = read_header(b"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|ID\\T\\42 X|P|2.5.1\r")
    ack = pinned_acks.build(header, ACCEPTED)
    assert ack.split(b"\r")[1] == b"MSA|AA|ID\\T\\42 X|"


def test_guessed_control_id_is_escaped_for_the_default_separators(pinned_acks):
    """A control id guessed from an unreadable header is escaped, since the ACK uses other separators."""
    ack = pinned_acks.build(None, REJECTED, control_id="A^B|C", error_code="102", error_location="MSH-2")
    assert ack.split(b"\r")[1] == b"MSA|AR|A\\S\\B\\F\\C|"


def test_separators_in_the_reason_are_escaped(pinned_acks):
    """Separator characters in a reason are escaped (\\F\\ \\S\\ \\R\\ \\E\\ \\T\\); CR and LF become spaces."""
    ack = pinned_acks.build(read_header(ADT_A01), ERROR, error_code="207", reason="a|b^c~d\\e&f\rg\nh")
    escaped = b"a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f g h"
    msa, err = ack.split(b"\r")[1:3]
    assert msa == b"MSA|AE|MSG00001|" + escaped
    assert err.endswith(b"|E||||" + escaped)
    assert ack.count(b"\r") == 3  # a CR in the reason did not start a segment


def test_message_separators_are_used_in_the_ack(pinned_acks):
    """An ACK to a message with its own separators is written in those separators, values echoed as sent."""
    header = read_header(b"MSH#!@$%#EPIC!X#GENHOSP#HERALD#HIE#20260301##ADT!A03!ADT_A03#ID|^7#P#2.4\r")
    ack = pinned_acks.build(header, ERROR, error_code="207", reason="x#y!z")
    assert ack == (
        b"MSH#!@$%#HERALD#HIE#EPIC#GENHOSP#20260301120000+0000##ACK!A03!ACK#ACK0001#P#2.4\r"
        b"MSA#AE#ID|^7#x$F$y$S$z\r"
        b"ERR#!!!207%Application internal error%HL70357##207!Application internal error!HL70357#E####x$F$y$S$z\r"
    )


def test_v27_truncation_character_is_escaped(pinned_acks):
    """With v2.7's fifth encoding character declared, a # in the reason becomes \\P\\ and MSH-2 keeps all five."""
    header = read_header(b"MSH|^~\\&#|EPIC|GENHOSP|||20260301||ADT^A01|MSG27|P|2.7\r")
    ack = pinned_acks.build(header, ERROR, error_code="207", reason="bed #4")
    assert ack.startswith(b"MSH|^~\\&#|HERALD|")
    assert ack.split(b"\r")[1] == b"MSA|AE|MSG27|bed \\P\\4"


def test_msa_3_is_cut_to_80_characters_without_splitting_an_escape_sequence(pinned_acks):
    """MSA-3 holds at most 80 characters and never ends inside an escape sequence; ERR-8 keeps the whole text."""
    reason = "x" * 78 + "|tail"  # escaped: 78 x's, then \F\ across the 80-character mark
    ack = pinned_acks.build(read_header(ADT_A01), ERROR, error_code="207", reason=reason)
    msa, err = ack.split(b"\r")[1:3]
    assert msa == b"MSA|AE|MSG00001|" + b"x" * 78
    assert err.endswith(b"x" * 78 + b"\\F\\tail")
    short = pinned_acks.build(read_header(ADT_A01), ERROR, reason="y" * 200)
    assert short.split(b"\r")[1] == b"MSA|AE|MSG00001|" + b"y" * 80


def test_empty_processing_id_and_version_get_defaults(pinned_acks):
    """A sender that leaves MSH-11 and MSH-12 empty gets P and 2.5.1 in the ACK."""
    header = read_header(b"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT|MSG1\r")
    assert pinned_acks.build(header, ACCEPTED).split(b"\r")[0].endswith(b"||ACK|ACK0001|P|2.5.1")


def test_non_ascii_sender_names_do_not_break_the_ack(pinned_acks):
    """A Latin-1 sender name is replaced by ? in the ASCII ACK rather than raising."""
    header = read_header("MSH|^~\\&|HÔPITAL|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1\r".encode("latin-1"))
    assert pinned_acks.build(header, ACCEPTED).split(b"|")[4] == b"H?PITAL"


def test_time_stamp_is_in_utc():
    """MSH-7 is the injected clock's moment converted to UTC."""
    eastern = timezone(timedelta(hours=-5))
    acks = AckBuilder(clock=lambda: datetime(2026, 3, 1, 7, 0, 0, tzinfo=eastern), next_control_id=lambda: "1")
    assert acks.build(None, ACCEPTED).split(b"|")[6] == b"20260301120000+0000"


def test_default_control_ids_are_unique_and_count_up():
    """Without an injected generator, each ACK gets a new control id from one per-process counter."""
    acks = AckBuilder(clock=lambda: datetime(2026, 3, 1, tzinfo=UTC))
    ids = [acks.build(None, ACCEPTED).split(b"|")[9] for _ in range(3)]
    assert len(set(ids)) == 3
    assert ids == sorted(ids)
    assert all(len(i) == 17 and i.startswith(b"H") for i in ids)


def test_each_ack_takes_the_next_control_id(pinned_acks):
    """The injected generator is called once per ACK."""
    ids = [pinned_acks.build(None, ACCEPTED).split(b"|")[9] for _ in range(2)]
    assert ids == [b"ACK0001", b"ACK0002"]


@pytest.mark.parametrize(
    ("outcome", "original", "enhanced"),
    [(ACCEPTED, "AA", "CA"), (ERROR, "AE", "CE"), (REJECTED, "AR", "CR")],
)
def test_ack_codes(outcome, original, enhanced):
    """Each outcome maps to its MSA-1 code in original and in enhanced mode."""
    assert (ack_code(outcome, False), ack_code(outcome, True)) == (original, enhanced)


def _with_msh15(value: str):
    return read_header(f"MSH|^~\\&|EPIC|GENHOSP|||20260301||ADT^A01|MSG1|P|2.5.1|||{value}\r".encode())


@pytest.mark.parametrize(
    ("msh15", "expected"),
    [
        ("", {ACCEPTED: True, ERROR: True, REJECTED: True}),
        ("AL", {ACCEPTED: True, ERROR: True, REJECTED: True}),
        ("NE", {ACCEPTED: False, ERROR: False, REJECTED: False}),
        ("ER", {ACCEPTED: False, ERROR: True, REJECTED: True}),
        ("SU", {ACCEPTED: True, ERROR: False, REJECTED: False}),
        ("er", {ACCEPTED: False, ERROR: True, REJECTED: True}),
    ],
)
def test_should_acknowledge_follows_msh_15(msh15, expected):
    """AL always, NE never, ER only on errors, SU only on success; empty MSH-15 (original mode) always."""
    header = _with_msh15(msh15)
    assert {outcome: should_acknowledge(header, outcome) for outcome in expected} == expected


def test_unreadable_header_is_always_acknowledged():
    """When the header could not be read there is no MSH-15 to obey: always answer."""
    assert all(should_acknowledge(None, o) for o in (ACCEPTED, ERROR, REJECTED))


def test_an_msh_15_outside_table_0155_gets_an_original_mode_aa():
    """MSH-15 = XX is not a request for enhanced mode: the message gets AA (not CA), and always an ACK."""
    raw = b"MSH|^~\\&|EPIC|GENHOSP|HERALD|HIE|20260301115900||ADT^A04^ADT_A01|MSG00003|T|2.5.1|||XX\rPID|1\r"
    header = read_header(raw)
    assert should_acknowledge(header, ACCEPTED)
    assert AckBuilder(clock=lambda: datetime(2026, 3, 1, tzinfo=UTC)).build(header, ACCEPTED).split(b"\r")[1] == (
        b"MSA|AA|MSG00003|"
    )
