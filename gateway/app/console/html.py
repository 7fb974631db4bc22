"""HTML for the console's pages: one layout, tables, forms, every value escaped.

Pages build their HTML from these functions and never put a value in a page
unescaped (:func:`esc`). No inline script or style anywhere: the Content
Security Policy allows only the console's own ``/static`` files.
"""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Iterable, Mapping

from gateway.app.console.exchange import ConsoleResponse, Visit

__all__ = [
    "badge",
    "choice",
    "esc",
    "hidden",
    "href",
    "layout",
    "page",
    "post_button",
    "section",
    "table",
    "url",
]

NAV = (
    ("/messages", "Messages"),
    ("/outbox", "Outbox"),
    ("/reviews", "Reviews"),
    ("/roster", "Roster"),
    ("/senders", "Senders"),
)
ADMIN_NAV = (("/admin/users", "Users"), ("/admin/audit", "Audit trail"))


def esc(value: object) -> str:
    """A value as HTML text (None as nothing)."""
    return "" if value is None else html.escape(str(value), quote=True)


def url(path: str, **params: object) -> str:
    """``path`` with the non-empty ``params`` as its query string."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"{path}?{query}" if query else path


def href(path: str, **params: object) -> str:
    """:func:`url`, escaped for an attribute."""
    return esc(url(path, **params))


def choice(link: str, label: str, active: bool) -> str:
    """A link among several (a filter, a menu entry), marked when it is the one shown; ``link`` escaped already."""
    marked = ' class="active"' if active else ""
    return f'<a href="{link}"{marked}>{esc(label)}</a>'


def badge(state: str | None) -> str:
    """A state as a coloured label (the colour from the state's name, in the stylesheet)."""
    return f'<span class="badge state-{esc(state)}">{esc(state)}</span>' if state else ""


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str = "none", cls: str = "") -> str:
    """A table of cells that are HTML already (escape values with :func:`esc` first)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{esc(empty)}</p>'
    klass = f' class="{esc(cls)}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def hidden(fields: Mapping[str, object]) -> str:
    """Hidden inputs (a value that is a list gives one input per item)."""
    out = []
    for name, value in fields.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            out.append(f'<input type="hidden" name="{esc(name)}" value="{esc(item)}">')
    return "".join(out)


def post_button(
    visit: Visit, action: str, label: str, fields: Mapping[str, object] | None = None, confirm: str = "", cls: str = ""
) -> str:
    """A one-button form that POSTs ``fields`` (and the CSRF token) to ``action``; ``confirm`` asks first."""
    asks = f' data-confirm="{esc(confirm)}"' if confirm else ""
    klass = f' class="{esc(cls)}"' if cls else ""
    return (
        f'<form method="post" action="{esc(action)}" class="inline"{asks}>'
        + hidden({"csrf": visit.csrf, **(fields or {})})
        + f'<button type="submit"{klass}>{esc(label)}</button></form>'
    )


def section(title: str, body: str, anchor: str = "") -> str:
    """A titled part of a page."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{body}</section>"


def layout(title: str, body: str, visit: Visit | None = None, active: str = "") -> str:
    """The whole page: the navigation (for a signed-in user), the message left by the last action, the body."""
    nav = ""
    if visit is not None:
        links = list(NAV) + (list(ADMIN_NAV) if visit.admin else [])
        items = "".join(choice(esc(path), name, path == active) for path, name in links)
        logout = (
            '<form method="post" action="/logout" class="inline">'
            + hidden({"csrf": visit.csrf})
            + '<button type="submit" class="link">Log out</button></form>'
        )
        nav = (
            f'<nav><span class="brand">Herald</span>{items}'
            f'<span class="who">{esc(visit.user)} ({esc(visit.role)}) {logout}</span></nav>'
        )
    flash = f'<p class="flash" role="status">{esc(visit.flash)}</p>' if visit is not None and visit.flash else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · Herald</title>"
        '<link rel="stylesheet" href="/static/console.css"><script src="/static/console.js" defer></script>'
        f"</head><body>{nav}<main><h1>{esc(title)}</h1>{flash}{body}</main></body></html>"
    )


def page(title: str, body: str, visit: Visit | None = None, active: str = "", status: int = 200) -> ConsoleResponse:
    """A response of one laid-out page."""
    return ConsoleResponse(status, layout(title, body, visit, active).encode("utf-8"))
