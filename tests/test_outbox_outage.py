"""A receiver down far longer than the old 254 s: with a fake clock, every notification is delivered exactly
once after it recovers, and one patient's notifications reach each destination in the order of their messages.

The store is real (a SQLite file, then a PostgreSQL database: the ``...OnPostgres``
classes; its reader and writer threads); time is a
:class:`~twisted.internet.task.Clock` for the worker (its timers, its "now",
the retry horizon's clock); the receiver's outage is failure injection at the
channel: while it is down every attempt fails as a refused connection would.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from test_audit import store_of
from test_cli import SAMPLES, stored_messages
from test_smart import _scratch
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from gateway.config import STORE_ENV
from gateway.delivery.channels import DeliveryFailed
from gateway.delivery.worker import DeliveryWorker
from gateway.store import Store
from gateway.store.keys import KeyRing

#: Samples that make several notifications for the same patients (Epic's ED visit to admission story,
#: Cerner's admit and discharge, MEDITECH's) and some for others.
SAMPLE_FILES = sorted(SAMPLES.glob("*.hl7"))


class FakeClockWithThreads(task.Clock):
    """Fake time for the worker's timers; the real reactor's thread pool for its file and JSON work."""

    def getThreadPool(self):
        return reactor.getThreadPool()

    def callFromThread(self, f, *args, **kw):
        return reactor.callFromThread(f, *args, **kw)


class Receiver:
    """The channel, as failure injection: down (every attempt refused) or up (records what arrives)."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.down = True
        self.attempts_while_down = 0
        self.delivered: list[tuple[str, int, str]] = []  # (notification id, message id, target), in order

    def send(self, n):
        if self.down:
            self.attempts_while_down += 1
            return defer.fail(DeliveryFailed(f"{n.target}: connection refused", permanent=False))
        self.delivered.append((n.id, n.message_id, n.target))
        return defer.succeed("HTTP 200")


@defer.inlineCallbacks
def step(clock: task.Clock, worker: DeliveryWorker, seconds: float):
    """Advance the fake clock, then let the store's threads answer: the poll that started is waited for
    (however long the store takes to answer it), the attempts' records a moment."""
    clock.advance(seconds)
    yield task.deferLater(reactor, 0.003, lambda: None)
    deadline = reactor.seconds() + 10
    while worker._polling and reactor.seconds() < deadline:
        yield task.deferLater(reactor, 0.001, lambda: None)


class OnPostgres:
    """Mixed into a TestCase: each test's data folder keeps its store in a new PostgreSQL database."""

    @pytest.fixture(autouse=True)
    def _store_on_postgres(self, pg_database, monkeypatch):
        monkeypatch.setenv(STORE_ENV, pg_database.url)


class OutageTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_every_notification_once_in_order_per_patient_after_a_ten_minute_outage(self):
        """Down for 600 s of fake time (more than twice the old 254 s to dead): nothing dies; after recovery each
        notification is delivered exactly once, in message order per patient and destination."""
        data = _scratch(self) / "data"
        stored_messages(data, SAMPLE_FILES)
        keys = KeyRing.load(None)
        store = Store(store_of(data), reactor=reactor, keys=keys)
        store.start()
        self.addCleanup(store.stop)
        clock = FakeClockWithThreads()
        clock.advance(1_000_000)  # rows are due from 0
        worker = DeliveryWorker(
            store,
            clock,
            backoff_initial=2.0,
            backoff_max=120.0,
            poll_interval=1.0,
            clock=lambda: datetime.fromtimestamp(clock.seconds(), UTC),
            rng=random.Random(7).random,
        )
        receiver = Receiver(clock)
        worker._send = receiver.send
        worker.startService()
        self.addCleanup(worker.stopService)

        conn = store._conn  # read the outbox the way the test sees it (the writer's connection, idle here)
        expected = conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0]
        self.assertGreater(expected, 10)
        # The rows were written "now" (the fixture's NOW); count the horizon from the fake clock's start.
        # (The connection commits each statement by itself, on either engine.)
        conn.execute(
            "UPDATE notifications SET created_at = ?", (datetime.fromtimestamp(clock.seconds(), UTC).isoformat(),)
        )

        @defer.inlineCallbacks
        def run_for(seconds: float, every: float = 1.0):
            for _ in range(int(seconds / every)):
                yield step(clock, worker, every)

        yield run_for(600)
        states = dict(conn.execute("SELECT state, COUNT(*) FROM notifications GROUP BY state").fetchall())
        self.assertEqual(states.get("dead", 0), 0, "a notification died during a 10-minute outage")
        self.assertEqual(states.get("sent", 0), 0)
        self.assertGreater(receiver.attempts_while_down, 0)

        receiver.down = False
        for _ in range(60):
            yield run_for(30, every=2.0)
            if conn.execute("SELECT COUNT(*) FROM notifications WHERE state != 'sent'").fetchone()[0] == 0:
                break
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM notifications WHERE state != 'sent'").fetchone()[0], 0)
        ids = [d[0] for d in receiver.delivered]
        self.assertEqual(len(ids), expected)
        self.assertEqual(len(set(ids)), expected, "a notification was delivered twice")

        # In order per patient and destination: the patient key is the stored keyed hash.
        key_of = dict(conn.execute("SELECT id, patient_key FROM notifications").fetchall())
        seen: dict[tuple[str, str], int] = {}
        ordered_groups = 0
        for nid, message_id, target in receiver.delivered:
            group = (key_of[nid], target)
            if not key_of[nid]:
                continue
            if group in seen:
                ordered_groups += 1
                self.assertGreater(message_id, seen[group], f"out of order for one patient at {target}")
            seen[group] = message_id
        self.assertGreater(ordered_groups, 3, "the samples should hold several messages for one patient")


class BreakerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_dead_destination_rests_after_five_failures_and_the_others_carry_on(self):
        """The HIE refuses everything: after 5 failures in a row it gets no attempt for the 30 s cooldown, while
        the PCP and care team drops are all delivered; after the cooldown one trial goes."""
        data = _scratch(self) / "data"
        stored_messages(data, SAMPLE_FILES)
        store = Store(store_of(data), reactor=reactor, keys=KeyRing.load(None))
        store.start()
        self.addCleanup(store.stop)
        clock = FakeClockWithThreads()
        clock.advance(1_000_000)
        worker = DeliveryWorker(
            store,
            clock,
            backoff_initial=0.5,
            backoff_max=1.0,
            poll_interval=0.5,
            clock=lambda: datetime.fromtimestamp(clock.seconds(), UTC),
        )
        attempts: list[tuple[float, str]] = []
        hie = str(data / "outbox" / "hie")

        def send(n):
            attempts.append((clock.seconds(), n.target))
            if n.target.endswith("hie"):
                return defer.fail(DeliveryFailed("refused", permanent=False))
            return defer.succeed("ok")

        worker._send = send
        worker.startService()
        self.addCleanup(worker.stopService)
        for _ in range(40):
            yield step(clock, worker, 0.5)
        to_hie = [t for t, target in attempts if target == hie]
        self.assertEqual(worker.breaker_states()[hie], "open")
        self.assertEqual(len(to_hie), 5, "attempts went on while the breaker was open")
        others = store._conn.execute(
            "SELECT COUNT(*) FROM notifications WHERE target != ? AND state != 'sent'", (hie,)
        ).fetchone()[0]
        self.assertEqual(others, 0, "the other destinations waited behind the dead one")
        for _ in range(30):
            yield step(clock, worker, 0.5)
        to_hie = [t for t, target in attempts if target == hie]
        self.assertEqual(len(to_hie), 6, "one trial after the cooldown")
        self.assertGreaterEqual(to_hie[5] - to_hie[4], 30.0)


class OutageTestsOnPostgres(OnPostgres, OutageTests):
    """The outage, with the store on PostgreSQL."""


class BreakerTestsOnPostgres(OnPostgres, BreakerTests):
    """The breaker, with the store on PostgreSQL."""
