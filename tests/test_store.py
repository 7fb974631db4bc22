"""The store's SQL on a real SQLite file (the writer thread is not needed for these)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.records import RECEIVED, IntakeRecord, MessageOutcome, Notification
from gateway.store import Store
from gateway.store.messages import apply_outcomes, record_frame
from gateway.store.outbox import due_notifications

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
STAMP = NOW.isoformat(timespec="milliseconds")


@pytest.fixture
def store(database):
    """A Store on a fresh database (SQLite, then PostgreSQL), never started: its job functions are called directly."""
    s = Store(database, reactor=object(), clock=lambda: NOW)
    yield s
    s._conn.close()


def stored(store: Store, control_id: str) -> int:
    record = IntakeRecord(
        raw=f"MSH|^~\\&|EHR|FAC|||20261120||ADT^A01|{control_id}|P|2.5.1\r".encode(),
        peer="test",
        state=RECEIVED,
        ack_code="AA",
        sending_application="EHR",
        sending_facility="FAC",
        message_type="ADT",
        trigger_event="A01",
        control_id=control_id,
    )
    return record_frame(store._conn, record, STAMP).message_id


def outcome(message_id: int, notification_id: str) -> MessageOutcome:
    note = Notification(
        id=notification_id,
        message_id=message_id,
        recipient_role="hie",
        recipient="HIE",
        channel="file",
        target="/tmp/x",
        event_code="notification-admit",
        payload="{}",
    )
    return MessageOutcome(message_id, "routed", None, "{}", None, [note], [("converted", {})])


def test_one_conflicting_outcome_fails_alone(store):
    """An outcome that cannot be stored marks its own message failed; the rest of the batch is applied."""
    first, second, third = stored(store, "C1"), stored(store, "C2"), stored(store, "C3")
    conn = store._conn
    applied = apply_outcomes(conn, [outcome(first, "n-1"), outcome(second, "n-1"), outcome(third, "n-3")], STAMP, 0.0)
    assert applied == 2
    states = dict(conn.execute("SELECT id, state FROM messages").fetchall())
    assert states == {first: "routed", second: "failed", third: "routed"}
    reason = conn.execute("SELECT reason FROM messages WHERE id = ?", (second,)).fetchone()[0]
    assert "could not be stored" in reason
    assert conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0] == 2
    kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE message_id = ? ORDER BY id", (second,))]
    assert kinds == ["received", "failed"]


def test_a_batch_of_outcomes_writes_its_events_in_order_and_the_chain_holds(store):
    """The batch's events are chained at its end (one read of the head): in outcome order, and verify() passes."""
    from gateway.store.events import gathered
    from gateway.store.integrity import verify

    ids = [stored(store, f"C{i}") for i in range(5)]
    conn = store._conn
    before = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    outcomes = [outcome(mid, f"n-{mid}") for mid in ids] + [outcome(ids[0], "n-again")]
    with gathered(conn) as waiting:  # the outer block: apply_outcomes' own joins it, and nothing is written yet
        assert apply_outcomes(conn, outcomes, STAMP, 0.0) == 5
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == before
        assert len(waiting) == 10  # converted + routed, per applied outcome
    rows = conn.execute("SELECT message_id, kind FROM events WHERE id > ? ORDER BY id", (before,)).fetchall()
    assert [tuple(r) for r in rows] == [(mid, kind) for mid in ids for kind in ("converted", "routed")]
    report = verify(conn)
    assert report.intact, report.findings


def test_outcome_applies_only_once(store):
    """A message already past 'received' is not turned into notifications a second time."""
    mid = stored(store, "C1")
    conn = store._conn
    assert apply_outcomes(conn, [outcome(mid, "n-1")], STAMP, 0.0) == 1
    assert apply_outcomes(conn, [outcome(mid, "n-2")], STAMP, 0.0) == 0
    assert conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0] == 1


def test_retransmission_after_a_rejection_is_not_flagged(store):
    """A sender that fixes a rejected message and resends it under the same MSH-10 is not flagged."""
    conn = store._conn
    rejected = IntakeRecord(
        raw=b"MSH|^~\\&|EHR|FAC|||x||ADT^A01|C9|P|2.5.1\r",
        peer="test",
        state="rejected",
        ack_code="AR",
        sending_application="EHR",
        sending_facility="FAC",
        control_id="C9",
        reason="bad",
    )
    record_frame(conn, rejected, STAMP)
    mid = stored(store, "C9")
    flag = conn.execute("SELECT flag FROM messages WHERE id = ?", (mid,)).fetchone()[0]
    assert flag is None


def test_a_failing_job_alone_in_its_commit_leaves_nothing_behind(store):
    """A job that writes and then fails, with no other job in the commit, is rolled back whole."""
    conn = store._conn

    def half_then_fail(c):
        c.execute("INSERT INTO events (at, actor, kind) VALUES ('t', 'test', 'half')")
        raise RuntimeError("boom")

    from gateway.store.writer import _Job

    job = _Job(half_then_fail, (), None)
    [(_, ok, error)] = store._run_batch(conn, [job])
    assert not ok and isinstance(error, RuntimeError)
    assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'half'").fetchone()[0] == 0


def test_a_failing_job_among_others_fails_alone(store):
    """In a group commit, one failing job is undone and the others are committed."""
    conn = store._conn
    from gateway.store.writer import _Job

    def good(c):
        c.execute("INSERT INTO events (at, actor, kind) VALUES ('t', 'test', 'good')")

    def bad(c):
        c.execute("INSERT INTO events (at, actor, kind) VALUES ('t', 'test', 'bad')")
        raise RuntimeError("boom")

    results = store._run_batch(conn, [_Job(good, (), None), _Job(bad, (), None), _Job(good, (), None)])
    assert [ok for _, ok, _ in results] == [True, False, True]
    kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE actor = 'test'")]
    assert kinds == ["good", "good"]


def test_migrations_run_once_and_are_recorded(tmp_path):
    """A new database gets every migration, each recorded once; migrating again changes nothing."""
    from gateway.store import SCHEMA_VERSION, migrate, open_database, schema_version
    from gateway.store.schema import MIGRATIONS

    conn = open_database(tmp_path / "h.db")
    assert schema_version(conn) == 0
    migrate(conn)
    migrate(conn)
    rows = [r[0] for r in conn.execute("SELECT version FROM migrations ORDER BY version")]
    assert rows == [v for v, _ in MIGRATIONS]
    assert schema_version(conn) == SCHEMA_VERSION


def test_a_database_from_a_newer_herald_is_refused(tmp_path):
    """A schema version above this code's is a clear StoreError, not a guess."""
    from gateway.errors import StoreError
    from gateway.store import SCHEMA_VERSION, migrate, open_database

    conn = open_database(tmp_path / "h.db")
    migrate(conn)
    conn.execute("INSERT INTO migrations (version, applied_at) VALUES (?, '2026-01-01')", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this Herald"):
        migrate(conn)


def test_version_2_keeps_stored_payloads_and_allows_none(tmp_path, monkeypatch):
    """Upgrading a version-1 file keeps each stored notification payload; new rows store none and read the Bundle."""
    from gateway.store import SCHEMA_VERSION, migrate, open_database, schema_version
    from gateway.store import schema as store_module

    conn = open_database(tmp_path / "old.db")
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    migrate(conn)
    conn.execute(
        "INSERT INTO messages (received_at, sha256, raw, state, fhir, updated_at) "
        "VALUES ('t', 'x', x'00', 'routed', '{\"b\":1}', 't')"
    )
    conn.execute(
        "INSERT INTO notifications (id, message_id, recipient_role, recipient, channel, target, event_code, "
        "summary, payload, state, next_attempt_at, created_at, updated_at) "
        "VALUES ('old', 1, 'hie', 'HIE', 'file', '/x', 'e', '{}', '{\"stored\":true}', 'pending', 0, 't', 't')"
    )
    monkeypatch.undo()
    migrate(conn)
    assert schema_version(conn) == SCHEMA_VERSION >= 2
    # Version 4: the summary (a copy of the patient's name) is gone from the rows and the schema.
    columns = {r["name"] for r in conn.execute("PRAGMA table_info(notifications)")}
    assert "summary" not in columns and {"recipient", "payload", "event_code"} <= columns
    conn.execute(
        "INSERT INTO notifications (id, message_id, recipient_role, recipient, channel, target, event_code, "
        "payload, state, next_attempt_at, created_at, updated_at) "
        "VALUES ('new', 1, 'pcp', 'PCP', 'file', '/x', 'e', NULL, 'pending', 0, 't', 't')"
    )
    due = {n.id: n for n in due_notifications(conn, 1.0, 10, ())}
    assert (due["old"].payload, due["old"].bundle) == ('{"stored":true}', None)
    assert (due["new"].payload, due["new"].bundle) == (None, '{"b":1}')
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'notifications'")}
    assert {"notifications_due", "notifications_message"} <= indexes


def test_version_4_leaves_no_summary_in_the_file(tmp_path, monkeypatch):
    """Upgrading to version 4 drops the notification summaries (patient names) from the file's bytes, WAL included."""
    from gateway.store import migrate, open_database
    from gateway.store import schema as store_module

    path = tmp_path / "old.db"
    conn = open_database(path)
    conn.execute("PRAGMA secure_delete=OFF")  # as many SQLite builds default
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:3])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 3)
    migrate(conn)
    conn.execute(
        "INSERT INTO messages (received_at, sha256, raw, state, updated_at) VALUES ('t', 'x', x'00', 's', 't')"
    )
    for n in range(200):
        conn.execute(
            "INSERT INTO notifications (id, message_id, recipient_role, recipient, channel, target, event_code, "
            "summary, payload, state, next_attempt_at, created_at, updated_at) VALUES "
            "(?, 1, 'hie', 'HIE', 'file', '/x', 'e', ?, NULL, 'pending', 0, 't', 't')",
            (f"n-{n}", '{"patient": "ZZQUILLFEATHER"}'),
        )
    conn.close()
    monkeypatch.undo()
    conn = open_database(path)
    conn.execute("PRAGMA secure_delete=OFF")  # the migration must not rely on the connection's setting
    migrate(conn)
    conn.close()
    files = [p for p in tmp_path.iterdir() if p.name.startswith("old.db")]
    assert not [p.name for p in files if b"ZZQUILLFEATHER" in p.read_bytes()]
