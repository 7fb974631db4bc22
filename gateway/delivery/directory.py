"""The recipient directory: who is told of which events, through which channels, when.

An entry is a PCP (by NPI), a practice, an ACO's care team (by ACO id) or a
health information exchange. Each has one or more channels (FHIR, MLLP,
Direct secure email, file drop) and preferences: which kinds of event it
wants (:data:`EVENT_KINDS`), immediately or as a daily digest at a set time in
its own time zone. A PCP may name its practice, whose channels it then uses.

This module is a stage: the entries are plain values, checked here
(:func:`entry_from_dict` raises :class:`DirectoryError` naming the field), and
:func:`event_kind` and :func:`recipients_for` decide from a Bundle and a
roster member who is told. The store keeps the entries
(:mod:`gateway.store.directory`); ``herald recipients`` edits them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import HeraldError

__all__ = [
    "CHANNEL_KINDS",
    "ENTRY_KINDS",
    "EVENT_KINDS",
    "DirectoryEntry",
    "DirectoryError",
    "Selection",
    "entry_from_dict",
    "entry_id",
    "event_kind",
    "missing_pcps",
    "recipients_for",
]

#: Kinds of directory entry.
ENTRY_KINDS = ("pcp", "practice", "care_team", "hie")
#: The events a recipient can ask for (a notification is exactly one of them).
EVENT_KINDS = ("ed-visit", "admit", "discharge", "discharge-snf", "transfer")
#: Channels, and the settings each needs (required) and accepts (optional).
CHANNEL_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fhir": (("url",), ("ca", "client_cert", "client_key", "timeout", "auth")),
    "mllp": (("host", "port"), ("ca", "client_cert", "client_key", "timeout", "on_error", "message")),
    "direct": (("to", "certificate"), ("timeout",)),
    "file": (("directory",), ("format", "encrypt")),
}
_SMART_KEYS = (("token_url", "client_id", "key_file"), ("kid", "alg", "scope"))
#: HL7 table 0112 dispositions that send the patient to a skilled nursing facility (or its like):
#: 03 SNF, 61 swing bed (SNF-level care in a hospital bed), 64 Medicaid-certified nursing facility.
SNF_DISPOSITIONS = frozenset({"03", "61", "64"})
_FHIR_SNF = frozenset({"snf"})
_NPI = re.compile(r"\d{10}")
_TIME = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


class DirectoryError(HeraldError):
    """A directory entry that cannot be used: ``field`` names what is wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class DirectoryEntry:
    """One recipient. ``channels`` are dicts with a ``channel`` key and that channel's settings."""

    id: str
    kind: str
    name: str
    npi: str = ""
    aco_id: str = ""
    practice: str = ""
    channels: tuple[Mapping[str, Any], ...] = ()
    events: tuple[str, ...] = EVENT_KINDS
    mode: str = "immediate"
    digest_at: str = ""
    timezone: str = "UTC"
    enabled: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def wants(self, kind: str) -> bool:
        return self.enabled and kind in self.events

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "npi": self.npi,
            "aco_id": self.aco_id,
            "practice": self.practice,
            "channels": [dict(c) for c in self.channels],
            "events": list(self.events),
            "mode": self.mode,
            "digest_at": self.digest_at,
            "timezone": self.timezone,
            "enabled": self.enabled,
        }


def entry_id(kind: str, *, npi: str = "", aco_id: str = "", name: str = "") -> str:
    """The id an entry is known by: ``pcp:<NPI>``, ``care_team:<ACO>``, ``practice:<name>``, ``hie:<name>``."""
    if kind == "pcp":
        return f"pcp:{npi}"
    if kind == "care_team":
        return f"care_team:{aco_id}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{kind}:{slug or 'default'}"


def entry_from_dict(raw: Mapping[str, Any]) -> DirectoryEntry:
    """Check an entry's fields and make it; :class:`DirectoryError` names the first bad one."""
    kind = str(raw.get("kind", ""))
    if kind not in ENTRY_KINDS:
        raise DirectoryError("kind", f"{kind!r} is not one of {', '.join(ENTRY_KINDS)}")
    name = str(raw.get("name", "")).strip()
    npi = str(raw.get("npi", "") or "").strip()
    aco_id = str(raw.get("aco_id", "") or "").strip()
    if kind == "pcp" and not _NPI.fullmatch(npi):
        raise DirectoryError("npi", "a PCP is known by its 10-digit NPI")
    if npi and not _NPI.fullmatch(npi):
        raise DirectoryError("npi", f"{npi!r} is not a 10-digit NPI")
    if kind == "care_team" and not aco_id:
        raise DirectoryError("aco_id", "a care team is known by its ACO id")
    if not name:
        raise DirectoryError("name", "every entry needs a name people recognise")
    events = tuple(raw.get("events") or EVENT_KINDS)
    for e in events:
        if e not in EVENT_KINDS:
            raise DirectoryError("events", f"{e!r} is not one of {', '.join(EVENT_KINDS)}")
    mode = str(raw.get("mode", "immediate"))
    if mode not in ("immediate", "digest"):
        raise DirectoryError("mode", f"{mode!r} is not 'immediate' or 'digest'")
    digest_at = str(raw.get("digest_at", "") or "")
    if mode == "digest" and not _TIME.fullmatch(digest_at):
        raise DirectoryError("digest_at", "a daily digest needs its time as HH:MM (24-hour)")
    if digest_at and not _TIME.fullmatch(digest_at):
        raise DirectoryError("digest_at", f"{digest_at!r} is not HH:MM (24-hour)")
    timezone = str(raw.get("timezone", "UTC") or "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise DirectoryError("timezone", f"{timezone!r} is not an IANA time zone name") from None
    practice = str(raw.get("practice", "") or "")
    channels = tuple(_channel(i, c) for i, c in enumerate(raw.get("channels") or ()))
    if not channels and not (kind == "pcp" and practice):
        raise DirectoryError("channels", "an entry needs at least one channel (a PCP may use its practice's)")
    wanted_id = entry_id(kind, npi=npi, aco_id=aco_id, name=name)
    return DirectoryEntry(
        id=str(raw.get("id") or wanted_id),
        kind=kind,
        name=name,
        npi=npi,
        aco_id=aco_id,
        practice=practice,
        channels=channels,
        events=events,
        mode=mode,
        digest_at=digest_at,
        timezone=timezone,
        enabled=bool(raw.get("enabled", True)),
    )


def _channel(index: int, raw: Any) -> Mapping[str, Any]:
    where = f"channels[{index}]"
    if not isinstance(raw, Mapping):
        raise DirectoryError(where, "must be a table of settings")
    kind = raw.get("channel")
    if kind not in CHANNEL_KINDS:
        raise DirectoryError(f"{where}.channel", f"{kind!r} is not one of {', '.join(CHANNEL_KINDS)}")
    required, optional = CHANNEL_KINDS[kind]
    for key in required:
        if raw.get(key) in (None, ""):
            raise DirectoryError(f"{where}.{key}", f"a {kind} channel needs {key}")
    for key in raw:
        if key != "channel" and key not in required and key not in optional:
            raise DirectoryError(f"{where}.{key}", f"unknown setting (known: {', '.join(required + optional)})")
    if kind == "fhir" and not str(raw["url"]).startswith(("https://", "http://")):
        raise DirectoryError(f"{where}.url", "must be an https:// (or, for testing, http://) base URL")
    if kind == "mllp":
        port = raw["port"]
        if not isinstance(port, int) or not 0 < port < 65536:
            raise DirectoryError(f"{where}.port", "must be a TCP port number")
        if raw.get("on_error", "retry") not in ("retry", "dead"):
            raise DirectoryError(f"{where}.on_error", "must be 'retry' or 'dead' (what an AE/CE answer does)")
        if raw.get("message", "original") not in ("original",):
            raise DirectoryError(f"{where}.message", "only 'original' (the v2 message as received) is sent")
    if kind == "direct" and "@" not in str(raw["to"]):
        raise DirectoryError(f"{where}.to", "must be a Direct address (name@direct.example.org)")
    if kind == "file" and raw.get("format", "json") not in ("json", "ndjson"):
        raise DirectoryError(f"{where}.format", "must be 'json' (one file a notification) or 'ndjson' (a digest)")
    if "timeout" in raw and not (isinstance(raw["timeout"], int | float) and raw["timeout"] > 0):
        raise DirectoryError(f"{where}.timeout", "must be a positive number of seconds")
    if "auth" in raw:
        auth = raw["auth"]
        if not isinstance(auth, Mapping):
            raise DirectoryError(f"{where}.auth", "must be a table (SMART Backend Services settings)")
        for key in _SMART_KEYS[0]:
            if not auth.get(key):
                raise DirectoryError(f"{where}.auth.{key}", f"SMART Backend Services needs {key}")
        for key in auth:
            if key not in _SMART_KEYS[0] + _SMART_KEYS[1]:
                raise DirectoryError(f"{where}.auth.{key}", "unknown setting")
    return dict(raw)


# -- deciding --------------------------------------------------------------------------


def _first(bundle: Mapping, kind: str) -> Mapping:
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == kind:
            return resource
    return {}


def event_kind(bundle: Mapping) -> str | None:
    """Which of :data:`EVENT_KINDS` a notification Bundle is, or None (an update no preference names).

    An emergency encounter (class EMER) is an ``ed-visit`` whatever its trigger
    (registration, or the discharge that ends it); a discharge whose
    disposition (HL7 table 0112, or FHIR's ``snf``) is a skilled nursing
    facility is ``discharge-snf``.
    """
    code = (_first(bundle, "MessageHeader").get("eventCoding") or {}).get("code", "")
    encounter = _first(bundle, "Encounter")
    emergency = (encounter.get("class") or {}).get("code") == "EMER"
    if code in ("notification-admit", "notification-discharge") and emergency:
        return "ed-visit"
    if code == "notification-admit":
        return "admit"
    if code == "notification-transfer":
        return "transfer"
    if code == "notification-discharge":
        codings = ((encounter.get("hospitalization") or {}).get("dischargeDisposition") or {}).get("coding") or ()
        for c in codings:
            system = c.get("system", "")
            if (system.endswith("v2-0112") and c.get("code") in SNF_DISPOSITIONS) or (
                system.endswith("discharge-disposition") and c.get("code") in _FHIR_SNF
            ):
                return "discharge-snf"
        return "discharge"
    return None


@dataclass(frozen=True)
class Selection:
    """Who is told of one event: ``(entry, channel index, channel settings)`` each, and PCPs with no entry."""

    deliveries: tuple[tuple[DirectoryEntry, int, Mapping[str, Any]], ...]
    missing_pcps: tuple[str, ...] = ()


def recipients_for(
    kind: str | None,
    member: Mapping[str, str] | None,
    entries: Mapping[str, DirectoryEntry],
) -> Selection:
    """The deliveries for an event of ``kind`` about ``member`` (a roster row, or None when unmatched).

    The member's PCP (by NPI; its practice's channels when it has none of its
    own) and its ACO's care team when the patient matched; every HIE always.
    Each only when it wants this kind of event. A PCP the roster names with no
    directory entry is returned in ``missing_pcps``, never skipped silently.
    """
    out: list[tuple[DirectoryEntry, int, Mapping[str, Any]]] = []
    missing: list[str] = []

    def add(entry: DirectoryEntry, channels_of: DirectoryEntry | None = None) -> None:
        if kind is None or not entry.wants(kind):
            return
        for i, channel in enumerate((channels_of or entry).channels):
            out.append((entry, i, channel))

    if member is not None:
        npi = member.get("pcp_npi", "")
        if npi:
            pcp = entries.get(entry_id("pcp", npi=npi))
            if pcp is None:
                missing.append(npi)
            elif pcp.channels:
                add(pcp)
            elif pcp.practice and pcp.practice in entries:
                add(pcp, entries[pcp.practice])
            else:
                missing.append(npi)
        team = entries.get(entry_id("care_team", aco_id=member.get("aco_id", "")))
        if team is not None:
            add(team)
    for entry in entries.values():
        if entry.kind == "hie":
            add(entry)
    return Selection(tuple(out), tuple(missing))


def missing_pcps(npis: Iterable[str], entries: Mapping[str, DirectoryEntry]) -> list[str]:
    """The NPIs (of PCPs the roster names) with no usable directory entry, sorted."""
    out = set()
    for npi in npis:
        if not npi:
            continue
        pcp = entries.get(entry_id("pcp", npi=npi))
        if pcp is None or not (pcp.channels or (pcp.practice and pcp.practice in entries)):
            out.add(npi)
    return sorted(out)
