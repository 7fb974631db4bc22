"""What a console page is given and what it gives back, free of Twisted: a request, a visit, a response.

The Twisted resource (:mod:`gateway.app.console.service`) turns each HTTP
request into a :class:`ConsoleRequest` on the reactor's thread; the page
runs on one of the console's worker threads and returns a
:class:`ConsoleResponse`, which the reactor writes. Tests call the pages with
these values directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConsoleRequest", "ConsoleResponse", "PageError", "Visit"]


@dataclass(frozen=True)
class ConsoleRequest:
    """One HTTP request as a page reads it: the path and method, the form or query values, the cookies."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    form: dict[str, list[str]] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)
    client: str = "127.0.0.1"
    secure: bool = False

    def arg(self, name: str, default: str = "") -> str:
        """A query value (the first given), stripped; ``default`` when absent."""
        values = self.query.get(name)
        return values[0].strip() if values else default

    def field(self, name: str, default: str = "") -> str:
        """A form value (the first given), as typed (passwords are not stripped)."""
        values = self.form.get(name)
        return values[0] if values else default

    def fields(self, name: str) -> list[str]:
        """Every value of a form field given several times (checkboxes)."""
        return list(self.form.get(name, ()))


@dataclass
class ConsoleResponse:
    """What goes back: a status, an HTML (or other) body, headers and cookies to set."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)

    @classmethod
    def redirect(cls, location: str, status: int = 303) -> ConsoleResponse:
        """A redirect (303 See Other after a form: the browser GETs the page it names)."""
        return cls(status, b"", headers={"Location": location})


class PageError(Exception):
    """A page that cannot be shown as asked: its HTTP status and a message fit for a person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Visit:
    """A signed-in user's request and what a page needs to answer it.

    ``conn`` is the worker thread's read-only connection (PHI opened with the
    key ring); ``store`` the gateway's running store, for writes; ``roster``
    gives the published roster version. ``audit`` records a read of patient
    data before it is shown; ``say`` leaves a message for the next page.
    """

    request: ConsoleRequest
    user: str
    role: str
    csrf: str
    conn: Any
    store: Any
    config: Any
    roster: Callable[[], Any]
    audit: Callable[..., None]
    say: Callable[[str], None]
    now: Callable[[], float]
    flash: str = ""

    @property
    def admin(self) -> bool:
        """Whether the user may manage users and verify the audit trail."""
        return self.role == "admin"

    @property
    def who(self) -> str:
        """How the audit trail names what this user does through the console."""
        return f"console:{self.user}"
