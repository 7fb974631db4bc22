"""Who may use the console: user names, passwords hashed with argon2, random tokens, and a login throttle.

Passwords are hashed with argon2id (``argon2-cffi``'s :class:`~argon2.PasswordHasher`
with its defaults, RFC 9106's low-memory profile: 64 MiB, 3 passes, 4 lanes;
about 0.2 s a hash on this machine). A login for a name nobody has costs the
same as one with a wrong password (a hash is checked either way), so the
answer's time does not say which names exist. Failed logins are counted per
name and per client address over a window; past the limit a login is refused
without checking the password at all until the window has moved on.
"""

from __future__ import annotations

import collections
import re
import secrets
import threading
import time
from collections.abc import Callable
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "LoginThrottle",
    "PasswordCheck",
    "check_name",
    "check_password",
    "hash_password",
    "new_token",
    "verify_password",
]

#: A console user's name: letters, digits and ``. _ @ -``, up to 64 (it appears in the audit trail).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: The shortest password accepted (NIST SP 800-63B asks for at least 8; a console that shows PHI, more).
MIN_PASSWORD = 12
MAX_PASSWORD = 1024

_HASHER = PasswordHasher()


def check_name(name: str) -> str:
    """``name`` if it can be a console user's name; else :class:`ValueError` saying what a name may hold."""
    if not _NAME.fullmatch(name or ""):
        raise ValueError("name: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    return name


def check_password(password: str) -> str:
    """``password`` if it is long enough (and not absurdly long); else :class:`ValueError`."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"password: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"password: at most {MAX_PASSWORD} characters")
    return password


def hash_password(password: str) -> str:
    """The argon2id hash of a password (checked first: :class:`ValueError` when too short)."""
    return _HASHER.hash(check_password(password))


@cache
def _nobody() -> str:
    # A hash to check a login against when there is no such user: the same work as a real check.
    return _HASHER.hash(secrets.token_urlsafe(24))


class PasswordCheck:
    """The result of checking a password: whether it matched, and whether its hash should be made anew."""

    __slots__ = ("ok", "rehash")

    def __init__(self, ok: bool, rehash: bool = False) -> None:
        self.ok = ok
        self.rehash = rehash


def verify_password(stored_hash: str | None, password: str) -> PasswordCheck:
    """Check ``password`` against ``stored_hash`` (None: no such user; the check costs the same)."""
    try:
        _HASHER.verify(stored_hash or _nobody(), password[:MAX_PASSWORD])
    except (VerificationError, InvalidHashError):
        return PasswordCheck(False)
    if stored_hash is None:
        return PasswordCheck(False)
    return PasswordCheck(True, _HASHER.check_needs_rehash(stored_hash))


def new_token() -> str:
    """A random token (256 bits, URL-safe): a session cookie, a CSRF token, a login form's nonce."""
    return secrets.token_urlsafe(32)


class LoginThrottle:
    """Failed logins per user name and per client address in a sliding window; thread-safe.

    A name may fail ``per_name`` times in ``window`` seconds, an address
    ``per_client`` times (several people behind one proxy share an address,
    hence more). ``clock`` gives seconds (injected: tests move it).
    """

    def __init__(
        self,
        per_name: int = 5,
        per_client: int | None = None,
        window: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_name = per_name
        self.per_client = per_client if per_client is not None else 4 * per_name
        self.window = window
        self.clock = clock
        self._failures: dict[tuple[str, str], collections.deque] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> collections.deque:
        times = self._failures.get(key)
        if times is None:
            return collections.deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def wait(self, name: str, client: str) -> float:
        """Seconds until ``name`` from ``client`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            waits = []
            for key, limit in ((("name", name.casefold()), self.per_name), (("client", client), self.per_client)):
                times = self._recent(key, now)
                if len(times) >= limit:
                    waits.append(times[len(times) - limit] + self.window - now)
            return max(waits, default=0.0)

    def failed(self, name: str, client: str) -> None:
        """Count a failed login."""
        now = self.clock()
        with self._lock:
            for key in (("name", name.casefold()), ("client", client)):
                self._recent(key, now)
                self._failures.setdefault(key, collections.deque()).append(now)

    def succeeded(self, name: str) -> None:
        """A good login clears its name's failures (not its address's)."""
        with self._lock:
            self._failures.pop(("name", name.casefold()), None)
