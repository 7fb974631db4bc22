"""The console served by Twisted: its listener (HTTPS with the [tls] server certificate), worker threads,
and the search index's background work.

The reactor only parses requests and writes answers: each request becomes a
:class:`ConsoleRequest` and runs on the console's own thread pool
(:meth:`ConsoleApp.handle` blocks on database reads, argon2 and the store's
writer), so a slow page never holds MLLP intake. The access log names the
method, the path without its query string (a search's query names a patient)
and the status.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet import defer, ssl, threads
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from gateway.app.console.app import ConsoleApp
from gateway.app.console.exchange import ConsoleRequest, ConsoleResponse
from gateway.config import Config, parse_listen
from gateway.errors import ConfigError
from gateway.store import Store
from gateway.store.console import index_work
from gateway.store.keys import KeyRing
from mllp.tls import TLS_VERSIONS

__all__ = ["ConsoleResource", "ConsoleService", "console_tls_options", "web_console"]

#: The largest request body read (forms are small; anything bigger is refused).
MAX_BODY = 64 * 1024
#: Messages (or purge events) indexed per background job, and how often the job runs when idle / catching up.
INDEX_BATCH = 500
INDEX_IDLE_SECONDS = 5.0
INDEX_BUSY_SECONDS = 0.25


def _decode(values: dict[bytes, list[bytes]]) -> dict[str, list[str]]:
    return {k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs] for k, vs in values.items()}


class ConsoleResource(Resource):
    """Every path of the console: the request handed to a worker thread, the answer written when it is ready."""

    isLeaf = True

    def __init__(self, app: ConsoleApp, pool: ThreadPool, reactor) -> None:
        super().__init__()
        self.app = app
        self.pool = pool
        self.reactor = reactor

    def render(self, request):
        if request.method not in (b"GET", b"POST"):
            request.setResponseCode(405)
            return b"method not allowed"
        body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(body) > MAX_BODY:
            request.setResponseCode(413)
            return b"request too large"
        form: dict[str, list[str]] = {}
        if request.method == b"POST":
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        path = request.path.decode("utf-8", "replace")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.uri.decode("utf-8", "replace")).query)
        address = request.getClientAddress()
        cookies = _decode({k: [v] for k, v in request.received_cookies.items()})
        console_request = ConsoleRequest(
            method=request.method.decode("ascii"),
            path=path.rstrip("/") or "/",
            query=query,
            form=form,
            cookies={k: v[0] for k, v in cookies.items()},
            client=getattr(address, "host", "") or "",
            secure=request.isSecure(),
        )
        finished = []
        request.notifyFinish().addErrback(lambda _: finished.append(True))
        d = threads.deferToThreadPool(self.reactor, self.pool, self.app.handle, console_request)
        d.addCallback(self._write, request, finished)
        d.addErrback(self._failed, request, finished)
        return NOT_DONE_YET

    def _write(self, response: ConsoleResponse, request, finished: list) -> None:
        if finished:
            return  # the browser went away
        request.setResponseCode(response.status)
        request.setHeader(b"Content-Type", response.content_type.encode("ascii"))
        for name, value in response.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("latin-1"))
        for cookie in response.cookies:
            request.responseHeaders.addRawHeader(b"Set-Cookie", cookie.encode("latin-1"))
        request.write(response.body)
        request.finish()

    def _failed(self, failure, request, finished: list) -> None:
        ConsoleService._log.failure("console: a request could not be answered", failure)
        if not finished:
            request.setResponseCode(500)
            request.finish()


class ConsoleSite(Site):
    """A Site whose access log leaves out query strings (a search's names a patient)."""

    _log = Logger()

    def log(self, request) -> None:
        self._log.debug(
            "console {kind} {path} {code}",
            kind=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            code=request.code,
        )


def console_tls_options(config: Config) -> ssl.CertificateOptions:
    """HTTPS with the [tls] server certificate and key (no client certificate asked: browsers log in).

    :class:`ConfigError` naming the setting when a file is missing or unusable.
    """
    cert_path, key_path, _ = config.tls_files
    data = {}
    for name, path in (("cert", cert_path), ("key", key_path)):
        try:
            data[name] = path.read_bytes()
        except OSError as e:
            raise ConfigError(
                f"tls.{name}",
                f"{path}: {e.strerror} (the console's tls: listener uses the [tls] server certificate; "
                f"for development `herald certs init --dir {path.parent}`)",
            ) from None
    try:
        chain = x509.load_pem_x509_certificates(data["cert"])
        key = serialization.load_pem_private_key(data["key"], password=None)
    except ValueError as e:
        raise ConfigError("tls", f"the console cannot use {cert_path} and {key_path}: {e}") from None
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLS_VERSIONS[config.tls_min_version],
    )
    options.getContext()  # a key that is not the certificate's fails here, at start
    return options


class ConsoleService(Service):
    """The console's listener, its worker threads, and the search index's background work.

    ``url`` says where it listens once ``ready`` has fired.
    """

    _log = Logger()

    def __init__(
        self,
        config: Config,
        store: Store,
        keys: KeyRing,
        reactor,
        clock: Callable[[], float] | None = None,
        threads_max: int = 4,
    ) -> None:
        self.config = config
        self.store = store
        self.reactor = reactor
        self.listen = parse_listen(config.console_listen)
        self.tls = console_tls_options(config) if self.listen.tls else None
        self.app = ConsoleApp(config, store, keys, **({"clock": clock} if clock else {}))
        self.pool = ThreadPool(minthreads=1, maxthreads=threads_max, name="herald-console")
        self.port = None
        self.url = ""
        self.ready: defer.Deferred = defer.Deferred()
        self._index_call = None
        self._indexing: defer.Deferred | None = None
        self._backfilled = 0

    def startService(self):
        super().startService()
        self.pool.start()
        if self.listen.tls:
            endpoint = SSL4ServerEndpoint(
                self.reactor, self.listen.port, self.tls, self.listen.backlog, self.listen.interface
            )
        else:
            endpoint = serverFromString(self.reactor, self.config.console_listen)
        site = ConsoleSite(ConsoleResource(self.app, self.pool, self.reactor), reactor=self.reactor)
        site.displayTracebacks = False
        d = endpoint.listen(site)

        def bound(port):
            self.port = port
            host = self.listen.interface or "localhost"
            self.url = f"{'https' if self.listen.tls else 'http'}://{host}:{port.getHost().port}/"
            self._log.info("web console on {address}", address=self.url)
            self.ready.callback(self.url)
            return port

        d.addCallbacks(bound, self.ready.errback)
        self._index_call = self.reactor.callLater(0, self._index_step)
        return d

    def _index_step(self) -> None:
        """One background job of the index (back-fill, intake refusals, purges); soon again while there is more."""
        self._index_call = None
        self._indexing = self.store.submit_background(index_work, INDEX_BATCH)

        def done(counts: dict) -> None:
            self._indexing = None
            busy = counts["backfilled"] >= INDEX_BATCH or counts["refusals"] >= INDEX_BATCH
            self._backfilled += counts["backfilled"]
            if self._backfilled and not counts["backfilled"]:
                self._log.info("search index: {count} earlier messages indexed", count=self._backfilled)
                self._backfilled = 0
            if self.running:
                delay = INDEX_BUSY_SECONDS if busy else INDEX_IDLE_SECONDS
                self._index_call = self.reactor.callLater(delay, self._index_step)

        def failed(f) -> None:
            self._indexing = None
            self._log.warn("search index: background work failed ({kind})", kind=f.type.__name__)
            if self.running:
                self._index_call = self.reactor.callLater(INDEX_IDLE_SECONDS, self._index_step)

        self._indexing.addCallbacks(done, failed)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._index_call is not None and self._index_call.active():
            self._index_call.cancel()
        self._index_call = None
        if self.port is not None:
            yield self.port.stopListening()
        if self._indexing is not None:
            yield self._indexing  # the job in hand is written before the store stops
        # The threads finish the requests they hold (blocking: joined off the reactor), then their connections close.
        yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.pool.stop)
        self.app.close()


def web_console(config: Config, store: Store, keys: KeyRing, reactor) -> ConsoleService | None:
    """The console service when ``[console] enabled`` (ConfigError now when its certificate is unusable)."""
    if not config.console_enabled:
        return None
    return ConsoleService(config, store, keys, reactor)
