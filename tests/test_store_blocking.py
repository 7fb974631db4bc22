"""The store's blocking methods, as the CLI and a console use them: no reactor runs, the writer still writes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from twisted.internet.task import Clock

from gateway.errors import StoreError
from gateway.records import RECEIVED, REVIEW, IntakeRecord, MatchRecord, Notification
from gateway.store import Store, open_database
from gateway.store.messages import record_frame
from gateway.store.reviews import record_match

THEN = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
STAMP = "2026-05-01T09:30:00.000+00:00"


@pytest.fixture
def store(database):
    """A started Store (SQLite, then PostgreSQL) whose reactor is a Clock (never run) at 1234 s, its clock pinned."""
    reactor = Clock()
    reactor.advance(1234)
    s = Store(database, reactor=reactor, clock=lambda: THEN)
    s.start()
    yield s
    s.close()


def held_review(store: Store) -> int:
    """A message in review with one candidate (written straight into the file), its review id."""
    conn = open_database(store.path)
    raw = b"MSH|^~\\&|EHR|FAC|||20260501||ADT^A04|C1|P|2.5.1\r"
    mid = record_frame(conn, IntakeRecord(raw=raw, peer="t", state=RECEIVED, ack_code="AA", control_id="C1"), "t0")
    mid = mid.message_id
    conn.execute("UPDATE messages SET state = ? WHERE id = ?", (REVIEW, mid))
    record_match(conn, mid, MatchRecord("possible", "probabilistic", 9.5), {"candidates": []}, "t0")
    conn.close()
    return 1


def test_a_blocking_write_goes_through_the_writer_with_the_injected_clock(store):
    """record_roster_event runs on the writer thread (not the caller's) and is stamped by the store's clock."""
    callers = []
    store.call(lambda conn: callers.append(threading.current_thread().name))
    store.record_roster_event({"import": 1})
    assert callers == ["herald-store-writer"]
    conn = open_database(store.path, readonly=True)
    assert [tuple(r) for r in conn.execute("SELECT at, actor, kind FROM events")] == [
        (STAMP, "roster", "roster-imported")
    ]


def test_accepting_a_review_stamps_the_decision_and_the_outbox_with_the_store_s_clocks(store):
    """A review accepted from the CLI: decided at the store's clock, notifications due at its reactor's seconds."""
    review_id = held_review(store)
    note = Notification("n-1", 1, "pcp", "Dr. A", "file", "/drop", "notification-admit")
    state = store.accept_review(
        review_id, aco_id="A", member_id="M", notifications=[note], events=[], mrns=[("MRN1", "FAC")], by="alice"
    )
    assert state == "routed"
    conn = open_database(store.path, readonly=True)
    assert tuple(conn.execute("SELECT decided_at, decided_by FROM reviews").fetchone()) == (STAMP, "alice")
    assert tuple(conn.execute("SELECT next_attempt_at, created_at FROM notifications").fetchone()) == (1234.0, STAMP)
    assert conn.execute("SELECT confirmed_at FROM confirmed_links").fetchone()[0] == STAMP


def test_a_blocking_write_raises_what_the_job_raised(store):
    """A decided review cannot be decided again: the caller gets the StoreError, in its own thread."""
    held_review(store)
    store.reject_review(1, by="bob")
    with pytest.raises(StoreError, match="already rejected"):
        store.reject_review(1, by="bob")


def test_a_stopped_store_refuses_blocking_calls(database):
    """call() and read() on a store that is not running fail at once instead of waiting."""
    s = Store(database, reactor=Clock())
    with pytest.raises(StoreError, match="not running"):
        s.call(lambda conn: None)
    with pytest.raises(StoreError, match="not running"):
        s.read(lambda conn: None)
    s.close()
