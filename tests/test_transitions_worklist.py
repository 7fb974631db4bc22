"""The follow-up worklist through the product, on the test's clock: due dates around weekends and a
holiday, due and overdue as the CLI lists them, a readmission closing the open tasks, done and export."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner
from transitions_harness import ACO, TransitionsTestCase, adt
from twisted.internet import defer, reactor, task

from gateway.app.cli import main
from gateway.app.transitions_service import TransitionsService
from gateway.resources import mappings_dir


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


class WorklistTests(TransitionsTestCase):
    def herald(self, *args: str) -> str:
        result = CliRunner().invoke(main, [*args, "--data", str(self.data)])
        self.assertEqual(result.exit_code, 0, result.output)
        return result.output

    def due(self, member: str = "M-1") -> dict[str, tuple[str, str]]:
        return {
            t["code"]: (t["resource"]["restriction"]["period"]["start"], t["resource"]["restriction"]["period"]["end"])
            for t in self.tasks(member=member)
        }

    @defer.inlineCallbacks
    def discharge(self, member: str, visit: str, admitted: datetime, discharged: datetime, disposition="01", **kw):
        yield self.send(
            adt("A01", member, visit, admitted, admitted=admitted, **kw),
            adt(
                "A03",
                member,
                visit,
                discharged,
                admitted=admitted,
                discharged=discharged,
                disposition=disposition,
                **kw,
            ),
        )
        yield self.transition(discharged + timedelta(minutes=5))

    @defer.inlineCallbacks
    def test_a_friday_discharge_skips_the_weekend_and_the_list_says_due_then_overdue(self):
        """Discharged Friday 6 March: the TCM contact is due Tuesday 10th; due that day, overdue the next."""
        yield self.discharge("M-1", "V1", at("2026-03-03"), at("2026-03-06", 15))
        self.assertEqual(
            self.due(),
            {
                "tcm-contact": ("2026-03-06", "2026-03-10"),
                "home-visit": ("2026-03-09", "2026-03-11"),
                "medication-reconciliation": ("2026-03-06", "2026-03-13"),
                "face-to-face": ("2026-03-06", "2026-03-20"),
            },
        )
        listed = self.herald("tasks", "list", "--due", "--on", "2026-03-10").splitlines()
        self.assertEqual([line.split()[3] for line in listed[1:]], ["tcm-contact"])
        self.assertEqual(listed[1].split()[5], "due")
        overdue = self.herald("tasks", "list", "--overdue", "--on", "2026-03-11").splitlines()
        self.assertEqual([line.split()[3] for line in overdue[1:]], ["tcm-contact"])
        both = self.herald("tasks", "list", "--due", "--overdue", "--on", "2026-03-11").splitlines()
        self.assertEqual(sorted(line.split()[3] for line in both[1:]), ["home-visit", "tcm-contact"])
        self.assertEqual(self.herald("tasks", "list", "--overdue", "--on", "2026-03-10"), "no tasks\n")

    @defer.inlineCallbacks
    def test_a_holiday_is_not_a_business_day(self):
        """Discharged Wednesday 25 November 2026 (Thanksgiving the 26th): the TCM contact is due Monday 30th."""
        yield self.discharge("M-1", "V2", at("2026-11-20"), at("2026-11-25", 10))
        self.assertEqual(self.due()["tcm-contact"], ("2026-11-25", "2026-11-30"))

    @defer.inlineCallbacks
    def test_a_readmission_closes_the_open_tasks_and_the_next_discharge_makes_new_ones(self):
        """Discharged Monday, one task done, readmitted Wednesday: the other three are cancelled, saying so."""
        yield self.discharge("M-1", "V3", at("2026-03-01"), at("2026-03-02", 11))
        tcm = next(t for t in self.tasks() if t["code"] == "tcm-contact")
        self.assertEqual(self.herald("tasks", "done", tcm["id"][:8], "--by", "rn.ortiz"), f"task {tcm['id']} done\n")
        yield self.send(adt("A01", "M-1", "V4", at("2026-03-04", 9), admitted=at("2026-03-04", 9)))
        yield self.transition(at("2026-03-04", 10))
        self.assertEqual(self.tasks(), [], "nothing left open")
        cancelled = self.tasks(("cancelled",))
        self.assertEqual(
            sorted(t["code"] for t in cancelled), ["face-to-face", "home-visit", "medication-reconciliation"]
        )
        reasons = {t["resource"]["statusReason"]["text"] for t in cancelled}
        self.assertEqual(reasons, {"readmitted on 2026-03-04 (LSR)"})
        self.assertEqual([t["code"] for t in self.tasks(("completed",))], ["tcm-contact"])
        # The readmission is flagged, and its own discharge makes its own tasks.
        flags = {e["visit"]: e["flags"] for e in self.episodes()}
        self.assertEqual(flags["V4"], ["readmission-30d"])
        yield self.send(
            adt("A03", "M-1", "V4", at("2026-03-06", 16), admitted=at("2026-03-04", 9), discharged=at("2026-03-06", 16))
        )
        yield self.transition(at("2026-03-06", 17))
        self.assertEqual(len(self.tasks()), 4)
        self.assertTrue(all("readmission-30d" in t["resource"]["note"][0]["text"] for t in self.tasks()))
        self.assertIn("task-closed", self.kinds())

    @defer.inlineCallbacks
    def test_a_discharge_to_a_snf_or_a_death_makes_no_tcm_tasks(self):
        """Disposition 03 (SNF): the SNF coordination task only; 20 (died): none, with a no-tasks event."""
        yield self.discharge("M-3", "V5", at("2026-03-02"), at("2026-03-05", 10), disposition="03")
        self.assertEqual(self.due("M-3"), {"snf-coordination": ("2026-03-05", "2026-03-06")})
        yield self.discharge("M-4", "V6", at("2026-03-02"), at("2026-03-05", 10), disposition="20")
        self.assertEqual(self.due("M-4"), {})
        self.assertIn("no-tasks", self.kinds())

    @defer.inlineCallbacks
    def test_export_as_fhir_ndjson_and_csv(self):
        """herald tasks export: a valid FHIR Task a line (naming the member, not the patient), or CSV rows."""
        from fhir.resources.R4B.task import Task

        yield self.discharge("M-1", "V7", at("2026-03-01"), at("2026-03-02", 11))
        lines = self.herald("tasks", "export", "--format", "ndjson").splitlines()
        self.assertEqual(len(lines), 4)
        for line in lines:
            resource = json.loads(line)
            Task.model_validate(resource)
            self.assertEqual(resource["for"]["identifier"], {"system": f"urn:herald:member:{ACO}", "value": "M-1"})
            self.assertEqual(resource["owner"], {"display": "Sam Ortiz RN"})
            self.assertEqual(resource["encounter"]["identifier"], {"system": "urn:herald:id:LSR", "value": "V7"})
            self.assertNotIn("TESTPATIENT", line.upper())
        out = self.data / "tasks.csv"
        self.herald("tasks", "export", "--format", "csv", "--out", str(out), "--on", "2026-03-05")
        self.assertTrue(out.read_text().startswith("id,aco_id,member_id,code,title,start,due,state"))
        states = {r["code"]: r["state"] for r in csv.DictReader(out.open())}
        self.assertEqual(states["tcm-contact"], "overdue")  # due Wednesday the 4th
        self.assertEqual(states["face-to-face"], "open")


class EdVisitTaskTests(TransitionsTestCase):
    """An ACO that follows up every ED visit (its switch in a worklist file of the site's own)."""

    extra_config = 'worklist = "worklist.toml"'

    def prepare(self) -> None:
        rules = (mappings_dir() / "worklist.toml").read_text() + f'\n[aco."{ACO}"]\ned_visit_tasks = true\n'
        (self.data / "worklist.toml").write_text(rules)

    @defer.inlineCallbacks
    def test_an_ed_visit_makes_a_follow_up_task_when_the_aco_wants_one(self):
        """The ED visit's end makes the ed-follow-up task, due in 2 business days (Friday night: Tuesday)."""
        yield self.send(
            adt("A04", "M-1", "E1", at("2026-03-06", 20), klass="E", admitted=at("2026-03-06", 20)),
            adt(
                "A03",
                "M-1",
                "E1",
                at("2026-03-06", 23),
                klass="E",
                admitted=at("2026-03-06", 20),
                discharged=at("2026-03-06", 23),
            ),
        )
        yield self.transition(at("2026-03-07", 0))
        (only,) = self.tasks()
        self.assertEqual(only["code"], "ed-follow-up")
        self.assertEqual(only["resource"]["restriction"]["period"]["end"], "2026-03-10")


class PollTests(TransitionsTestCase):
    @defer.inlineCallbacks
    def test_the_poll_runs_on_the_injected_clock_and_sweeps_a_stale_ed_visit(self):
        """A service on a task.Clock: nothing runs until the clock reaches the poll; then the stale visit is closed."""
        yield self.send(adt("A04", "M-1", "E9", at("2026-03-02", 8), klass="E", admitted=at("2026-03-02", 8)))
        yield self.transition(at("2026-03-02", 9))
        yield self.gw.transitions.stopService()
        clock = task.Clock()
        svc = TransitionsService(
            self.gw.store, self.config, reactor, clock=lambda: self.now, scheduler=clock, sweep_seconds=600
        )
        svc.startService()  # runs once at start: the visit is 1 hour old, still open
        self.addCleanup(svc.stopService)
        yield self.wait_quiet(svc)
        self.assertEqual(self.episodes()[0]["status"], "open")
        self.now = at("2026-03-03", 10)
        clock.advance(3599)  # before the poll: no run
        yield self.wait_quiet(svc)
        self.assertEqual(self.episodes()[0]["status"], "open")
        clock.advance(1)  # the poll (poll_seconds = 3600), and the sweep is due (600 s since the last)
        yield self.wait_quiet(svc)
        self.assertEqual((self.episodes()[0]["status"], self.episodes()[0]["ended"]), ("closed", "assumed"))

    @defer.inlineCallbacks
    def wait_quiet(self, svc):
        """Wait for the run in progress (if any) to finish."""
        yield task.deferLater(reactor, 0.05, lambda: None)
        yield svc._lock.acquire()
        svc._lock.release()


class WorklistOnPostgres(WorklistTests):
    """The same, with the store on PostgreSQL (the service leads care transitions: gateway.store.claims)."""

    backend = "postgresql"
