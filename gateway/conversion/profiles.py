"""Sender profiles: what one EHR interface does differently, as data (``mappings/senders/*.toml``).

A profile is chosen by the message's sender (MSH-3, MSH-4, as globs; most
specific match wins) and applied to the parsed :class:`~gateway.conversion.v2.V2Message`
*before* :func:`~gateway.conversion.convert.convert` runs, so the standard maps
see standard values:

1. ``copy``: a value from a Z-segment fills an empty standard field;
2. ``identifiers``: where the sender puts each identifier (``PID.3[type=MR]``,
   ``PID.2``, ``IN1[4=MEDICARE*].36``, ``ZPD.2``) and which type and assigning
   authority it has; one read from elsewhere becomes a PID-3 repetition
   ``value^^^AUTHORITY^TYPE``, so the CX map gives its system (MB: the MBI
   system; an OID or a URI authority: that system);
3. ``codes``: the sender's local codes translated into the standard table of
   the field (PV1-2 patient class, PID-8 sex, PV1-36 discharge disposition,
   PV1-14 admit source, PV1-10 hospital service, ...); the local code stays as
   the CWE's alternate code;
4. ``class_rules``: the patient class from several fields (PV1-2 ``O`` with a
   PV1-3 location ``ED*`` is an emergency visit);
5. ``ignore``: fields blanked so they are not mapped;
6. ``expected``: fields the sender always fills; a message without one is
   reported (``herald profile test``, the ``parsed`` event).

The profile also gives the sender's time zone (times without an offset) and
the charset to read it with when MSH-18 is empty. Every file is checked when
it is loaded; a problem is a :class:`~gateway.errors.ProfileError` naming the
file, the key and the reason. :func:`apply_profile` returns the changes it
made (path, before, after, why) for an analyst's terminal: they quote field
values, so they never go to a log.

This is a stage: it reads its mapping files and nothing else.
"""

from __future__ import annotations

import fnmatch
import pickle
import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.conversion.v2 import CHARSETS, Segment, V2Message
from gateway.conversion.vocabulary import Vocabulary, load_vocabulary
from gateway.errors import ProfileError
from gateway.header import read_msh
from gateway.limits import Limits
from gateway.resources import mappings_dir

__all__ = [
    "DEFAULT_PROFILE",
    "Applied",
    "Change",
    "FieldPath",
    "Profile",
    "ProfileRegistry",
    "ProfileSet",
    "ProfiledMessage",
    "Selection",
    "apply_profile",
    "default_folder",
    "load_profiles",
    "open_message",
    "parse_path",
    "profile_event",
    "read_message",
]

#: The profile every other extends, used for senders no profile matches.
DEFAULT_PROFILE = "default"
#: What ``[profiles] unknown_senders`` may say.
UNKNOWN_SENDERS = ("default", "reject")

#: Fields whose local codes a profile may translate: the HL7 table, Herald's code table (None: the
#: HL7 table's values below), and how the field is rewritten ("code": component 1 replaced;
#: "cwe": the standard code first, the local one kept as the alternate code).
CODED_FIELDS: dict[str, tuple[str, str | None, str]] = {
    "PV1.2": ("0004", "0004-encounter-class", "code"),
    "PID.8": ("0001", "0001-administrative-gender", "code"),
    "PV1.4": ("0007", "0007-admission-type", "cwe"),
    "PV1.10": ("0069", None, "cwe"),
    "PV1.14": ("0023", None, "cwe"),
    "PV1.36": ("0112", "0112-discharge-disposition", "cwe"),
    "PID.16": ("0002", "0002-marital-status", "cwe"),
    "NK1.3": ("0063", "0063-relationship", "cwe"),
}

#: HL7 tables Herald has no code table for: their values (HL7 v2.5.1 chapter 3, the suggested values).
HL7_TABLES: dict[str, frozenset[str]] = {
    "0023": frozenset({"1", "2", "3", "4", "5", "6", "7", "8", "9"}),  # admit source
    "0069": frozenset({"CAR", "MED", "PUL", "SUR", "URO"}),  # hospital service
}

_TOP_KEYS = {
    "description": str,
    "extends": str,
    "timezone": str,
    "charset": str,
    "ignore": list,
    "expected": list,
    "match": dict,
    "z_segments": dict,
    "identifiers": list,
    "codes": dict,
    "class_rules": list,
    "copy": list,
}
_MATCH_KEYS = ("application", "facility", "identity", "listener")
_IDENTIFIER_KEYS = {"field": str, "type": str, "authority": str, "expected": bool, "why": str}
_CLASS_RULE_KEYS = {"when": dict, "set": str, "why": str}
_COPY_KEYS = {"from": str, "to": str, "why": str}

_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})"
    r"(?:\[(?P<segf>\d+)=(?P<segv>[^\]]*)\])?"
    r"(?:[.-](?P<field>\d+)(?:\[(?P<rep>[^\]]+)\])?(?:[.-](?P<comp>\d+))?)?$"
)
_CODE = re.compile(r"^[A-Za-z0-9_./ \-]{1,40}$")


# -- field paths -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A field as analysts write it: ``PID.3``, ``PID.3[type=MR]``, ``PV1.3.1``, ``IN1[4=MEDICARE*].36``.

    ``segment_if`` picks occurrences of the segment by one of its fields
    (component 1, a glob); ``rep`` picks repetitions: ``("index", "2")``
    (1-based), ``("type", "MR")`` (CX-5) or ``("authority", "CMS")`` (CX-4).
    """

    text: str
    segment: str
    field: int
    component: int | None = None
    rep: tuple[str, str] | None = None
    segment_if: tuple[int, str] | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def field_key(self) -> str:
        """``SEG.N``, the field without selectors or component."""
        return f"{self.segment}.{self.field}"

    @property
    def label(self) -> str:
        """As HL7 writes it: ``PID-3``, ``PV1-3.1``."""
        return f"{self.segment}-{self.field}" + (f".{self.component}" if self.component else "")


def parse_path(text: str) -> FieldPath:
    """Read a field path; raise ValueError saying what is wrong."""
    m = _PATH.match(text.strip())
    if not m or m.group("field") is None:
        raise ValueError(
            f"{text!r} is not a field path (SEG.N, SEG.N.C, SEG.N[type=MR], SEG.N[2], SEG[N=VALUE].N; "
            "segment names in capitals)"
        )
    number = int(m.group("field"))
    comp = int(m.group("comp")) if m.group("comp") else None
    if number < 1 or (comp is not None and comp < 1):
        raise ValueError(f"{text!r}: field and component numbers start at 1")
    if m.group("seg") == "MSH" and number <= 2:
        raise ValueError(f"{text!r}: MSH-1 and MSH-2 are the separators")
    rep = None
    if m.group("rep"):
        sel = m.group("rep").strip()
        key, eq, value = sel.partition("=")
        if not eq:
            if not sel.isdigit() or int(sel) < 1:
                raise ValueError(f"{text!r}: a repetition is [N] (1-based), [type=CODE] or [authority=NAME]")
            rep = ("index", sel)
        elif key.strip() in ("type", "authority") and value.strip():
            rep = (key.strip(), value.strip().upper())
        else:
            raise ValueError(f"{text!r}: a repetition is [N] (1-based), [type=CODE] or [authority=NAME]")
    segment_if = None
    if m.group("segf"):
        segment_if = (int(m.group("segf")), m.group("segv").strip().upper())
    return FieldPath(text.strip(), m.group("seg"), number, comp, rep, segment_if)


# -- the profile -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentifierRule:
    """Where one identifier is and what it is (CX-5 type, CX-4 authority)."""

    path: FieldPath
    type: str = ""
    authority: str = ""
    expected: bool = False
    why: str = ""
    origin: tuple[str, str] = ("", "")  # (file, key): where it was written


@dataclass(frozen=True, slots=True)
class ClassRule:
    """PV1-2 becomes ``set`` when every ``when`` path matches its glob ("" = empty)."""

    when: tuple[tuple[FieldPath, str], ...]
    set: str
    why: str = ""
    origin: tuple[str, str] = ("", "")


@dataclass(frozen=True, slots=True)
class CopyRule:
    """An empty ``target`` takes the value at ``source`` (usually a Z-segment field)."""

    source: FieldPath
    target: FieldPath
    why: str = ""
    origin: tuple[str, str] = ("", "")


@dataclass(frozen=True, slots=True)
class Match:
    """Which senders a profile is for: globs per criterion (empty: any)."""

    application: tuple[str, ...] = ()
    facility: tuple[str, ...] = ()
    identity: tuple[str, ...] = ()
    listener: tuple[str, ...] = ()

    @property
    def given(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The criteria that say something (not absent, not only ``*``)."""
        return tuple((name, globs) for name in _MATCH_KEYS if (globs := getattr(self, name)) and globs != ("*",))

    @property
    def specificity(self) -> tuple[int, int]:
        """(criteria given, criteria given without a wildcard): the larger wins."""
        given = self.given
        exact = sum(1 for _, globs in given if not any(_has_wildcard(g) for g in globs))
        return len(given), exact

    def describe(self) -> str:
        """``MSH-3 EPIC*, MSH-4 RVH`` (what an analyst reads)."""
        names = {"application": "MSH-3", "facility": "MSH-4", "identity": "TLS identity", "listener": "listener"}
        return ", ".join(f"{names[n]} {' or '.join(g)}" for n, g in self.given) or "(every sender)"


@dataclass(frozen=True)
class Profile:
    """One sender profile, with what it extends folded in (see the module docstring)."""

    name: str
    file: str
    description: str = ""
    lineage: tuple[str, ...] = ()  # the profiles it extends, nearest first
    match: Match = Match()
    timezone: str = ""
    charset: str = ""
    identifiers: tuple[IdentifierRule, ...] = ()
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    class_rules: tuple[ClassRule, ...] = ()
    copy: tuple[CopyRule, ...] = ()
    ignore: tuple[FieldPath, ...] = ()
    expected: tuple[FieldPath, ...] = ()
    z_segments: dict[str, str] = field(default_factory=dict)

    @property
    def tzinfo(self) -> ZoneInfo | None:
        """The sender's zone (None: the configuration's)."""
        return ZoneInfo(self.timezone) if self.timezone else None

    @property
    def does_nothing(self) -> bool:
        """True when applying it changes no field (only the zone or charset may be set)."""
        return not (self.identifiers or self.codes or self.class_rules or self.copy or self.ignore or self.expected)

    def summary(self) -> str:
        """One line: what it matches and what it holds."""
        parts = [f"matches {self.match.describe()}" if self.name != DEFAULT_PROFILE else "for unmatched senders"]
        if self.lineage:
            parts.append(f"extends {' -> '.join(self.lineage)}")
        if self.timezone:
            parts.append(f"time zone {self.timezone}")
        if self.charset:
            parts.append(f"charset {self.charset} when MSH-18 is empty")
        counts = [
            (len(self.identifiers), "identifier"),
            (sum(len(t) for t in self.codes.values()), "local code"),
            (len(self.class_rules), "class rule"),
            (len(self.copy), "copy rule"),
            (len(self.ignore), "ignored field"),
            (len(self.expected), "expected field"),
        ]
        parts += [f"{n} {what}{'s' if n != 1 else ''}" for n, what in counts if n]
        return "; ".join(parts)


_BUILTIN_DEFAULT = Profile(DEFAULT_PROFILE, "(built in)", "no sender profile: the standard maps only")


# -- selection ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """The profile chosen for a sender, and why (``known``: a profile other than the default matched)."""

    profile: Profile
    known: bool
    reason: str


class ProfileSet:
    """The profiles of one folder, checked, and the choice of one per sender (cached)."""

    def __init__(
        self, profiles: dict[str, Profile], folder: Path | None = None, unknown_senders: str = "default"
    ) -> None:
        self.profiles = profiles
        self.default = profiles.get(DEFAULT_PROFILE, _BUILTIN_DEFAULT)
        self.folder = folder
        self.unknown_senders = unknown_senders
        self._selectable = sorted(
            (p for p in profiles.values() if p.name != DEFAULT_PROFILE), key=lambda p: p.match.specificity, reverse=True
        )
        self._cache: dict[tuple, Selection] = {}

    def __getstate__(self):  # sent to the worker processes: the cache stays behind
        return {**self.__dict__, "_cache": {}}

    def __len__(self) -> int:
        return len(self.profiles)

    @property
    def reject_unknown(self) -> bool:
        """Messages from senders no profile matches fail (``[profiles] unknown_senders = "reject"``)."""
        return self.unknown_senders == "reject"

    def get(self, name: str) -> Profile:
        """The profile called ``name``; KeyError when there is none."""
        if name == DEFAULT_PROFILE:
            return self.default
        return self.profiles[name]

    def candidates(
        self, application: str, facility: str, identity: str | None = None, listener: str | None = None
    ) -> list[Profile]:
        """Every profile that matches the sender, the one :meth:`select` picks first."""
        values = {"application": application, "facility": facility, "identity": identity, "listener": listener}
        return [p for p in self._selectable if all(_matches(values[n], globs) for n, globs in p.match.given)]

    def select(self, application: str, facility: str, identity: str | None = None, listener: str | None = None):
        """The profile for a sender (MSH-3, MSH-4, and the connection's identity and listener when known).

        The matching profile with the most criteria given wins, then the one
        with fewer wildcards (ties are refused when the folder is loaded);
        none: the default profile, ``known`` False.
        """
        key = (application, facility, identity, listener)
        found = self._cache.get(key)
        if found is not None:
            return found
        values = {"application": application, "facility": facility, "identity": identity, "listener": listener}
        found = None
        for profile in self._selectable:
            if all(_matches(values[n], globs) for n, globs in profile.match.given):
                found = Selection(profile, True, _why(profile, values))
                break
        if found is None:
            found = Selection(
                self.default,
                False,
                f"no profile matches MSH-3 {application or '(empty)'!r}, MSH-4 {facility or '(empty)'!r}",
            )
        if len(self._cache) < 4096:
            self._cache[key] = found
        return found


def _why(profile: Profile, values: dict) -> str:
    names = {"application": "MSH-3", "facility": "MSH-4", "identity": "TLS identity", "listener": "listener"}
    said = [f"{names[n]} {values[n]!r} matches {' or '.join(g)}" for n, g in profile.match.given]
    given, exact = profile.match.specificity
    return f"{', '.join(said)} ({given} criteria, {exact} exact)"


def _has_wildcard(glob: str) -> bool:
    return any(c in glob for c in "*?[")


def _matches(value: str | None, globs: tuple[str, ...]) -> bool:
    if value is None:
        return False
    v = value.strip().upper()
    return any(fnmatch.fnmatchcase(v, g.upper()) for g in globs)


def _may_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether some value could match a glob of ``a`` and one of ``b`` (conservative for two globs)."""
    if not a or not b or a == ("*",) or b == ("*",):
        return True
    for x in a:
        for y in b:
            xu, yu = x.upper(), y.upper()
            if not _has_wildcard(xu) and fnmatch.fnmatchcase(xu, yu):
                return True
            if not _has_wildcard(yu) and fnmatch.fnmatchcase(yu, xu):
                return True
            if _has_wildcard(xu) and _has_wildcard(yu):
                px, py = re.split(r"[*?\[]", xu, maxsplit=1)[0], re.split(r"[*?\[]", yu, maxsplit=1)[0]
                if px.startswith(py) or py.startswith(px):
                    return True
    return False


# -- applying a profile ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One edit a profile made: where, the value before and after, and why (values may be PHI)."""

    path: str
    before: str
    after: str
    why: str


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying a profile did: its changes, the expected fields the message lacked, the zone."""

    profile: Profile
    changes: tuple[Change, ...] = ()
    missing: tuple[str, ...] = ()
    tz: ZoneInfo | None = None


def apply_profile(msg: V2Message, profile: Profile) -> Applied:
    """Rewrite ``msg`` in place as ``profile`` says (see the module docstring); return what was done.

    Order: copy rules, identifiers, local codes, class rules, ignored fields;
    then the expected fields are looked for.
    """
    if profile.does_nothing:
        return Applied(profile, tz=profile.tzinfo)
    changes: list[Change] = []
    missing: list[str] = []
    segs: dict[str, list[Segment]] = {}  # the segments by name, found once (rules look up many)
    for seg in msg.segments:
        segs.setdefault(seg.name, []).append(seg)
    for rule in profile.copy:
        _copy(msg, segs, rule, changes)
    pid = segs["PID"][0] if "PID" in segs else None
    for rule in profile.identifiers:
        _identifier(msg, segs, pid, rule, changes, missing)
    for key, table in profile.codes.items():
        _translate(msg, segs, key, table, changes)
    for rule in profile.class_rules:
        if _class_rule(msg, segs, rule, changes):
            break
    for path in profile.ignore:
        _ignore(msg, segs, path, changes)
    for path in profile.expected:
        if not any(text for *_, text in _values(msg, segs, path)):
            missing.append(f"{path.label}: expected by the profile but empty or absent")
    return Applied(profile, tuple(changes), tuple(missing), profile.tzinfo)


def _occurrences(segs: dict[str, list[Segment]], path: FieldPath) -> list[Segment]:
    found = segs.get(path.segment, [])
    if path.segment_if is None:
        return found
    n, glob = path.segment_if
    return [s for s in found if fnmatch.fnmatchcase(s.get(n).strip().upper(), glob)]


def _selected(seg: Segment, path: FieldPath) -> list[int]:
    """Indexes of the repetitions of ``path``'s field that its selector picks."""
    reps = _raw_reps(seg, path.field)
    if path.rep is None:
        return [i for i, r in enumerate(reps) if r]
    kind, value = path.rep
    if kind == "index":
        i = int(value) - 1
        return [i] if i < len(reps) and reps[i] else []
    comp = 5 if kind == "type" else 4
    out = []
    for i, r in enumerate(reps):
        parts = r.split(seg.msg.comp) if r else []  # types and authorities are codes: compared as written
        got = parts[comp - 1] if len(parts) >= comp else ""
        if kind == "authority":
            got = got.split(seg.msg.sub, 1)[0]
        if got.strip().upper() == value:
            out.append(i)
    return out


def _raw_reps(seg: Segment, n: int) -> list[str]:
    """Every repetition of field ``n`` as written, empty ones kept (positions matter when rewriting)."""
    value = seg.raw(n)
    if not value or value == '""':
        return []
    return value.split(seg.msg.rep)


def _values(msg: V2Message, segs: dict, path: FieldPath) -> list[tuple[Segment, int, str]]:
    """(segment, repetition index, text) at ``path``: the component given, else component 1; unescaped."""
    out = []
    for seg in _occurrences(segs, path):
        reps = _raw_reps(seg, path.field)
        for i in _selected(seg, path):
            parts = msg.components(reps[i])
            c = path.component or 1
            out.append((seg, i, parts[c - 1].strip() if c <= len(parts) else ""))
    return out


def _set_reps(seg: Segment, n: int, reps: list[str]) -> None:
    """Write field ``n`` of ``seg`` (its cached repetitions are dropped: they were split from the old text)."""
    fields = seg.fields
    if n >= len(fields):
        fields.extend([""] * (n + 1 - len(fields)))
    while reps and not reps[-1]:
        reps = reps[:-1]
    fields[n] = seg.msg.rep.join(reps)
    seg._reps.pop(n, None)


def _escape(msg: V2Message, text: str) -> str:
    """``text`` with the message's separators escaped, ready to write into a component."""
    e = msg.esc
    out = text.replace(e, f"{e}E{e}")
    for ch, code in ((msg.fs, "F"), (msg.comp, "S"), (msg.rep, "R"), (msg.sub, "T")):
        out = out.replace(ch, f"{e}{code}{e}")
    return out


def _authority_hd(msg: V2Message, authority: str, namespace: str = "") -> str:
    """CX-4 for an authority given as an OID (``NS&OID&ISO``), a URI (``NS&URI&URI``) or a name.

    ``namespace`` (raw, as the sender wrote CX-4.1) is kept beside an OID or a
    URI: it is what ``assigner.display`` shows.
    """
    a = authority.strip()
    if re.match(r"^[0-2](\.(0|[1-9]\d*))+$", a):
        return f"{namespace}{msg.sub}{_escape(msg, a)}{msg.sub}ISO"
    if a.lower().startswith(("http://", "https://", "urn:")):
        return f"{namespace}{msg.sub}{_escape(msg, a)}{msg.sub}URI"
    return _escape(msg, a)


def _namespace(msg: V2Message, rep: str) -> str:
    """CX-4.1 of a raw CX repetition, as written."""
    parts = rep.split(msg.comp)
    return parts[3].split(msg.sub, 1)[0] if len(parts) > 3 else ""


def _label(segs: dict, seg: Segment, n: int, rep: int | None = None) -> str:
    index = segs[seg.name].index(seg)
    return f"{seg.name}-{n}" + (f" (#{index + 1})" if index else "") + (f"[{rep + 1}]" if rep is not None else "")


def _with_component(msg: V2Message, rep: str, comp: int, value: str) -> str:
    parts = rep.split(msg.comp)
    if len(parts) < comp:
        parts += [""] * (comp - len(parts))
    parts[comp - 1] = value
    while len(parts) > 1 and not parts[-1]:
        parts.pop()
    return msg.comp.join(parts)


def _copy(msg: V2Message, segs: dict, rule: CopyRule, changes: list[Change]) -> None:
    found = [(seg, i) for seg, i, text in _values(msg, segs, rule.source) if text]
    if not found:
        return
    seg, i = found[0]
    value = _raw_reps(seg, rule.source.field)[i]
    if rule.source.component:
        value = value.split(msg.comp)[rule.source.component - 1]
    for target in _occurrences(segs, rule.target)[:1]:
        reps = _raw_reps(target, rule.target.field)
        if any(reps):
            return
        written = value if not rule.target.component else _with_component(msg, "", rule.target.component, value)
        _set_reps(target, rule.target.field, [written])
        changes.append(Change(rule.target.label, "", written, rule.why or f"copied from {rule.source}"))


def _identifier(msg: V2Message, segs: dict, pid: Segment | None, rule: IdentifierRule, changes, missing) -> None:
    path = rule.path
    why = rule.why or f"identifier at {path}"
    if path.segment == "PID" and path.field == 3 and pid is not None:
        # Already in PID-3: give it the profile's type and authority.
        selected = [i for seg, i, text in _values(msg, segs, path) if seg is pid and text]
        reps = _raw_reps(pid, 3)
        for i in selected:
            new = reps[i]
            if rule.authority:
                new = _with_component(msg, new, 4, _authority_hd(msg, rule.authority, _namespace(msg, new)))
            if rule.type:
                new = _with_component(msg, new, 5, _escape(msg, rule.type))
            if new != reps[i]:
                changes.append(Change(_label(segs, pid, 3, i), reps[i], new, why))
                reps[i] = new
        if selected:
            _set_reps(pid, 3, reps)
        elif rule.expected:
            missing.append(f"{path} ({rule.type or 'identifier'}): expected by the profile but absent")
        return
    found = [(seg, i, text) for seg, i, text in _values(msg, segs, path) if text]
    if not found:
        if rule.expected:
            missing.append(f"{path} ({rule.type or 'identifier'}): expected by the profile but empty or absent")
        return
    if pid is None:
        return  # the converter refuses a message without PID; nothing to add to
    reps = _raw_reps(pid, 3)
    present = {(msg.components(r)[0].strip(), _cx_type(msg, r)) for r in reps if r}
    for seg, i, text in found:
        if (text, rule.type.upper()) in present:
            continue
        source = _raw_reps(seg, path.field)[i]
        authority = _authority_hd(msg, rule.authority) if rule.authority else ""
        if not authority and not path.component and len(source.split(msg.comp)) > 3:
            authority = source.split(msg.comp)[3]  # a CX keeps its own authority
        new = _with_component(msg, _escape(msg, text), 4, authority)
        if rule.type:
            new = _with_component(msg, new, 5, _escape(msg, rule.type))
        reps.append(new)
        present.add((text, rule.type.upper()))
        changes.append(Change(f"PID-3[{len(reps)}]", "", new, f"{why} (from {_label(segs, seg, path.field)})"))
        if seg is pid and path.field in (2, 4):
            # The converter reads PID-2 and PID-4 as identifiers too: moved, not copied.
            source_reps = _raw_reps(pid, path.field)
            changes.append(Change(_label(segs, pid, path.field, i), source_reps[i], "", "moved to PID-3"))
            source_reps[i] = ""
            _set_reps(pid, path.field, source_reps)
    _set_reps(pid, 3, reps)


def _cx_type(msg: V2Message, rep: str) -> str:
    parts = msg.components(rep)
    return parts[4].strip().upper() if len(parts) > 4 else ""


def _translate(msg: V2Message, segs: dict, key: str, table: dict[str, str], changes: list[Change]) -> None:
    segment, _, number = key.partition(".")
    n = int(number)
    hl7_table, _, kind = CODED_FIELDS[key]
    for seg in segs.get(segment, ()):
        reps = _raw_reps(seg, n)
        changed = False
        for i, rep in enumerate(reps):
            parts = rep.split(msg.comp)
            local = msg.unescape(parts[0]).strip()
            target = table.get(local.upper())
            if target is None or target == local:
                continue
            if kind == "code":
                new = _with_component(msg, rep, 1, target)
            else:
                local_text = parts[1] if len(parts) > 1 else ""
                # The local code's system: as the sender named it, else the sender's own table.
                local_system = parts[2] if len(parts) > 2 and parts[2] else _local_system(msg, hl7_table)
                new = msg.comp.join([target, "", f"HL7{hl7_table}", parts[0], local_text, local_system])
            changes.append(Change(_label(segs, seg, n), local, target, f"local code (HL7 table {hl7_table})"))
            reps[i] = new
            changed = True
        if changed:
            _set_reps(seg, n, reps)


def _local_system(msg: V2Message, hl7_table: str) -> str:
    """A coding system name for a sender's local codes of one table: ``APP-FACILITY-nnnn`` (MSH-3, MSH-4)."""
    header = msg.header
    name = "-".join(x for x in (header.sending_application, header.sending_facility, hl7_table) if x)
    return _escape(msg, name)


def _class_rule(msg: V2Message, segs: dict, rule: ClassRule, changes: list[Change]) -> bool:
    for path, glob in rule.when:
        texts = [text for *_, text in _values(msg, segs, path)] or [""]
        if not any(fnmatch.fnmatchcase(t.upper(), glob) for t in texts):
            return False
    if "PV1" not in segs:
        return False
    pv1 = segs["PV1"][0]
    reps = _raw_reps(pv1, 2) or [""]
    before = msg.unescape(reps[0].split(msg.comp)[0]).strip()
    if before != rule.set:
        reps[0] = _with_component(msg, reps[0], 1, rule.set)
        _set_reps(pv1, 2, reps)
        changes.append(Change("PV1-2", before, rule.set, rule.why or "class rule"))
    return True


def _ignore(msg: V2Message, segs: dict, path: FieldPath, changes: list[Change]) -> None:
    for seg in _occurrences(segs, path):
        reps = _raw_reps(seg, path.field)
        picked = _selected(seg, path)
        if not picked:
            continue
        for i in picked:
            before = reps[i]
            reps[i] = _with_component(msg, before, path.component, "") if path.component else ""
            if reps[i] != before:
                label = _label(segs, seg, path.field, i if path.rep else None)
                changes.append(Change(label, before, reps[i], "ignored"))
        _set_reps(seg, path.field, reps)


# -- reading a message with its profile --------------------------------------


@dataclass(frozen=True, slots=True)
class ProfiledMessage:
    """A message read and rewritten by its sender's profile, ready for ``convert``."""

    msg: V2Message
    selection: Selection
    applied: Applied

    @property
    def tz(self) -> ZoneInfo | None:
        return self.applied.tz


def open_message(
    raw: bytes,
    profiles: ProfileSet,
    charset: str = "",
    limits: Limits | None = Limits(),
    *,
    profile: Profile | None = None,
    identity: str | None = None,
    listener: str | None = None,
) -> tuple[V2Message, Selection]:
    """Choose the sender's profile and parse ``raw`` with its charset when MSH-18 (``charset``, as
    stored) is empty; the profile is not applied yet (:func:`apply_profile`).

    ``profile`` forces one (``herald profile test``); otherwise it is chosen
    by MSH-3 and MSH-4. Raises MessageError (and LimitExceeded) as
    :class:`V2Message` does.
    """
    header = read_msh(raw)
    if profile is not None:
        selection = Selection(profile, profile.name != DEFAULT_PROFILE, "given")
    else:
        selection = profiles.select(header.sending_application, header.sending_facility, identity, listener)
    declared = charset or header.charset.strip()
    msg = V2Message(raw, declared or selection.profile.charset, header=header, limits=limits)
    return msg, selection


def read_message(
    raw: bytes,
    profiles: ProfileSet,
    charset: str = "",
    limits: Limits | None = Limits(),
    *,
    profile: Profile | None = None,
    identity: str | None = None,
    listener: str | None = None,
) -> ProfiledMessage:
    """:func:`open_message` then :func:`apply_profile`: the message as ``convert`` should see it."""
    msg, selection = open_message(raw, profiles, charset, limits, profile=profile, identity=identity, listener=listener)
    return ProfiledMessage(msg, selection, apply_profile(msg, selection.profile))


def profile_event(selection: Selection, applied: Applied | None) -> dict:
    """What the ``parsed`` event says of the profile: its name, how many changes, the expected fields
    missing, and whether the sender had no profile (no field values: the event log holds no PHI)."""
    out: dict = {"profile": selection.profile.name}
    if applied is not None and applied.changes:
        out["profile_changes"] = len(applied.changes)
    if applied is not None and applied.missing:
        out["profile_missing"] = list(applied.missing)
    if not selection.known:
        out["unknown_sender"] = selection.reason
    return out


# -- loading and checking ----------------------------------------------------


def default_folder() -> Path:
    """The shipped profiles: ``mappings/senders``."""
    return mappings_dir() / "senders"


def load_profiles(
    folder: Path | str | None = None,
    vocab: Vocabulary | None = None,
    unknown_senders: str = "default",
    *,
    draft: Path | str | None = None,
) -> ProfileSet:
    """Read and check every ``*.toml`` in ``folder`` (default: the shipped ones).

    ``draft`` is a profile file read with them (in place of the folder's file
    of the same name, if any): how ``herald profile check`` checks a file
    against the profiles it would join (what it extends, the ties).

    Raises :class:`ProfileError` (file, key, reason) at the first problem:
    TOML syntax, an unknown key, a wrong type, a field path, a code not in its
    standard table, a time zone or charset Herald does not know, a profile
    extending one that is not there (or itself), two profiles that would both
    match a sender with the same specificity.
    """
    folder = Path(folder) if folder is not None else default_folder()
    if unknown_senders not in UNKNOWN_SENDERS:
        raise ProfileError(str(folder), "unknown_senders", f"{unknown_senders!r} is not one of default, reject")
    if not folder.is_dir():
        raise ProfileError(str(folder), "(folder)", "is not a folder of sender profiles")
    vocab = vocab or load_vocabulary()
    files = {path.stem: path for path in sorted(folder.glob("*.toml"))}
    if draft is not None:
        draft = Path(draft)
        if draft.suffix != ".toml":
            raise ProfileError(str(draft), "(file)", "a sender profile is a .toml file")
        files[draft.stem] = draft
    raw = {}
    for name, path in sorted(files.items()):
        raw[name] = (str(path), _read_file(path))
    parsed = {name: _parse(name, file, data, vocab) for name, (file, data) in raw.items()}
    profiles = {name: _resolve(name, parsed, vocab) for name in parsed}
    _check_ties(profiles)
    return ProfileSet(profiles, folder, unknown_senders)


def _read_file(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(str(path), "(file)", "is not UTF-8 text") from None
    except OSError as e:
        raise ProfileError(str(path), "(file)", f"cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(str(path), "(syntax)", f"not valid TOML: {e}") from None


@dataclass
class _Parsed:
    """One file as written, checked on its own (inheritance is resolved after)."""

    name: str
    file: str
    data: dict
    extends: str | None
    match: Match | None
    identifiers: list[IdentifierRule]
    class_rules: list[ClassRule]
    copy: list[CopyRule]
    ignore: list[FieldPath]
    expected: list[FieldPath]
    codes: dict[str, dict[str, str]]
    z_segments: dict[str, str]


def _parse(name: str, file: str, data: dict, vocab: Vocabulary) -> _Parsed:
    def fail(key: str, reason: str):
        raise ProfileError(file, key, reason)

    def moved(k: str) -> str:
        # A top-level key written after a [table] header belongs to that table in TOML.
        return " (a top-level setting? In TOML it must come before the first [table])" if k in _TOP_KEYS else ""

    for key, value in data.items():
        if key not in _TOP_KEYS:
            fail(key, f"unknown setting (known: {', '.join(_TOP_KEYS)})")
        if not isinstance(value, _TOP_KEYS[key]):
            fail(key, f"expected {_type_name(_TOP_KEYS[key])}, got {type(value).__name__}")
    for k in data.get("match", {}):
        if k not in _MATCH_KEYS:
            fail(f"match.{k}", f"unknown criterion (known: {', '.join(_MATCH_KEYS)}){moved(k)}")
    timezone = data.get("timezone", "")
    if timezone:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # "Pacific" is a folder of tzdata: OSError
            fail("timezone", f"{timezone!r} is not an IANA time zone name (e.g. America/New_York)")
    charset = data.get("charset", "")
    if charset and charset.strip().upper() not in CHARSETS:
        fail("charset", f"{charset!r} is not an MSH-18 character set Herald reads (known: {', '.join(CHARSETS)})")
    extends = data.get("extends")
    if name == DEFAULT_PROFILE:
        if extends:
            fail("extends", "the default profile extends nothing: every other profile extends it")
        if "match" in data:
            fail("match", "the default profile is for senders no other profile matches: it has no [match]")
    elif extends is not None and not extends.strip():
        fail("extends", 'must name a profile (a file name without .toml), e.g. "default"')

    match = None
    if "match" in data:
        criteria = {}
        for k, v in data["match"].items():
            globs = [v] if isinstance(v, str) else v
            if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g.strip() for g in globs):
                fail(f"match.{k}", "expected a glob or a list of globs (non-empty strings)")
            criteria[k] = tuple(g.strip() for g in globs)
        match = Match(**criteria)
        if not match.given:
            fail("match", "matches every sender: give application (MSH-3) or facility (MSH-4) globs")
    elif name != DEFAULT_PROFILE:
        fail("match", 'missing: which senders the profile is for ([match] application = "...", facility = "...")')

    def path_at(key: str, text) -> FieldPath:
        if not isinstance(text, str):
            fail(key, f"expected a field path (a string), got {type(text).__name__}")
        try:
            return parse_path(text)
        except ValueError as e:
            fail(key, str(e))

    identifiers = []
    for i, entry in enumerate(data.get("identifiers", []), 1):
        key = f"identifiers[{i}]"
        _check_table(entry, _IDENTIFIER_KEYS, key, fail)
        if "field" not in entry:
            fail(f"{key}.field", "missing: where the identifier is (e.g. PID.3[type=MR], ZPD.2)")
        path = path_at(f"{key}.field", entry["field"])
        id_type = entry.get("type", "").strip().upper()
        if id_type and id_type not in vocab.tables["0203-identifier-type"]:
            fail(f"{key}.type", f"{id_type!r} is not an HL7 table 0203 identifier type (MR, MB, PI, AN, ...)")
        authority = entry.get("authority", "").strip()
        if any(c in authority for c in "\r\n"):
            fail(f"{key}.authority", "must be one line")
        if not id_type and not authority:
            fail(key, "says neither type nor authority: the identifier would come out as it went in")
        identifiers.append(
            IdentifierRule(path, id_type, authority, entry.get("expected", False), entry.get("why", ""), (file, key))
        )

    codes: dict[str, dict[str, str]] = {}
    for field_text, table in data.get("codes", {}).items():
        key = f'codes."{field_text}"'
        try:
            path = parse_path(field_text)
        except ValueError as e:
            fail(key, str(e))
        if path.field_key not in CODED_FIELDS or path.rep or path.component or path.segment_if:
            fail(key, f"local codes can be given for {', '.join(CODED_FIELDS)} (a whole field)")
        if not isinstance(table, dict):
            fail(key, "expected a table of local code = standard code")
        hl7_table, herald_table, _ = CODED_FIELDS[path.field_key]
        known = set(vocab.tables[herald_table]) if herald_table else HL7_TABLES[hl7_table]
        rows = {}
        for local, target in table.items():
            if not isinstance(target, str):
                reason = f"expected the standard code as a string, got {type(target).__name__}{moved(local)}"
                fail(f"{key}.{local}", reason)
            if not _CODE.match(local.strip()):
                fail(f"{key}.{local}", "a local code is letters, digits, spaces and . _ / - (up to 40)")
            if target.strip().upper() not in known:
                shown = ", ".join(sorted(known)[:14]) + (", ..." if len(known) > 14 else "")
                fail(f"{key}.{local}", f"{target!r} is not a code of HL7 table {hl7_table} (known: {shown})")
            rows[local.strip().upper()] = target.strip().upper()
        codes[path.field_key] = rows

    class_rules = []
    for i, entry in enumerate(data.get("class_rules", []), 1):
        key = f"class_rules[{i}]"
        _check_table(entry, _CLASS_RULE_KEYS, key, fail)
        if not entry.get("when"):
            fail(f"{key}.when", 'missing: the fields and globs that must match, e.g. { "PV1.3.1" = "ED*" }')
        if "set" not in entry:
            fail(f"{key}.set", "missing: the patient class (table 0004) the rule sets")
        target = entry["set"].strip().upper()
        if target not in vocab.tables["0004-encounter-class"]:
            fail(f"{key}.set", f"{target!r} is not an HL7 table 0004 patient class")
        when = []
        for p, glob in entry["when"].items():
            if not isinstance(glob, str):
                fail(f"{key}.when.{p}", 'expected a glob (a string; "" for an empty field)')
            when.append((path_at(f"{key}.when", p), glob.strip().upper()))
        class_rules.append(ClassRule(tuple(when), target, entry.get("why", ""), (file, key)))

    copies = []
    for i, entry in enumerate(data.get("copy", []), 1):
        key = f"copy[{i}]"
        _check_table(entry, _COPY_KEYS, key, fail)
        for k in ("from", "to"):
            if k not in entry:
                fail(f"{key}.{k}", "missing")
        target = path_at(f"{key}.to", entry["to"])
        if target.rep or target.segment_if:
            fail(f"{key}.to", "a copy writes a whole field or a component: no selector")
        copies.append(CopyRule(path_at(f"{key}.from", entry["from"]), target, entry.get("why", ""), (file, key)))

    ignore = [path_at(f"ignore[{i}]", p) for i, p in enumerate(data.get("ignore", []), 1)]
    for i, p in enumerate(ignore, 1):
        if p.segment == "MSH":
            fail(f"ignore[{i}]", "MSH fields cannot be ignored: they identify the message")
    expected = [path_at(f"expected[{i}]", p) for i, p in enumerate(data.get("expected", []), 1)]

    z_segments = {}
    for seg, what in data.get("z_segments", {}).items():
        if not re.match(r"^Z[A-Z0-9]{2}$", seg):
            fail(f"z_segments.{seg}", f"a Z-segment name is Z and two capitals or digits (e.g. ZPD){moved(seg)}")
        if not isinstance(what, str):
            fail(f"z_segments.{seg}", "expected a description of the segment (a string)")
        z_segments[seg] = what
    return _Parsed(
        name, file, data, extends, match, identifiers, class_rules, copies, ignore, expected, codes, z_segments
    )


def _check_table(entry, keys: dict, key: str, fail) -> None:
    if not isinstance(entry, dict):
        fail(key, "expected a table ([[...]] with key = value lines)")
    for k, v in entry.items():
        if k not in keys:
            fail(f"{key}.{k}", f"unknown setting (known: {', '.join(keys)})")
        if not isinstance(v, keys[k]):
            fail(f"{key}.{k}", f"expected {_type_name(keys[k])}, got {type(v).__name__}")


def _resolve(name: str, parsed: dict[str, _Parsed], vocab: Vocabulary) -> Profile:
    """``name`` with every profile it extends folded in (nearest wins; lists: parent's first)."""
    chain = [parsed[name]]
    seen = {name}
    while True:
        current = chain[-1]
        parent = current.extends if current.extends is not None else (None if current.name == DEFAULT_PROFILE else "")
        if parent == "":
            parent = DEFAULT_PROFILE if DEFAULT_PROFILE in parsed else None
        if parent is None:
            break
        if parent in seen:
            raise ProfileError(current.file, "extends", f"{parent!r} extends {name!r} in turn: a cycle")
        if parent not in parsed:
            known = ", ".join(sorted(parsed)) or "none"
            raise ProfileError(
                current.file, "extends", f"there is no profile {parent!r} in the folder (known: {known})"
            )
        seen.add(parent)
        chain.append(parsed[parent])
    own = chain[0]
    timezone = next((p.data["timezone"] for p in chain if p.data.get("timezone")), "")
    charset = next((p.data["charset"].strip().upper() for p in chain if p.data.get("charset")), "")
    description = own.data.get("description", "")
    identifiers: list[IdentifierRule] = []
    codes: dict[str, dict[str, str]] = {}
    class_rules: list[ClassRule] = []
    copies: list[CopyRule] = []
    ignore: list[FieldPath] = []
    expected: list[FieldPath] = []
    z_segments: dict[str, str] = {}
    for p in reversed(chain):  # the farthest ancestor first; nearer ones override
        by_field = {r.path.text: r for r in p.identifiers}
        identifiers = [by_field.pop(r.path.text, r) for r in identifiers] + list(by_field.values())
        for f, table in p.codes.items():
            codes[f] = {**codes.get(f, {}), **table}
        class_rules = p.class_rules + class_rules  # the nearer profile's rules are tried first
        copies += p.copy
        ignore += [x for x in p.ignore if x not in ignore]
        expected += [x for x in p.expected if x not in expected]
        z_segments.update(p.z_segments)
    profile = Profile(
        name=name,
        file=own.file,
        description=description,
        lineage=tuple(p.name for p in chain[1:]),
        match=own.match or Match(),
        timezone=timezone,
        charset=charset,
        identifiers=tuple(identifiers),
        codes=codes,
        class_rules=tuple(class_rules),
        copy=tuple(copies),
        ignore=tuple(ignore),
        expected=tuple(expected),
        z_segments=z_segments,
    )
    _check_z_segments(profile, chain)
    return profile


def _check_z_segments(profile: Profile, chain: list[_Parsed]) -> None:
    """Every Z-segment a rule reads or writes is declared in ``[z_segments]`` (here or in what it extends)."""
    declared = profile.z_segments
    for p in chain:
        spots: list[tuple[str, FieldPath]] = []
        spots += [(r.origin[1] + ".field", r.path) for r in p.identifiers]
        spots += [(r.origin[1] + ".from", r.source) for r in p.copy]
        spots += [(r.origin[1] + ".to", r.target) for r in p.copy]
        spots += [(r.origin[1] + ".when", path) for r in p.class_rules for path, _ in r.when]
        spots += [(f"ignore[{i}]", x) for i, x in enumerate(p.ignore, 1)]
        spots += [(f"expected[{i}]", x) for i, x in enumerate(p.expected, 1)]
        for key, path in spots:
            if path.segment.startswith("Z") and path.segment not in declared:
                raise ProfileError(
                    p.file,
                    key,
                    f"{path.segment} is a Z-segment the profile does not declare: add it to [z_segments] "
                    "with what it holds",
                )


def _check_ties(profiles: dict[str, Profile]) -> None:
    """Refuse two profiles that could both match one sender with the same specificity."""
    ordered = sorted((p for p in profiles.values() if p.name != DEFAULT_PROFILE), key=lambda p: p.name)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if a.match.specificity != b.match.specificity:
                continue
            if all(_may_overlap(getattr(a.match, k), getattr(b.match, k)) for k in _MATCH_KEYS):
                raise ProfileError(
                    b.file,
                    "match",
                    f"ties with {Path(a.file).name} ({a.match.describe()}): a sender could match both with "
                    "the same specificity; make one more specific (give MSH-4 as well, or fewer wildcards)",
                )


def _type_name(types) -> str:
    names = {str: "a string", list: "a list", dict: "a table", bool: "true or false"}
    return names.get(types, types.__name__)


# -- the running set, reloadable ---------------------------------------------


class ProfileRegistry:
    """The profiles in use, and a reload that keeps them when the new ones do not load.

    The pipeline asks :attr:`current` for each batch; :attr:`generation`
    counts successful loads, so the worker processes can tell when theirs is
    out of date (they are handed :attr:`state`). Thread-safe.
    """

    def __init__(
        self, folder: Path | str | None = None, unknown_senders: str = "default", vocab: Vocabulary | None = None
    ) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self.unknown_senders = unknown_senders
        self._vocab = vocab
        self._lock = threading.Lock()
        self._current = load_profiles(self.folder, vocab, unknown_senders)
        self._packed = pickle.dumps(self._current)
        self.generation = 1

    @classmethod
    def from_config(cls, config, vocab: Vocabulary | None = None) -> ProfileRegistry:
        """The registry of ``config``'s ``[profiles]`` section (raises ProfileError when a profile is bad)."""
        return cls(config.profiles_folder, config.profiles_unknown_senders, vocab)

    @property
    def current(self) -> ProfileSet:
        return self._current

    @property
    def state(self) -> tuple[int, bytes]:
        """(generation, the profiles pickled): what a worker process is handed with each batch.

        Pickled once per generation (a few kilobytes): a batch carries bytes,
        and a worker unpickles them only when the generation is new to it.
        """
        with self._lock:
            return self.generation, self._packed

    def reload(self) -> tuple[bool, str]:
        """Load the folder again: (True, what was loaded), or (False, why) with the running profiles kept."""
        try:
            fresh = load_profiles(self.folder, self._vocab, self.unknown_senders)
        except ProfileError as e:
            return False, str(e)
        packed = pickle.dumps(fresh)
        with self._lock:
            self._current, self._packed = fresh, packed
            self.generation += 1
            generation = self.generation
        return True, f"{len(fresh)} profiles from {self.folder} (generation {generation})"
