"""Retention: `herald purge` removes the bodies of finished messages past retention; the trail still verifies.

On SQLite and on PostgreSQL (the ``data_dir`` fixture)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from test_audit import MESSAGES, NOW, attacker, explain, gateway_data, run, sample, store_of
from test_intake import QueueReactor, accepted_record, drain, run_until, success
from twisted.internet.task import Clock

from gateway.app.audit import PeriodicPurge, purge_bodies
from gateway.config import load_config
from gateway.store import Store, open_database
from gateway.store.integrity import verify
from gateway.store.keys import KEYS_ENV
from gateway.store.messages import record_frame
from gateway.store.retention import id_ranges


@pytest.fixture(autouse=True)
def _no_keys_from_the_environment(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)


def bodies(data: Path) -> dict[int, tuple[int, bool, bool]]:
    """Per message: (bytes of raw as stored, whether it has a Bundle, whether it is marked purged)."""
    rows = attacker(data).execute("SELECT id, length(raw), fhir IS NOT NULL, purged_at IS NOT NULL FROM messages")
    return {r[0]: (r[1], bool(r[2]), bool(r[3])) for r in rows}


def test_purge_removes_old_bodies_keeps_rows_and_the_trail_verifies(data_dir):
    """Messages past retention lose raw and Bundle; newer ones keep theirs; verify passes; the event names them."""
    data = data_dir
    keys = gateway_data(data, MESSAGES[:2], at=NOW - timedelta(days=100))
    Store(store_of(data), reactor=object(), clock=lambda: NOW, keys=keys)._conn.close()
    conn = open_database(store_of(data), keys=keys)
    record_frame(conn, accepted_record(sample(MESSAGES[2])), NOW.isoformat(timespec="milliseconds"))
    conn.close()
    config = load_config(None, data_dir=data)
    report = purge_bodies(config, keys, timedelta(days=90), by="tests", now=NOW)
    assert report.message_ids == (1, 2)
    after = bodies(data)
    assert after[1] == (0, False, True) and after[2] == (0, False, True)
    assert after[3][0] > 0 and not after[3][2]
    header = attacker(data).execute("SELECT control_id, sha256, digest FROM messages WHERE id = 1").fetchone()
    assert header[0] == "LSR8841200377" and header[1] and header[2]
    actor, detail = attacker(data).execute("SELECT actor, detail FROM events WHERE kind = 'purged'").fetchone()
    assert actor == "tests"
    assert json.loads(detail) == {
        "count": 2,
        "ranges": [[1, 2]],
        "received_before": "2026-08-22T08:00:00.000+00:00",
        "notification_payloads": 0,
    }
    report = verify(open_database(store_of(data), readonly=True, keys=keys))
    assert report.intact, report.findings
    assert report.purged == 2


def test_purge_cli_then_verify_and_log_show(data_dir):
    """`herald purge --older-than 90d` purges, removes the message's notification file, and verify still passes."""
    data = data_dir
    gateway_data(data, at=NOW.replace(year=2020))
    drops = attacker(data).execute("SELECT target, id FROM notifications WHERE message_id = 1").fetchall()
    files = [Path(target) / f"{nid}.json.sealed" for target, nid in drops]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"sealed")
    dry = run("purge", "--older-than", "90d", "--dry-run", "--data", data)
    assert dry.exit_code == 0, explain(dry)
    assert "would purge 3 message(s)" in dry.output and ": 1-3" in dry.output
    assert all(v[0] > 0 for v in bodies(data).values())  # a dry run changes nothing
    result = run("purge", "--older-than", "90d", "--data", data)
    assert result.exit_code == 0, explain(result)
    assert "purged the bodies of 3 message(s)" in result.output and f"{len(files)} file(s) removed" in result.output
    assert not any(f.exists() for f in files)
    verified = run("audit", "verify", "--data", data)
    assert verified.exit_code == 0, explain(verified)
    assert "(3 with their body purged)" in verified.output
    shown = run("log", "show", "1", "--data", data)
    assert shown.exit_code == 0, explain(shown)
    assert "WARNING" not in shown.output and "  (purged)" in shown.output
    again = run("purge", "--older-than", "90d", "--data", data)
    assert "purged the bodies of 0 message(s)" in again.output


def test_purge_keeps_messages_whose_work_is_not_finished(data_dir):
    """A message still to be processed, or with a notification still to deliver, keeps its body."""
    data = data_dir
    keys = gateway_data(data, MESSAGES[:2], at=NOW - timedelta(days=200))
    db = attacker(data)
    db.execute("UPDATE notifications SET state = 'retrying' WHERE message_id = 1")
    conn = open_database(store_of(data), keys=keys)
    record_frame(conn, accepted_record(sample(MESSAGES[2])), (NOW - timedelta(days=200)).isoformat())
    conn.close()
    report = purge_bodies(load_config(None, data_dir=data), keys, timedelta(days=90), by="tests", now=NOW)
    assert report.message_ids == (2,)


def test_a_body_removed_without_a_purge_event_is_named(data_dir):
    """Blanking a body and marking it purged by hand is caught: no purged event names the message."""
    data = data_dir
    gateway_data(data)
    attacker(data).execute("UPDATE messages SET raw = ?, purged_at = '2026-12-01' WHERE id = 2", (b"",))
    result = run("audit", "verify", "--data", data)
    assert result.exit_code == 1, explain(result)
    assert "BROKEN at message 2: altered: its body was removed, but no 'purged' event names it" in result.output


@pytest.mark.parametrize("age", ["90", "ninety days", "-3d", "3y"])
def test_a_bad_age_is_a_usage_error(tmp_path, age):
    """--older-than takes 90d, 12h or 2w; anything else exits 2 before touching the database."""
    result = run("purge", "--older-than", age, "--data", tmp_path)
    assert result.exit_code == 2, explain(result)
    assert "is not an age" in result.output


def test_id_ranges():
    """Purge events name messages as runs of ids."""
    assert id_ranges([7, 1, 2, 3, 9, 10]) == [[1, 3], [7, 7], [9, 10]]
    assert id_ranges([]) == []


class ClockedQueueReactor(QueueReactor):
    """The store's queued callbacks, and timers on a Clock the test advances."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()

    def callLater(self, delay, f, *args, **kwargs):
        return self.clock.callLater(delay, f, *args, **kwargs)


def test_the_server_purges_periodically_with_retention_days(data_dir):
    """With [retention] days set, the server purges a minute after start, batch after batch, then hourly."""
    data = data_dir
    keys = gateway_data(data, at=NOW - timedelta(days=40))
    reactor = ClockedQueueReactor()
    store = Store(store_of(data), reactor=reactor, clock=lambda: NOW, keys=keys)
    store.start()
    try:
        purge = PeriodicPurge(store, data, 30, reactor)
        purge.startService()
        reactor.clock.advance(59)
        assert bodies(data)[1][2] is False
        reactor.clock.advance(1)
        run_until(reactor, lambda: purge.purged == 3)

        def timers() -> list[float]:
            return [c.getTime() for c in reactor.clock.getDelayedCalls()]

        run_until(reactor, lambda: timers() == [60.0])  # files removed: the next batch at once
        reactor.clock.advance(0)
        run_until(reactor, lambda: timers() == [3660.0])  # it found nothing: the next pass in an hour
        purge.stopService()
        assert reactor.clock.getDelayedCalls() == []
    finally:
        success(drain(reactor, store.stop()))
    assert {m: b[2] for m, b in bodies(data).items()} == {1: True, 2: True, 3: True}
    assert verify(open_database(store_of(data), readonly=True, keys=keys)).intact
