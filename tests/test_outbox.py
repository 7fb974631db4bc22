"""The outbox never silently gives up: retries with jitter until a horizon, permanent failures dead at once,
Retry-After honoured, and dead letters an operator can see, count, retry and cancel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from test_audit import store_of
from test_cli import NOW, SAMPLES, assert_clean_exit, explain, run, stored_messages
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.delivery.channels import DeliveryFailed
from gateway.delivery.worker import DeliveryWorker
from gateway.records import DEAD, RETRYING, DeliveryAttempt, Notification
from gateway.store import Store, open_database
from gateway.store.keys import KeyRing


class Recorded:
    """What the worker would write for an attempt (its store job, observed, not faked)."""

    def __init__(self):
        self.rows = []

    def __call__(self, n, outcome, detail, state, next_at, status=None):
        self.rows.append((outcome, detail, state, next_at))


def worker(clock: Clock, *, horizon_hours=72.0, rng=lambda: 1.0, now=None) -> tuple[DeliveryWorker, Recorded]:
    w = DeliveryWorker(
        None,
        clock,
        retry_horizon=horizon_hours * 3600,
        backoff_initial=2.0,
        backoff_max=600.0,
        clock=lambda: now or datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
        rng=rng,
    )
    w._record = Recorded()
    return w, w._record


def note(attempts=0, queued=timedelta(0), now=datetime(2026, 3, 1, 12, 0, tzinfo=UTC)) -> Notification:
    created = (now - queued).isoformat(timespec="milliseconds")
    return Notification(
        "n1", 1, "hie", "HIE", "fhir", "https://hie.example/fhir", "e", attempts=attempts, created_at=created
    )


def fail(error) -> Failure:
    try:
        raise error
    except Exception:
        return Failure()


def test_a_permanent_failure_is_dead_at_once():
    w, rec = worker(Clock())
    w._failed(fail(DeliveryFailed("hie.example: HTTP 404", permanent=True, status=404)), note())
    assert rec.rows == [("error", "hie.example: HTTP 404 (permanent: not retried)", DEAD, 0.0)]


def test_a_receiver_down_longer_than_the_old_254_seconds_is_still_retried():
    clock = Clock()
    clock.advance(10_000)
    w, rec = worker(clock)
    w._failed(
        fail(DeliveryFailed("hie.example: connection refused", permanent=False)),
        note(attempts=20, queued=timedelta(hours=2)),
    )
    ((_, _, state, next_at),) = rec.rows
    assert state == RETRYING
    assert 10_000 < next_at <= 10_000 + 600


def test_past_the_horizon_it_is_dead_and_says_why():
    w, rec = worker(Clock(), horizon_hours=72)
    w._failed(
        fail(DeliveryFailed("hie.example: HTTP 503", permanent=False)),
        note(attempts=400, queued=timedelta(hours=71, minutes=59)),
    )
    ((_, detail, state, _),) = rec.rows
    assert state == DEAD
    assert "past the 72 h retry horizon" in detail


def test_retry_after_is_honoured():
    clock = Clock()
    w, rec = worker(clock, rng=lambda: 0.0)
    w._failed(fail(DeliveryFailed("hie.example: HTTP 429", permanent=False, retry_after=120.0)), note(attempts=1))
    assert rec.rows[0][3] == pytest.approx(120.0)


def test_retries_are_jittered():
    import random

    r = random.Random(5)
    clock = Clock()
    w, rec = worker(clock, rng=r.random)
    for _ in range(50):
        w._failed(fail(DeliveryFailed("x", permanent=False)), note(attempts=7))
    delays = {round(row[3], 3) for row in rec.rows}
    assert len(delays) > 45 and max(delays) <= 256  # attempt 8: up to 2 s x 2^7


# -- dead letters for an operator ----------------------------------------------------------


@pytest.fixture
def with_dead_letter(data_dir):
    """A data folder (its store SQLite, then PostgreSQL) with one message's notifications, the first dead."""
    data = data_dir
    stored_messages(data, [SAMPLES / "epic-v251-a04-ed-registration.hl7"])
    store = Store(store_of(data), reactor=Clock(), clock=lambda: NOW, keys=KeyRing.load(None))
    conn = store._conn
    rows = conn.execute("SELECT id, message_id FROM notifications ORDER BY id").fetchall()
    from gateway.store.outbox import record_attempts

    nid, mid = rows[0]
    record_attempts(
        conn,
        [DeliveryAttempt(nid, mid, 9, "error", "hie.example: HTTP 503 (past the 72 h retry horizon)", DEAD, 0.0)],
        NOW.isoformat(),
    )
    conn.close()
    return data, nid, [r[0] for r in rows]


def test_dead_letters_show_in_the_log_list_and_the_outbox(with_dead_letter):
    data, nid, _ = with_dead_letter
    log = run("log", "list", "--data", data)
    assert_clean_exit(log, 0)
    assert "1 DEAD" in log.output, explain(log)
    listed = run("outbox", "list", "--state", "dead", "--data", data)
    assert_clean_exit(listed, 0)
    assert nid in listed.output and "past the 72 h retry horizon" in listed.output
    counts = run("outbox", "counts", "--data", data)
    assert counts.exit_code == 3, explain(counts)
    assert "dead letters: 1" in counts.output


def test_outbox_retry_makes_a_dead_letter_due_again_and_audits_it(with_dead_letter):
    data, nid, _ = with_dead_letter
    result = run("outbox", "retry", nid, "--by", "ops", "--data", data)
    assert_clean_exit(result, 0)
    assert "requeued 1 notification(s)" in result.output
    conn = open_database(store_of(data))
    state, due = conn.execute("SELECT state, next_attempt_at FROM notifications WHERE id = ?", (nid,)).fetchone()
    assert state == "pending"
    assert due <= datetime.now(UTC).timestamp() + 1
    kinds = [k for (k,) in conn.execute("SELECT kind FROM events WHERE notification_id = ? ORDER BY id", (nid,))]
    assert kinds[-1] == "requeued"
    again = run("outbox", "retry", nid, "--data", data)
    assert again.exit_code == 2, "not dead any more: said, and the exit says so"


def test_outbox_cancel_stops_a_notification_being_sent(with_dead_letter):
    data, nid, ids = with_dead_letter
    result = run("outbox", "cancel", *ids, "--by", "ops", "--data", data)
    assert "cancelled" in result.output, explain(result)
    listed = run("outbox", "list", "--state", "cancelled", "--data", data)
    assert nid in listed.output


def test_outbox_retry_needs_ids_or_all_dead(tmp_path):
    result = run("outbox", "retry", "--data", tmp_path)
    assert result.exit_code == 2
    assert "give notification ids, or --all-dead" in result.output


def test_a_fhir_recipients_tls_and_smart_settings_are_read_relative_to_the_config(tmp_path):
    from gateway.config import load_config

    config = tmp_path / "herald.toml"
    config.write_text(
        '[recipients.hie]\nchannel = "fhir"\nurl = "https://hie.example/fhir"\ntimeout = 5\n'
        '[recipients.hie.auth]\ntoken_url = "https://hie.example/token"\nclient_id = "herald"\n'
        'key_file = "keys/smart.pem"\n',
        encoding="utf-8",
    )
    hie = load_config(config, data_dir=tmp_path / "data").recipients["hie"]
    assert hie.fhir["auth"]["key_file"] == str(tmp_path / "keys" / "smart.pem")
    assert hie.fhir["timeout"] == 5


def test_a_missing_smart_key_stops_the_start_naming_the_key(tmp_path):
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        DeliveryWorker(
            None,
            Clock(),
            fhir_settings={
                "https://hie.example/fhir": {
                    "auth": {
                        "token_url": "https://hie.example/token",
                        "client_id": "h",
                        "key_file": str(tmp_path / "no.pem"),
                    }
                }
            },
        )
    assert "auth.key_file" in str(caught.value)


# -- a stalled receiver, end to end -------------------------------------------------------------

import test_end_to_end as e2e  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET  # noqa: E402


class StallingReceiver(Resource):
    """An HIE that sends its headers and the start of a body, then nothing more (the issue's stall)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = []
        self.open = 0
        self.most_open = 0

    def render_POST(self, request):
        request.content.read()
        self.requests.append(request)
        self.open += 1
        self.most_open = max(self.most_open, self.open)

        def closed(_):
            self.open -= 1

        request.notifyFinish().addBoth(closed)
        request.setResponseCode(200)
        request.setHeader("content-type", "application/fhir+json")
        request.setHeader("content-length", "1000")
        request.write(b'{"resourceType":')
        return NOT_DONE_YET


class StalledReceiverTests(e2e.GatewayTestCase):
    extra_config = """
[delivery]
timeout = 1.0
backoff_initial = 5.0
poll_interval = 0.05
concurrency = 4
per_destination = 2
"""

    def make_receiver(self):
        return StallingReceiver()

    @defer.inlineCallbacks
    def test_a_receiver_that_stalls_mid_body_is_cut_off_and_file_drops_carry_on(self):
        """Six ED visits (six MRNs, so the HIE's are not held in order behind one another): the HIE stalls
        every body; the PCP's and care team's file drops all go out at once, the HIE's attempts end at the
        1 s timeout as retryable, and no more than 2 wait on the HIE at a time."""
        c = yield self.client()
        for i in range(6):
            raw = e2e.sample(e2e.ED_VISIT).replace(b"LSR8841200", b"STALL%05d" % i, 1)
            raw = raw.replace(b"E2249017^", b"E22490%02d^" % i, 1)
            yield c.send(raw, timeout=10)
        yield self.wait_for(
            "SELECT COUNT(*) FROM notifications WHERE recipient_role != 'hie' AND state = 'sent'", expected=12
        )
        # The HIE's six attempts take at least 3 s (two at a time, each cut off at 1 s): the file drops were
        # all sent before that, so they did not wait behind it (one member's drops go one after another).
        conn = self.db()
        hie_attempts = conn.execute(
            "SELECT COUNT(*) FROM delivery_attempts a JOIN notifications n ON n.id = a.notification_id "
            "WHERE n.recipient_role = 'hie'"
        ).fetchone()[0]
        conn.close()
        self.assertLess(hie_attempts, 6, "file drops waited behind the stalled HIE")
        yield self.wait_for(
            "SELECT COUNT(*) FROM delivery_attempts a JOIN notifications n ON n.id = a.notification_id "
            "WHERE n.recipient_role = 'hie' AND a.detail LIKE '%no complete answer within 1 s%'",
            expected=6,
        )
        conn = self.db()
        states = dict(conn.execute("SELECT state, COUNT(*) FROM notifications WHERE recipient_role = 'hie' GROUP BY 1"))
        conn.close()
        self.assertEqual(states, {"retrying": 6})
        self.assertLessEqual(self.receiver.most_open, 2, "more than per_destination attempts held by one receiver")
        self.assertGreaterEqual(len(self.receiver.requests), 6)


class StopUnderStallTests(e2e.GatewayTestCase):
    make_receiver = StalledReceiverTests.make_receiver
    extra_config = """
[delivery]
timeout = 120.0
poll_interval = 0.05
"""

    @defer.inlineCallbacks
    def test_a_stop_is_not_held_by_a_stalled_receiver(self):
        """With a 120 s timeout and the HIE stalling every body, stopping takes the 1 s grace, not 120 s; the
        cancelled attempts are recorded to retry, and the file drops were sent."""
        c = yield self.client()
        yield c.send(e2e.sample(e2e.ED_VISIT), timeout=10)
        yield self.wait_for(
            "SELECT COUNT(*) FROM notifications WHERE recipient_role != 'hie' AND state = 'sent'", expected=2
        )
        deadline = reactor.seconds() + 10
        while not self.receiver.requests and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.gw.delivery.stop_grace = 1.0
        started = reactor.seconds()
        yield self.gw.delivery.stopService()
        self.assertLess(reactor.seconds() - started, 3.0)
        yield self.wait_for(
            "SELECT COUNT(*) FROM notifications WHERE recipient_role = 'hie' AND state = 'retrying'", expected=1
        )


def test_a_stop_while_the_directory_is_read_reads_no_more_from_the_store():
    """Stopped while its poll waits for the recipient directory, the worker does not go on to read the outbox
    from a store that is stopping too (it said "the store is not running" in a test's log)."""
    from twisted.internet import defer as _defer

    class SlowStore:
        def __init__(self):
            self.directory = _defer.Deferred()
            self.outbox_reads = 0

        def submit_read(self, fn, *args):
            return self.directory

        def due_notifications(self, *args):
            self.outbox_reads += 1
            return _defer.succeed([])

    store = SlowStore()
    worker = DeliveryWorker(store, Clock(), agent=object())
    worker.startService()
    worker.stopService()
    store.directory.callback({})
    assert store.outbox_reads == 0
