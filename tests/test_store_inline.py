"""Commits on the reactor's thread (``Writer.inline``): a server's intake jobs, when the writer thread is idle.

A running Store on a real SQLite file. The reactor is test_intake's QueueReactor
(calls from the store's threads queued for the test thread) with a
``callLater(0)``: :meth:`TurningReactor.turn` ends the reactor's turn, which
is when the jobs submitted in it are committed; calls made during a turn wait
for the next one, as in Twisted's reactor. Nothing sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from test_intake import ADT, PEER, STORED_AT, QueueReactor, drain, failure, success
from test_store_threads import record
from twisted.internet.base import DelayedCall

from gateway.intake.receiver import Intake
from gateway.store import Store
from gateway.store.events import append_event, appends_only


class TurningReactor(QueueReactor):
    """QueueReactor plus ``callLater(0)``: the calls run when the test ends a turn (:meth:`turn`)."""

    def __init__(self) -> None:
        super().__init__()
        self.later: list[DelayedCall] = []

    def callLater(self, delay, f, *args, **kwargs) -> DelayedCall:
        assert delay == 0
        call = DelayedCall(0, f, args, kwargs, self.later.remove, lambda c: None, seconds=lambda: 0)
        self.later.append(call)
        return call

    def turn(self) -> None:
        """Run the calls made before this turn (those made during it wait for the next, as in the reactor)."""
        calls, self.later = self.later, []
        for call in calls:
            call.called = 1
            call.func(*call.args, **call.kw)


@pytest.fixture
def turning():
    return TurningReactor()


@pytest.fixture
def sqlite_database(tmp_path):
    return tmp_path / "herald.db"


@pytest.fixture
def inline_store(sqlite_database, turning):
    """A running Store committing intake's jobs on the reactor's thread, as ``make_service`` makes it."""
    s = Store(sqlite_database, reactor=turning, clock=lambda: STORED_AT)
    s.inline = True
    # No idle tick of the writer thread (it takes the connection's lock for a moment) in the middle of a test.
    s.IDLE_FLUSH_SECONDS = 60
    s.start()
    yield s
    success(drain(turning, s.stop()))


def thread_of(conn) -> str:
    return threading.current_thread().name


def test_the_jobs_of_one_turn_share_one_commit_on_the_reactors_thread(inline_store, turning):
    stored = [inline_store.record_frame(record(f"C{i}")) for i in range(3)]
    where = inline_store.submit(thread_of)
    assert not where.called  # committed at the turn's end, not at once
    turning.turn()
    ids = [success(d).message_id for d in stored]  # fired already: no hand-back through callFromThread
    assert len(set(ids)) == 3
    assert success(where) == threading.current_thread().name
    assert inline_store.inline_commits == 1
    assert inline_store.jobs == 4


def test_a_busy_writer_thread_is_handed_the_jobs(inline_store, turning):
    """While the writer thread commits (pipeline outcomes, a checkpoint), the reactor's thread does not wait for it."""
    entered, release = threading.Event(), threading.Event()

    def hold(conn):
        entered.set()
        release.wait(10)

    inline_store.submit_background(hold)
    assert entered.wait(10)
    where = inline_store.submit(thread_of)
    turning.turn()
    assert not where.called
    release.set()
    assert success(drain(turning, where)) == "herald-store-writer"
    assert inline_store.inline_commits == 0


def test_another_process_holding_the_write_lock_does_not_stop_the_reactor(sqlite_database, inline_store, turning):
    """The reactor's thread tries the lock without waiting; the writer thread waits for it (busy_timeout) instead."""
    other = sqlite3.connect(sqlite_database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # as `herald review` or a purge would, for a moment
    try:
        stored = inline_store.record_frame(record("LOCKED"))
        started = time.monotonic()
        turning.turn()
        assert time.monotonic() - started < 5  # not the 10 s busy_timeout
        assert not stored.called
        assert inline_store.inline_commits == 0
    finally:
        other.execute("COMMIT")
        other.close()
    assert success(drain(turning, stored)).message_id == 1
    # The connection's own busy_timeout is as before for the writer thread's next commits.
    assert inline_store.call(lambda conn: conn.execute("PRAGMA busy_timeout").fetchone()[0]) == 10000


def test_stopping_commits_the_jobs_waiting_for_the_turns_end(sqlite_database, turning):
    s = Store(sqlite_database, reactor=turning, clock=lambda: STORED_AT)
    s.inline = True
    s.start()
    stored = s.record_frame(record("LAST"))
    success(drain(turning, s.stop()))
    turning.turn()  # the cancelled end-of-turn call does nothing
    assert success(drain(turning, stored)).message_id == 1
    conn = sqlite3.connect(sqlite_database)
    assert conn.execute("SELECT control_id FROM messages").fetchall() == [("LAST",)]
    conn.close()


@pytest.mark.parametrize("marked", [False, True], ids=["other-job", "appends-only-job"])
def test_a_failing_job_sends_its_commit_to_the_writer_thread_where_it_fails_alone(inline_store, turning, marked):
    """The reactor's thread rolls back and hands the batch over (no savepoints, no lock wait there)."""
    good = [inline_store.record_frame(record(f"G{i}")) for i in range(2)]

    def bad(conn):
        append_event(conn, "t", None, None, "test", "half", None)
        raise RuntimeError("boom")

    if marked:
        bad = appends_only(bad)  # in a gathered batch: its event must not be written either
    failing = inline_store.submit(bad)
    more = inline_store.record_frame(record("G9"))
    turning.turn()
    assert not failing.called
    assert len({success(drain(turning, d)).message_id for d in [*good, more]}) == 3
    assert isinstance(failure(drain(turning, failing)).value, RuntimeError)
    assert inline_store.replays == 1
    assert inline_store.inline_commits == 0
    kinds = inline_store.read(lambda conn: [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY id")])
    assert kinds == ["received", "received", "received"]


def test_a_database_error_at_begin_sends_the_jobs_to_the_writer_thread(inline_store, turning):
    """Not only a busy lock: any failure to begin on the reactor's thread leaves the jobs to the writer thread."""
    real = inline_store._conn

    class Failing:
        def execute(self, sql, *args):
            if sql == "BEGIN IMMEDIATE":
                raise sqlite3.DatabaseError("database disk image is malformed")
            return real.execute(sql, *args)

    inline_store._conn = Failing()
    try:
        stored = inline_store.record_frame(record("B1"))
        turning.turn()
    finally:
        inline_store._conn = real
    assert success(drain(turning, stored)).message_id == 1
    assert inline_store.inline_commits == 0


def test_no_lock_wait_on_the_reactors_thread(inline_store, turning):
    def settings(conn):
        return conn.execute("PRAGMA busy_timeout").fetchone()[0]

    here = inline_store.submit(settings)
    turning.turn()
    assert success(here) == 0
    assert inline_store.call(settings) == 10000  # the writer thread's own commits, as before


def test_riders_go_with_the_next_commit_on_the_reactors_thread(inline_store, turning):
    first = inline_store.record_frame(record("R1"))
    turning.turn()
    inline_store.record_ack_sent(success(first).message_id, "AA")  # nobody waits on it: no commit of its own
    assert inline_store.inline_commits == 1
    inline_store.record_frame(record("R2"))
    turning.turn()
    assert inline_store.inline_commits == 2
    kinds = inline_store.read(lambda conn: [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY id")])
    assert kinds == ["received", "ack-sent", "received"]  # the rider first: it was written down first


def test_postgresql_stores_commit_on_the_writer_thread(pg_database, turning):
    """On PostgreSQL (a round trip a statement, the nodes' writer lock) the writer thread commits, ``inline`` or not."""
    s = Store(pg_database, reactor=turning, clock=lambda: STORED_AT)
    s.inline = True
    s.start()
    try:
        where = s.submit(thread_of)
        turning.turn()
        assert success(drain(turning, where)) == "herald-store-writer"
        assert s.inline_commits == 0
    finally:
        success(drain(turning, s.stop()))


def test_intakes_bookkeeping_follows_the_ack(inline_store, turning, pinned_acks):
    """With a reactor, the log line, metrics, ack-sent event and pipeline wake-up come in the turn after the ACK."""
    woken = []
    intake = Intake(inline_store, pinned_acks, on_stored=lambda: woken.append(True), reactor=turning)
    answer = intake.frameReceived(ADT, PEER)
    turning.turn()  # the commit
    assert b"MSA|AA|MSG00001" in success(answer)
    assert woken == []
    assert len(inline_store._riders) == 1  # the ack-sent event waits for the next commit already
    turning.turn()  # the bookkeeping
    assert woken == [True]
    inline_store.record_frame(record("NEXT"))
    turning.turn()  # the ack-sent event rides this commit
    kinds = inline_store.read(lambda conn: [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY id")])
    assert kinds == ["received", "ack-sent", "received"]


def test_a_stop_between_the_ack_and_its_bookkeeping_keeps_the_ack_sent_event(sqlite_database, turning, pinned_acks):
    s = Store(sqlite_database, reactor=turning, clock=lambda: STORED_AT)
    s.inline = True
    s.start()
    intake = Intake(s, pinned_acks, reactor=turning)
    answer = intake.frameReceived(ADT, PEER)
    turning.turn()  # the commit and the ACK
    assert b"MSA|AA" in success(answer)
    success(drain(turning, s.stop()))  # before the bookkeeping's turn
    conn = sqlite3.connect(sqlite_database)
    assert [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY id")] == ["received", "ack-sent"]
    conn.close()


def test_intakes_commit_reads_the_chains_head_once(inline_store, turning, monkeypatch):
    """A commit made only of intake's jobs (frames, ack-sent events) chains its events in one insert, intact."""
    from gateway.store import events
    from gateway.store.integrity import verify

    heads = []
    real = events._head
    monkeypatch.setattr(events, "_head", lambda conn: heads.append(1) or real(conn))
    first = inline_store.record_frame(record("H0"))
    turning.turn()
    inline_store.record_ack_sent(success(first).message_id, "AA")
    stored = [inline_store.record_frame(record(f"H{i}")) for i in range(1, 4)]
    heads.clear()
    turning.turn()
    assert [success(d).message_id for d in stored] == [2, 3, 4]
    assert heads == [1]
    report = inline_store.read(verify)
    assert report.intact and report.events == 5


def test_a_commit_with_other_jobs_writes_each_event_at_once(inline_store, turning):
    """A job not marked appends-only may read the events its commit wrote before it: nothing is gathered then."""
    stored = inline_store.record_frame(record("SEEN"))

    def count_events(conn):
        append_event(conn, "t", None, None, "test", "mine", None)
        return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    counted = inline_store.submit(count_events)
    turning.turn()
    assert success(stored).message_id == 1
    assert success(counted) == 2  # the frame's `received` event and its own


def slow_commits(store, now: list[float], seconds: float) -> None:
    """Make each COMMIT on ``store`` take ``seconds`` of its (fake) monotonic clock ``now``."""
    real = Store._commit

    def slow(conn, results):
        now[0] += seconds
        return real(conn, results)

    store._commit = slow


def committed_where(store, turning) -> str:
    where = store.submit(thread_of)
    turning.turn()
    name = success(drain(turning, where)) if not where.called else success(where)
    with store._conn_lock:  # the writer thread has left its commit (it answers from inside it)
        pass
    return "reactor" if name == threading.current_thread().name else "writer"


def test_repeated_slow_commits_send_intakes_commits_to_the_writer_thread_for_a_while(inline_store, turning):
    """A disk in trouble holds the reactor up a few times, not at every ACK; an ordinary hiccup changes nothing."""
    now = [100.0]
    inline_store._monotonic = lambda: now[0]
    slow_commits(inline_store, now, 0.2)
    assert [committed_where(inline_store, turning) for _ in range(3)] == ["reactor"] * 3
    assert inline_store.slow_inline_commits == 3
    del inline_store._commit  # commits are quick again
    assert committed_where(inline_store, turning) == "writer"
    now[0] += Store.INLINE_PAUSE_SECONDS
    assert committed_where(inline_store, turning) == "reactor"
    # Two slow commits, then a third long after: no pause.
    slow_commits(inline_store, now, 0.2)
    assert [committed_where(inline_store, turning) for _ in range(2)] == ["reactor"] * 2
    now[0] += Store.SLOW_INLINE_WINDOW_SECONDS + 1
    assert committed_where(inline_store, turning) == "reactor"
    del inline_store._commit
    assert committed_where(inline_store, turning) == "reactor"


def test_one_stalled_commit_sends_intakes_commits_to_the_writer_thread_at_once(inline_store, turning):
    now = [100.0]
    inline_store._monotonic = lambda: now[0]
    slow_commits(inline_store, now, Store.STALLED_INLINE_COMMIT_SECONDS)
    assert committed_where(inline_store, turning) == "reactor"
    del inline_store._commit
    assert committed_where(inline_store, turning) == "writer"


def test_the_server_commits_on_the_reactor_unless_configured_not_to(tmp_path):
    from twisted.internet import reactor as real_reactor

    from gateway.app.service import make_service
    from gateway.config import load_config
    from gateway.store.keys import KeyRing

    for setting, expected in (("", True), ("commit_on_reactor = false", False)):
        folder = tmp_path / f"data{expected}"
        config_file = tmp_path / f"herald{expected}.toml"
        config_file.write_text(f"[storage]\n{setting}\n")
        config = load_config(config_file, data_dir=folder, listen=["tcp:0:interface=127.0.0.1"], allow_plain=True)
        gw = make_service(config, real_reactor, keys=KeyRing.disabled())
        assert gw.store.inline is expected
        gw.store.close()


def test_commit_on_reactor_must_be_true_or_false(tmp_path):
    from gateway.config import ConfigError, load_config

    config_file = tmp_path / "herald.toml"
    config_file.write_text('[storage]\ncommit_on_reactor = "yes"\n')
    with pytest.raises(ConfigError, match="storage.commit_on_reactor"):
        load_config(config_file, data_dir=tmp_path / "data")
