"""The follow-up worklist: due dates around weekends and holidays, per-ACO switches, readmissions."""

from __future__ import annotations

from datetime import date

import pytest

from gateway.errors import ConfigError
from gateway.transitions.calendar import BusinessCalendar
from gateway.transitions.worklist import (
    close_for_readmission,
    load_worklist,
    plan_tasks,
    task_resource,
    task_status,
)

RULES = load_worklist()


def due(event, day, aco="A1"):
    return {p.code: (p.start, p.due) for p in plan_tasks(event, day, aco, RULES)}


def test_a_monday_discharge_home_gets_the_tcm_tasks():
    tasks = due("discharge", date(2026, 3, 2))  # a Monday
    assert tasks == {
        "tcm-contact": (date(2026, 3, 2), date(2026, 3, 4)),  # Wednesday: 2 business days after
        "home-visit": (date(2026, 3, 5), date(2026, 3, 7)),  # from day 3, due by day 5
        "medication-reconciliation": (date(2026, 3, 2), date(2026, 3, 9)),
        "face-to-face": (date(2026, 3, 2), date(2026, 3, 16)),  # 14 days: moderate complexity by default
    }


def test_a_friday_discharge_skips_the_weekend():
    assert due("discharge", date(2026, 3, 6))["tcm-contact"][1] == date(2026, 3, 10)  # Tuesday


def test_a_saturday_discharge_counts_from_monday():
    assert due("discharge", date(2026, 3, 7))["tcm-contact"][1] == date(2026, 3, 10)  # Monday is day 1


def test_a_holiday_is_not_a_business_day():
    # Wednesday 25 November 2026; Thanksgiving is Thursday the 26th.
    assert due("discharge", date(2026, 11, 25))["tcm-contact"][1] == date(2026, 11, 30)
    # The Friday before 4 July 2026 (a Saturday) is the observed holiday.
    assert due("discharge", date(2026, 7, 2))["tcm-contact"][1] == date(2026, 7, 7)


def test_a_discharge_to_a_snf_gets_coordination_not_tcm():
    assert set(due("discharge-snf", date(2026, 3, 2))) == {"snf-coordination"}


def test_ed_visit_tasks_are_an_acos_choice(tmp_path):
    assert due("ed-visit", date(2026, 3, 2)) == {}
    text = _rules_file().read_text() + "\n[aco.A9]\ned_visit_tasks = true\nface_to_face_days = 7\n"
    path = tmp_path / "worklist.toml"
    path.write_text(text)
    rules = load_worklist(path)
    plans = {p.code: p.due for p in plan_tasks("ed-visit", date(2026, 3, 2), "A9", rules)}
    assert plans == {"ed-follow-up": date(2026, 3, 4)}
    assert plan_tasks("ed-visit", date(2026, 3, 2), "A1", rules) == []
    f2f = {p.code: p.due for p in plan_tasks("discharge", date(2026, 3, 2), "A9", rules)}["face-to-face"]
    assert f2f == date(2026, 3, 9), "A9 does high-complexity TCM: 7 days"


def _rules_file():
    from gateway.resources import mappings_dir

    return mappings_dir() / "worklist.toml"


def test_due_and_overdue_on_a_given_day():
    plan = plan_tasks("discharge", date(2026, 3, 6), "A1", RULES)[0]
    task = task_resource(plan, source="msg-1", aco_id="A1", member_id="M1", authored="2026-03-06T15:00:00Z")
    assert task_status(task, date(2026, 3, 9)) == "open"
    assert task_status(task, date(2026, 3, 10)) == "due"
    assert task_status(task, date(2026, 3, 11)) == "overdue"
    assert task_status({**task, "status": "completed"}, date(2026, 3, 11)) == "done"


def test_a_task_is_a_valid_fhir_task_naming_no_patient():
    from fhir.resources.R4B.task import Task

    plan = plan_tasks("discharge", date(2026, 3, 2), "A1", RULES)[0]
    task = task_resource(
        plan,
        source="msg-1",
        aco_id="A1",
        member_id="M1",
        authored="2026-03-02T15:00:00Z",
        owner="rn-jones@aco.example",
        encounter_identifier={"system": "urn:herald:id:LSR", "value": "V1"},
    )
    Task.model_validate(task)
    assert task["for"] == {"identifier": {"system": "urn:herald:member:A1", "value": "M1"}}
    again = task_resource(plan, source="msg-1", aco_id="A1", member_id="M1", authored="2026-03-02T15:00:00Z")
    assert again["id"] == task["id"], "the same message makes the same Task"


def test_a_readmission_closes_the_open_tasks_of_the_earlier_discharge():
    tasks = [
        task_resource(p, source="m1", aco_id="A1", member_id="M1", authored="2026-03-02T10:00:00Z")
        for p in plan_tasks("discharge", date(2026, 3, 2), "A1", RULES)
    ]
    tasks[0] = {**tasks[0], "status": "completed"}
    closed = close_for_readmission(tasks, date(2026, 3, 4))
    assert {t["code"]["coding"][0]["code"] for t in closed} == {
        "home-visit",
        "medication-reconciliation",
        "face-to-face",
    }
    assert all(t["status"] == "cancelled" and t["statusReason"]["text"] == "readmitted" for t in closed)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[calendar]\nweekend = ['Saturday']\n", "calendar.weekend"),
        ("[calendar]\nholidays = ['25 Dec']\n", "calendar.holidays"),
        ("[defaults]\ncolour = 1\n", "defaults.colour"),
        ("[[tasks]]\ncode = 'x'\ntitle = 'x'\nevents = ['lunch']\ndue_days = 1\n", "tasks[0].events"),
        ("[[tasks]]\ncode = 'x'\ntitle = 'x'\nevents = ['discharge']\n", "tasks[0]"),
        ("[[tasks]]\ntitle = 'x'\nevents = ['discharge']\ndue_days = 1\n", "tasks[0]"),
    ],
)
def test_bad_rules_are_refused_naming_the_key(tmp_path, text, key):
    path = tmp_path / "worklist.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_worklist(path)
    assert key in str(caught.value)


def test_business_days_between():
    cal = BusinessCalendar.of(["2026-03-04"])
    assert cal.business_days_between(date(2026, 3, 2), date(2026, 3, 9)) == 4  # Tue, Thu, Fri, Mon
