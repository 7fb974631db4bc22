"""The follow-up worklist: which tasks a care transition creates, when each is due, and the FHIR Task.

Rules are data (``mappings/worklist.toml``): each task names the event kinds
that create it (``discharge``, ``discharge-snf``, ``ed-visit``), when it is
due (business days, or calendar days, from the day of the event), an optional
window start, and a per-ACO switch. :func:`plan_tasks` gives the tasks of one
event; :func:`task_resource` makes one a FHIR R4 ``Task``; :func:`task_status`
says whether it is open, due or overdue on a day; :func:`close_for_readmission`
closes a discharge's open tasks when the patient is readmitted.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.resources import mappings_dir
from gateway.transitions.calendar import WEEKDAYS, BusinessCalendar

__all__ = [
    "TASK_SYSTEM",
    "TaskPlan",
    "TaskRule",
    "WorklistRules",
    "close_for_readmission",
    "load_worklist",
    "plan_tasks",
    "task_resource",
    "task_status",
]

#: The code system of Herald's task codes.
TASK_SYSTEM = "urn:herald:task"
_NAMESPACE = uuid.UUID("0e3c9a4e-54f5-4f4b-9a4c-6b3f1f3c1e2a")
_EVENTS = ("discharge", "discharge-snf", "ed-visit")
_DEFAULTS = {"ed_visit_tasks": False, "face_to_face_days": 14}


@dataclass(frozen=True)
class TaskRule:
    code: str
    title: str
    events: tuple[str, ...]
    due_business_days: int | None = None
    due_days: int | str | None = None
    start_days: int = 0
    only_if: str = ""


@dataclass(frozen=True)
class WorklistRules:
    calendar: BusinessCalendar
    tasks: tuple[TaskRule, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    per_aco: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Discharge dispositions (HL7 table 0112) that make no follow-up task: not a return to the community.
    no_task_dispositions: frozenset[str] = frozenset()

    def setting(self, aco_id: str, name: str) -> Any:
        return {**self.defaults, **self.per_aco.get(aco_id, {})}[name]


@dataclass(frozen=True)
class TaskPlan:
    """One task to create: what, from when, by when."""

    code: str
    title: str
    start: date
    due: date


def load_worklist(path: Path | None = None) -> WorklistRules:
    """Read the rules; :class:`ConfigError` names the key of anything wrong."""
    path = path or mappings_dir() / "worklist.toml"
    where = path.name
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(where, f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(where, f"not valid TOML: {e}") from None
    cal = raw.get("calendar", {})
    for day in cal.get("weekend", ()):
        if day not in WEEKDAYS:
            raise ConfigError(f"{where}: calendar.weekend", f"{day!r} is not one of {', '.join(WEEKDAYS)}")
    try:
        calendar = BusinessCalendar.of(cal.get("holidays", ()), cal.get("weekend", ("Sat", "Sun")))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: calendar.holidays", f"each holiday is a date, YYYY-MM-DD ({e})") from None
    defaults = {**_DEFAULTS, **raw.get("defaults", {})}
    for key in defaults:
        if key not in _DEFAULTS:
            raise ConfigError(f"{where}: defaults.{key}", f"unknown setting (known: {', '.join(_DEFAULTS)})")
    per_aco = raw.get("aco", {})
    for aco, settings in per_aco.items():
        for key in settings:
            if key not in _DEFAULTS:
                raise ConfigError(f"{where}: aco.{aco}.{key}", f"unknown setting (known: {', '.join(_DEFAULTS)})")
    tasks = []
    for i, t in enumerate(raw.get("tasks", ())):
        key = f"{where}: tasks[{i}]"
        try:
            rule = TaskRule(
                code=t["code"],
                title=t["title"],
                events=tuple(t["events"]),
                due_business_days=t.get("due_business_days"),
                due_days=t.get("due_days"),
                start_days=t.get("start_days", 0),
                only_if=t.get("only_if", ""),
            )
        except KeyError as e:
            raise ConfigError(key, f"needs {e.args[0]}") from None
        except TypeError as e:
            raise ConfigError(key, f"unknown key ({e})") from None
        for event in rule.events:
            if event not in _EVENTS:
                raise ConfigError(f"{key}.events", f"{event!r} is not one of {', '.join(_EVENTS)}")
        if (rule.due_business_days is None) == (rule.due_days is None):
            raise ConfigError(key, "give exactly one of due_business_days and due_days")
        if isinstance(rule.due_days, str) and rule.due_days not in _DEFAULTS:
            raise ConfigError(f"{key}.due_days", f"a number of days, or a setting ({', '.join(_DEFAULTS)})")
        if rule.only_if and rule.only_if not in _DEFAULTS:
            raise ConfigError(f"{key}.only_if", f"must name a setting ({', '.join(_DEFAULTS)})")
        tasks.append(rule)
    codes = [t.code for t in tasks]
    if len(set(codes)) != len(codes):
        raise ConfigError(f"{where}: tasks", "two tasks share a code")
    dispositions = raw.get("dispositions", {})
    for key in dispositions:
        if key != "no_tasks":
            raise ConfigError(f"{where}: dispositions.{key}", "unknown setting (known: no_tasks)")
    no_tasks = dispositions.get("no_tasks", [])
    if not isinstance(no_tasks, list) or not all(isinstance(c, str) and c for c in no_tasks):
        raise ConfigError(f"{where}: dispositions.no_tasks", "a list of disposition codes (HL7 table 0112), as text")
    return WorklistRules(calendar, tuple(tasks), defaults, per_aco, frozenset(no_tasks))


def plan_tasks(event: str, day: date, aco_id: str, rules: WorklistRules) -> list[TaskPlan]:
    """The tasks an ``event`` (a discharge, discharge to a SNF, ED visit) on ``day`` creates for ``aco_id``."""
    out = []
    for rule in rules.tasks:
        if event not in rule.events:
            continue
        if rule.only_if and not rules.setting(aco_id, rule.only_if):
            continue
        if rule.due_business_days is not None:
            due = rules.calendar.add_business_days(day, rule.due_business_days)
        else:
            days = rule.due_days
            if isinstance(days, str):
                days = int(rules.setting(aco_id, days))
            due = day + timedelta(days=int(days))
        out.append(TaskPlan(rule.code, rule.title, day + timedelta(days=rule.start_days), due))
    return out


def task_status(task: Mapping[str, Any], today: date) -> str:
    """``done``, ``cancelled``, ``overdue`` (past its due day), ``due`` (due today), or ``open``."""
    status = task.get("status")
    if status in ("completed", "cancelled"):
        return "done" if status == "completed" else "cancelled"
    due = date.fromisoformat(task["restriction"]["period"]["end"][:10])
    if today > due:
        return "overdue"
    return "due" if today == due else "open"


def task_resource(
    plan: TaskPlan,
    *,
    source: str,
    aco_id: str,
    member_id: str,
    authored: str,
    owner: str = "",
    encounter_identifier: Mapping[str, str] | None = None,
) -> dict:
    """``plan`` as a FHIR R4 Task for the member (named by the roster's member id, not the patient's name).

    ``source`` makes the id stable (the event's message id and the task code):
    processing the same message again makes the same Task.
    """
    task = {
        "resourceType": "Task",
        "id": str(uuid.uuid5(_NAMESPACE, f"{source}|{plan.code}")),
        "status": "requested",
        "intent": "order",
        "priority": "routine",
        "code": {"coding": [{"system": TASK_SYSTEM, "code": plan.code}], "text": plan.title},
        "description": plan.title,
        "for": {"identifier": {"system": f"urn:herald:member:{aco_id}", "value": member_id}},
        "authoredOn": authored,
        "executionPeriod": {"start": plan.start.isoformat()},
        "restriction": {"period": {"start": plan.start.isoformat(), "end": plan.due.isoformat()}},
    }
    if owner:
        task["owner"] = {"display": owner}
    if encounter_identifier:
        task["encounter"] = {"identifier": dict(encounter_identifier)}
    return task


def close_for_readmission(tasks: Iterable[dict], readmitted: date, reason: str = "readmitted") -> list[dict]:
    """Open tasks created on or before ``readmitted``, cancelled with the reason (a new discharge makes new ones)."""
    closed = []
    for task in tasks:
        if task.get("status") in ("completed", "cancelled"):
            continue
        if date.fromisoformat(task["authoredOn"][:10]) > readmitted:
            continue  # created after the readmission: about a later stay
        closed.append({**task, "status": "cancelled", "statusReason": {"text": reason}})
    return closed
