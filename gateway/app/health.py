"""The health listener: ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP, served by twisted.web.

``[health] listen`` says where (loopback, port 9102, by default): the answers
carry no patient data, but destinations and senders are named, and nothing
asks who is calling, so it is for the machine's own probes and a Prometheus
that reaches it through the host. A listener that cannot bind is logged as an
error and the gateway goes on: intake must not stop for want of a metrics port.

- ``/healthz``: 200 ``ok`` while the process answers at all.
- ``/readyz``: 200 with a JSON body of every check when all pass, else 503
  naming the failing ones. The checks: the database takes a write (a real
  committed write through the writer, :func:`gateway.store.health.probe_write`),
  every MLLP listener is bound, no message has waited longer than
  ``[health] stall_seconds`` for the pipeline, no destination is past its
  alert threshold (dead letters, or its oldest unsent notification's wait),
  and the disk reserve has not paused the work.
- ``/metrics``: :class:`gateway.app.metrics.GatewayMetrics` in Prometheus text format.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from gateway.app.metrics import CONTENT_TYPE, GatewayMetrics, seconds_since, waited
from gateway.config import Config
from gateway.store import health as health_store

__all__ = ["Check", "HealthListener", "Readiness", "health_site"]


@dataclass(frozen=True)
class Check:
    """One readiness check: its name, whether it passed, and why in words (no patient data)."""

    name: str
    ok: bool
    detail: str
    failing: list[str] = field(default_factory=list)  # for "destinations": the ones past their threshold


class Readiness:
    """The checks behind ``/readyz``, made afresh at each request."""

    #: Seconds the write probe may take before the database counts as not writable.
    PROBE_TIMEOUT = 5.0

    def __init__(self, store, config: Config, listeners: list, pipeline, reactor, disk=None) -> None:
        self.store = store
        self.config = config
        self.listeners = listeners  # the gateway's list: filled after this is made
        self.pipeline = pipeline
        self.reactor = reactor
        self.disk = disk

    @defer.inlineCallbacks
    def checks(self):
        """Fire with every :class:`Check`, in a fixed order."""
        probe = defer.maybeDeferred(self.store.submit, health_store.probe_write)
        probe.addTimeout(self.PROBE_TIMEOUT, self.reactor)
        read = defer.maybeDeferred(self.store.submit_read, health_store.snapshot, self.store.seconds())
        (probed, wrote), (read_ok, snap) = yield defer.DeferredList([probe, read], consumeErrors=True)
        out = [self._database(probed, wrote), self._listeners()]
        if read_ok:
            out += [self._pipeline(snap), self._destinations(snap)]
        else:
            why = f"the store could not be read: {snap.getErrorMessage()}"
            out += [Check("pipeline", False, why), Check("destinations", False, why)]
        if self.disk is not None:
            short = self.disk.paused
            out.append(
                Check(
                    "disk",
                    not short,
                    f"{'below' if short else 'above'} the {self.disk.reserve_bytes // (1024 * 1024)} MB reserve"
                    + ("; the pipeline and delivery are paused" if short else ""),
                )
            )
        return out

    def _database(self, ok: bool, result) -> Check:
        if ok:
            return Check("database", True, "writable (a write committed)")
        if isinstance(result.value, defer.TimeoutError):
            return Check("database", False, f"a write did not commit within {self.PROBE_TIMEOUT:g} s")
        return Check("database", False, f"not writable: {result.getErrorMessage()}")

    def _listeners(self) -> Check:
        if not self.listeners:
            return Check("listeners", False, "no MLLP listener is configured")
        down = [svc.spec for svc in self.listeners if not _bound(svc)]
        if down:
            return Check("listeners", False, f"not listening: {', '.join(down)}", down)
        return Check("listeners", True, f"listening: {', '.join(svc.spec for svc in self.listeners)}")

    def _pipeline(self, snap: health_store.Snapshot) -> Check:
        if not self.config.pipeline_enabled:
            return Check("pipeline", True, f"disabled ([pipeline] enabled = false); {snap.backlog} message(s) wait")
        if not snap.backlog:
            return Check("pipeline", True, "no message waits")
        age = seconds_since(snap.oldest_received_at, self.store.clock())
        limit = self.config.health_stall_seconds
        said = f"{snap.backlog} message(s) wait, the oldest {age:.0f} s"
        paused = " (paused: the disk is short of space)" if getattr(self.pipeline, "paused", False) else ""
        if age > limit:
            return Check("pipeline", False, f"stalled: {said}, over [health] stall_seconds = {limit:g}{paused}")
        return Check("pipeline", True, said + paused)

    def _destinations(self, snap: health_store.Snapshot) -> Check:
        now_seconds, now = self.store.seconds(), self.store.clock()
        failing, said = [], []
        for b in snap.destinations:
            allowed, minutes = self.config.destination_thresholds(b.destination)
            wait = waited(b, now_seconds, now)
            why = []
            if b.dead > allowed:
                why.append(f"{b.dead} dead (more than {allowed})")
            if wait > minutes * 60:
                why.append(f"oldest unsent waited {wait / 60:.0f} min (over {minutes:g})")
            if why:
                failing.append(b.destination)
                said.append(f"{b.destination}: {', '.join(why)}")
        if failing:
            return Check("destinations", False, "; ".join(said), failing)
        waiting = sum(b.pending + b.retrying for b in snap.destinations)
        return Check("destinations", True, f"none past its threshold; {waiting} notification(s) waiting")


def _bound(listener) -> bool:
    port = getattr(listener, "port", None)
    return bool(listener.running and port is not None and getattr(port, "connected", True))


class _Healthz(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class _Answer(Resource):
    """A leaf whose answer comes from a Deferred; nothing is written to a client that has gone."""

    isLeaf = True

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.maybeDeferred(self.answer)

        def write(result):
            if gone:
                return
            code, content_type, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            request.write(body)
            request.finish()

        def failed(f):
            Logger().error("the health endpoint failed: {error}", error=f.getErrorMessage())
            return 500, b"text/plain; charset=utf-8", b"internal error\n"

        d.addErrback(failed).addCallback(write)
        return NOT_DONE_YET


class _Readyz(_Answer):
    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    @defer.inlineCallbacks
    def answer(self):
        checks = yield self.readiness.checks()
        failing = [c.name for c in checks if not c.ok]
        body = {
            "status": "not ready" if failing else "ready",
            "failing": failing,
            "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name" and v != []} for c in checks},
        }
        text = json.dumps(body, indent=2).encode("utf-8") + b"\n"
        return 503 if failing else 200, b"application/json", text


class _Metrics(_Answer):
    def __init__(self, metrics: GatewayMetrics, store) -> None:
        super().__init__()
        self.metrics = metrics
        self.store = store

    @defer.inlineCallbacks
    def answer(self):
        try:
            snap = yield self.store.submit_read(health_store.snapshot, self.store.seconds())
        except Exception:
            snap = None  # herald_store_read_ok 0 says so; the counters are still served
        self.metrics.refresh(snap, self.store.seconds(), self.store.clock())
        return 200, CONTENT_TYPE.encode("ascii"), self.metrics.render()


class _QuietSite(Site):
    """A Site that writes no access log line: a probe every few seconds is not news."""

    noisy = False

    def log(self, request) -> None:
        pass


class _Root(Resource):
    def getChild(self, path, request):
        return notFound()


def health_site(readiness: Readiness, metrics: GatewayMetrics, store) -> Site:
    """The site: ``/healthz``, ``/readyz``, ``/metrics``; anything else is 404."""
    root = _Root()
    root.putChild(b"healthz", _Healthz())
    root.putChild(b"readyz", _Readyz(readiness))
    root.putChild(b"metrics", _Metrics(metrics, store))
    return _QuietSite(root)


class HealthListener(Service):
    """Serves :func:`health_site` on ``[health] listen``; ``ready`` fires with the port (None: it could not bind)."""

    _log = Logger()

    def __init__(self, spec: str, site: Site, reactor) -> None:
        self.spec = spec
        self.site = site
        self.reactor = reactor
        self.port = None
        self.error: str | None = None
        self.ready: defer.Deferred = defer.Deferred()

    @property
    def address(self) -> str:
        """``http://HOST:PORT/`` once bound ("" before)."""
        if self.port is None:
            return ""
        host = self.port.getHost()
        return f"http://{host.host}:{host.port}/"

    def startService(self):
        super().startService()
        if "interface=" not in self.spec or not any(
            f"interface={loop}" in self.spec for loop in ("127.", "localhost", "::1")
        ):
            self._log.warn(
                "the health and metrics listener {spec} accepts connections from other machines; "
                "nothing there asks who is calling",
                spec=self.spec,
            )
        d = serverFromString(self.reactor, self.spec).listen(self.site)

        def bound(port):
            self.port = port
            self._log.info("health and metrics on {address}", address=self.address)
            self.ready.callback(port.getHost().port)

        def failed(f):
            self.error = f.getErrorMessage()
            self._log.error(
                "the health and metrics listener {spec} could not listen: {error}; the gateway runs without it",
                spec=self.spec,
                error=self.error,
            )
            self.ready.callback(None)

        d.addCallbacks(bound, failed)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
