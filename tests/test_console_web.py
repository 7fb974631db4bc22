"""The web console over HTTP: a real gateway (``make_service``, in its own process) with the console on
127.0.0.1 port 0, messages sent over MLLP, and a plain HTTP client holding its cookies.

The gateway's HIE is a local FHIR endpoint that answers 404, so every HIE
notification is a dead letter at once; a possible match opens a review; a
message without a PV1 segment fails in the pipeline (no Bundle).
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_matching_flow import CORNELIUS, DESMOND, HEADER, ROSALIND, ROSALIND_FULL, adt, possible_message

from gateway.app.cli import main
from gateway.store import open_database
from gateway.store.keys import KeyRing

ROOT = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-admin-password-1", "bob": "bob-analyst-password-2"}

#: Starts the gateway as ``herald serve`` does (make_service) and prints its ports, then runs until SIGTERM.
RUNNER = """
import json, sys
from twisted.internet import defer, task
from gateway.app.service import make_service
from gateway.config import load_config

@defer.inlineCallbacks
def run(reactor):
    gw = make_service(load_config(sys.argv[1]), reactor)
    gw.service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", gw.service.stopService)
    yield defer.gatherResults([lst.ready for lst in gw.listeners] + [gw.console.ready])
    print(json.dumps({"mllp": gw.listening_ports()[0], "console": gw.console.port.getHost().port}), flush=True)
    yield defer.Deferred()

task.react(run)
"""


class NotFoundFhir(http.server.BaseHTTPRequestHandler):
    """A FHIR endpoint that knows no $process-message: every notification to it is dead at once (404)."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def without_pv1(raw: bytes) -> bytes:
    """The message less its PV1 segment: the pipeline fails it (no visit to notify about), with no Bundle."""
    return b"\r".join(s for s in raw.split(b"\r") if not s.startswith(b"PV1"))


def send_mllp(port: int, raw: bytes) -> bytes:
    """One message over MLLP on a fresh connection; the ACK's bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"\x0b" + raw + b"\x1c\r")
        data = b""
        while not data.endswith(b"\x1c\r"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


class ConsoleGateway:
    """A data folder, its config, the roster, the users, the running gateway and the messages it was sent."""

    def __init__(self, root: Path, console_listen: str = "tcp:0:interface=127.0.0.1", messages: bool = True) -> None:
        self.root = root
        self.fhir = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFoundFhir)
        threading.Thread(target=self.fhir.serve_forever, daemon=True).start()
        self.config = root / "herald.toml"
        self.config.write_text(
            "[server]\n"
            'listen = ["tcp:0:interface=127.0.0.1"]\n'
            "allow_plain = true\n"
            'data_dir = "data"\n'
            "[pipeline]\nworkers = 0\n"
            "[delivery]\npoll_interval = 0.2\n"
            "[matching]\ncertain = 35.0\nprobable = 24.0\npossible = 14.0\n"
            f'[recipients.hie]\nchannel = "fhir"\nurl = "http://127.0.0.1:{self.fhir.server_address[1]}/fhir"\n'
            "[health]\nenabled = false\n"
            f'[console]\nenabled = true\nlisten = "{console_listen}"\n'
        )
        self.data = root / "data"
        roster = root / "roster.csv"
        roster.write_text("\n".join([HEADER, ROSALIND, DESMOND, CORNELIUS]) + "\n", encoding="utf-8")
        self.cli("roster", "import", roster)
        for name, role in (("alice", "admin"), ("bob", "analyst")):
            self.cli("users", "add", name, "--role", role, "--password-stdin", input=PASSWORDS[name] + "\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(self.config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError("the gateway did not start")
        ports = json.loads(line)
        self.mllp, self.port = ports["mllp"], ports["console"]
        self.ids: dict[str, int] = {}
        if not messages:
            return
        for raw in (
            adt("C-ROUTED", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL),
            possible_message("C-POSS", "E300"),
            without_pv1(adt("C-NOPV1", "E400^^^FLOWHOSP^MR", "PEMBERTON", "ROSALIND", "19500411", "F")),
        ):
            ack = send_mllp(self.mllp, raw)
            assert b"MSA|AA|" in ack, ack
        self.wait_processed()

    def cli(self, *args, input: str | None = None):
        result = CliRunner().invoke(main, [*map(str, args), "--config", str(self.config)], input=input)
        assert result.exit_code == 0, result.output
        return result

    def db(self):
        return open_database(self.data / "herald.db", readonly=True, keys=KeyRing.load(None))

    def wait_processed(self, timeout: float = 60.0) -> None:
        """Until every message is processed and every notification has had its first attempt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = self.db()
            try:
                states = dict(conn.execute("SELECT control_id, state FROM messages").fetchall())
                waiting = conn.execute("SELECT COUNT(*) FROM notifications WHERE state = 'pending'").fetchone()[0]
                self.ids = dict(conn.execute("SELECT control_id, id FROM messages").fetchall())
            finally:
                conn.close()
            if len(states) == 3 and "received" not in states.values() and waiting == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"not processed in {timeout} s: {states}")

    def events(self, kind: str) -> list[dict]:
        conn = self.db()
        try:
            rows = conn.execute("SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,)).fetchall()
            return [dict(r) | {"detail": json.loads(r["detail"] or "{}"), "mac": None} for r in rows]
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.fhir.shutdown()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """One running gateway with the console for the module's tests (its messages processed)."""
    gw = ConsoleGateway(tmp_path_factory.mktemp("console"))
    yield gw
    gw.stop()


class Browser:
    """An HTTP client that keeps cookies and does not follow redirects (so each answer can be checked)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, fields: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())} if self.cookies else {}
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields, doseq=True)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        text = response.read().decode("utf-8")
        for header in response.headers.get_all("Set-Cookie") or ():
            name, _, rest = header.partition("=")
            value = rest.split(";")[0]
            if "Max-Age=0" in header:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        conn.close()
        return response, text

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, fields: dict):
        return self.request("POST", path, fields)

    def login(self, name: str, password: str):
        _, form = self.get("/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form).group(1)
        return self.post("/login", {"nonce": nonce, "name": name, "password": password, "next": "/messages"})

    def csrf(self, path: str = "/messages") -> str:
        _, text = self.get(path)
        return re.search(r'name="csrf" value="([^"]+)"', text).group(1)


def signed_in(gateway, name: str) -> Browser:
    browser = Browser(gateway.port)
    response, _ = browser.login(name, PASSWORDS[name])
    assert response.status == 303, response.status
    return browser


def test_a_page_without_a_session_sends_the_browser_to_sign_in(gateway):
    """Every page but the sign-in form needs a session: a GET is sent to /login, a POST refused."""
    browser = Browser(gateway.port)
    response, _ = browser.get("/messages/1")
    assert response.status == 303
    assert response.headers["Location"] == "/login?next=%2Fmessages%2F1"
    response, _ = browser.post("/notifications/retry", {"all_dead": "1"})
    assert response.status == 403


def test_signing_in_sets_a_private_session_cookie_and_strict_headers(gateway):
    """The session cookie is HttpOnly and SameSite=Strict; pages forbid inline script, framing and caching."""
    browser = Browser(gateway.port)
    response, _ = browser.login("alice", PASSWORDS["alice"])
    assert response.status == 303 and response.headers["Location"] == "/messages"
    cookie = [c for c in response.headers.get_all("Set-Cookie") if c.startswith("herald_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback in this test; over tls: it is Secure
    response, text = browser.get("/messages")
    assert response.status == 200 and "alice (admin)" in text
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert response.headers["Cache-Control"] == "no-store" and response.headers["X-Frame-Options"] == "DENY"
    login = [e for e in gateway.events("console-login") if e["detail"]["by"] == "alice"]
    assert login and login[-1]["actor"] == "console" and login[-1]["detail"]["client"] == "127.0.0.1"


def test_a_wrong_password_is_refused_and_audited_without_a_session(gateway):
    """A wrong password gets 401 and no session; the refusal is in the audit trail (the password is not)."""
    browser = Browser(gateway.port)
    response, text = browser.login("bob", "not-bobs-password")
    assert response.status == 401 and "Wrong name or password" in text
    assert "herald_session" not in browser.cookies
    refused = gateway.events("console-login-refused")
    assert refused[-1]["detail"]["name"] == "bob" and refused[-1]["detail"]["reason"] == "password"
    assert "not-bobs-password" not in json.dumps(refused)


def test_a_login_form_without_its_nonce_is_refused(gateway):
    """The sign-in POST must carry the nonce its form was served with (a cross-site login is refused)."""
    browser = Browser(gateway.port)
    response, _ = browser.post("/login", {"name": "alice", "password": PASSWORDS["alice"], "nonce": "forged"})
    assert response.status == 403 and "herald_session" not in browser.cookies


def test_repeated_failures_for_one_name_are_throttled(gateway):
    """After [console] login_attempts failures a name is refused with 429, even with the right password."""
    browser = Browser(gateway.port)
    for _ in range(5):
        response, _ = browser.login("alice", "wrong-password-guess")
        assert response.status == 401
    response, text = browser.login("alice", "wrong-password-guess")
    assert response.status == 429 and "Too many failed sign-ins" in text and int(response.headers["Retry-After"]) > 0
    response, _ = browser.login("alice", PASSWORDS["alice"])
    assert response.status == 429, "the right password does not lift the throttle early"
    assert gateway.events("console-login-refused")[-1]["detail"]["reason"] == "throttled"


def test_a_post_without_the_session_s_csrf_token_is_refused(gateway):
    """Every POST carries the session's CSRF token; without it nothing is done (403)."""
    browser = signed_in(gateway, "bob")
    dead = gateway.events("dead-letter")
    response, text = browser.post("/notifications/retry", {"ids": dead[0]["notification_id"], "csrf": "forged"})
    assert response.status == 403 and "CSRF" in text
    assert not [e for e in gateway.events("requeued") if e["detail"]["by"] == "console:bob"]


def test_search_by_mrn_finds_the_message_and_the_search_is_audited(gateway):
    """An MRN typed in any case finds its message through the blind index; the search is a PHI read, audited."""
    browser = signed_in(gateway, "bob")
    response, text = browser.get("/messages?mrn=e100")
    assert response.status == 200
    routed = gateway.ids["C-ROUTED"]
    assert f'href="/messages/{routed}"' in text and "C-ROUTED" in text
    assert "C-POSS" not in text and "C-NOPV1" not in text
    read = [e for e in gateway.events("phi-read") if e["detail"].get("command") == "message search"]
    assert read[-1]["actor"] == "console" and read[-1]["detail"]["by"] == "bob"
    assert read[-1]["message_id"] == routed and read[-1]["detail"]["kinds"] == ["mrn"]
    # Not in any log: the MRN searched for.
    assert "E100" not in json.dumps(read)


def test_a_message_the_pipeline_failed_is_found_by_its_patient_from_the_raw_v2(gateway):
    """A message with no Bundle (failed: no PV1) is indexed from its stored v2, so its MRN finds it."""
    browser = signed_in(gateway, "bob")
    _, text = browser.get("/messages?mrn=E400&family=pemberton")
    assert "C-NOPV1" in text and 'class="badge state-failed"' in text and "no PV1 segment" in text


def test_search_by_name_and_state_and_a_bad_field_named(gateway):
    """Family name and state narrow the search; a bad date is refused naming the field."""
    browser = signed_in(gateway, "bob")
    _, text = browser.get("/messages?family=Pembertin&state=review")
    assert "C-POSS" in text and "C-ROUTED" not in text
    response, text = browser.get("/messages?since=yesterday")
    assert response.status == 400 and "since: not a date" in text


def test_the_message_page_shows_named_fields_the_fhir_and_the_match_and_is_audited(gateway):
    """Raw v2 with hl7apy's field names, the Bundle, the match's field weights, notifications; the view audited."""
    browser = signed_in(gateway, "bob")
    message_id = gateway.ids["C-ROUTED"]
    response, text = browser.get(f"/messages/{message_id}")
    assert response.status == 200
    assert 'title="PID-5 Patient name (XPN)"' in text and "PID-5</td><td>Patient name (XPN)" in text
    assert "PEMBERTON^ROSALIND" in text
    assert "&quot;resourceType&quot;: &quot;Bundle&quot;" in text
    assert "Field weights" in text and "birth_date" in text
    assert "Resend" in text  # the HIE's notification is dead (404)
    read = [e for e in gateway.events("phi-read") if e["detail"].get("command") == "message page"]
    assert read[-1]["message_id"] == message_id and read[-1]["detail"]["by"] == "bob"


def test_an_analyst_is_refused_the_admin_pages(gateway):
    """Users and the audit check are for admins: an analyst gets 403, an admin the page."""
    analyst = signed_in(gateway, "bob")
    for path in ("/admin/users", "/admin/audit"):
        response, text = analyst.get(path)
        assert response.status == 403 and "for admins" in text
    response, _ = analyst.post("/admin/users", {"csrf": analyst.csrf(), "name": "eve", "role": "admin"})
    assert response.status == 403
    _, users = signed_in_admin(gateway).get("/admin/users")
    assert "bob" in users and "analyst" in users


def signed_in_admin(gateway) -> Browser:
    """An admin session that does not depend on alice's throttle (another admin, added once)."""
    if "carol" not in PASSWORDS:
        PASSWORDS["carol"] = "carol-admin-password-3"
        gateway.cli("users", "add", "carol", "--role", "admin", "--password-stdin", input=PASSWORDS["carol"] + "\n")
    return signed_in(gateway, "carol")


def test_retrying_a_dead_letter_requeues_it_in_the_console_user_s_name(gateway):
    """Retry on a dead letter makes it due again (the server tries it at once); the event names the user."""
    browser = signed_in(gateway, "bob")
    _, outbox = browser.get("/outbox?state=dead")
    dead = [e["notification_id"] for e in gateway.events("dead-letter")]
    assert dead[0][:8] in outbox
    csrf = re.search(r'name="csrf" value="([^"]+)"', outbox).group(1)
    response, _ = browser.post("/notifications/retry", {"csrf": csrf, "ids": dead[0], "back": "/outbox?state=dead"})
    assert response.status == 303 and response.headers["Location"] == "/outbox?state=dead"
    _, after = browser.get("/outbox?state=dead")
    assert "Requeued 1 notification(s)" in after
    requeued = [e for e in gateway.events("requeued") if e["notification_id"] == dead[0]]
    assert requeued and requeued[-1]["detail"]["by"] == "console:bob"


def test_a_redirect_after_an_action_stays_on_this_console(gateway):
    """The ``back`` of a form is followed only when it is a path here (no open redirect)."""
    browser = signed_in(gateway, "bob")
    csrf = browser.csrf()
    response, _ = browser.post("/notifications/cancel", {"csrf": csrf, "ids": "no-such-id", "back": "//evil.example/x"})
    assert response.headers["Location"] == "/outbox"


def test_accepting_a_review_routes_the_held_notifications(gateway):
    """Accept on a candidate decides the review as `herald review accept` does, by the console user."""
    browser = signed_in(gateway, "bob")
    _, reviews = browser.get("/reviews")
    assert "PEMBERTIN" in reviews and "Accept this member" in reviews and "F-1" in reviews
    review_id = re.search(r'action="/reviews/(\d+)/accept"', reviews).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', reviews).group(1)
    response, _ = browser.post(f"/reviews/{review_id}/accept", {"csrf": csrf, "member_id": "F-1", "aco_id": "ACO-FLOW"})
    assert response.status == 303
    _, page = browser.get(response.headers["Location"])
    assert f"Review {review_id} accepted" in page and "pcp, care_team" in page
    accepted = gateway.events("review-accepted")
    assert accepted[-1]["detail"]["by"] == "console:bob" and accepted[-1]["detail"]["member"] == "F-1"
    read = [e for e in gateway.events("phi-read") if e["detail"].get("command") == "review list"]
    assert read and read[-1]["detail"]["by"] == "bob"


def test_the_roster_finds_a_member_by_name_and_shows_who_matched(gateway):
    """A name search runs the matcher over the roster; the member page lists the messages matched to them."""
    browser = signed_in(gateway, "bob")
    _, found = browser.get("/roster?family=Pemberton&given=Rosalind&birth=1950-04-11")
    assert "F-1" in found and "Rosalind" in found
    _, member = browser.get("/roster/member?aco=ACO-FLOW&id=F-1")
    assert "Messages matched to this member" in member
    assert f'href="/messages/{gateway.ids["C-ROUTED"]}"' in member
    read = [e for e in gateway.events("phi-read") if e["detail"].get("command") == "roster member"]
    assert read[-1]["detail"]["member"] == "F-1"


def test_the_senders_page_counts_each_sender_and_charts_the_hours(gateway):
    """Per sender: messages, refusals, error rate; the chart is an inline SVG of the last 48 hours."""
    browser = signed_in(gateway, "bob")
    response, text = browser.get("/senders?window=1d")
    assert response.status == 200
    assert "FLOWEHR|FLOWHOSP" in text and "33.3%" in text  # 1 of 3 failed
    assert "<svg" in text and "messages, 1 refused or failed" in text


def test_logging_out_ends_the_session(gateway):
    """Log out forgets the session: its cookie opens nothing afterwards."""
    browser = signed_in(gateway, "bob")
    token = browser.cookies["herald_session"]
    response, _ = browser.post("/logout", {"csrf": browser.csrf()})
    assert response.status == 303 and "herald_session" not in browser.cookies
    browser.cookies["herald_session"] = token
    response, _ = browser.get("/messages")
    assert response.status == 303 and response.headers["Location"].startswith("/login")


def test_removing_a_user_ends_their_sessions(gateway):
    """`herald users remove` takes effect at once in the running console."""
    PASSWORDS["dave"] = "dave-analyst-password-4"
    gateway.cli("users", "add", "dave", "--role", "analyst", "--password-stdin", input=PASSWORDS["dave"] + "\n")
    browser = signed_in(gateway, "dave")
    assert browser.get("/messages")[0].status == 200
    gateway.cli("users", "remove", "dave")
    assert browser.get("/messages")[0].status == 303


def test_static_files_are_served_and_nothing_else_is(gateway):
    """The stylesheet and script are served to anyone; an unknown path is 404 to a signed-in user."""
    browser = Browser(gateway.port)
    response, text = browser.get("/static/console.js")
    assert response.status == 200 and "data-confirm" in text
    assert response.headers["Content-Type"].startswith("text/javascript")
    response, _ = signed_in(gateway, "bob").get("/nowhere")
    assert response.status == 404


def test_over_tls_the_console_serves_https_and_its_cookie_is_secure(tmp_path):
    """A tls: console listener serves HTTPS with the [tls] server certificate; cookies are Secure, HSTS is set."""
    import ssl

    from gateway.app.certs import make_dev_certs

    certs = make_dev_certs(tmp_path / "data" / "certs", days=1)
    gw = ConsoleGateway(tmp_path, console_listen="tls:0:interface=127.0.0.1", messages=False)
    try:
        context = ssl.create_default_context(cafile=str(certs.ca))
        conn = http.client.HTTPSConnection("localhost", gw.port, context=context, timeout=30)
        conn.request("GET", "/login")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("herald_login=") and "; Secure" in cookie and "HttpOnly" in cookie
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/login")
            plain.getresponse().read()
    finally:
        gw.stop()


def test_the_access_log_leaves_out_query_strings():
    """The console's access log names the method, path and status: a search's MRN (its query) is not logged."""
    from twisted.logger import globalLogPublisher

    from gateway.app.console.service import ConsoleSite

    class Request:
        method = b"GET"
        path = b"/messages"
        uri = b"/messages?mrn=E100"
        code = 200

    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        ConsoleSite.log(ConsoleSite.__new__(ConsoleSite), Request())
    finally:
        globalLogPublisher.removeObserver(logged.append)
    mine = [e for e in logged if e.get("log_format", "").startswith("console ")]
    assert mine and mine[0]["path"] == "/messages"
    assert "E100" not in repr([{k: v for k, v in e.items() if k != "log_logger"} for e in mine])
