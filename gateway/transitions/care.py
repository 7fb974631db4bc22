"""What a member's ADT events mean for care transitions: episodes, flags, worklist tasks, the ED e-alert.

:func:`plan_member` is a stage (data in, data out). Given every episode event
of one member, the episodes as last stored, the member's open tasks and the
ids of the messages that are new, it folds the events again
(:func:`~gateway.transitions.episodes.fold`, so the order they arrived in
does not matter), closes an ED visit that never got its A03
(:func:`~gateway.transitions.episodes.close_stale`), flags each episode
(:func:`~gateway.transitions.alerts.encounter_flags`) and compares each with
its stored state:

- a stay newly *discharged* (inpatient, observation or SNF) makes the
  discharge's tasks (``discharge``, or ``discharge-snf`` to a SNF; none for a
  disposition the rules list, e.g. death or a transfer to another hospital);
  an ED visit newly closed makes the ``ed-visit`` tasks when the ACO wants them;
- a discharge cancelled (A13), or a stay cancelled (A11), closes the tasks
  it made; a discharge whose time changed closes them and makes new ones;
- an inpatient admission (a *readmission*) closes the open tasks of the
  member's earlier discharges;
- an ED registration (A04, or an A01 of an emergency class) of an open
  visit asks for the e-alert (one per visit).

:func:`alert_facts` gives the utilisation the e-alert and the CDS Hooks card show.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, tzinfo

from gateway.transitions.alerts import encounter_flags
from gateway.transitions.episodes import Episode, EpisodeEvent, close_stale, episode_as_dict, fold, setting_of
from gateway.transitions.worklist import WorklistRules, close_for_readmission, plan_tasks, task_resource

__all__ = ["CareSettings", "MemberPlan", "alert_facts", "alert_id", "event_flags", "plan_member"]

_SNF_DISPOSITIONS = frozenset({"03", "61", "64"})
#: Where a discharge can make tasks: stays after which the patient may go home.
_DISCHARGE_SETTINGS = ("inpatient", "observation", "snf")
_ALERT_NAMESPACE = uuid.UUID("5b0f3a4e-8c1d-4e52-9a07-2f1f6c3d9b11")


@dataclass(frozen=True)
class CareSettings:
    """How care transitions are decided: the worklist rules, which facilities are SNFs, when a visit is stale."""

    rules: WorklistRules
    snf_facilities: frozenset[str] = frozenset()
    stale_after: Mapping[str, timedelta] = field(default_factory=lambda: {"ed": timedelta(hours=24)})
    #: The time zone an event's day is read in when its time carries none.
    timezone: tzinfo = UTC


@dataclass
class MemberPlan:
    """What to write for one member: changed episodes, new and closed tasks, e-alerts, audit events."""

    aco_id: str
    member_id: str
    episodes: list[Episode] = field(default_factory=list)
    flags: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    closed_tasks: list[dict] = field(default_factory=list)
    #: (the ED episode, the message id of its registration) for each e-alert to send.
    alerts: list[tuple[Episode, int]] = field(default_factory=list)
    events: list[tuple[int | None, str, dict]] = field(default_factory=list)
    #: Every episode of the member as folded now (for the alert's utilisation).
    all_episodes: list[Episode] = field(default_factory=list)


def alert_id(facility: str, visit: str) -> str:
    """The e-alert's notification id: one per ED visit, the same however often its messages are processed."""
    return str(uuid.uuid5(_ALERT_NAMESPACE, f"ed-alert|{facility}|{visit}"))


_NEVER = datetime.max.replace(tzinfo=UTC)


def _utc(moment: datetime) -> datetime:
    """An event time in UTC (one without a zone is taken as UTC, as the fold does)."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _key(e: Episode | EpisodeEvent) -> tuple[str, str]:
    return (e.facility, e.visit)


def _day(moment: datetime, tz: tzinfo) -> date:
    """The day of an event, in its own offset (as the hospital wrote it), else in ``tz``."""
    return moment.date() if moment.tzinfo else moment.replace(tzinfo=tz).date()


def _encounter(ep: Episode) -> dict:
    return {"system": f"urn:herald:id:{ep.facility}", "value": ep.visit}


def _task_encounter(task: Mapping) -> tuple[str, str] | None:
    ident = ((task.get("encounter") or {}).get("identifier")) or {}
    system = ident.get("system", "")
    if not system.startswith("urn:herald:id:"):
        return None
    return (system.removeprefix("urn:herald:id:"), ident.get("value", ""))


def plan_member(
    aco_id: str,
    member_id: str,
    events: Iterable[EpisodeEvent],
    stored: Mapping[tuple[str, str], Mapping],
    open_tasks: Iterable[Mapping],
    new_messages: set[int],
    settings: CareSettings,
    now: datetime,
    owner: str = "",
) -> MemberPlan:
    """Decide what the member's events mean (module docstring).

    ``stored``: each episode's stored state (as :func:`episode_as_dict` gave it,
    with its ``flags``) by (facility, visit); ``open_tasks``: rows with the
    open Task as ``resource`` and its ``message_id``; ``new_messages``: the
    message ids not folded before (only their registrations ask for an
    e-alert); ``owner``: the care manager the tasks are for.
    """
    plan = MemberPlan(aco_id, member_id)
    snf = settings.snf_facilities
    marked = [replace(e, facility_kind="snf") if e.facility in snf else e for e in events]
    by_visit: dict[tuple[str, str], list[EpisodeEvent]] = {}
    for e in marked:
        by_visit.setdefault(e.key, []).append(e)
    episodes = [close_stale(ep, now, settings.stale_after) for ep in fold(marked)]
    plan.all_episodes = episodes
    tasks = [dict(t) for t in open_tasks]
    authored = now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def close(selected: list[dict], reason: str, readmitted: date | None = None) -> None:
        done = close_for_readmission([t["resource"] for t in selected], readmitted or date.max, reason)
        by_id = {t["resource"]["id"]: t for t in selected}
        for r in done:
            row = by_id[r["id"]]
            tasks.remove(row)
            if row.get("planned") is not None:  # made in this same plan: written cancelled at once
                row["planned"]["resource"] = r
            else:
                plan.closed_tasks.append(
                    {"id": r["id"], "status": "cancelled", "resource": r, "message_id": row.get("message_id")}
                )

    for ep in sorted(episodes, key=lambda e: _utc(e.start) if e.start else _NEVER):
        key = _key(ep)
        flags = encounter_flags(ep, episodes)
        plan.flags[key] = flags
        old = stored.get(key)
        state = {**episode_as_dict(ep), "flags": flags}
        if old is None or dict(old) != state:
            plan.episodes.append(ep)
        was_discharged = old is not None and old.get("status") == "closed" and old.get("ended") == "discharged"
        was_closed = old is not None and old.get("status") == "closed"
        first_message = max(
            (e.message_id for e in by_visit.get(key, ()) if e.trigger == "A03"), default=max(ep.messages, default=0)
        )
        own = [t for t in tasks if _task_encounter(t["resource"]) == key]
        # A discharge (or an ED visit's end) undone: its tasks are closed.
        if was_closed and ep.status != "closed" and own:
            reason = "the stay was cancelled (A11)" if ep.status == "cancelled" else "the discharge was cancelled (A13)"
            close(own, reason)
            own = []
        newly_closed = ep.status == "closed" and (
            not was_closed or (was_discharged and old.get("end") != state["end"]) or old.get("ended") != ep.ended
        )
        if newly_closed and own:
            close(own, "the discharge was corrected")
        if newly_closed and ep.end is not None:
            kind = _task_event(ep, settings.rules)
            if kind is not None:
                for p in plan_tasks(kind, _day(ep.end, settings.timezone), aco_id, settings.rules):
                    task = task_resource(
                        p,
                        source=f"{ep.facility}|{ep.visit}|{state['end']}",
                        aco_id=aco_id,
                        member_id=member_id,
                        authored=authored,
                        owner=owner,
                        encounter_identifier=_encounter(ep),
                    )
                    if flags:
                        task["note"] = [{"text": "Flags: " + ", ".join(flags)}]
                    planned = {
                        "id": task["id"],
                        "code": p.code,
                        "facility": ep.facility,
                        "visit": ep.visit,
                        "message_id": first_message,
                        "resource": task,
                    }
                    plan.tasks.append(planned)
                    tasks.append({"resource": task, "message_id": first_message, "planned": planned})
            elif ep.setting in _DISCHARGE_SETTINGS and ep.ended == "discharged":
                plan.events.append((first_message, "no-tasks", {"disposition": ep.disposition}))
        # A readmission: the open tasks of earlier discharges are closed.
        newly_admitted = ep.setting == "inpatient" and ep.start is not None and ep.status != "cancelled"
        was_inpatient = (
            old is not None
            and old.get("status") != "cancelled"
            and old.get("start") is not None
            and (setting_of(old.get("klass", ""), old.get("facility_kind", "hospital")) == "inpatient")
        )
        if newly_admitted and not was_inpatient:
            earlier = {
                _key(e)
                for e in episodes
                if e is not ep and e.status == "closed" and e.end is not None and _utc(e.end) <= _utc(ep.start)
            }
            stale = [t for t in tasks if _task_encounter(t["resource"]) in earlier]
            if stale:
                day = _day(ep.start, settings.timezone)
                close(stale, f"readmitted on {day.isoformat()} ({ep.facility})", max(day, now.date()))
        # An ED registration of an open visit: the e-alert (once per visit).
        if ep.status == "open" and ep.setting == "ed":
            registrations = [
                e.message_id
                for e in by_visit.get(key, ())
                if e.message_id in new_messages
                and e.trigger in ("A04", "A01")
                and setting_of(e.klass, e.facility_kind) == "ed"
            ]
            if registrations:
                plan.alerts.append((ep, min(registrations)))
        if ep.setting == "snf" and old is None and ep.status != "cancelled":
            plan.events.append((min(ep.messages, default=None), "snf-admission", {"aco": aco_id, "member": member_id}))
    return plan


def event_flags(history: Iterable[EpisodeEvent], new: EpisodeEvent, snf_facilities: frozenset[str]) -> list[str]:
    """The flags of the episode ``new`` belongs to, given the member's events (``new`` among them or not)."""
    events = [e for e in history if e.message_id != new.message_id] + [new]
    marked = [replace(e, facility_kind="snf") if e.facility in snf_facilities else e for e in events]
    episodes = fold(marked)
    current = next((e for e in episodes if (e.facility, e.visit) == new.key), None)
    return encounter_flags(current, episodes) if current is not None else []


def _task_event(ep: Episode, rules: WorklistRules) -> str | None:
    """The worklist event a closed episode is (``discharge``, ``discharge-snf``, ``ed-visit``), or None."""
    if ep.setting == "ed":
        return "ed-visit"
    if ep.setting not in _DISCHARGE_SETTINGS or ep.ended != "discharged":
        return None
    if ep.disposition in _SNF_DISPOSITIONS:
        return "discharge-snf"
    if ep.disposition in rules.no_task_dispositions:
        return None
    return "discharge"


def alert_facts(episodes: Iterable[Episode], at: datetime, current: Episode | None = None) -> tuple[int, str]:
    """(ED visits in the 60 days up to ``at``, the current one included; the last discharge before ``at``)
    as the e-alert says them: ``"2026-02-14 from NRG (inpatient)"``."""
    when, utc = _utc(at), _utc
    stays = [e for e in episodes if e.status != "cancelled" and e.start is not None]
    ed = [e for e in stays if e.setting == "ed" and when - timedelta(days=60) <= utc(e.start) <= when]
    if current is not None and current.setting == "ed" and current not in ed:
        ed.append(current)
    discharged = [
        e
        for e in stays
        if e is not current
        and e.setting in _DISCHARGE_SETTINGS
        and e.status == "closed"
        and e.end is not None
        and utc(e.end) <= when
    ]
    last = ""
    if discharged:
        e = max(discharged, key=lambda x: utc(x.end))
        last = f"{e.end.date().isoformat()} from {e.facility} ({e.setting})"
    return len(ed), last
