"""How big one HL7 v2 message may be, and a scan that checks it without parsing.

A frame under the byte limit can still ask for a lot: 60,000 repetitions of
PID-3 fit in 1 MB and convert to a 13 MB Bundle. :func:`scan` counts
segments, fields, repetitions and components and measures field lengths on
the raw bytes, with the separators the MSH declares, in passes that run in C
(counts, ``bytes.translate``, substring searches): its cost grows with the
bytes, not with their arrangement. Intake runs it on the connection's path
(a few microseconds for an ordinary ADT message, see ``bench/limits_scan.py``);
the converter runs it again, so a message over a limit is never expanded even
if it reaches the pipeline some other way.

This module imports only the header reader and the errors: the converter and
intake both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import compress, repeat
from operator import ge
from typing import NamedTuple

from gateway.errors import MessageError
from gateway.header import ERR_DATA_TYPE, ERR_SEGMENT_SEQUENCE, ERR_VALUE_TOO_LONG, MessageHeader, read_msh

__all__ = ["HEADER_FIELDS", "LimitExceeded", "Limits", "scan"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The largest message Herald reads (README, "Bounded input", says why each default)."""

    #: Segments in one message.
    segments: int = 500
    #: Fields in one segment.
    fields: int = 256
    #: Repetitions of one field.
    repetitions: int = 100
    #: Components in one repetition.
    components: int = 64
    #: Bytes in one field (all its repetitions).
    field_length: int = 65536
    #: Characters in MSH-10 (HL7 v2.7 and later: ST, 199; v2.5 said 20).
    control_id_length: int = 199
    #: Characters in each of the other MSH fields Herald reads and echoes (MSH-3 to MSH-12).
    header_field_length: int = 256

    def check(self) -> list[tuple[str, str]]:
        """Problems with these values as (name, reason); empty when usable."""
        floors = {
            "segments": 2,
            "fields": 20,
            "repetitions": 1,
            "components": 10,
            "field_length": 256,
            "control_id_length": 20,
            "header_field_length": 64,
        }
        return [
            (name, f"must be at least {low}")
            for name, low in floors.items()
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low
        ]


#: The MSH fields held to ``header_field_length`` (MSH-10 has its own limit).
HEADER_FIELDS = (3, 4, 5, 6, 7, 8, 9, 11, 12)

_SEGMENT_ID = re.compile(rb"[A-Z][A-Z0-9]{2}")


class LimitExceeded(MessageError):
    """A message over one of the :class:`Limits`; ``limit`` names it, ``sequence`` counts the segment."""

    def __init__(self, reason: str, code: str, location: str, limit: str, sequence: int = 1) -> None:
        super().__init__(reason, code, location)
        self.limit = limit
        self.sequence = sequence


def scan(raw: bytes, limits: Limits, header: MessageHeader | None = None) -> None:
    """Raise :class:`LimitExceeded` at the first part of ``raw`` over ``limits``; return None when within.

    ``header`` is the message's MSH as already read (read here when not
    given; :class:`MessageError` when it cannot be). Reasons name the limit
    and the place (``PID-3``), never a value.
    """
    if header is None:
        header = read_msh(raw)
    fs = header.field_separator.encode("latin-1")
    enc = header.encoding_characters.encode("latin-1")
    comp, rep = enc[0:1], enc[1:2]
    # CR, LF or CR LF, as the converter splits (bytes.splitlines knows no other line ends).
    lines = raw.splitlines()
    # A blank line is not a segment (the converter skips them too).
    if len(lines) > limits.segments and len(lines) - lines.count(b"") > limits.segments:
        _too_many_segments(lines, fs, limits)
    for line in lines:
        if line:
            # An MSH shorter than both header limits has no field over either.
            if len(line) > min(limits.control_id_length, limits.header_field_length):
                _check_msh(line, fs, limits)
            break
    # Fields, repetitions and components are runs of one separator once every
    # other byte but the separators that end its part is deleted: one pass in C
    # each (bytes.translate, then a substring search), whatever the message.
    # Only a segment found over a limit is split, to say where.
    # Counts over the whole message come first: most have too few separators
    # of each kind for any run to reach its limit.
    runs = _runs(fs, comp, rep)
    over_fields = raw.count(fs) > limits.fields and fs * (limits.fields + 1) in raw.translate(None, runs.fields)
    over_reps = raw.count(rep) >= limits.repetitions and rep * limits.repetitions in raw.translate(
        None, runs.repetitions
    )
    over_comps = raw.count(comp) >= limits.components and comp * limits.components in raw.translate(
        None, runs.components
    )
    lengthy = len(raw) > limits.field_length
    if not (over_fields or over_reps or over_comps or lengthy):
        return None
    for index, line in enumerate(lines):
        if (
            (over_fields and fs * (limits.fields + 1) in line.translate(None, runs.fields))
            or (over_reps and rep * limits.repetitions in line.translate(None, runs.repetitions))
            or (over_comps and comp * limits.components in line.translate(None, runs.components))
            or (lengthy and len(line) > limits.field_length)
        ):
            _check_segment(lines, index, fs, comp, rep, limits)
    return None


class _Runs(NamedTuple):
    """For one set of separators, the bytes to delete so a part's separators stand in one run."""

    fields: bytes  # all but the field separator and the segment ends
    repetitions: bytes  # all but the repetition separator and what ends a field
    components: bytes  # all but the component separator and what ends a repetition


@lru_cache(maxsize=64)
def _runs(fs: bytes, comp: bytes, rep: bytes) -> _Runs:
    def all_but(keep: bytes) -> bytes:
        return bytes(b for b in range(256) if b not in keep)

    ends = b"\r\n"
    return _Runs(all_but(fs + ends), all_but(rep + fs + ends), all_but(comp + rep + fs + ends))


def _too_many_segments(lines: list[bytes], fs: bytes, limits: Limits) -> None:
    count = index = 0
    for index, line in enumerate(lines):  # noqa: B007 - the index after the loop is the segment over
        if line:
            count += 1
            if count > limits.segments:
                break
    name = _segment_name(lines[index], fs)
    raise LimitExceeded(
        f"the message has more than {limits.segments} segments (limits.segments)",
        ERR_SEGMENT_SEQUENCE,
        name.decode("ascii"),
        "segments",
        _sequence(lines, index, name, fs),
    )


def _segment_name(line: bytes, fs: bytes) -> bytes:
    """The segment id, or ``?`` when it is not one (a location must never quote content)."""
    name = line[:3]
    return name if _SEGMENT_ID.fullmatch(name) and line[3:4] in (fs, b"") else b"?"


def _check_msh(line: bytes, fs: bytes, limits: Limits) -> None:
    # The first segment is the MSH (read_msh checked): MSH-n is fields[n - 1].
    fields = line.split(fs, 13)
    if len(fields) > 9 and len(fields[9]) > limits.control_id_length:
        raise LimitExceeded(
            f"MSH-10 is longer than {limits.control_id_length} characters (limits.control_id_length)",
            ERR_VALUE_TOO_LONG,
            "MSH-10",
            "control_id_length",
        )
    for n in HEADER_FIELDS:
        if n - 1 < len(fields) and len(fields[n - 1]) > limits.header_field_length:
            raise LimitExceeded(
                f"MSH-{n} is longer than {limits.header_field_length} characters (limits.header_field_length)",
                ERR_VALUE_TOO_LONG,
                f"MSH-{n}",
                "header_field_length",
            )


def _sequence(lines: list[bytes], index: int, name: bytes, fs: bytes) -> int:
    """Which occurrence of its segment id ``lines[index]`` is (counted only when there is an error to report)."""
    if name == b"?":
        return 1 + sum(1 for line in lines[:index] if line and _segment_name(line, fs) == name)
    prefix = name + fs
    return 1 + sum(1 for line in lines[:index] if line.startswith(prefix) or line == name)


def _check_segment(lines: list[bytes], index: int, fs: bytes, comp: bytes, rep: bytes, limits: Limits) -> None:
    line = lines[index]
    name = _segment_name(line, fs)
    seg = name.decode("ascii")

    def over(what: str, reason: str, code: str, field: int) -> LimitExceeded:
        return LimitExceeded(
            f"{seg}{reason} (limits.{what})", code, f"{seg}-{field}", what, _sequence(lines, index, name, fs)
        )

    if line.count(fs) > limits.fields:
        raise over("fields", f" has more than {limits.fields} fields", ERR_DATA_TYPE, limits.fields + 1)
    fields = line.split(fs)
    # MSH-1 is the separator itself: MSH-n is fields[n - 1]; elsewhere SEG-n is fields[n].
    shift = 1 if seg == "MSH" else 0
    if shift:
        fields[1] = b""  # MSH-2 holds the encoding characters themselves
    # Only the checks the whole segment failed, counted in C (map, max); Python
    # loops only to locate a field known to be over.
    if line.count(rep) >= limits.repetitions and max(map(bytes.count, fields, repeat(rep))) >= limits.repetitions:
        i = next(i for i, f in enumerate(fields) if f.count(rep) >= limits.repetitions)
        raise over(
            "repetitions", f"-{i + shift} has more than {limits.repetitions} repetitions", ERR_DATA_TYPE, i + shift
        )
    if line.count(comp) >= limits.components:
        # Components are counted per repetition: split on both separators at once, and
        # count only in pieces long enough to hold that many separators (all in C).
        pieces = (fs.join(fields) if shift else line).replace(rep, fs).split(fs)
        long_enough = list(compress(pieces, map(ge, map(len, pieces), repeat(limits.components))))
        if long_enough and max(map(bytes.count, long_enough, repeat(comp))) >= limits.components:
            i = next(
                i
                for i, f in enumerate(fields)
                if f.count(comp) >= limits.components
                and max(map(bytes.count, f.split(rep), repeat(comp))) >= limits.components
            )
            raise over(
                "components", f"-{i + shift} has more than {limits.components} components", ERR_DATA_TYPE, i + shift
            )
    if len(line) > limits.field_length and max(map(len, fields)) > limits.field_length:
        i = next(i for i, f in enumerate(fields) if len(f) > limits.field_length)
        raise over(
            "field_length", f"-{i + shift} is longer than {limits.field_length} bytes", ERR_VALUE_TOO_LONG, i + shift
        )
