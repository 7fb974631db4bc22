"""A small, fast HL7 v2 reader for the pipeline.

It decodes the bytes with the declared charset, splits on the separators the
message declares, and reads fields by the paths analysts use (``PID-3``,
component 1 of repetition 2 ...). Values are unescaped on the way out.
hl7apy's object model costs 8-23 ms a message; this costs tens of
microseconds, which is why the pipeline uses it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo

from gateway.errors import MessageError
from gateway.header import ERR_DATA_TYPE, ERR_SEGMENT_SEQUENCE, MessageHeader, read_msh
from gateway.limits import Limits, scan

#: MSH-18 values (HL7 table 0211, and spellings seen in the wild) and the
#: Python codecs that read them.
CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}

_SEGMENT_END = re.compile(r"\r\n|\r|\n")


def decode(raw: bytes, charset: str = "") -> tuple[str, str]:
    """Decode ``raw`` per MSH-18; return (text, codec used).

    With no charset (or ASCII that is not ASCII) UTF-8 is tried, then
    windows-1252, which is what senders that declare nothing mostly send. A
    UTF-8 byte order mark outweighs the declaration.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        charset = "UNICODE UTF-8"
    codec = CHARSETS.get(charset.strip().upper(), "")
    if codec and codec != "ascii":
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), "cp1252"


class Segment:
    """One segment; ``field(n)`` is HL7's n (for MSH, MSH-1 is the field separator).

    ``fields`` is read-only once the segment is read: repetitions are split
    once per field and kept (the converter reads some fields several times).
    """

    __slots__ = ("name", "fields", "msg", "_reps")

    def __init__(self, name: str, fields: list[str], msg: V2Message) -> None:
        self.name = name
        self.fields = fields
        self.msg = msg
        self._reps: dict[int, list[str]] = {}

    def raw(self, n: int) -> str:
        """Field ``n`` as written (escapes kept, all repetitions)."""
        f = self.fields
        return f[n] if n < len(f) else ""

    def _separators(self, n: int) -> bool:
        # MSH-1 and MSH-2 hold the separators themselves: never split or unescaped.
        return n <= 2 and self.name == "MSH"

    def reps(self, n: int) -> list[str]:
        """The repetitions of field ``n`` as written (empty list when empty or ``""``); do not modify it."""
        found = self._reps.get(n)
        if found is not None:
            return found
        f = self.fields
        value = f[n] if n < len(f) else ""
        if not value or value == '""':
            found = []
        elif self._separators(n):
            found = [value]
        else:
            found = [r for r in value.split(self.msg.rep) if r and r != '""']
        self._reps[n] = found
        return found

    def comps(self, n: int, rep: int = 0) -> list[str]:
        """Components of repetition ``rep`` of field ``n``, unescaped."""
        reps = self.reps(n)
        if rep >= len(reps):
            return []
        if self._separators(n):
            return [reps[rep]]
        return self.msg.components(reps[rep])

    def get(self, n: int, comp: int = 1, rep: int = 0) -> str:
        """Component ``comp`` (1-based) of repetition ``rep`` of field ``n``, unescaped; "" when absent."""
        c = self.comps(n, rep)
        return c[comp - 1] if comp <= len(c) else ""

    def __repr__(self) -> str:  # no field contents: they may be PHI
        return f"<Segment {self.name} with {len(self.fields) - 1} fields>"


class V2Message:
    """A decoded HL7 v2 message split into segments."""

    def __init__(
        self, raw: bytes, charset: str = "", header: MessageHeader | None = None, limits: Limits | None = Limits()
    ) -> None:
        """Decode ``raw`` with ``charset`` (an MSH-18 value), else with the MSH-18 it declares.

        ``header`` is the message's MSH as intake read it (:func:`gateway.header.read_msh`);
        it is read here when not given. Raises :class:`MessageError` when the MSH cannot be read,
        and :class:`~gateway.limits.LimitExceeded` when the message is over ``limits`` (intake's
        limits; ``None`` reads any size): what is over a limit is never converted.
        """
        self.header = header = header or read_msh(raw)
        if limits is not None:
            scan(raw, limits, header)
        text, self.codec = decode(raw, charset or header.charset.strip())
        text = text.lstrip("\r\n \t")
        if not text.startswith("MSH"):
            raise MessageError("the message does not start with an MSH segment", ERR_SEGMENT_SEQUENCE, "MSH")
        self.fs = fs = header.field_separator
        enc = header.encoding_characters
        # A fifth character (v2.7's truncation character) is accepted and not
        # used: values are read as sent, a truncated value is the best we have.
        self.comp, self.rep, self.esc, self.sub = enc[0], enc[1], enc[2], enc[3]
        self.segments: list[Segment] = []
        for line in _SEGMENT_END.split(text):
            if not line.strip():
                continue
            parts = line.split(fs)
            name = parts[0].strip()
            if name == "MSH":
                # Make MSH-n be fields[n]: MSH-1 is the separator itself.
                parts = ["MSH", fs, *parts[1:]]
            self.segments.append(Segment(name, parts, self))

    # -- navigation ---------------------------------------------------------

    def segment(self, name: str) -> Segment | None:
        """The first segment called ``name``."""
        for s in self.segments:
            if s.name == name:
                return s
        return None

    def all(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in order."""
        return [s for s in self.segments if s.name == name]

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def version(self) -> str:
        return self.msh.get(12)

    def components(self, value: str) -> list[str]:
        """Split one repetition into unescaped components.

        A subcomponent separator stays in the text (many senders write a
        literal ``&`` in names and addresses); datatypes whose components have
        subcomponents (HD, FN, SAD) split the raw component with
        :meth:`subcomponents` instead, before unescaping.
        """
        parts = value.split(self.comp)
        if self.esc in value:
            return [self.unescape(p) for p in parts]
        return ["" if p == '""' else p for p in parts]

    def subcomponents(self, value: str) -> list[str]:
        """Split a raw (still escaped) component into unescaped subcomponents."""
        return [self.unescape(p) for p in value.split(self.sub)]

    def unescape(self, value: str) -> str:
        """Resolve HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\ ...)."""
        if value == '""':
            return ""
        esc = self.esc
        if esc not in value:
            return value
        out = []
        i = 0
        n = len(value)
        while i < n:
            ch = value[i]
            if ch != esc:
                out.append(ch)
                i += 1
                continue
            end = value.find(esc, i + 1)
            if end < 0:
                out.append(value[i:])
                break
            seq = value[i + 1 : end]
            i = end + 1
            if seq == "F":
                out.append(self.fs)
            elif seq == "S":
                out.append(self.comp)
            elif seq == "T":
                out.append(self.sub)
            elif seq == "R":
                out.append(self.rep)
            elif seq == "E":
                out.append(esc)
            elif seq == ".br" or seq.startswith(".sp"):
                out.append("\n")
            elif seq.startswith("X") and len(seq) > 1:
                try:
                    data = bytes.fromhex(seq[1:])
                except ValueError:
                    out.append(esc + seq + esc)  # not hex: keep it as written
                    continue
                try:
                    out.append(data.decode(self.codec if self.codec != "ascii" else "latin-1"))
                except UnicodeDecodeError:
                    out.append(data.decode("latin-1"))
            elif seq in ("H", "N") or seq.startswith((".", "C", "M", "Z")):
                pass  # formatting and charset-switch escapes carry no text
            else:
                out.append(esc + seq + esc)
        return "".join(out)


# -- dates and times ---------------------------------------------------------

_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?$", re.ASCII)


def parse_dtm(value: str, location: str, default_tz: tzinfo | None = None) -> tuple[str, datetime | None]:
    """An HL7 DTM/TS value as a FHIR ``dateTime`` string, and a datetime when it has a time.

    The precision of the source is kept (``2024``, ``2024-03``, ``2024-03-05``
    or a full time). A time with no offset takes ``default_tz`` (UTC when none).
    Raises :class:`MessageError` naming ``location`` when the value is not a date.
    """
    v = value.strip()
    m = _DTM.match(v)
    if not m:
        raise MessageError("not a valid HL7 date/time", ERR_DATA_TYPE, location)
    year, month, day, hour, minute, second, frac, offset = m.groups()
    if frac and second is None:  # a fraction belongs to the seconds
        raise MessageError("not a valid HL7 date/time", ERR_DATA_TYPE, location)
    try:
        if int(year) < 1:  # FHIR has no year 0000
            raise ValueError
        if hour is None:
            if day is not None:
                datetime(int(year), int(month), int(day))
                return f"{year}-{month}-{day}", None
            if month is not None:
                if not 1 <= int(month) <= 12:
                    raise ValueError
                return f"{year}-{month}", None
            return year, None
        if offset:
            sign = 1 if offset[0] == "+" else -1
            hh, mm = int(offset[1:3]), int(offset[3:5])
            if hh > 14 or mm > 59:
                raise ValueError
            tz: tzinfo = timezone(sign * timedelta(hours=hh, minutes=mm))
        else:
            tz = default_tz or UTC
        micro = int(round(float(frac) * 1_000_000)) if frac else 0
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute or 0),
            int(second or 0),
            min(micro, 999_999),
            tzinfo=tz,
        )
    except (ValueError, TypeError, OverflowError):
        raise MessageError("not a valid HL7 date/time", ERR_DATA_TYPE, location) from None
    if moment.utcoffset() is None:  # pragma: no cover - zoneinfo always answers
        moment = moment.replace(tzinfo=UTC)
    text = moment.isoformat(timespec="milliseconds" if frac else "seconds")
    return text, moment
