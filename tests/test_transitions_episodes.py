"""Episodes through the product: ADT over MLLP, the pipeline, the store and the transitions service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from transitions_harness import ACO, TransitionsTestCase, adt
from twisted.internet import defer

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


class EpisodeTests(TransitionsTestCase):
    @defer.inlineCallbacks
    def test_admit_transfer_discharge_is_one_closed_stay_with_its_units(self):
        """A01, A02, A03 of one visit are stored as one closed inpatient stay, its units in order."""
        yield self.send(
            adt("A01", "M-1", "V1", h(0), admitted=h(0)),
            adt("A02", "M-1", "V1", h(20), admitted=h(0)),
            adt("A03", "M-1", "V1", h(70), admitted=h(0), discharged=h(70), disposition="01"),
        )
        written = yield self.transition(h(71))
        self.assertEqual(written["episodes"], 1)
        (ep,) = self.episodes()
        self.assertEqual(
            (ep["status"], ep["ended"], ep["facility"], ep["visit"]), ("closed", "discharged", "LSR", "V1")
        )
        self.assertEqual((ep["start"], ep["end"]), (h(0).isoformat(), h(70).isoformat()))
        self.assertEqual(len(ep["messages"]), 3)
        # The discharge home made the TCM tasks; the visit number is not stored in the clear.
        self.assertEqual(
            sorted(t["code"] for t in self.tasks()),
            ["face-to-face", "home-visit", "medication-reconciliation", "tcm-contact"],
        )
        conn = self.db()
        raw = b"".join(
            bytes(v) if isinstance(v, bytes) else str(v).encode()
            for table in ("episodes", "episode_events", "tasks")
            for row in conn.execute(f"SELECT * FROM {table}")  # noqa: S608 - the test's own table names
            for v in row
            if v is not None
        )
        conn.close()
        self.assertNotIn(b"V1^", raw)
        self.assertNotIn(b'"V1"', raw)

    @defer.inlineCallbacks
    def test_a_cancelled_admit_is_no_stay_and_closes_nothing_it_did_not_make(self):
        """A01 then A11: the episode is cancelled, the timeline leaves it out, no task is made."""
        yield self.send(adt("A01", "M-1", "V2", h(0), admitted=h(0)), adt("A11", "M-1", "V2", h(1), admitted=h(0)))
        yield self.transition(h(2))
        (ep,) = self.episodes()
        self.assertEqual(ep["status"], "cancelled")
        self.assertEqual(self.tasks(None), [])

    @defer.inlineCallbacks
    def test_a_cancelled_discharge_closes_the_tasks_it_made(self):
        """A03 makes tasks; an A13 (discharge cancelled) reopens the stay and cancels them, saying why."""
        yield self.send(
            adt("A01", "M-1", "V3", h(0), admitted=h(0)),
            adt("A03", "M-1", "V3", h(48), admitted=h(0), discharged=h(48), disposition="01"),
        )
        yield self.transition(h(49))
        self.assertEqual(len(self.tasks()), 4)
        yield self.send(adt("A13", "M-1", "V3", h(50), admitted=h(0)))
        yield self.transition(h(51))
        (ep,) = self.episodes()
        self.assertEqual((ep["status"], ep["end"]), ("open", None))
        self.assertEqual(self.tasks(), [])
        cancelled = self.tasks(("cancelled",))
        self.assertEqual(len(cancelled), 4)
        self.assertEqual(
            {t["resource"]["statusReason"]["text"] for t in cancelled}, {"the discharge was cancelled (A13)"}
        )

    @defer.inlineCallbacks
    def test_an_ed_visit_never_discharged_is_closed_after_the_set_time(self):
        """An A04 with no A03 stays open for 24 hours, then a sweep closes it as assumed (at start + 24 h)."""
        yield self.send(adt("A04", "M-1", "E1", h(0), klass="E", admitted=h(0)))
        yield self.transition(h(1))
        (ep,) = self.episodes()
        self.assertEqual((ep["status"], ep["klass"]), ("open", "EMER"))
        yield self.transition(h(23.5))
        self.assertEqual(self.episodes()[0]["status"], "open")
        yield self.transition(h(30))
        (ep,) = self.episodes()
        self.assertEqual((ep["status"], ep["ended"], ep["end"]), ("closed", "assumed", h(24).isoformat()))
        # The A03 arriving late still ends the stay as the hospital said.
        yield self.send(adt("A03", "M-1", "E1", h(31), klass="E", admitted=h(0), discharged=h(6)))
        yield self.transition(h(32))
        (ep,) = self.episodes()
        self.assertEqual((ep["status"], ep["ended"], ep["end"]), ("closed", "discharged", h(6).isoformat()))

    @defer.inlineCallbacks
    def test_messages_arriving_out_of_order_give_the_same_stay(self):
        """A03, A02, A01 arriving in that order (each run in between) end as the in-order stay; tasks once."""
        discharge = adt("A03", "M-3", "V4", h(70), admitted=h(0), discharged=h(70), disposition="01")
        yield self.send(discharge)
        yield self.transition(h(71))
        (first,) = self.episodes("M-3")
        self.assertEqual((first["status"], first["start"]), ("closed", h(0).isoformat()))
        yield self.send(adt("A02", "M-3", "V4", h(20), admitted=h(0)))
        yield self.transition(h(72))
        yield self.send(adt("A01", "M-3", "V4", h(0), admitted=h(0)))
        yield self.transition(h(73))
        (ep,) = self.episodes("M-3")
        self.assertEqual((ep["status"], ep["start"], ep["end"]), ("closed", h(0).isoformat(), h(70).isoformat()))
        self.assertEqual(len(ep["messages"]), 3)
        self.assertEqual(len(self.tasks(None, "M-3")), 4, "the discharge's tasks, made once")

    @defer.inlineCallbacks
    def test_an_opted_out_member_has_no_episodes(self):
        """Episodes are a member's, for the ACO: an opted-out member's messages leave no episode event."""
        yield self.send(adt("A01", "M-2", "V5", h(0), admitted=h(0)))
        yield self.transition(h(1))
        self.assertEqual(self.episodes("M-2"), [])
        conn = self.db()
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM episode_events").fetchone()[0], 0)
        conn.close()

    @defer.inlineCallbacks
    def test_the_timeline_command_shows_the_stays_and_is_audited(self):
        """herald patient timeline: ED then inpatient then home, and a phi-read event for it."""
        from click.testing import CliRunner

        from gateway.app.cli import main

        yield self.send(
            adt("A04", "M-1", "E7", h(0), klass="E", admitted=h(0)),
            adt("A03", "M-1", "E7", h(4), klass="E", admitted=h(0), discharged=h(4)),
            adt("A01", "M-1", "V7", h(4), admitted=h(4)),
            adt("A03", "M-1", "V7", h(80), admitted=h(4), discharged=h(80), disposition="01"),
        )
        yield self.transition(h(81))
        result = CliRunner().invoke(main, ["patient", "timeline", "M-1", "--data", str(self.data)])
        self.assertEqual(result.exit_code, 0, result.output)
        lines = result.output.splitlines()
        self.assertEqual(lines[0], f"member M-1 ({ACO}): 2 stays")
        self.assertIn("ed", lines[2].split())
        self.assertIn("inpatient", lines[2].split(), "the ED visit went on to an admission")
        self.assertEqual(lines[3].split()[-1], "home")
        conn = self.db()
        read = conn.execute("SELECT detail FROM events WHERE kind = 'phi-read' ORDER BY id DESC LIMIT 1").fetchone()
        conn.close()
        self.assertIn('"command": "patient timeline"', read[0])


class EpisodeOnPostgres(EpisodeTests):
    """The same, with the store on PostgreSQL (the service leads care transitions: gateway.store.claims)."""

    backend = "postgresql"
