"""Care transitions at rest: each member's episode events, the episodes they fold into, the worklist.

Three tables (schema version 8):

- ``episode_events``: what one routed message said about its member's visit
  (:class:`gateway.records.MessageOutcome` ``episode``), written in the
  transaction that applies the message's outcome (:func:`record_episode_event`),
  sealed; ``folded_at`` is set once the transitions service has folded it;
- ``episodes``: one row per facility and visit number (found by its keyed
  hash, :func:`~gateway.store.sealing.episode_key`), the folded state sealed;
  setting, status and whether it is a SNF stay stay readable (the service
  looks for open ED visits, the SNF report for SNF stays);
- ``tasks``: the follow-up worklist, one FHIR ``Task`` a row (sealed), with
  its member, code and status readable.

The logic (folding, flags, which tasks, the alert) is not here: the service
(:mod:`gateway.app.transitions_service`) reads with :func:`member_state` and
:func:`unfolded_events`, decides with the stages of :mod:`gateway.transitions`,
and writes what it decided with :func:`apply_transitions` in one transaction.
Every function takes a connection and runs in its caller's transaction.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from gateway.records import MessageOutcome, Notification
from gateway.store.events import append_event
from gateway.store.outbox import insert_notification
from gateway.store.sealing import (
    episode_event_context,
    episode_key,
    episode_state_context,
    keys_of,
    message_context,
    task_context,
)

__all__ = [
    "FlagsOf",
    "alert_source",
    "apply_transitions",
    "complete_task",
    "episodes_of",
    "member_acos",
    "member_events",
    "member_state",
    "open_episodes",
    "record_episode_event",
    "snf_episodes",
    "task_rows",
    "unfolded_events",
]

#: What the layer above hands the writer's connection (``Store.use_episode_flags``): the flags of a
#: new episode event given the member's events so far (plain dicts, as ``MessageOutcome.episode``).
FlagsOf = Callable[[list[dict], dict], list[str]]

#: A task still to be done.
OPEN_TASK = "requested"


def record_episode_event(conn: sqlite3.Connection, o: MessageOutcome, now: str) -> list[Notification]:
    """Store ``o``'s episode event (sealed) and return its notifications, each member one with the flags.

    Called by :func:`gateway.store.messages.apply_outcomes` in the outcome's own
    transaction, so the event exists exactly when the outcome does. When the
    connection carries a flag function (``Store.use_episode_flags``), the flags
    of this event (a readmission, the third ED visit in 60 days, ...) are added
    to the attribution of the notifications to the member's PCP and care team
    (the HIE's are left as they are), with a ``flagged`` audit event.
    """
    event = o.episode
    if event is None:
        return list(o.notifications)
    keys = keys_of(conn)
    aco_id, member_id = str(event.get("aco_id", "")), str(event.get("member_id", ""))
    conn.execute(
        "INSERT INTO episode_events (message_id, aco_id, member_id, episode_key, event, recorded_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            o.message_id,
            aco_id,
            member_id,
            episode_key(keys, str(event.get("facility", "")), str(event.get("visit", ""))),
            keys.seal_text(json.dumps(event, sort_keys=True), episode_event_context(o.message_id)),
            now,
        ),
    )
    flags_of: FlagsOf | None = getattr(conn, "episode_flags", None)
    if flags_of is None:
        return list(o.notifications)
    flags = flags_of(member_events(conn, aco_id, member_id), event)
    if not flags:
        return list(o.notifications)
    append_event(conn, now, o.message_id, None, "transitions", "flagged", {"flags": list(flags)})
    return [
        dataclasses.replace(n, attribution={**n.attribution, "flags": list(flags)})
        if n.attribution is not None and n.recipient_role != "hie"
        else n
        for n in o.notifications
    ]


def _open_event(conn: sqlite3.Connection, row: sqlite3.Row) -> dict:
    opened = keys_of(conn).open_text(row["event"], episode_event_context(row["message_id"]))
    return json.loads(opened)


def member_events(conn: sqlite3.Connection, aco_id: str, member_id: str) -> list[dict]:
    """Every episode event of one member (opened), in message order."""
    rows = conn.execute(
        "SELECT message_id, event FROM episode_events WHERE aco_id = ? AND member_id = ? ORDER BY message_id",
        (aco_id, member_id),
    ).fetchall()
    return [_open_event(conn, r) for r in rows]


def unfolded_events(conn: sqlite3.Connection, limit: int) -> list[dict]:
    """Up to ``limit`` episode events not yet folded, oldest message first, each ``{message_id, aco_id,
    member_id, event}``."""
    rows = conn.execute(
        "SELECT message_id, aco_id, member_id, event FROM episode_events WHERE folded_at IS NULL "
        "ORDER BY message_id LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        {
            "message_id": r["message_id"],
            "aco_id": r["aco_id"],
            "member_id": r["member_id"],
            "event": _open_event(conn, r),
        }
        for r in rows
    ]


def _open_episode(conn: sqlite3.Connection, row: sqlite3.Row) -> dict:
    state = json.loads(keys_of(conn).open_text(row["state"], episode_state_context(row["episode_key"])))
    return {"id": row["id"], "aco_id": row["aco_id"], "member_id": row["member_id"], "state": state}


def _open_task(conn: sqlite3.Connection, row: sqlite3.Row) -> dict:
    item = dict(row)
    item["resource"] = json.loads(keys_of(conn).open_text(row["resource"], task_context(row["id"])))
    return item


def member_state(conn: sqlite3.Connection, members: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """For each ``(aco_id, member_id)``: its ``events`` (every one, opened), ``episodes`` (stored states)
    and open ``tasks`` (rows with the Task opened): what the service folds and decides from."""
    out = {}
    for aco_id, member_id in dict.fromkeys(members):
        episodes = conn.execute(
            "SELECT id, episode_key, aco_id, member_id, state FROM episodes WHERE aco_id = ? AND member_id = ?",
            (aco_id, member_id),
        ).fetchall()
        tasks = conn.execute(
            "SELECT * FROM tasks WHERE aco_id = ? AND member_id = ? AND status = ?",
            (aco_id, member_id, OPEN_TASK),
        ).fetchall()
        out[(aco_id, member_id)] = {
            "events": member_events(conn, aco_id, member_id),
            "episodes": [_open_episode(conn, r) for r in episodes],
            "tasks": [_open_task(conn, r) for r in tasks],
        }
    return out


def open_episodes(conn: sqlite3.Connection, setting: str) -> list[dict]:
    """Open episodes of one setting (``ed``: visits a sweep may close for want of an A03), opened."""
    rows = conn.execute(
        "SELECT id, episode_key, aco_id, member_id, state FROM episodes WHERE status = 'open' AND setting = ?",
        (setting,),
    ).fetchall()
    return [_open_episode(conn, r) for r in rows]


def episodes_of(conn: sqlite3.Connection, aco_id: str, member_id: str) -> list[dict]:
    """One member's episodes (opened), for the timeline."""
    rows = conn.execute(
        "SELECT id, episode_key, aco_id, member_id, state FROM episodes WHERE aco_id = ? AND member_id = ? ORDER BY id",
        (aco_id, member_id),
    ).fetchall()
    return [_open_episode(conn, r) for r in rows]


def member_acos(conn: sqlite3.Connection, member_id: str) -> list[str]:
    """The ACOs with episodes of a member id (a member id may be on several ACOs' rosters)."""
    rows = conn.execute(
        "SELECT DISTINCT aco_id FROM episodes WHERE member_id = ? ORDER BY aco_id", (member_id,)
    ).fetchall()
    return [r[0] for r in rows]


def snf_episodes(conn: sqlite3.Connection, aco_id: str | None = None) -> list[dict]:
    """What the SNF report reads: every episode (opened) of each member with a SNF stay or a discharge to one.

    Selected by the readable ``snf`` column first, so only those members' episodes are opened.
    """
    where, args = "", []
    if aco_id:
        where, args = " AND aco_id = ?", [aco_id]
    members = conn.execute(f"SELECT DISTINCT aco_id, member_id FROM episodes WHERE snf = 1{where}", args).fetchall()
    out = []
    for aco, member in members:
        out.extend(episodes_of(conn, aco, member))
    return out


def task_rows(
    conn: sqlite3.Connection,
    statuses: Iterable[str] | None = (OPEN_TASK,),
    aco_id: str | None = None,
    member: tuple[str, str] | None = None,
) -> list[dict]:
    """Tasks (rows with the FHIR Task opened as ``resource``) of these statuses (None: all), oldest first."""
    sql, where, args = "SELECT * FROM tasks", [], []
    if statuses is not None:
        wanted = list(statuses)
        where.append(f"status IN ({','.join('?' * len(wanted))})")
        args += wanted
    if aco_id:
        where.append("aco_id = ?")
        args.append(aco_id)
    if member:
        where.append("aco_id = ? AND member_id = ?")
        args += list(member)
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " ORDER BY created_at, id", args).fetchall()
    return [_open_task(conn, r) for r in rows]


def _update_task(conn: sqlite3.Connection, task_id: str, resource: dict, status: str, now: str, by: str) -> bool:
    """Set a still-open task's status and Task (sealed again); False when it was no longer open."""
    sealed = keys_of(conn).seal_text(json.dumps(resource, sort_keys=True), task_context(task_id))
    cur = conn.execute(
        "UPDATE tasks SET status = ?, resource = ?, updated_at = ?, closed_by = ? WHERE id = ? AND status = ?",
        (status, sealed, now, by, task_id, OPEN_TASK),
    )
    return cur.rowcount == 1


def complete_task(conn: sqlite3.Connection, task_id: str, by: str, now: str) -> str | None:
    """Mark an open task done (the Task ``completed``), audited; returns its status before (None: no such task).

    A task already done or cancelled is left as it is (its status is returned).
    """
    row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        return None
    if row["status"] != OPEN_TASK:
        return row["status"]
    task = _open_task(conn, row)["resource"]
    task = {**task, "status": "completed", "lastModified": now}
    _update_task(conn, task_id, task, "completed", now, by)
    detail = {"task": task_id, "code": row["code"], "aco": row["aco_id"], "member": row["member_id"], "by": by}
    append_event(conn, now, row["message_id"], None, "cli", "task-done", detail)
    return OPEN_TASK


def alert_source(conn: sqlite3.Connection, message_id: int) -> dict | None:
    """What the ED e-alert is bound to: the message as received (opened), its charset and MSH-3/MSH-4."""
    row = conn.execute(
        "SELECT id, raw, charset, sending_application, sending_facility FROM messages WHERE id = ?", (message_id,)
    ).fetchone()
    if row is None or row["raw"] is None:
        return None
    return {
        "raw": keys_of(conn).open(row["raw"], message_context("raw", message_id)),
        "charset": row["charset"] or "",
        "sending_application": row["sending_application"] or "",
        "sending_facility": row["sending_facility"] or "",
    }


def apply_transitions(conn: sqlite3.Connection, change: dict[str, Any], now: str, due: float) -> dict[str, int]:
    """Write what the transitions service decided, in one transaction; returns counts of what changed.

    ``change`` holds (each optional):

    - ``episodes``: ``{aco_id, member_id, setting, status, snf, state}``, ``state`` the episode as
      plain data (its ``facility`` and ``visit`` give the key): inserted or replaced;
    - ``tasks``: new tasks ``{id, aco_id, member_id, code, facility, visit, message_id, resource}``
      (one that exists already is left alone: processing an event again makes the same task);
    - ``closed_tasks``: ``{id, status, resource, message_id}``: applied only to a task still open;
    - ``notifications``: outbox rows (ED e-alerts); one whose id exists already is left alone;
    - ``events``: ``(message_id, kind, detail)`` audit events;
    - ``folded``: the message ids whose episode events are now folded.
    """
    keys = keys_of(conn)
    counts = {"episodes": 0, "tasks": 0, "closed_tasks": 0, "notifications": 0}
    for ep in change.get("episodes", ()):
        state = ep["state"]
        key = episode_key(keys, state["facility"], state["visit"])
        sealed = keys.seal_text(json.dumps(state, sort_keys=True), episode_state_context(key))
        conn.execute(
            "INSERT INTO episodes (episode_key, aco_id, member_id, setting, status, snf, state, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (episode_key) DO UPDATE SET aco_id = excluded.aco_id, "
            "member_id = excluded.member_id, setting = excluded.setting, status = excluded.status, "
            "snf = excluded.snf, state = excluded.state, updated_at = excluded.updated_at",
            (key, ep["aco_id"], ep["member_id"], ep["setting"], ep["status"], int(bool(ep["snf"])), sealed, now),
        )
        counts["episodes"] += 1
    for t in change.get("tasks", ()):
        sealed = keys.seal_text(json.dumps(t["resource"], sort_keys=True), task_context(t["id"]))
        cur = conn.execute(
            "INSERT OR IGNORE INTO tasks (id, aco_id, member_id, code, episode_key, message_id, status, resource, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                t["id"],
                t["aco_id"],
                t["member_id"],
                t["code"],
                episode_key(keys, t["facility"], t["visit"]),
                t["message_id"],
                t["resource"].get("status", OPEN_TASK),
                sealed,
                now,
                now,
            ),
        )
        if cur.rowcount:
            counts["tasks"] += 1
            detail = {"task": t["id"], "code": t["code"], "aco": t["aco_id"], "member": t["member_id"]}
            append_event(conn, now, t["message_id"], None, "transitions", "task-created", detail)
    for t in change.get("closed_tasks", ()):
        if _update_task(conn, t["id"], t["resource"], t["status"], now, "transitions"):
            counts["closed_tasks"] += 1
            reason = (t["resource"].get("statusReason") or {}).get("text", "")
            detail = {"task": t["id"], "status": t["status"], "reason": reason}
            append_event(conn, now, t.get("message_id"), None, "transitions", "task-closed", detail)
    for n in change.get("notifications", ()):
        if conn.execute("SELECT 1 FROM notifications WHERE id = ?", (n.id,)).fetchone() is None:
            insert_notification(conn, n, now, due)
            counts["notifications"] += 1
    for message_id, kind, detail in change.get("events", ()):
        append_event(conn, now, message_id, None, "transitions", kind, detail)
    folded = list(change.get("folded", ()))
    for i in range(0, len(folded), 500):
        part = folded[i : i + 500]
        conn.execute(
            f"UPDATE episode_events SET folded_at = ? WHERE message_id IN ({','.join('?' * len(part))})", [now, *part]
        )
    return counts
