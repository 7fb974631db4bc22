"""The store's writer and reader threads: what goes into each commit, reads off the writer, failures alone.

A running Store on a real database (SQLite, then PostgreSQL); its threads hand results back through a
queue that the test thread drains (the QueueReactor of test_intake), so no
reactor runs and no test sleeps.
"""

from __future__ import annotations

import threading

from test_intake import STORED_AT, drain, success

from gateway.errors import StoreError
from gateway.records import RECEIVED, IntakeRecord
from gateway.store import Store
from gateway.store.events import append_event


def record(control_id: str) -> IntakeRecord:
    raw = f"MSH|^~\\&|EHR|FAC|||20260301||ADT^A01|{control_id}|P|2.5.1\r".encode()
    return IntakeRecord(
        raw=raw,
        peer="test",
        state=RECEIVED,
        ack_code="AA",
        sending_application="EHR",
        sending_facility="FAC",
        control_id=control_id,
    )


def held_writer(store: Store) -> threading.Event:
    """Block the writer thread inside a job until the returned event is set (jobs queue up meanwhile)."""
    entered, release = threading.Event(), threading.Event()

    def hold(conn):
        entered.set()
        release.wait(10)

    store.submit(hold)
    assert entered.wait(10)
    return release


def commit_of(store: Store):
    """A job that reports which commit it ran in (the writer's commit counter at the time)."""
    return lambda conn: store.commits


def test_intake_jobs_all_go_first_and_background_jobs_take_turns(store, reactor):
    """Every waiting intake job rides the next commit with one background job; other background jobs wait."""
    release = held_writer(store)
    background = [store.submit_background(commit_of(store)) for _ in range(3)]
    intake = [store.submit(commit_of(store)) for _ in range(5)]
    release.set()
    intake_commits = {success(drain(reactor, d)) for d in intake}
    background_commits = [success(drain(reactor, d)) for d in background]
    assert len(intake_commits) == 1
    first = intake_commits.pop()
    assert background_commits == [first, first + 1, first + 2]


def test_one_failing_job_in_a_group_fails_alone_and_the_group_is_replayed(store, reactor):
    """Without savepoints a failure rolls the group back; the rest run again and are committed, the failure alone."""
    release = held_writer(store)
    good = [store.record_frame(record(f"C{i}")) for i in range(3)]

    def bad(conn):
        append_event(conn, "t", None, None, "test", "half", None)
        raise RuntimeError("boom")

    failing = store.submit(bad)
    more = store.record_frame(record("C9"))
    release.set()
    ids = [success(drain(reactor, d)).message_id for d in [*good, more]]
    assert len(set(ids)) == 4
    err = drain(reactor, failing)
    assert isinstance(_sync_failure(err).value, RuntimeError)
    assert store.replays == 1
    count = success(drain(reactor, store.submit_read(lambda c: c.execute("SELECT COUNT(*) FROM messages").fetchone())))
    assert count[0] == 4
    halves = store.submit_read(lambda c: c.execute("SELECT COUNT(*) FROM events WHERE kind = 'half'").fetchone())
    assert success(drain(reactor, halves))[0] == 0


def test_reads_do_not_wait_for_the_writer(store, reactor):
    """A read is answered from the last commit while the writer is busy inside a job."""
    mid = success(drain(reactor, store.record_frame(record("R1")))).message_id
    release = held_writer(store)
    try:
        pending = success(drain(reactor, store.pending_messages(0, 10)))
        assert [p.id for p in pending] == [mid]
    finally:
        release.set()


def test_outcomes_are_written_in_slices_and_counted(store, reactor, monkeypatch):
    """record_outcomes splits a batch into background jobs of OUTCOMES_PER_JOB and fires with the total applied."""
    from test_store import outcome

    monkeypatch.setattr(Store, "OUTCOMES_PER_JOB", 2)
    ids = [success(drain(reactor, store.record_frame(record(f"O{i}")))).message_id for i in range(5)]
    before = store.commits
    applied = success(drain(reactor, store.record_outcomes([outcome(m, f"n-{m}") for m in ids])))
    assert applied == 5
    assert store.commits - before == 3
    states = store.submit_read(lambda c: [r[0] for r in c.execute("SELECT state FROM messages ORDER BY id")])
    assert success(drain(reactor, states)) == ["routed"] * 5


def test_background_jobs_queued_before_stop_are_finished(database, reactor):
    """Stopping the store commits the background jobs already queued instead of failing them."""
    s = Store(database, reactor=reactor, clock=lambda: STORED_AT)
    s.start()
    release = held_writer(s)
    jobs = [s.submit_background(append_event, "t", None, None, "b", "k", None)]
    jobs += [s.submit_background(lambda conn: 1) for _ in range(4)]
    # stop() joins the writer here (the test's thread pool is inline): let the held job go a moment later.
    threading.Timer(0.2, release.set).start()
    stopped = s.stop()
    for d in jobs:
        success(drain(reactor, d))
    success(drain(reactor, stopped))


def test_jobs_after_stop_fail_cleanly(database, reactor):
    """A write or read given to a stopped store fails with StoreError instead of hanging."""
    s = Store(database, reactor=reactor, clock=lambda: STORED_AT)
    s.start()
    success(drain(reactor, s.stop()))
    for d in (s.submit(lambda c: 1), s.submit_background(lambda c: 1), s.submit_read(lambda c: 1)):
        assert isinstance(_sync_failure(d).value, StoreError)


def _sync_failure(d):
    from twisted.trial.unittest import SynchronousTestCase

    return SynchronousTestCase().failureResultOf(d)
