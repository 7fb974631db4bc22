"""ACO attribution roster files: formats, and checks by line and column.

A roster file is read one row at a time (a million-member file never sits in
memory as objects): :func:`open_roster` reads the header (or recognises a
fixed-width CCLF8 record), :meth:`RosterSource.rows` yields each row as a
:class:`RosterRow`, a good member or the problems found in it. The store
stages the rows and publishes the ACO's new roster version whole
(:func:`gateway.app.roster.import_roster_file`); duplicates are found there.
:data:`DERIVATION` is how a member's normalised person and blocking keys are
computed; the import hands it to the store, which imports no stage. A
header cell that feeds no roster column is never dropped silently: it is an
:class:`UnreadColumn` of the source (a problem with ``strict``), unless the
format lists it as one of its files' columns Herald does not read.

Formats are data (``mappings/roster_formats.toml``): Herald's CSV (any
layout through the config's ``[roster.columns]``), the CMS SSP Assignment List
Report table 1-1 and CCLF8 beneficiary demographics (delimited or fixed-width).
CMS files carry no ACO id and no PCP: the ACO comes from ``--aco`` (or
``[roster] aco_id``), the PCP from a second file (``--pcp``).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import fnmatch
import hashlib
import io
import itertools
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from gateway.conversion.convert import MBI_PATTERN
from gateway.conversion.datatypes import npi_check_digit
from gateway.errors import RosterError
from gateway.matching.blocking import BLOCKING_RECIPE, blocking_keys
from gateway.matching.people import frequency_terms, pack_person, person_from_member, unpack_person
from gateway.records import MEMBER_COLUMNS, RosterDerivation
from gateway.resources import mappings_dir

FORMATS_FILE = mappings_dir() / "roster_formats.toml"

#: The roster's columns, as the store keeps them and matching reads them.
ROSTER_COLUMNS = MEMBER_COLUMNS
_DATE_COLUMNS = ("birth_date", "effective_start", "effective_end")
_YES = {"Y", "YES", "1", "TRUE", "T"}
_NO = {"", "N", "NO", "0", "FALSE", "F"}
_ZIP = re.compile(r"\d{5}(-?\d{4})?")
_STATE = re.compile(r"[A-Za-z]{2}")
_NPI = re.compile(r"\d{10}")
_NON_DIGIT = re.compile(r"\D")
_SUFFIX_NOISE = re.compile(r"[.\s]")
#: Where name_suffix sits in a member's values: a member without one hashes as before the column existed.
_SUFFIX_AT = ROSTER_COLUMNS.index("name_suffix")


@dataclass(frozen=True, slots=True)
class RosterMember:
    """One attributed patient of an ACO (``keys``: its blocking keys, computed when not given)."""

    aco_id: str
    member_id: str
    mbi: str
    mrn: str
    mrn_authority: str
    last_name: str
    first_name: str
    birth_date: str
    sex: str
    pcp_npi: str
    pcp_name: str
    care_manager: str
    effective_start: str
    effective_end: str
    middle_name: str = ""
    name_suffix: str = ""  # generational (JR, SR, II, III, ...), normalised by the file check
    address_line: str = ""
    city: str = ""
    state: str = ""
    zip: str = ""
    phone: str = ""
    opted_out: bool = False
    keys: tuple[str, ...] = ()
    person: str = ""  # the normalised person (gateway.matching.people.pack_person), computed when not given

    def __post_init__(self) -> None:
        if not self.keys or not self.person:
            # Normalised once, here: the store keeps the result, so matching never redoes it.
            person = person_from_member(self.row())
            if not self.person:
                object.__setattr__(self, "person", pack_person(person))
            if not self.keys:
                object.__setattr__(self, "keys", tuple(blocking_keys(person)))

    def values(self) -> tuple:
        """The member's values in the order of :data:`ROSTER_COLUMNS` (opt-out as 0/1)."""
        return tuple(int(self.opted_out) if c == "opted_out" else getattr(self, c) for c in ROSTER_COLUMNS)

    def row(self) -> dict:
        """The member as a roster row (the columns of :data:`ROSTER_COLUMNS`)."""
        return dict(zip(ROSTER_COLUMNS, self.values(), strict=True))

    @staticmethod
    def content_hash_of(values: tuple) -> bytes:
        """A digest of every column's value: an import compares it to tell changed members from unchanged.

        An empty name_suffix is left out, so a member of a roster file from
        before that column (schema version 1) is not counted as changed.
        """
        if values[_SUFFIX_AT] == "":
            values = values[:_SUFFIX_AT] + values[_SUFFIX_AT + 1 :]
        text = "\x1f".join(str(v) for v in values)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class RosterRow:
    """One data row of a roster file: a member, or the problems that kept it out.

    ``aco_id`` and ``member_id`` name a bad row's member when they could be
    read, so that replacing the roster does not end a member whose row was bad.
    """

    line: int
    member: RosterMember | None
    problems: tuple[tuple[int, str, str], ...] = ()
    aco_id: str = ""
    member_id: str = ""


@dataclass(frozen=True)
class RosterFormat:
    """How one kind of roster file is laid out (from ``mappings/roster_formats.toml``)."""

    name: str
    source: str
    columns: dict[str, tuple[str, ...]]
    date_formats: tuple[str, ...]
    sex_codes: dict[str, str]
    required: tuple[str, ...]
    member_id_from: str = ""
    detect: tuple[str, ...] = ()
    fixed_width: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Headers (or shell-style patterns) the format's files carry and Herald does not read.
    ignored: tuple[str, ...] = ()

    def ignores(self, name: str) -> bool:
        """Whether the format says a header (lower case) is one of its columns Herald does not read."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignored)


def said_names(said: list) -> list[list[str]]:
    """The header names already said, per group (a header both lists name is said once)."""
    return [names for _, _, names in said]


@dataclass(frozen=True, slots=True)
class UnreadColumn:
    """A header cell of a delimited roster file whose values no roster column takes.

    Unknown (``nearest``: the closest accepted spelling, and ``feeds``: the
    roster column it is a spelling of), a second column for a roster column
    already read from another (``read_from``: that one's header), or a cell
    with no name (``header`` empty).
    """

    position: int  # 1-based, as a spreadsheet counts columns
    header: str  # the header cell as written
    nearest: str = ""
    feeds: str = ""
    read_from: str = ""

    @property
    def label(self) -> str:
        """The column as a problem names it: its quoted header, or its position when it has none."""
        return f"'{self.header.strip()}'" if self.header.strip() else f"{self.position} (no name)"

    @property
    def reason(self) -> str:
        """Why no roster column takes it."""
        if not self.header.strip():
            return "the column has no name"
        if self.read_from:
            return f"a second column for {self.feeds}, which is read from '{self.read_from}'"
        if not self.nearest:
            return "not a roster column Herald reads"
        which = f", which feeds {self.feeds}" if self.feeds and self.feeds != self.nearest else ""
        return f"not a roster column Herald reads (nearest: '{self.nearest}'{which})"

    def warning(self) -> tuple[int, str, str]:
        """The column as a (line, column, reason) warning of an import that goes on without it."""
        return (1, self.label, f"{self.reason}; its values are not imported")

    def problem(self) -> tuple[int, str, str]:
        """The column as a (line, column, reason) problem of a refused file."""
        return (1, self.label, self.reason)


@dataclass(frozen=True)
class RosterOptions:
    """What the command line and the config add to a file.

    ``pcp`` maps ``mbi:VALUE`` / ``member:VALUE`` to PCP columns (from
    :func:`read_pcp_file`); ``opted_out`` holds such keys of members who opted
    out of data sharing (from :func:`read_opt_out_file`). With ``strict``, a
    header no roster column reads (and the format does not list as ignored)
    refuses the file.
    """

    format: str = "auto"
    aco_id: str = ""
    columns: Mapping[str, str] = field(default_factory=dict)
    pcp: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    opted_out: frozenset[str] = frozenset()
    today: date | None = None
    strict: bool = False
    #: Headers (or shell-style patterns, lower case) of the site's own columns Herald is not to read
    #: (``[roster] ignored`` in the config, ``--ignore`` on the command line): said once, never refused.
    ignored: tuple[str, ...] = ()


def load_formats(path: Path | None = None) -> dict[str, RosterFormat]:
    """Read the roster formats table."""
    data = tomllib.loads((path or FORMATS_FILE).read_text(encoding="utf-8"))
    out = {}
    for name, spec in data["formats"].items():
        out[name] = RosterFormat(
            name=name,
            source=spec["source"],
            columns={col: tuple(n.lower() for n in names) for col, names in spec.get("columns", {}).items()},
            date_formats=tuple(spec["date_formats"]),
            sex_codes={str(k).upper(): v for k, v in spec["sex_codes"].items()},
            required=tuple(spec["required"]),
            member_id_from=spec.get("member_id_from", ""),
            detect=tuple(n.lower() for n in spec.get("detect", ())),
            fixed_width={col: (int(p[0]), int(p[1])) for col, p in spec.get("fixed_width", {}).items()},
            ignored=tuple(n.lower() for n in spec.get("ignored", ())),
        )
    return out


def load_name_suffixes(path: Path | None = None) -> dict[str, str]:
    """The generational suffixes a name_suffix column may hold (normalised spelling to what is kept)."""
    data = tomllib.loads((path or FORMATS_FILE).read_text(encoding="utf-8"))
    return {str(k).upper(): str(v) for k, v in data["name_suffixes"].items()}


def _supplement_columns(kind: str, path: Path | None = None) -> dict[str, tuple[str, ...]]:
    data = tomllib.loads((path or FORMATS_FILE).read_text(encoding="utf-8"))
    return {col: tuple(n.lower() for n in names) for col, names in data["supplements"][kind]["columns"].items()}


FORMATS = load_formats()
NAME_SUFFIXES = load_name_suffixes()


def npi_problem(npi: str) -> str | None:
    """Why ``npi`` is not an NPI (ten digits whose last is the Luhn check digit), or None."""
    if not _NPI.fullmatch(npi):
        return "is not a 10-digit NPI"
    if npi_check_digit(npi[:9]) != npi[9]:
        return f"is not an NPI: its check digit should be {npi_check_digit(npi[:9])}, not {npi[9]} (a typo?)"
    return None


# -- reading a file ---------------------------------------------------------------


def sniff_encoding(path: Path) -> tuple[str, str]:
    """``(encoding, sha256)`` of a file: UTF-8 (with or without BOM) if it decodes, else cp1252.

    A file that is neither (a NUL byte, or a byte cp1252 leaves undefined) is
    not a roster: :class:`RosterError` names the line and the byte, rather than
    a decoding error halfway through an import.
    """
    digest = hashlib.sha256()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    cp1252 = codecs.getincrementaldecoder("cp1252")()
    ok = {"utf-8": True, "cp1252": True}
    line, bad = 1, None
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            nul = chunk.find(b"\x00")
            if nul >= 0 and bad is None:
                bad = (line + chunk.count(b"\n", 0, nul), "a NUL byte")
            for name, decoder in (("utf-8", utf8), ("cp1252", cp1252)):
                if ok[name]:
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        ok[name] = False
                        if name == "cp1252" and bad is None:
                            bad = (line + chunk.count(b"\n", 0, e.start), f"byte 0x{chunk[e.start]:02x}")
            line += chunk.count(b"\n")
    if ok["utf-8"]:
        try:
            utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            ok["utf-8"] = False
    if bad is not None and (bad[1] == "a NUL byte" or not ok["utf-8"]):
        raise RosterError(
            [(bad[0], "-", f"{bad[1]}: not a text file in UTF-8 or Windows-1252; a roster is CSV or fixed-width text")],
            source=str(path),
        )
    return ("utf-8-sig" if ok["utf-8"] else "cp1252"), digest.hexdigest()


def _delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in (",", "|", "\t", ";")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


class RosterSource:
    """An opened roster file: its format and header, ready to yield rows.

    Raises :class:`RosterError` (line 1) from the constructor when the header
    cannot serve: a required column missing, no way to know the ACO, or (with
    ``strict``) a column no roster column reads. ``unread`` holds the header
    cells of a delimited file that feed no roster column (each to be said by
    name); ``not_read`` the headers the format says Herald does not read.
    """

    def __init__(self, lines: Iterable[str], options: RosterOptions, name: str = "roster") -> None:
        self.name = name
        self.options = options
        self._lines = iter(lines)
        self._today = options.today or date.today()
        first = next(self._lines, None)
        if first is None or not first.strip():
            raise RosterError([(1, "-", "the file is empty")])
        first = first.lstrip("\ufeff").rstrip("\r\n")
        self.format, self.fixed = self._pick_format(first, options.format)
        self._index: dict[str, int] = {}
        self._header_names: dict[str, str] = {}
        self.unread: tuple[UnreadColumn, ...] = ()
        self.not_read: tuple[str, ...] = ()
        self.delimiter = ","
        self._pending_first: str | None = None
        if self.fixed:
            self._pending_first = first  # no header: the first line is a record
            for col in self.format.fixed_width:
                start, length = self.format.fixed_width[col]
                self._header_names[col] = f"{col} (positions {start}-{start + length - 1})"
            available = set(self.format.fixed_width)
        else:
            self.delimiter = _delimiter(first)
            header = next(csv.reader([first], delimiter=self.delimiter))
            self.header = header
            lookup = {h.strip().lower(): i for i, h in enumerate(header)}
            columns = dict(self.format.columns)
            for col, name in options.columns.items():
                columns[col] = (name.lower(), *columns.get(col, ()))
            for col, names in columns.items():
                for n in names:
                    if n in lookup:
                        self._index[col] = lookup[n]
                        self._header_names[col] = header[lookup[n]].strip()
                        break
            available = set(self._index)
            self.unread, self.not_read = self._columns_not_read(header, columns)
        problems = []
        for col in self.format.required:
            if col not in available:
                spellings = ", ".join(self.format.columns.get(col, ())) or "(none in this format)"
                problems.append((1, col, f"required column is missing from the header (accepted: {spellings})"))
        if "mbi" not in available and "mrn" not in available:
            problems.append((1, "mbi", "the header has neither an MBI nor an MRN column"))
        if "member_id" not in available and not self.format.member_id_from and "member_id" not in self.format.required:
            problems.append((1, "member_id", "required column is missing from the header"))
        if "aco_id" not in available and not options.aco_id:
            problems.append((1, "aco_id", "the file has no ACO id column: give --aco or set [roster] aco_id"))
        if problems or options.strict:
            # A refused header says its unread columns too: a misspelt one is often why.
            problems.extend(u.problem() for u in self.unread)
        if problems:
            raise RosterError(problems)

    def _columns_not_read(
        self, header: list[str], columns: Mapping[str, tuple[str, ...]]
    ) -> tuple[tuple[UnreadColumn, ...], tuple[str, ...]]:
        """The header cells no roster column reads: (those to say one by one, those the format ignores)."""
        read = set(self._index.values())
        spelling_of: dict[str, str] = {}
        for col, names in columns.items():
            for n in names:
                spelling_of.setdefault(n, col)
        unread: list[UnreadColumn] = []
        ignored: list[str] = []
        for i, cell in enumerate(header):
            name = cell.strip().lower()
            if i in read:
                continue
            if not name:
                unread.append(UnreadColumn(i + 1, cell))
            elif self.format.ignores(name) or any(fnmatch.fnmatchcase(name, p) for p in self.options.ignored):
                ignored.append(cell.strip())
            elif name in spelling_of and spelling_of[name] in self._index:
                col = spelling_of[name]
                unread.append(UnreadColumn(i + 1, cell, name, col, self._header_names[col]))
            else:
                nearest = difflib.get_close_matches(name, spelling_of, n=1, cutoff=0.0)
                near = nearest[0] if nearest else ""
                unread.append(UnreadColumn(i + 1, cell, near, spelling_of.get(near, "")))
        return tuple(unread), tuple(ignored)

    def not_read_note(self) -> str:
        """One line naming the headers the format says Herald does not read ('' when there are none).

        A run of headers one pattern names (``hcc_col_*``) is shown as its
        first and last and a count.
        """
        said = []
        for patterns, who in (
            (self.format.ignored, f"the {self.format.name} format says"),
            (self.options.ignored, "[roster] ignored says"),
        ):
            groups: dict[str, list[str]] = {}
            for name in self.not_read:
                pattern = next((p for p in patterns if fnmatch.fnmatchcase(name.lower(), p)), None)
                if pattern is not None and not any(name in g for g in said_names(said)):
                    groups.setdefault(pattern, []).append(name)
            shown: list[str] = []
            for names in groups.values():
                shown += [f"{names[0]} .. {names[-1]} ({len(names)} columns)"] if len(names) > 2 else names
            if shown:
                said.append((who, shown, [n for names in groups.values() for n in names]))
        return "; ".join(f"not read, as {who}: {', '.join(shown)}" for who, shown, _ in said)

    @classmethod
    def from_text(cls, text: str, options: RosterOptions | None = None, name: str = "roster") -> RosterSource:
        """A source over text already in memory (tests, small files)."""
        return cls(io.StringIO(text, newline=""), options or RosterOptions(), name)

    def _pick_format(self, first: str, wanted: str) -> tuple[RosterFormat, bool]:
        lowered = {h.strip().lower() for h in re.split(r"[,|\t;]", first)}
        looks_fixed = len(first) >= 500 and bool(MBI_PATTERN.match(first[:11].upper())) and "," not in first
        if wanted != "auto":
            fmt = FORMATS.get(wanted)
            if fmt is None:
                raise RosterError([(1, "-", f"unknown roster format {wanted!r} (known: {', '.join(FORMATS)})")])
            return fmt, bool(fmt.fixed_width) and "bene_mbi_id" not in lowered
        if looks_fixed:
            return FORMATS["cclf8"], True
        for fmt in FORMATS.values():
            if fmt.detect and all(n in lowered for n in fmt.detect):
                return fmt, False
        return FORMATS["csv"], False

    def rows(self) -> Iterator[RosterRow]:
        """Each data row, checked; blank rows are skipped."""
        if self.fixed:
            yield from self._fixed_rows()
            return
        # Line numbers count physical lines (a quoted cell may hold a newline).
        reader = csv.reader(self._lines, delimiter=self.delimiter)
        width = len(self.header)
        for cells in reader:
            line = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            problems: list[tuple[int, str, str]] = []
            if any(c.strip() for c in cells[width:]):
                # Usually an unquoted delimiter in a name: every later cell has moved one column.
                problems.append((line, "-", f"the row has {len(cells)} cells but the header has {width}"))
            raw = {col: (cells[i].strip() if i < len(cells) else "") for col, i in self._index.items()}
            yield self._check(line, raw, problems)

    def _fixed_rows(self) -> Iterator[RosterRow]:
        spec = self.format.fixed_width
        need = max(start + length - 1 for start, length in spec.values())
        lines = self._lines
        if self._pending_first is not None:
            lines = itertools.chain([self._pending_first], lines)
        for n, text in enumerate(lines, start=1):
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            problems: list[tuple[int, str, str]] = []
            if len(text) < need:
                problems.append(
                    (n, "-", f"the record has {len(text)} characters; a {self.format.name} record has {need}")
                )
            raw = {col: text[start - 1 : start - 1 + length].strip() for col, (start, length) in spec.items()}
            yield self._check(n, raw, problems)

    def _check(self, line: int, raw: dict[str, str], problems: list[tuple[int, str, str]]) -> RosterRow:
        fmt = self.format
        names = self._header_names
        v = {c: raw.get(c, "") for c in ROSTER_COLUMNS}

        def bad(col: str, why: str) -> None:
            problems.append((line, names.get(col, col), why))

        if v["mbi"]:
            v["mbi"] = v["mbi"].replace("-", "").upper()
            if not MBI_PATTERN.match(v["mbi"]):
                bad("mbi", "is not a valid MBI (11 characters in the CMS format, e.g. 1EG4TE5MK73)")
        if not v["member_id"] and fmt.member_id_from:
            v["member_id"] = v[fmt.member_id_from]
        option_aco = self.options.aco_id
        if option_aco:
            if v["aco_id"] and v["aco_id"] != option_aco:
                bad("aco_id", f"is {v['aco_id']!r} but --aco says {option_aco!r}")
            v["aco_id"] = option_aco
        for col in dict.fromkeys((*fmt.required, "aco_id", "member_id")):
            if not v[col]:
                bad(col, "is empty")
        for col in _DATE_COLUMNS:
            if v[col]:
                parsed = _parse_date(v[col], fmt.date_formats)
                if parsed is None:
                    bad(col, f"{v[col]!r} is not a date ({' or '.join(_show_format(f) for f in fmt.date_formats)})")
                elif col == "birth_date" and parsed > self._today.isoformat():
                    bad(col, f"{v[col]!r} is in the future")
                else:
                    v[col] = parsed
        if v["sex"]:
            sex = fmt.sex_codes.get(v["sex"].upper())
            if sex is None:
                bad("sex", f"{v['sex']!r} is not one of {', '.join(sorted(fmt.sex_codes))}")
            else:
                v["sex"] = sex
        if v["name_suffix"]:
            suffix = NAME_SUFFIXES.get(_SUFFIX_NOISE.sub("", v["name_suffix"]).upper())
            if suffix is None:
                known = ", ".join(dict.fromkeys(NAME_SUFFIXES.values()))
                bad("name_suffix", f"{v['name_suffix']!r} is not a generational suffix ({known})")
            else:
                v["name_suffix"] = suffix
        if v["mrn"] and not v["mrn_authority"]:
            bad("mrn_authority", "is empty but an MRN is given")
        if not v["mbi"] and not v["mrn"]:
            bad("mbi", "neither an MBI nor an MRN is given")
        if v["zip"] and not _ZIP.fullmatch(v["zip"]):
            bad("zip", f"{v['zip']!r} is not a ZIP code (5 or 9 digits)")
        if v["state"] and not _STATE.fullmatch(v["state"]):
            bad("state", f"{v['state']!r} is not a two-letter state code")
        if v["phone"] and not 7 <= len(_NON_DIGIT.sub("", v["phone"])) <= 15:
            bad("phone", "is not a telephone number")
        opted = v["opted_out"].upper()
        if opted not in _YES and opted not in _NO:
            bad("opted_out", f"{v['opted_out']!r} is not Y or N")
        keys = (f"mbi:{v['mbi']}" if v["mbi"] else "", f"member:{v['member_id']}")
        opted_out = opted in _YES or any(k in self.options.opted_out for k in keys if k)
        if not (v["pcp_npi"] or v["pcp_name"]):
            for k in keys:
                pcp = self.options.pcp.get(k) if k else None
                if pcp:
                    v.update({c: pcp.get(c, "") for c in ("pcp_npi", "pcp_name", "care_manager") if pcp.get(c)})
                    break
        if v["pcp_npi"] and (why := npi_problem(v["pcp_npi"])):
            bad("pcp_npi", why)
        if v["effective_start"] and v["effective_end"] and v["effective_end"] < v["effective_start"]:
            bad("effective_end", "is before effective_start")
        if problems:
            return RosterRow(line, None, tuple(problems), v["aco_id"], v["member_id"])
        v["opted_out"] = opted_out
        member = RosterMember(**v)
        return RosterRow(line, member, (), member.aco_id, member.member_id)


def _show_format(fmt: str) -> str:
    return fmt.replace("%Y", "YYYY").replace("%m", "MM").replace("%d", "DD")


#: strptime formats the roster tables use, as patterns (strptime costs ~35 us a call; a million rows add up).
_DATE_PATTERNS = {
    "%Y-%m-%d": (re.compile(r"(\d{4})-(\d{2})-(\d{2})"), (0, 1, 2)),
    "%m/%d/%Y": (re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})"), (2, 0, 1)),
    "%Y%m%d": (re.compile(r"(\d{4})(\d{2})(\d{2})"), (0, 1, 2)),
}


def _parse_date(value: str, formats: Iterable[str]) -> str | None:
    value = value.strip()
    for fmt in formats:
        pattern = _DATE_PATTERNS.get(fmt)
        if pattern is None:
            try:
                parsed = datetime.strptime(value, fmt).date()
            except ValueError:
                continue
        else:
            found = pattern[0].fullmatch(value)
            if found is None:
                continue
            y, m, d = (int(found.group(i + 1)) for i in pattern[1])
            try:
                parsed = date(y, m, d)
            except ValueError:
                continue
        return parsed.isoformat() if parsed.year >= 1850 else None
    return None


def open_roster(path: Path, options: RosterOptions | None = None) -> tuple[RosterSource, str]:
    """Open a roster file for reading row by row; returns the source and the file's SHA-256.

    The caller closes nothing: the file is read through once by ``rows()`` and
    closed when the iteration ends.
    """
    encoding, digest = sniff_encoding(path)
    handle = path.open("r", encoding=encoding, newline="")
    try:
        source = RosterSource(_lines_then_close(handle), options or RosterOptions(), str(path))
    except BaseException:
        handle.close()
        raise
    return source, digest


def _lines_then_close(handle) -> Iterator[str]:
    with handle:
        yield from handle


def read_roster(
    text: str, options: RosterOptions | None = None
) -> tuple[list[RosterMember], list[tuple[int, str, str]]]:
    """Parse roster text in memory: the good members and every row problem (header problems raise).

    Duplicates are not looked for here: the import finds them (see
    :func:`gateway.store.roster_import.publish_roster_version`).
    """
    members, problems = [], []
    for row in RosterSource.from_text(text, options).rows():
        if row.member is not None:
            members.append(row.member)
        problems.extend(row.problems)
    return members, problems


# -- second files: PCP and opt-outs ---------------------------------------------------


def _read_keyed(path: Path, kind: str, wanted: tuple[str, ...]) -> dict[str, dict[str, str]]:
    encoding, _ = sniff_encoding(path)
    text = path.read_text(encoding=encoding)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise RosterError([(1, "-", "the file is empty")], source=str(path))
    delimiter = _delimiter(lines[0])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader)
    lookup = {h.strip().lower(): i for i, h in enumerate(header)}
    index = {}
    for col, names in _supplement_columns(kind).items():
        for n in names:
            if n in lookup:
                index[col] = lookup[n]
                break
    if "mbi" not in index and "member_id" not in index:
        raise RosterError([(1, "mbi", "the header has neither an MBI nor a member_id column")], source=str(path))
    missing = [c for c in wanted if c not in index]
    if wanted and len(missing) == len(wanted):
        raise RosterError([(1, wanted[0], f"the header has none of {', '.join(wanted)}")], source=str(path))
    out: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    problems = []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        values = {col: (cells[i].strip() if i < len(cells) else "") for col, i in index.items()}
        mbi = values.get("mbi", "").replace("-", "").upper()
        if mbi and not MBI_PATTERN.match(mbi):
            problems.append((line, header[index["mbi"]], "is not a valid MBI"))
            continue
        key = f"mbi:{mbi}" if mbi else (f"member:{values['member_id']}" if values.get("member_id") else "")
        if not key:
            problems.append((line, "mbi", "neither an MBI nor a member id is given"))
            continue
        npi = values.get("pcp_npi", "")
        if npi and (why := npi_problem(npi)):
            problems.append((line, header[index["pcp_npi"]], why))
            continue
        if key in first_line:
            problems.append((line, "mbi" if mbi else "member_id", f"the member is also on line {first_line[key]}"))
            continue
        first_line[key] = line
        out[key] = {c: values.get(c, "") for c in wanted}
    if problems:
        raise RosterError(problems, source=str(path))
    return out


def read_pcp_file(path: Path) -> dict[str, dict[str, str]]:
    """A PCP attribution file (MBI or member id; pcp_npi, pcp_name, care_manager) by member key."""
    return _read_keyed(path, "pcp", ("pcp_npi", "pcp_name", "care_manager"))


def read_opt_out_file(path: Path) -> frozenset[str]:
    """The member keys listed in an opt-out file (one MBI or member id a row)."""
    return frozenset(_read_keyed(path, "opt_out", ()))


def _derive(row: dict) -> tuple[str, list[str]]:
    person = person_from_member(row)
    return pack_person(person), blocking_keys(person)


def _keys_of(packed: str) -> list[str]:
    return blocking_keys(person_from_member({"person": packed}))


def _terms_of(packed: str) -> list[str]:
    person = unpack_person(packed)
    return frequency_terms(person) if person is not None else []


#: Matching's normalisation as the store needs it to keep a roster version's derived columns.
DERIVATION = RosterDerivation(BLOCKING_RECIPE, _derive, _keys_of, _terms_of)
