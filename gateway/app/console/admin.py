"""Admin pages: console users (add, remove) and verifying the audit trail. Analysts get 403.

Users are the same rows ``herald users`` manages; adding or removing one is
audited with the admin who did it.
"""

from __future__ import annotations

from gateway.app.audit import report_lines, verify_trail
from gateway.app.console.auth import check_name, hash_password
from gateway.app.console.exchange import ConsoleResponse, PageError, Visit
from gateway.app.console.html import esc, page, post_button, section, table
from gateway.errors import StoreError
from gateway.store.console import CONSOLE_ROLES, add_user, list_users, remove_user
from gateway.store.schema import iso

__all__ = ["add_user_action", "audit_page", "remove_user_action", "require_admin", "users_page"]


def require_admin(visit: Visit) -> None:
    """Refuse (403) a user who is not an admin."""
    if not visit.admin:
        raise PageError(403, f"{visit.user} is an {visit.role}: this page is for admins")


def users_page(visit: Visit):
    """``GET /admin/users``: every console user, a form to add one, a button to remove one."""
    require_admin(visit)
    rows = [
        [
            esc(u["name"]),
            esc(u["role"]),
            esc(u["created_at"][:19].replace("T", " ")),
            esc(u["updated_at"][:19].replace("T", " ")),
            esc(u["sessions"]),
            ""
            if u["name"] == visit.user
            else post_button(
                visit,
                "/admin/users/remove",
                "Remove",
                {"name": u["name"]},
                confirm=f"Remove {u['name']}? Their sessions end now.",
                cls="danger",
            ),
        ]
        for u in list_users(visit.conn)
    ]
    roles = "".join(f'<option value="{r}">{r}</option>' for r in CONSOLE_ROLES)
    form = (
        '<form method="post" action="/admin/users" class="search">'
        f'<input type="hidden" name="csrf" value="{esc(visit.csrf)}">'
        '<label>Name<input type="text" name="name" required autocomplete="off"></label>'
        f'<label>Role<select name="role">{roles}</select></label>'
        '<label>Password<input type="password" name="password" required autocomplete="new-password"></label>'
        '<label>Again<input type="password" name="again" required autocomplete="new-password"></label>'
        '<button type="submit">Add user</button></form>'
        '<p class="hint">Passwords: at least 12 characters; <code>herald users passwd NAME</code> changes one.</p>'
    )
    body = table(["Name", "Role", "Added (UTC)", "Changed (UTC)", "Sessions", ""], rows, "no users") + section(
        "Add a user", form, "add"
    )
    return page("Console users", body, visit, "/admin/users")


def add_user_action(visit: Visit) -> ConsoleResponse:
    """``POST /admin/users``: add a user (its password hashed with argon2id)."""
    require_admin(visit)
    r = visit.request
    name, role, password = r.field("name").strip(), r.field("role"), r.field("password")
    try:
        check_name(name)
        if role not in CONSOLE_ROLES:
            raise ValueError(f"role: {role!r} is not one of {', '.join(CONSOLE_ROLES)}")
        if password != r.field("again"):
            raise ValueError("password: the two passwords differ")
        hashed = hash_password(password)
        visit.store.call(add_user, name, role, hashed, iso(visit.store.clock()), visit.who)
    except (ValueError, StoreError) as e:
        raise PageError(400, str(e)) from None
    visit.say(f"Added {name} ({role}).")
    return ConsoleResponse.redirect("/admin/users")


def remove_user_action(visit: Visit) -> ConsoleResponse:
    """``POST /admin/users/remove``: remove a user and end their sessions (not oneself)."""
    require_admin(visit)
    name = visit.request.field("name")
    if name == visit.user:
        raise PageError(400, "name: you cannot remove yourself (another admin, or `herald users remove`, can)")
    try:
        visit.store.call(remove_user, name, iso(visit.store.clock()), visit.who)
    except StoreError as e:
        raise PageError(404, str(e)) from None
    visit.say(f"Removed {name}.")
    return ConsoleResponse.redirect("/admin/users")


def audit_page(visit: Visit):
    """``GET /admin/audit`` offers the check; ``POST`` walks the whole trail (as ``herald audit verify``)."""
    require_admin(visit)
    result = ""
    if visit.request.method == "POST":
        report = verify_trail(visit.conn)
        lines = "\n".join(report_lines(report))
        verdict = "intact" if report.intact else "BROKEN"
        result = section(
            f"The trail is {verdict}", f'<pre class="{"ok" if report.intact else "error"}">{esc(lines)}</pre>', "result"
        )
    body = (
        "<p>Walks every event's MAC chain and every message row's digest, as <code>herald audit verify</code> "
        "does (minutes on a large log).</p>" + post_button(visit, "/admin/audit", "Verify the audit trail now") + result
    )
    return page("Audit trail", body, visit, "/admin/audit")
