"""The console as a function of a request: login, sessions, CSRF, roles, routing, auditing, security headers.

:meth:`ConsoleApp.handle` takes a :class:`ConsoleRequest` and returns a
:class:`ConsoleResponse`; it blocks (database reads, argon2, the store's
writer) and runs on the console's worker threads, never the reactor's. Each
worker thread has its own read-only connection (PHI opened with the key ring)
and its own roster reader; writes go through the gateway's running store, as
the CLI's do.

Every page but the login page needs a session: a random cookie (HttpOnly,
SameSite=Strict, Secure over TLS) whose hash names a row of
``console_sessions``. Every POST carries the session's CSRF token (the login
form, a nonce it was served with, in a cookie too). Pages that show patient
data record the read in the audit trail first, as ``console`` with the user's
name; if that cannot be recorded, nothing is shown.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from twisted.logger import Logger

from gateway.app.console import admin, browser, queues, roster, senders
from gateway.app.console.auth import LoginThrottle, hash_password, new_token, verify_password
from gateway.app.console.exchange import ConsoleRequest, ConsoleResponse, PageError, Visit
from gateway.app.console.html import esc, layout, page
from gateway.app.console.queues import local_path
from gateway.config import Config
from gateway.errors import HeraldError
from gateway.store import RosterReader, Store, open_database, read_transaction
from gateway.store.console import create_session, end_session, login_record, record_login, session_of, set_password
from gateway.store.keys import KeyRing
from gateway.store.schema import iso

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "ConsoleApp"]

SESSION_COOKIE = "herald_session"
LOGIN_COOKIE = "herald_login"
#: What a page may load: its own scripts, styles and images, nothing inline, no frames around it.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}

Page = Callable[..., ConsoleResponse]
#: (method, path pattern, handler, whether it shows a page in one read snapshot). Groups are ids (ints).
ROUTES: list[tuple[str, re.Pattern, Page, bool]] = [
    ("GET", re.compile(r"/messages"), browser.messages_page, True),
    ("GET", re.compile(r"/messages/(\d+)"), browser.message_page, True),
    ("GET", re.compile(r"/outbox"), queues.outbox_page, True),
    ("POST", re.compile(r"/notifications/retry"), queues.retry_action, False),
    ("POST", re.compile(r"/notifications/cancel"), queues.cancel_action, False),
    ("GET", re.compile(r"/reviews"), queues.reviews_page, True),
    ("POST", re.compile(r"/reviews/(\d+)/accept"), lambda v, i: queues.review_action(v, i, "accept"), False),
    ("POST", re.compile(r"/reviews/(\d+)/reject"), lambda v, i: queues.review_action(v, i, "reject"), False),
    ("GET", re.compile(r"/roster"), roster.roster_page, True),
    ("GET", re.compile(r"/roster/member"), roster.member_page, True),
    ("GET", re.compile(r"/senders"), senders.senders_page, True),
    ("GET", re.compile(r"/admin/users"), admin.users_page, True),
    ("POST", re.compile(r"/admin/users"), admin.add_user_action, False),
    ("POST", re.compile(r"/admin/users/remove"), admin.remove_user_action, False),
    ("GET", re.compile(r"/admin/audit"), admin.audit_page, True),
    ("POST", re.compile(r"/admin/audit"), admin.audit_page, False),
]


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ConsoleApp:
    """The console's pages over one gateway's store and configuration.

    ``clock`` gives wall-clock seconds (sessions' lifetimes, the senders
    page's windows); the login throttle has its own (``throttle``), so tests
    move either.
    """

    _log = Logger()

    def __init__(
        self,
        config: Config,
        store: Store,
        keys: KeyRing | None = None,
        clock: Callable[[], float] = time.time,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.keys = keys if keys is not None else store.keys
        self.clock = clock
        self.throttle = throttle or LoginThrottle(config.console_login_attempts)
        self.lifetime = config.console_session_hours * 3600
        self._local = threading.local()
        self._opened: list[Any] = []
        self._lock = threading.Lock()
        self._flash: dict[str, str] = {}
        folder = files("gateway.app.console") / "static"
        self._static = {name: (folder / name).read_bytes() for name in _STATIC}

    # -- per-thread reads --------------------------------------------------------------------

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_database(self.config.database, readonly=True, keys=self.keys)
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def _roster(self):
        reader = getattr(self._local, "roster", None)
        if reader is None:
            reader = RosterReader(self.config.database, self.keys)
            self._local.roster = reader
            with self._lock:
                self._opened.append(reader)
        return reader.current()

    def close(self) -> None:
        """Close every worker thread's connection and roster reader (after the threads have stopped)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for thing in opened:
            thing.close()

    # -- a request ---------------------------------------------------------------------------

    def handle(self, request: ConsoleRequest) -> ConsoleResponse:
        """Answer one request (blocking); never raises: a problem is a page saying what went wrong."""
        visit = None
        try:
            response, visit = self._route(request)
        except PageError as e:
            response = page("Not done" if e.status < 500 else "Error", f'<p class="error">{esc(e.message)}</p>', visit)
            response.status = e.status
            if e.status == 429:
                response.headers["Retry-After"] = str(int(self.throttle.window))
        except Exception as e:
            # Ids and the exception's type only: a message of a failed read could hold patient data.
            self._log.failure("console: a {kind} request failed ({error})", kind=request.method, error=type(e).__name__)
            response = page("Error", '<p class="error">Something went wrong; the server log says what.</p>', visit)
            response.status = 500
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        if request.secure:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    def _route(self, request: ConsoleRequest) -> tuple[ConsoleResponse, Visit | None]:
        path = request.path
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if request.method != "GET" or name not in self._static:
                raise PageError(404, "no such file")
            return ConsoleResponse(200, self._static[name], _STATIC[name], {"Cache-Control": "no-cache"}), None
        if path == "/favicon.ico":
            raise PageError(404, "no icon")
        if path == "/login":
            return (self._login_form(request) if request.method == "GET" else self._login(request)), None
        visit = self._visit(request)
        if visit is None:
            if request.method == "GET":
                return ConsoleResponse.redirect("/login?" + _query(next=path if path != "/" else "/messages")), None
            raise PageError(403, "not signed in (or the session has ended): sign in again")
        if request.method == "POST" and not hmac.compare_digest(request.field("csrf"), visit.csrf):
            raise PageError(403, "the form is out of date (its CSRF token does not match): reload the page")
        if path == "/logout" and request.method == "POST":
            self.store.call(end_session, request.cookies[SESSION_COOKIE], iso(self.store.clock()))
            response = ConsoleResponse.redirect("/login")
            response.cookies.append(self._cookie(SESSION_COOKIE, "", 0, request.secure))
            return response, None
        if path == "/" and request.method == "GET":
            return ConsoleResponse.redirect("/messages"), visit
        allowed = False
        for method, pattern, handler, reads in ROUTES:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            allowed = True
            if method != request.method:
                continue
            args = [int(g) for g in m.groups()]
            if request.method == "GET":
                visit.flash = self._take_flash(request)
            if reads:
                with read_transaction(visit.conn):
                    return handler(visit, *args), visit
            return handler(visit, *args), visit
        raise PageError(405 if allowed else 404, "no such page" if not allowed else "not allowed here")

    # -- sessions ----------------------------------------------------------------------------

    def _visit(self, request: ConsoleRequest) -> Visit | None:
        token = request.cookies.get(SESSION_COOKIE, "")
        if not token:
            return None
        conn = self._conn()
        session = session_of(conn, token, self.clock())
        if session is None:
            return None
        user = session["name"]

        def audit(command: str, message_ids=(), **detail) -> None:
            try:
                self.store.record_reads("console", command, list(message_ids), {"by": user, **detail})
            except HeraldError as e:
                raise PageError(
                    503, f"the read could not be recorded in the audit trail, so nothing is shown: {e}"
                ) from None

        def say(text: str) -> None:
            with self._lock:
                self._flash[_token_key(token)] = text

        return Visit(
            request,
            user,
            session["role"],
            session["csrf"],
            conn,
            self.store,
            self.config,
            self._roster,
            audit,
            say,
            self.clock,
        )

    def _take_flash(self, request: ConsoleRequest) -> str:
        with self._lock:
            return self._flash.pop(_token_key(request.cookies.get(SESSION_COOKIE, "")), "")

    def _cookie(self, name: str, value: str, max_age: int, secure: bool, path: str = "/") -> str:
        cookie = f"{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}"
        return cookie + ("; Secure" if secure else "")

    # -- logging in --------------------------------------------------------------------------

    def _login_form(self, request: ConsoleRequest, problem: str = "", status: int = 200) -> ConsoleResponse:
        if not problem and self._visit(request) is not None:
            return ConsoleResponse.redirect(local_path(request.arg("next"), "/messages"))
        # The nonce a browser already holds is kept: a second tab, or a request the browser makes on
        # its own (an icon), must not make the form it already shows go stale.
        held = request.cookies.get(LOGIN_COOKIE, "")
        nonce = held if re.fullmatch(r"[A-Za-z0-9_-]{43}", held) else new_token()
        following = local_path(request.arg("next") or request.field("next"), "/messages")
        error = f'<p class="error" role="alert">{esc(problem)}</p>' if problem else ""
        body = (
            f"{error}"
            '<form method="post" action="/login" class="login">'
            f'<input type="hidden" name="nonce" value="{nonce}">'
            f'<input type="hidden" name="next" value="{esc(following)}">'
            '<label>Name<input type="text" name="name" id="name" autocomplete="username" required autofocus></label>'
            '<label>Password<input type="password" name="password" id="password" autocomplete="current-password" '
            "required></label>"
            '<button type="submit" id="sign-in">Sign in</button></form>'
        )
        response = ConsoleResponse(status, layout("Sign in", body).encode("utf-8"))
        response.cookies.append(self._cookie(LOGIN_COOKIE, nonce, 600, request.secure, "/login"))
        return response

    def _login(self, request: ConsoleRequest) -> ConsoleResponse:
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(request.field("nonce"), nonce):
            return self._login_form(request, "The sign-in form had expired: try again.", 403)
        name, password = request.field("name").strip(), request.field("password")
        client = request.client
        now = iso(self.store.clock())
        wait = self.throttle.wait(name, client)
        if wait > 0:
            self.store.call(record_login, "", now, client, "throttled")
            response = self._login_form(
                request, f"Too many failed sign-ins: try again in {int(wait // 60) + 1} minute(s).", 429
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        record = login_record(self._conn(), name) if name else None
        check = verify_password(record[1] if record else None, password)
        if not check.ok:
            self.throttle.failed(name, client)
            # A name nobody has is not written down: it may be a password typed in the wrong box.
            self.store.call(record_login, name if record else "", now, client, "password" if record else "unknown")
            return self._login_form(request, "Wrong name or password.", 401)
        self.throttle.succeeded(name)
        if check.rehash:
            self.store.call(set_password, name, hash_password(password), now, "")
        token, csrf = new_token(), new_token()
        self.store.call(create_session, token, name, csrf, self.clock(), self.lifetime, now, client)
        response = ConsoleResponse.redirect(local_path(request.field("next"), "/messages"))
        response.cookies.append(self._cookie(SESSION_COOKIE, token, int(self.lifetime), request.secure))
        response.cookies.append(self._cookie(LOGIN_COOKIE, "", 0, request.secure, "/login"))
        return response


def _query(**params: str) -> str:
    return urllib.parse.urlencode(params)
