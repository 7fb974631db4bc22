"""The console's request handling without HTTP (ConsoleApp.handle over a running store), where time matters:
sessions end after their lifetime and the sign-in throttle lifts after its window, on injected clocks.
And the password rules and hashing the console and `herald users` share."""

from __future__ import annotations

import re

import pytest

from gateway.app.console.app import LOGIN_COOKIE, SESSION_COOKIE, ConsoleApp
from gateway.app.console.auth import LoginThrottle, check_name, hash_password, verify_password
from gateway.app.console.exchange import ConsoleRequest
from gateway.app.operations import opened_store
from gateway.config import load_config
from gateway.store.console import add_user
from gateway.store.keys import KeyRing

PASSWORD = "a-long-enough-password"


class Clock:
    """Seconds that a test moves."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def console(tmp_path):
    """A ConsoleApp over a running store with one analyst, its wall clock and its throttle's clock injected."""
    path = tmp_path / "herald.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[console]\nsession_hours = 1\nlogin_attempts = 2\n')
    config = load_config(path)
    keys = KeyRing.load(None)
    clock = Clock()
    with opened_store(config.database, keys=keys) as store:
        store.call(add_user, "ann", "analyst", hash_password(PASSWORD), "2026-11-20T08:00:00.000+00:00", "tests")
        app = ConsoleApp(config, store, keys, clock=clock, throttle=LoginThrottle(2, clock=clock))
        yield app, clock
        app.close()


def sign_in(app: ConsoleApp, password: str = PASSWORD, client: str = "10.0.0.7"):
    form_page = app.handle(ConsoleRequest("GET", "/login"))
    nonce = re.search(rb'name="nonce" value="([^"]+)"', form_page.body).group(1).decode()
    form = {"nonce": [nonce], "name": ["ann"], "password": [password], "next": ["/senders"]}
    return app.handle(ConsoleRequest("POST", "/login", form=form, cookies={LOGIN_COOKIE: nonce}, client=client))


def session_of(response) -> dict[str, str]:
    cookie = [c for c in response.cookies if c.startswith(SESSION_COOKIE + "=")][0]
    return {SESSION_COOKIE: cookie.split(";")[0].split("=", 1)[1]}


def test_a_session_ends_after_its_lifetime(console):
    """[console] session_hours: a page opens within the hour and sends the browser to sign in after it."""
    app, clock = console
    signed = sign_in(app)
    assert signed.status == 303 and signed.headers["Location"] == "/senders"
    assert "Max-Age=3600" in signed.cookies[0]
    cookies = session_of(signed)
    assert app.handle(ConsoleRequest("GET", "/senders", cookies=cookies)).status == 200
    clock.now += 3599
    assert app.handle(ConsoleRequest("GET", "/senders", cookies=cookies)).status == 200
    clock.now += 1
    ended = app.handle(ConsoleRequest("GET", "/senders", cookies=cookies))
    assert ended.status == 303 and ended.headers["Location"] == "/login?next=%2Fsenders"


def test_the_throttle_lifts_when_its_window_has_passed(console):
    """At login_attempts failures in 15 minutes a name is refused (429) until the oldest leaves the window."""
    app, clock = console
    assert sign_in(app, "wrong-password-1").status == 401
    clock.now += 60
    assert sign_in(app, "wrong-password-2").status == 401
    throttled = sign_in(app)
    assert throttled.status == 429 and throttled.headers["Retry-After"] == str(900 - 60 + 1)
    clock.now += 900 - 60 - 1
    assert sign_in(app).status == 429, "one second early"
    clock.now += 1  # the first failure leaves the window: one failure in 15 minutes, under the limit
    assert sign_in(app).status == 303


def test_a_client_address_is_throttled_across_names():
    """One address trying many names is held back too (4 times the per-name limit by default)."""
    clock = Clock()
    throttle = LoginThrottle(2, clock=clock)
    for n in range(8):
        assert throttle.wait(f"name{n}", "10.0.0.9") == 0
        throttle.failed(f"name{n}", "10.0.0.9")
    assert throttle.wait("someone-else", "10.0.0.9") == 900
    assert throttle.wait("someone-else", "10.0.0.10") == 0
    throttle.succeeded("name7")
    assert throttle.wait("name7", "10.0.0.11") == 0, "a good sign-in clears its name"


def test_passwords_are_argon2id_hashes_checked_in_constant_work():
    """A hash is argon2id and salted; a wrong password or an unknown user is refused the same way."""
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first.startswith("$argon2id$") and first != second
    assert verify_password(first, PASSWORD).ok
    assert not verify_password(first, PASSWORD + "x").ok
    assert not verify_password(None, PASSWORD).ok
    assert not verify_password("not a hash", PASSWORD).ok
    with pytest.raises(ValueError, match="password: at least 12 characters"):
        hash_password("short")
    with pytest.raises(ValueError, match="name: "):
        check_name("has space")
