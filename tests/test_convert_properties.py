"""Property: any valid ADT message converts to a valid notification Bundle, or to MessageError.

Hypothesis writes ADT messages with random but well-formed contents: every
segment the converter reads, random text with HL7 escape sequences and ""
nulls, random (valid and invalid) dates, codes from the tables and outside
them, versions 2.3 to 2.8, four or five encoding characters, CR/LF/CRLF
segment ends, a BOM, and the MSH-18 charsets. The converter must never raise
anything but MessageError, and every Bundle it makes must pass fhir.resources
(R4B) and keep the Da Vinci Notifications shape.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.conversion.convert import NOTIFICATION_EVENT_SYSTEM, convert, validate_bundle
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import load_vocabulary
from gateway.errors import MessageError

VOCAB = load_vocabulary()
SEPARATORS = set("|^~\\&#\r\n")
ESCAPES = [
    "\\F\\",
    "\\S\\",
    "\\T\\",
    "\\R\\",
    "\\E\\",
    "\\.br\\",
    "\\X41\\",
    "\\XC3A9\\",
    "\\H\\",
    "\\N\\",
    "\\Zx\\",
    "  ",
    " ",
]  # and runs of spaces, which FHIR codes must not keep

# (MSH-18 value, codec used to write the bytes, characters the codec can write)
CHARSETS = [
    ("", "utf-8", None),
    ("", "cp1252", "latin"),
    ("ASCII", "ascii", "ascii"),
    ("8859/1", "latin-1", "latin"),
    ("UNICODE UTF-8", "utf-8", None),
]


def _plain(charset_kind: str | None) -> st.SearchStrategy[str]:
    excluded = "".join(sorted(SEPARATORS))
    if charset_kind == "ascii":
        alphabet = st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters=excluded)
    elif charset_kind == "latin":
        # Characters windows-1252 and ISO 8859-1 both write.
        alphabet = st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters=excluded) | st.characters(
            min_codepoint=0xC0, max_codepoint=0xFF
        )
    else:
        alphabet = st.characters(blacklist_categories=("Cs", "Cc", "Co", "Cn"), blacklist_characters=excluded)
    return st.text(alphabet, max_size=12)


@st.composite
def text_value(draw, kind: str | None) -> str:
    """Text with escape sequences mixed in, sometimes the explicit null ""."""
    if draw(st.integers(0, 15)) == 0:
        return '""'
    parts = draw(st.lists(st.one_of(_plain(kind), st.sampled_from(ESCAPES)), max_size=4))
    return "".join(parts)


@st.composite
def dtm(draw) -> str:
    """A DTM of any precision, with or without an offset; now and then not a date at all."""
    roll = draw(st.integers(0, 9))
    if roll == 0:
        return draw(st.sampled_from(["", "UNKNOWN", "20261340", "2026022930", "0000", "99999999999999"]))
    moment = draw(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2099, 12, 31)))
    text = moment.strftime("%Y%m%d%H%M%S")[: draw(st.sampled_from([4, 6, 8, 12, 14]))]
    if len(text) == 14 and draw(st.booleans()):
        text += "." + draw(st.sampled_from(["1", "12", "1234"]))
    if len(text) >= 12 and draw(st.booleans()):
        minutes = draw(st.integers(-12 * 60, 14 * 60))
        sign = "-" if minutes < 0 else "+"
        text += f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return text


def code_from(table: str) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(VOCAB.tables[table]) + ["", "ZZ", " x "])


@st.composite
def adt_message(draw) -> bytes:
    msh18, codec, kind = draw(st.sampled_from(CHARSETS))
    version = draw(st.sampled_from(["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"]))
    enc = "^~\\&#" if version >= "2.7" and draw(st.booleans()) else "^~\\&"
    # Pools keep each example small: many fields, few distinct random values.
    texts = draw(st.lists(text_value(kind), min_size=3, max_size=8))
    dates = draw(st.lists(dtm(), min_size=2, max_size=5))
    t = lambda: draw(st.sampled_from(texts))  # noqa: E731
    when = lambda: draw(st.sampled_from(dates))  # noqa: E731
    trigger = draw(st.sampled_from(sorted(VOCAB.events)))

    def seg(name: str, fields: dict[int, str]) -> str:
        values = [""] * (max(fields, default=0) + 1)
        values[0] = name
        for n, v in fields.items():
            values[n] = v
        return "|".join(values)

    def cx() -> str:
        value = draw(st.sampled_from(["", "1EG4TE5MK73", "1eg4-te5-mk73", "123456789", "1234567893"])) or t()
        authority = draw(st.sampled_from(["", "HOSP", "CMS", "&2.16.840.1.113883.3.7&ISO", "&bad oid&ISO", "&x&UUID"]))
        return f"{value}^^^{authority}^{draw(code_from('0203-identifier-type'))}^^{when()}"

    def xpn() -> str:
        return f"{t()}^{t()}^{t()}^{t()}^{t()}^{t()}^{draw(code_from('0200-name-use'))}"

    def xad() -> str:
        return f"{t()}^{t()}^{t()}^{t()}^{t()}^{t()}^{draw(code_from('0190-address-use'))}^^{t()}"

    def xtn() -> str:
        if draw(st.booleans()):
            return t()
        rank = draw(st.sampled_from(["", "1", "0", "-1", "x"]))
        use, kind_ = draw(code_from("0201-telecom-use")), draw(code_from("0202-telecom-system"))
        return f"{t()}^{use}^{kind_}^{t()}^{t()}^{t()}^{t()}^{t()}^^^^{t()}^^^^^^{rank}"

    def xcn() -> str:
        ident = draw(st.sampled_from(["", "1234567893", "1234567890", "D123"])) or t()
        return f"{ident}^{t()}^{t()}^{t()}^{t()}^{t()}^{t()}^^{draw(st.sampled_from(['', 'NPI', 'HOSP']))}^L^^^NPI"

    def cwe(table: str | None = None) -> str:
        code = draw(code_from(table)) if table else t()
        system = draw(st.sampled_from(["", "I10", "I9CDX", "SCT", "LN", "L", "99ZZZ", "HL70063", "http://x.org/cs"]))
        return f"{code}^{t()}^{system}^{t()}^{t()}^^{t()}^^{t()}"

    def reps(make, most: int = 2) -> str:
        return "~".join(make() for _ in range(draw(st.integers(0, most))))

    msh = f"MSH|{enc}|{t()}|{t()}|HERALD|ACO|{when()}||ADT^{trigger}|{draw(st.sampled_from(['C1', 'C 2']))}|P|{version}"
    if msh18:
        msh += "||||||" + msh18
    number = lambda: draw(st.sampled_from(["", "1", "2", "0", "-3", "1.5", "x", "72.5", "nan"]))  # noqa: E731
    lines = [
        msh,
        seg("EVN", {1: trigger, 2: when(), 6: when(), 7: f"{t()}^1234567893^NPI"}),
        seg(
            "PID",
            {
                1: "1",
                2: reps(cx, 1),
                3: cx() + ("~" + reps(cx) if draw(st.booleans()) else ""),
                4: reps(cx, 1),
                5: reps(xpn, 3),
                6: xpn(),
                7: when(),
                8: draw(code_from("0001-administrative-gender")),
                9: reps(xpn, 1),
                11: reps(xad),
                12: t(),
                13: reps(xtn, 3),
                14: reps(xtn),
                15: cwe(),
                16: cwe("0002-marital-status"),
                19: t(),
                24: draw(st.sampled_from(["", "Y", "N"])),
                25: number(),
                29: when(),
                30: draw(st.sampled_from(["", "Y", "N"])),
                40: reps(xtn),
            },
        ),
        seg("PD1", {3: f"{t()}^^{t()}^^^HOSP^^^^{t()}", 4: reps(xcn)}),
        seg(
            "NK1",
            {
                1: "1",
                2: xpn(),
                3: cwe("0063-relationship"),
                4: xad(),
                5: xtn(),
                6: xtn(),
                7: cwe("0131-contact-role"),
                8: when(),
                15: draw(code_from("0001-administrative-gender")),
            },
        ),
        seg(
            "PV1",
            {
                1: "1",
                2: draw(code_from("0004-encounter-class")),
                3: f"{t()}^{t()}^{t()}^{t()}^^^{t()}^{t()}^{t()}",
                4: cwe("0007-admission-type"),
                5: cx(),
                6: f"{t()}^{t()}^{t()}^{t()}",
                7: reps(xcn),
                8: reps(xcn, 1),
                9: reps(xcn, 1),
                10: cwe(),
                13: cwe(),
                14: cwe(),
                17: reps(xcn, 1),
                19: cx() if draw(st.booleans()) else "",
                36: cwe("0112-discharge-disposition"),
                39: t(),
                44: when(),
                45: when(),
                50: cx(),
                52: reps(xcn, 1),
            },
        ),
        seg("PV2", {3: reps(cwe)}),
    ]
    for _ in range(draw(st.integers(0, 2))):
        lines.append(
            seg(
                "ROL",
                {
                    1: "1",
                    2: draw(st.sampled_from(["AD", "D", ""])),
                    3: draw(code_from("0443-participation-type")),
                    4: xcn(),
                    5: when(),
                },
            )
        )
    for _ in range(draw(st.integers(0, 2))):
        lines.append(seg("PRT", {2: "AD", 4: draw(code_from("0443-participation-type")), 5: xcn(), 11: when()}))
    for i in range(draw(st.integers(0, 3))):
        lines.append(
            seg(
                "DG1",
                {
                    1: str(i + 1),
                    3: cwe(),
                    4: t(),
                    5: when(),
                    6: cwe("0052-diagnosis-use"),
                    15: number(),
                    16: xcn(),
                    19: when(),
                    21: draw(st.sampled_from(["", "A", "D"])),
                },
            )
        )
    for i in range(draw(st.integers(0, 2))):
        lines.append(
            seg(
                "AL1",
                {
                    1: str(i + 1),
                    2: draw(code_from("0127-allergy-category")),
                    3: cwe(),
                    4: draw(code_from("0128-allergy-criticality")),
                    5: reps(t),
                    6: when(),
                },
            )
        )
    for i in range(draw(st.integers(0, 3))):
        value_type = draw(st.sampled_from(["NM", "ST", "TX", "FT", "CWE", "CE", "DT", "DTM", "SN", "ED", ""]))
        value = {
            "NM": number,
            "SN": lambda: "^".join(
                (draw(st.sampled_from(["", "<", ">=", "="])), number(), draw(st.sampled_from(["", ":", "-"])), number())
            ),
            "CWE": cwe,
            "CE": cwe,
            "DT": lambda: when(),
            "DTM": lambda: when(),
        }.get(value_type, t)
        lines.append(
            seg(
                "OBX",
                {
                    1: str(i + 1),
                    2: value_type,
                    3: cwe(),
                    5: value(),
                    6: f"{t()}^{t()}^{draw(st.sampled_from(['', 'UCUM', 'L']))}",
                    7: t(),
                    8: cwe(),
                    11: draw(code_from("0085-observation-status")),
                    14: when(),
                },
            )
        )
    for i in range(draw(st.integers(0, 2))):
        lines.append(
            seg(
                "IN1",
                {
                    1: str(i + 1),
                    2: cwe(),
                    3: cx(),
                    4: f"{t()}^^{t()}",
                    5: xad(),
                    8: t(),
                    9: t(),
                    12: when(),
                    13: when(),
                    15: cwe(),
                    17: cwe("0063-relationship"),
                    36: t(),
                    49: cx(),
                },
            )
        )
        if draw(st.booleans()):
            lines.append(seg("IN2", {1: "1", 6: draw(st.sampled_from(["", "9AA0-A00-AA00", "123"]))}))
    end = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    text = end.join(lines) + end
    raw = text.encode(codec)
    if codec == "utf-8" and draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    return raw


def assert_notification_shape(bundle: dict) -> None:
    """MessageHeader first with a Da Vinci event; focus, subject and locations resolve; ids unique."""
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    assert len(by_url) == len(bundle["entry"])
    header = bundle["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"
    assert header["eventCoding"]["system"] == NOTIFICATION_EVENT_SYSTEM
    encounter = by_url[header["focus"][0]["reference"]]
    assert encounter["resourceType"] == "Encounter"
    assert by_url[encounter["subject"]["reference"]]["resourceType"] == "Patient"
    for loc in encounter.get("location", []):
        assert by_url[loc["location"]["reference"]]["resourceType"] == "Location"


TIMEZONES = [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=adt_message(), tz=st.sampled_from(TIMEZONES))
def test_random_adt_converts_to_a_valid_notification_or_message_error(raw, tz):
    """Conversion raises nothing but MessageError, and every Bundle validates and has the notification shape."""
    try:
        conversion = convert(V2Message(raw), VOCAB, tz, datetime(2026, 3, 1, tzinfo=UTC))
    except MessageError:
        return
    validate_bundle(conversion.bundle)
    assert_notification_shape(conversion.bundle)
    for warning in conversion.warnings:
        assert ":" in warning  # every warning names its field


@pytest.mark.parametrize("seed_text", ["A\\F\\B", "\\Xzz\\", "\\", "a\\.br\\b", '""'])
def test_escape_edge_cases_in_names_convert(seed_text):
    """Odd escapes in a name (bad hex, a lone escape character, a null) still give a valid Bundle."""
    raw = (
        "MSH|^~\\&|APP|FAC|H|A|20260301120000||ADT^A01|C1|P|2.5.1\r"
        f"PID|1||M1^^^H^MR||{seed_text}^{seed_text}\rPV1|1|I|W^1^A^FAC||||||||||||||||V1\r"
    ).encode()
    validate_bundle(convert(V2Message(raw), VOCAB, UTC).bundle)
