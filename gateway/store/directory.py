"""The recipient directory's table: PCPs, practices, care teams and HIEs, and how to reach each.

An entry is stored whole as JSON (``settings``; checked by
:func:`gateway.delivery.directory.entry_from_dict` before it gets here), with
its id, kind, name, NPI and ACO id as columns to find it by. It names
providers and their endpoints, never a patient. Adding, changing and removing
an entry are audited.
"""

from __future__ import annotations

import json
import sqlite3

from gateway.store.events import append_event
from gateway.store.postgres import table_exists

__all__ = [
    "DIRECTORY_SCHEMA",
    "directory_version",
    "directory_entries",
    "directory_entry",
    "put_directory_entry",
    "remove_directory_entry",
    "roster_pcp_npis",
]

#: The directory's table (herald.db migration 7).
DIRECTORY_SCHEMA = """
CREATE TABLE recipients (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    npi TEXT NOT NULL DEFAULT '',
    aco_id TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE INDEX recipients_kind ON recipients (kind, id)
"""


def put_directory_entry(conn: sqlite3.Connection, entry: dict, now: str, by: str) -> str:
    """Add or replace an entry (in the caller's transaction); returns ``added`` or ``changed``."""
    before = conn.execute("SELECT settings FROM recipients WHERE id = ?", (entry["id"],)).fetchone()
    settings = json.dumps(entry, sort_keys=True)
    if before is not None and before[0] == settings:
        return "unchanged"
    conn.execute(
        "INSERT INTO recipients (id, kind, name, npi, aco_id, settings, created_at, updated_at, updated_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, "
        "name = excluded.name, npi = excluded.npi, aco_id = excluded.aco_id, settings = excluded.settings, "
        "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        (entry["id"], entry["kind"], entry["name"], entry.get("npi", ""), entry.get("aco_id", ""), settings)
        + (now, now, by),
    )
    action = "added" if before is None else "changed"
    channels = [c.get("channel") for c in entry.get("channels", ())]
    append_event(
        conn, now, None, None, "directory", f"recipient-{action}", {"id": entry["id"], "channels": channels, "by": by}
    )
    return action


def remove_directory_entry(conn: sqlite3.Connection, entry_id: str, now: str, by: str) -> bool:
    """Remove an entry; False when there was none. Notifications already queued for it stay queued."""
    removed = conn.execute("DELETE FROM recipients WHERE id = ?", (entry_id,)).rowcount
    if removed:
        append_event(conn, now, None, None, "directory", "recipient-removed", {"id": entry_id, "by": by})
    return bool(removed)


def directory_entries(conn: sqlite3.Connection, kind: str | None = None) -> list[dict]:
    """Every entry (of ``kind``), by id, as stored (the checked dict), with when and by whom it last changed."""
    sql = "SELECT settings, updated_at, updated_by FROM recipients"
    args: tuple = ()
    if kind:
        sql += " WHERE kind = ?"
        args = (kind,)
    out = []
    for row in conn.execute(sql + " ORDER BY id", args):
        entry = json.loads(row[0])
        entry["updated_at"], entry["updated_by"] = row[1], row[2]
        out.append(entry)
    return out


def directory_entry(conn: sqlite3.Connection, entry_id: str) -> dict | None:
    """One entry by id, or None."""
    row = conn.execute("SELECT settings, updated_at, updated_by FROM recipients WHERE id = ?", (entry_id,)).fetchone()
    if row is None:
        return None
    entry = json.loads(row[0])
    entry["updated_at"], entry["updated_by"] = row[1], row[2]
    return entry


def roster_pcp_npis(roster_conn: sqlite3.Connection) -> dict[str, int]:
    """The PCP NPIs the current roster names (members not ended), with how many members each has."""
    rows = roster_conn.execute(
        "SELECT pcp_npi, COUNT(*) FROM roster_members WHERE pcp_npi != '' AND ended_by IS NULL GROUP BY pcp_npi"
    )
    return {npi: n for npi, n in rows}


def directory_version(conn: sqlite3.Connection) -> tuple:
    """What changes whenever the directory does: (entries, newest change)."""
    if not table_exists(conn, "recipients"):
        return (0, "")
    return tuple(conn.execute("SELECT COUNT(*), COALESCE(MAX(updated_at), '') FROM recipients").fetchone())
