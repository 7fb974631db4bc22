"""Encounters as episodes: a visit's ADT messages folded into one stay, whatever order they came in.

An episode is keyed by the facility and the visit number (PV1-19). Its
messages are folded in the order their events happened (the event time, then
the message time, then arrival), not the order they arrived: an A03 that
overtakes its A01 on a busy interface still gives one stay that began at the
admit and ended at the discharge.

- A01 (admit), A04 (register), A05 (pre-admit): the stay begins;
- A02: a transfer (the unit is added to the stay's path);
- A06 / A07: the patient class changes (outpatient to inpatient, and back);
- A08: an update (class and unit as given; the status is unchanged);
- A03: the stay ends, with its disposition and destination;
- A11: the admit is cancelled (the stay is ``cancelled``); A13: the
  discharge is cancelled (the stay is open again);
- an ED visit never discharged is closed by :func:`close_stale` after a set
  time (``ended`` = ``assumed``), as notification services do.

:func:`timeline` lists a patient's stays in time order with the setting of
each (``ed``, ``inpatient``, ``observation``, ``snf``, ``outpatient``) and
where the patient went between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

__all__ = [
    "Episode",
    "EpisodeEvent",
    "close_stale",
    "episode_as_dict",
    "episode_event",
    "episode_from_dict",
    "event_as_dict",
    "event_from_dict",
    "fold",
    "setting_of",
    "timeline",
]

_BEGIN = {"A01", "A04", "A05"}
_SNF_DISPOSITIONS = {"03", "61", "64"}


@dataclass(frozen=True)
class EpisodeEvent:
    """What one ADT message says about its visit (no names: the patient is a key)."""

    message_id: int
    trigger: str
    facility: str
    visit: str
    patient: str
    klass: str = ""
    event_time: datetime | None = None
    message_time: datetime | None = None
    admit_time: datetime | None = None
    discharge_time: datetime | None = None
    unit: str = ""
    disposition: str = ""
    destination: str = ""
    facility_kind: str = "hospital"  # or "snf", from the sender's profile

    @property
    def key(self) -> tuple[str, str]:
        return (self.facility, self.visit)


@dataclass(frozen=True)
class Episode:
    facility: str
    visit: str
    patient: str
    status: str = "open"  # open, closed, cancelled
    klass: str = ""
    start: datetime | None = None
    end: datetime | None = None
    ended: str = ""  # "discharged", or "assumed" when closed for want of an A03
    units: tuple[str, ...] = ()
    disposition: str = ""
    destination: str = ""
    facility_kind: str = "hospital"
    messages: tuple[int, ...] = field(default=())

    @property
    def setting(self) -> str:
        return setting_of(self.klass, self.facility_kind)

    @property
    def to_snf(self) -> bool:
        return self.status == "closed" and self.disposition in _SNF_DISPOSITIONS


def setting_of(klass: str, facility_kind: str = "hospital") -> str:
    """Where a stay happened: ``snf`` at a SNF, else by patient class (EMER ed, IMP inpatient, ...)."""
    if facility_kind == "snf":
        return "snf"
    return {"E": "ed", "EMER": "ed", "I": "inpatient", "IMP": "inpatient", "ACUTE": "inpatient"}.get(
        klass, {"OBSENC": "observation", "B": "observation"}.get(klass, "outpatient")
    )


def _order(e: EpisodeEvent) -> tuple:
    """When the event happened (a time without a zone is taken as UTC), then the stored order."""
    when = e.event_time or e.message_time
    if when is None:
        return (datetime.max.replace(tzinfo=UTC), e.message_id)
    return (when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC), e.message_id)


def fold(events: Iterable[EpisodeEvent]) -> list[Episode]:
    """The episodes of ``events`` (any order, any visits), one per facility and visit number."""
    by_key: dict[tuple[str, str], list[EpisodeEvent]] = {}
    for e in events:
        if e.visit:
            by_key.setdefault(e.key, []).append(e)
    return [_fold_one(sorted(evs, key=_order)) for evs in by_key.values()]


def _fold_one(events: list[EpisodeEvent]) -> Episode:
    first = events[0]
    ep = Episode(first.facility, first.visit, first.patient, facility_kind=first.facility_kind)
    for e in events:
        ep = replace(ep, messages=(*ep.messages, e.message_id), patient=e.patient or ep.patient)
        klass = e.klass or ep.klass
        if e.trigger in _BEGIN:
            start = e.admit_time or e.event_time or ep.start
            ep = replace(ep, klass=klass, start=_earliest(ep.start, start) if ep.status != "cancelled" else start)
            if ep.status == "cancelled":
                ep = replace(ep, status="open")
        elif e.trigger == "A11":
            ep = replace(ep, status="cancelled")
        elif e.trigger == "A03":
            if ep.status != "cancelled":
                ep = replace(
                    ep,
                    klass=klass,
                    status="closed",
                    end=e.discharge_time or e.event_time,
                    ended="discharged",
                    disposition=e.disposition or ep.disposition,
                    destination=e.destination or ep.destination,
                    start=ep.start or e.admit_time,
                )
        elif e.trigger == "A13":
            if ep.status == "closed":
                ep = replace(ep, status="open", end=None, ended="", disposition="", destination="")
        elif e.trigger in ("A02", "A06", "A07", "A08"):
            ep = replace(ep, klass=klass, start=ep.start or e.admit_time)
        if e.unit and (not ep.units or ep.units[-1] != e.unit):
            ep = replace(ep, units=(*ep.units, e.unit))
    return ep


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return min(a, b)


def close_stale(episode: Episode, now: datetime, after: Mapping[str, timedelta]) -> Episode:
    """An open episode past its setting's limit (``after``, e.g. ``{"ed": 24 h}``) closed as ``assumed``."""
    limit = after.get(episode.setting)
    if episode.status != "open" or limit is None or episode.start is None or now - episode.start < limit:
        return episode
    return replace(episode, status="closed", ended="assumed", end=episode.start + limit)


def timeline(episodes: Iterable[Episode]) -> list[dict]:
    """One patient's stays in time order, with where the patient went after each (cancelled ones left out)."""
    stays = sorted((e for e in episodes if e.status != "cancelled" and e.start), key=lambda e: e.start)
    out = []
    for i, ep in enumerate(stays):
        following = stays[i + 1] if i + 1 < len(stays) else None
        if ep.status == "open":
            after = "still there"
        elif following is not None and ep.end is not None and following.start <= ep.end + timedelta(days=1):
            after = following.setting  # straight to the next stay (an ED visit that became an admission, a SNF)
        elif ep.to_snf:
            after = "snf"
        else:
            after = "home"
        out.append(
            {
                "facility": ep.facility,
                "visit": ep.visit,
                "setting": ep.setting,
                "start": ep.start.isoformat(),
                "end": ep.end.isoformat() if ep.end else "",
                "ended": ep.ended,
                "units": list(ep.units),
                "then": after,
            }
        )
    return out


def episode_event(
    bundle: Mapping, trigger: str, message_id: int, patient: str, facility_kind: str = "hospital"
) -> EpisodeEvent | None:
    """What a converted message's Bundle says about its visit; None without a visit number."""

    def first(kind: str) -> Mapping:
        for entry in bundle.get("entry") or ():
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == kind:
                return resource
        return {}

    encounter = first("Encounter")
    visit = next(
        (
            i
            for i in encounter.get("identifier") or ()
            if any(c.get("code") == "VN" for c in (i.get("type") or {}).get("coding") or ())
        ),
        None,
    )
    if visit is None:
        return None
    refs = {e.get("fullUrl"): e.get("resource") or {} for e in bundle.get("entry") or ()}
    provider = encounter.get("serviceProvider") or {}
    facility = refs.get(provider.get("reference"), {}).get("name") or provider.get("display", "")
    period = encounter.get("period") or {}
    stay = encounter.get("hospitalization") or {}
    disposition = next(
        (
            c.get("code", "")
            for c in (stay.get("dischargeDisposition") or {}).get("coding") or ()
            if c.get("system", "").endswith("v2-0112")
        ),
        "",
    )
    destination = refs.get((stay.get("destination") or {}).get("reference"), {}).get("name", "")
    unit = ""
    for loc in encounter.get("location") or ():
        unit = refs.get((loc.get("location") or {}).get("reference"), {}).get("name", "") or unit
        if unit:
            break
    return EpisodeEvent(
        message_id=message_id,
        trigger=trigger,
        facility=facility or (visit.get("assigner") or {}).get("display", ""),
        visit=visit.get("value", ""),
        patient=patient,
        klass=(encounter.get("class") or {}).get("code", ""),
        event_time=_time(bundle.get("timestamp")),
        message_time=_time(bundle.get("timestamp")),
        admit_time=_time(period.get("start")),
        discharge_time=_time(period.get("end")),
        unit=unit,
        disposition=disposition,
        destination=destination,
        facility_kind=facility_kind,
    )


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


_EVENT_TIMES = ("event_time", "message_time", "admit_time", "discharge_time")
_EPISODE_TIMES = ("start", "end")


def event_as_dict(event: EpisodeEvent) -> dict:
    """An event as plain data (times as ISO 8601): what a pipeline outcome carries and the store seals."""
    out = {f: getattr(event, f) for f in EpisodeEvent.__dataclass_fields__}
    for name in _EVENT_TIMES:
        out[name] = out[name].isoformat() if out[name] is not None else None
    return out


def event_from_dict(data: Mapping) -> EpisodeEvent:
    """:func:`event_as_dict` read back (keys it does not know, such as the member's ids, are left out)."""
    values = {f: data[f] for f in EpisodeEvent.__dataclass_fields__ if f in data}
    for name in _EVENT_TIMES:
        values[name] = _time(values.get(name))
    return EpisodeEvent(**values)


def episode_as_dict(episode: Episode) -> dict:
    """An episode as plain data (times as ISO 8601, tuples as lists)."""
    out = {f: getattr(episode, f) for f in Episode.__dataclass_fields__}
    for name in _EPISODE_TIMES:
        out[name] = out[name].isoformat() if out[name] is not None else None
    out["units"], out["messages"] = list(episode.units), list(episode.messages)
    return out


def episode_from_dict(data: Mapping) -> Episode:
    """:func:`episode_as_dict` read back."""
    values = {f: data[f] for f in Episode.__dataclass_fields__ if f in data}
    for name in _EPISODE_TIMES:
        values[name] = _time(values.get(name))
    values["units"] = tuple(values.get("units") or ())
    values["messages"] = tuple(values.get("messages") or ())
    return Episode(**values)
