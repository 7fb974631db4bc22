"""/healthz and /readyz (issue 15) on a running gateway, over a real socket: ready when it is, 503 naming the failing
check when the database cannot be written, a listener is not bound, the pipeline stalls or a destination is past its
alert threshold."""

from __future__ import annotations

import json
import socket

import pytest
from test_metrics import SAMPLES, GatewayCase, http_get, temporary_folder
from twisted.internet import defer, reactor, task

from gateway.app.replay import collect_messages, replay_async
from gateway.config import load_config
from gateway.errors import ConfigError


class HealthCase(GatewayCase):
    @defer.inlineCallbacks
    def ready(self):
        """(status code, the JSON body) of /readyz."""
        code, text, kind = yield http_get(self.base + "/readyz")
        self.assertEqual(kind, "application/json")
        return code, json.loads(text)


class ReadyTests(HealthCase):
    @defer.inlineCallbacks
    def test_healthz_answers_ok(self):
        """/healthz is 200 "ok" while the process runs; an unknown path is 404."""
        code, text, _ = yield http_get(self.base + "/healthz")
        self.assertEqual((code, text), (200, "ok\n"))
        code, _, _ = yield http_get(self.base + "/nothing")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_readyz_is_200_with_every_check_when_healthy(self):
        """A gateway that takes writes, listens, keeps up and delivers is ready; the body lists each check."""
        yield replay_async(reactor, "127.0.0.1", self.port, collect_messages([SAMPLES / "cerner-v23-a01-admit.hl7"]))
        yield self.settle()
        code, body = yield self.ready()
        self.assertEqual(code, 200, body)
        self.assertEqual(body["status"], "ready")
        self.assertEqual(body["failing"], [])
        self.assertEqual(set(body["checks"]), {"database", "listeners", "pipeline", "destinations", "disk"})
        self.assertTrue(all(c["ok"] for c in body["checks"].values()), body)

    @defer.inlineCallbacks
    def test_readyz_fails_when_the_database_is_read_only(self):
        """The database made read-only: /readyz is 503 naming "database" with SQLite's own words.

        How it is made read-only, honestly and as root (CI runs as root, and a chmod does not stop root writing):
        ``PRAGMA query_only`` on the gateway's own writer connection, the one every write goes through. SQLite
        then refuses every write with SQLITE_READONLY, "attempt to write a readonly database", the same error a
        read-only file or file system gives; the readiness probe's write goes through that writer like any
        other, so it meets the refusal a real read-only database would give it.
        """
        code, _ = yield self.ready()
        self.assertEqual(code, 200)
        yield self.gw.store.submit(lambda conn: conn.execute("PRAGMA query_only = ON"))
        code, body = yield self.ready()
        self.assertEqual(code, 503, body)
        self.assertEqual(body["status"], "not ready")
        self.assertEqual(body["failing"], ["database"])
        self.assertIn("readonly", body["checks"]["database"]["detail"])
        # The writer's connection is the gateway's: give it back writable before the store stops.
        self.gw.store._conn.execute("PRAGMA query_only = OFF")
        code, _ = yield self.ready()
        self.assertEqual(code, 200)


class UnboundListenerTests(HealthCase):
    """Two MLLP listeners, the second on a port another process holds."""

    def before_config(self) -> None:
        self.taken = socket.socket()
        self.taken.bind(("127.0.0.1", 0))
        self.taken.listen(1)
        self.addCleanup(self.taken.close)
        busy = self.taken.getsockname()[1]
        self.listen = f'listen = ["tcp:0:interface=127.0.0.1", "tcp:{busy}:interface=127.0.0.1"]\nallow_plain = true'

    @defer.inlineCallbacks
    def setUp(self):
        # The second listener cannot bind: its ready Deferred fails, which setUp would take for its own failure.
        from gateway.app.service import make_service

        self.data = temporary_folder(self)
        self.before_config()
        path = self.data / "herald.toml"
        path.write_text(f'[server]\n{self.listen}\n\n[health]\nlisten = "tcp:0:interface=127.0.0.1"\n')
        self.config = load_config(path, data_dir=self.data)
        self.gw = make_service(self.config, reactor)
        self.gw.service.startService()
        self.addCleanup(self.stop)
        results = yield defer.DeferredList([lst.ready for lst in self.gw.listeners], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False])
        self.base = f"http://127.0.0.1:{(yield self.gw.health.ready)}"

    @defer.inlineCallbacks
    def test_readyz_fails_naming_the_listener_that_is_not_bound(self):
        """A listener that could not bind makes /readyz 503, "listeners", naming its endpoint."""
        code, body = yield self.ready()
        self.assertEqual(code, 503, body)
        self.assertEqual(body["failing"], ["listeners"])
        self.assertEqual(body["checks"]["listeners"]["failing"], [self.config.listen[1]])
        # Stopping the other one: both named.
        yield self.gw.listeners[0].stopService()
        code, body = yield self.ready()
        self.assertEqual(body["checks"]["listeners"]["failing"], list(self.config.listen))


class StalledPipelineTests(HealthCase):
    health = "stall_seconds = 0.5"

    @defer.inlineCallbacks
    def test_readyz_fails_when_a_message_waits_past_stall_seconds(self):
        """The pipeline paused while a message waits longer than [health] stall_seconds: 503, "pipeline"."""
        self.gw.pipeline.pause()
        yield replay_async(reactor, "127.0.0.1", self.port, collect_messages([SAMPLES / "cerner-v23-a01-admit.hl7"]))
        code, body = yield self.ready()
        self.assertEqual(code, 200, "not stalled yet: it has waited less than 0.5 s")
        self.assertIn("1 message(s) wait", body["checks"]["pipeline"]["detail"])
        yield task.deferLater(reactor, 0.8, lambda: None)
        code, body = yield self.ready()
        self.assertEqual(code, 503, body)
        self.assertEqual(body["failing"], ["pipeline"])
        self.assertIn("stalled", body["checks"]["pipeline"]["detail"])
        self.gw.pipeline.resume()
        yield self.settle()
        code, _ = yield self.ready()
        self.assertEqual(code, 200)


class DeadDestinationTests(HealthCase):
    """The HIE's endpoint refuses connections; one attempt a notification: its notifications die."""

    extra = '[delivery]\nmax_attempts = 1\ntimeout = 2\n\n[recipients.hie]\nchannel = "fhir"\nurl = "{url}"\n{own}'
    own = ""

    def before_config(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.closed = f"http://127.0.0.1:{s.getsockname()[1]}/fhir"
        s.close()
        self.target = self.closed + "/$process-message"
        own = self.own.format(target=self.target)
        self.extra = self.extra.format(url=self.closed, own=own)

    @defer.inlineCallbacks
    def test_readyz_fails_naming_the_destination_past_its_threshold(self):
        """A dead letter at a destination (the default threshold is 0): 503, "destinations", naming it."""
        yield replay_async(reactor, "127.0.0.1", self.port, collect_messages([SAMPLES / "cerner-v23-a01-admit.hl7"]))
        yield self.settle()
        code, body = yield self.ready()
        self.assertEqual(code, 503, body)
        self.assertEqual(body["failing"], ["destinations"])
        self.assertEqual(body["checks"]["destinations"]["failing"], [self.target])
        self.assertIn("1 dead (more than 0)", body["checks"]["destinations"]["detail"])


class ToleratedDeadDestinationTests(DeadDestinationTests):
    """The same, with [health.destinations."<the HIE>"] dead_letters = 5: that destination may have five."""

    own = '\n[health.destinations."{target}"]\ndead_letters = 5\n'

    @defer.inlineCallbacks
    def test_readyz_fails_naming_the_destination_past_its_threshold(self):
        """A destination's own threshold wins over the default: one dead letter of five allowed is ready."""
        self.assertEqual(self.config.destination_thresholds(self.target), (5, 60.0))
        yield replay_async(reactor, "127.0.0.1", self.port, collect_messages([SAMPLES / "cerner-v23-a01-admit.hl7"]))
        yield self.settle()
        code, body = yield self.ready()
        self.assertEqual(code, 200, body)


@pytest.mark.parametrize(
    "text, key",
    [
        ('[health]\nlisten = "ssl:9102"\n', "health.listen"),
        ('[health]\nlisten = "tcp:99999"\n', "health.listen"),
        ("[health]\nstall_seconds = 0\n", "health.stall_seconds"),
        ("[health]\ndead_letters = -1\n", "health.dead_letters"),
        ('[health.destinations."x"]\nretries = 3\n', "health.destinations.x.retries"),
        ('[health.destinations."x"]\npending_minutes = 0\n', "health.destinations.x.pending_minutes"),
        ('[logging]\nformat = "xml"\n', "logging.format"),
        ('[logging]\nlevel = "loud"\n', "logging.level"),
        ('[logging]\nfile = ""\n', "logging.file"),
    ],
)
def test_bad_health_and_logging_settings_fail_naming_the_key(tmp_path, text, key):
    """A wrong [health] or [logging] value stops the start with a ConfigError naming its key."""
    path = tmp_path / "herald.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key


def test_health_defaults_and_paths_relative_to_the_config(tmp_path):
    """By default the health listener is on, on loopback port 9102; [logging] file is relative to the config file."""
    cfg = load_config(None)
    assert (cfg.health_enabled, cfg.health_listen) == (True, "tcp:9102:interface=127.0.0.1")
    assert (cfg.log_format, cfg.log_level, cfg.log_file) == ("text", "info", None)
    path = tmp_path / "etc" / "herald.toml"
    path.parent.mkdir()
    path.write_text('[logging]\nfile = "log/herald.log"\nformat = "json"\n')
    assert load_config(path).log_file == tmp_path / "etc" / "log" / "herald.log"


def test_the_example_config_sets_health_and_logging_as_documented():
    """herald.example.toml's [health] and [logging] load, and are the defaults (loopback 9102, text at info)."""
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "herald.example.toml")
    assert (cfg.health_enabled, cfg.health_listen, cfg.health_stall_seconds) == (
        True,
        "tcp:9102:interface=127.0.0.1",
        300,
    )
    assert (cfg.health_dead_letters, cfg.health_pending_minutes) == (0, 60)
    assert (cfg.log_format, cfg.log_level, cfg.log_file) == ("text", "info", None)
