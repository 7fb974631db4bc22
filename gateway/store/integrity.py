"""Tamper evidence: each message row's digest, and the walk that checks the whole trail.

A message row is stamped at insert with a *digest*: an HMAC-SHA256 (the key
ring's chain key, as for the event chain) over its immutable columns
(:data:`DIGEST_COLUMNS`: id, receipt time, peer, sender, type, control id,
the ACK sent, the flag, and ``sha256``, the hash of the raw message). The
digest covers the raw message through its hash, not its bytes: a purged
message (its body removed, see :mod:`gateway.store.retention`) still
verifies, and re-sealing a body under a new key changes nothing it covers.
When the row is read, the digest is computed again and the raw message is
hashed again; a mismatch is said, not hidden:

- :func:`message_problem` says what is wrong with one row (``herald log show``);
- :func:`altered_messages` / :func:`fail_altered`: the pipeline refuses an
  altered message (state ``failed``, with the reason);
- :func:`verify` walks the event chain and every message, and reports the
  first broken row of each (``herald audit verify``).

The chain's key without encryption at rest is no secret (``KeyRing.disabled``):
then the trail proves integrity against accidents and careless edits, not
against someone who can read the code. With a key file it is a MAC nobody
without the key can forge.
"""

from __future__ import annotations

import bisect
import hmac
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.errors import StoreError
from gateway.records import FAILED, RECEIVED, IntakeRecord
from gateway.store.events import (
    ANCHOR_KINDS,
    STORE_ACTOR,
    append_event,
    chain_keys,
    event_bytes,
    head_follows,
    rekey_chain,
)
from gateway.store.keys import SEALED_PREFIX, KeyRing, KeyRingError
from gateway.store.sealing import message_context, message_digest_matches

__all__ = [
    "DIGEST_COLUMNS",
    "AuditReport",
    "Finding",
    "altered_messages",
    "check_message",
    "fail_altered",
    "intake_digest",
    "message_digest",
    "message_problem",
    "rehash_message",
    "resume_chain",
    "stamp_all",
    "stamp_message",
    "verify",
]

#: The message columns a digest covers: set at insert, never changed after.
DIGEST_COLUMNS = (
    "id",
    "received_at",
    "peer",
    "sending_application",
    "sending_facility",
    "message_type",
    "trigger_event",
    "control_id",
    "version",
    "processing_id",
    "accept_ack_type",
    "application_ack_type",
    "charset",
    "sha256",
    "ack_code",
    "flag",
)
_DIGEST_SELECT = ", ".join(DIGEST_COLUMNS)
#: What a check of a message row reads.
_CHECK_SELECT = f"{_DIGEST_SELECT}, raw, digest, purged_at"

#: What the pipeline and ``herald log show`` say of an altered message.
ALTERED = "this message's record was altered after it was stored"

_DISABLED = KeyRing.disabled()


#: One encoder, made once (``json.dumps`` with arguments makes one a call).
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _message_bytes(row) -> bytes:
    values = [row[c] for c in DIGEST_COLUMNS]
    values[0] = int(values[0])
    return _CANONICAL.encode(["herald-message-1", *values]).encode("ascii")


def message_digest(keys: KeyRing, row) -> bytes:
    """The digest of a message row (a mapping holding :data:`DIGEST_COLUMNS`)."""
    return keys.chain_mac(b"", _message_bytes(row))


def intake_digest(
    keys: KeyRing, message_id: int, received_at: str, record: IntakeRecord, sha256: str, flag: str | None
) -> bytes:
    """The digest of the row intake is inserting (written with it: no second write of the row)."""
    r = record
    values = [
        "herald-message-1",
        message_id,
        received_at,
        str(r.peer),
        r.sending_application,
        r.sending_facility,
        r.message_type,
        r.trigger_event,
        r.control_id,
        r.version,
        r.processing_id,
        r.accept_ack_type,
        r.application_ack_type,
        r.charset,
        sha256,
        r.ack_code,
        flag,
    ]  # in the order of DIGEST_COLUMNS
    return keys.chain_mac(b"", _CANONICAL.encode(values).encode("ascii"))


def stamp_message(conn: sqlite3.Connection, message_id: int) -> None:
    """Write the digest of a message row just inserted (in the caller's transaction)."""
    row = conn.execute(f"SELECT {_DIGEST_SELECT} FROM messages WHERE id = ?", (message_id,)).fetchone()
    conn.execute("UPDATE messages SET digest = ? WHERE id = ?", (message_digest(chain_keys(conn), row), message_id))


def stamp_all(conn: sqlite3.Connection) -> int:
    """Stamp every message without a digest (the migration: rows stored before digests existed)."""
    keys = chain_keys(conn)
    rows = conn.execute(f"SELECT {_DIGEST_SELECT} FROM messages WHERE digest IS NULL").fetchall()
    conn.executemany("UPDATE messages SET digest = ? WHERE id = ?", [(message_digest(keys, r), r["id"]) for r in rows])
    return len(rows)


def _raw_bytes(value) -> bytes:
    if value is None:
        return b""
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def message_problem(conn: sqlite3.Connection, row) -> str | None:
    """What is wrong with a stored message row (read with :data:`_CHECK_SELECT`'s columns), or None.

    The wording names what changed when the message's ``received`` event (in
    the chained trail) says what it was.
    """
    return checked_raw(conn, row)[0]


def checked_raw(conn: sqlite3.Connection, row) -> tuple[str | None, bytes | None]:
    """``(problem, raw message)`` of a stored row: :func:`message_problem`'s answer, and the message
    opened on the way when it is intact (None when purged or altered), so a caller that goes on to
    process it does not read and open it a second time."""
    keys = chain_keys(conn)
    stored = row["digest"]
    if stored is None:
        return f"{ALTERED}: it has no digest (it was not written by Herald's intake)", None
    if not hmac.compare_digest(message_digest(keys, row), bytes(stored)):
        return f"{ALTERED}: {_what_changed(conn, row)}", None
    if row["purged_at"]:
        return None, None
    try:
        plain = keys.open(_raw_bytes(row["raw"]), message_context("raw", row["id"]))
    except KeyRingError:
        return f"{ALTERED}: its raw message does not open (changed, or sealed under a key this ring lacks)", None
    if not message_digest_matches(keys, row["sha256"] or "", plain, keys.digest(plain)):
        return f"{ALTERED}: its raw message was changed (it does not match the hash stored with it)", None
    return None, plain


def _what_changed(conn: sqlite3.Connection, row) -> str:
    received = conn.execute(
        "SELECT detail FROM events WHERE message_id = ? AND kind = 'received' ORDER BY id LIMIT 1", (row["id"],)
    ).fetchone()
    said = json.loads(received[0] or "{}") if received else {}
    if "peer" in said and said["peer"] != row["peer"]:
        return f"its peer was changed (it was received from {said['peer']}, the row now says {row['peer']})"
    return "its stored fields (receipt time, peer, sender, type, control id, ACK or hash) do not match its digest"


def check_message(conn: sqlite3.Connection, message_id: int) -> str | None:
    """:func:`message_problem` of one message by id (None when it is intact or does not exist)."""
    row = conn.execute(f"SELECT {_CHECK_SELECT} FROM messages WHERE id = ?", (message_id,)).fetchone()
    return None if row is None else message_problem(conn, row)


def checked_pending(conn: sqlite3.Connection, after_id: int, limit: int) -> tuple[dict[int, str], list[tuple]]:
    """The next messages still ``received`` after ``after_id``, each checked against its digest, in
    one read: ``(altered id -> what is wrong, [(id, raw, received_at, charset) of the intact ones])``."""
    rows = conn.execute(
        f"SELECT {_CHECK_SELECT} FROM messages WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
        (RECEIVED, after_id, limit),
    ).fetchall()
    altered: dict[int, str] = {}
    intact: list[tuple] = []
    for r in rows:
        problem, plain = checked_raw(conn, r)
        if problem is not None:
            altered[r["id"]] = problem
        else:
            intact.append((r["id"], plain if plain is not None else b"", r["received_at"], r["charset"] or ""))
    return altered, intact


def altered_messages(conn: sqlite3.Connection, message_ids: Iterable[int]) -> dict[int, str]:
    """Of these messages, those whose record was altered, with what is wrong (a read)."""
    ids = list(message_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = conn.execute(f"SELECT {_CHECK_SELECT} FROM messages WHERE id IN ({marks})", ids).fetchall()
    return {r["id"]: problem for r in rows if (problem := message_problem(conn, r)) is not None}


def fail_altered(conn: sqlite3.Connection, altered: dict[int, str], now: str) -> int:
    """Refuse altered messages: state ``failed`` with the reason, and a ``failed`` event (stage ``integrity``)."""
    done = 0
    for message_id, problem in sorted(altered.items()):
        cur = conn.execute(
            "UPDATE messages SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state = ?",
            (FAILED, problem, now, message_id, RECEIVED),
        )
        if cur.rowcount == 1:
            append_event(conn, now, message_id, None, "pipeline", "failed", {"stage": "integrity", "reason": problem})
            done += 1
    return done


# -- starting the writer: the chain under the ring it runs with --------------------------


def resume_chain(conn: sqlite3.Connection, now: str) -> str | None:
    """Check the trail's last row under ``conn``'s keys when the writer starts; say what was done, if anything.

    When the trail was written without a key and one is now configured
    (encryption at rest turned on), the chain starts afresh under the key
    (``chain-rekeyed``) and the message digests that check under the old key
    are stamped again under the new one: without this, turning encryption on
    would make the whole trail look forged. Only a database holding no sealed
    value is taken for one written without a key: the disabled ring's key is
    public, and a trail rewritten under it must not be adopted by the next
    start. When the last row checks under neither, nothing is changed:
    ``herald audit verify`` will say where.
    """
    keys = chain_keys(conn)
    follows = head_follows(conn, keys)
    if follows is None or follows:
        return None
    if keys.enabled and head_follows(conn, _DISABLED) and not _holds_sealed_values(conn):
        restamped, kept = _restamp(conn, _DISABLED, keys)
        detail = rekey_chain(conn, _DISABLED, now)
        return (
            f"the audit chain continues under the configured key (after event {detail['previous']}); "
            f"{restamped} message digest(s) stamped again, {kept} left as they were (they did not check)"
        )
    return "the audit trail's last row does not check under the configured key: run `herald audit verify`"


def _holds_sealed_values(conn: sqlite3.Connection) -> bool:
    """Whether any message body or Bundle is sealed (the database was written with a key)."""
    prefix = SEALED_PREFIX
    return (
        conn.execute(
            "SELECT 1 FROM messages WHERE substr(raw, 1, ?) = ? OR substr(CAST(fhir AS BLOB), 1, ?) = ? LIMIT 1",
            (len(prefix), prefix, len(prefix), prefix),
        ).fetchone()
        is not None
    )


def _restamp(conn: sqlite3.Connection, old: KeyRing, new: KeyRing) -> tuple[int, int]:
    updates, kept = [], 0
    for r in conn.execute(f"SELECT {_DIGEST_SELECT}, digest FROM messages"):
        if r["digest"] is not None and hmac.compare_digest(message_digest(old, r), bytes(r["digest"])):
            updates.append((message_digest(new, r), r["id"]))
        else:
            kept += 1
    conn.executemany("UPDATE messages SET digest = ? WHERE id = ?", updates)
    return len(updates), kept


# -- the walk -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One broken row: which (``event 57``, ``message 12``), what happened to it, and how that shows."""

    table: str  # "events" or "messages"
    row_id: int
    what: str  # edited, deleted, reordered, altered, missing, unverifiable
    why: str

    @property
    def where(self) -> str:
        return f"{'event' if self.table == 'events' else 'message'} {self.row_id}"

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: {self.why}"


@dataclass(slots=True)
class AuditReport:
    """What :func:`verify` found: counts, and the first broken row of each kind (none when intact)."""

    events: int = 0
    last_event: int = 0
    legacy_events: int = 0  # chained by the migration, not when written
    rekeyed_at: int | None = None  # the anchor after which the configured key chains
    messages: int = 0
    purged: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.findings


_EVENT_SELECT = "SELECT id, at, message_id, notification_id, actor, kind, detail, mac FROM events"
#: Rows either side of a broken one searched for where it came from (a moved row).
_WINDOW = 16


def verify(conn: sqlite3.Connection) -> AuditReport:
    """Walk the event chain and every message row; report the first broken row of each (a read)."""
    report = AuditReport()
    event_finding = _walk_events(conn, report)
    if event_finding is not None:
        report.findings.append(event_finding)
    message_finding = _walk_messages(conn, report)
    if message_finding is not None:
        report.findings.append(message_finding)
    if event_finding is None and message_finding is None and (cross := _cross_check(conn)) is not None:
        report.findings.append(cross)
    return report


def _walk_events(conn: sqlite3.Connection, report: AuditReport) -> Finding | None:
    keys = chain_keys(conn)
    rekeys = [
        r[0] for r in conn.execute("SELECT id FROM events WHERE kind = 'chain-rekeyed' AND actor = ?", (STORE_ACTOR,))
    ]
    report.rekeyed_at = max(rekeys) if rekeys else None
    prev_id, prev_mac = 0, b""
    for row in conn.execute(_EVENT_SELECT + " ORDER BY id"):
        event_id = row["id"]
        anchor = row["kind"] in ANCHOR_KINDS and row["actor"] == STORE_ACTOR
        ring = keys
        if report.rekeyed_at is not None and event_id < report.rekeyed_at:
            if not keys.enabled:
                return Finding(
                    "events",
                    event_id,
                    "unverifiable",
                    f"events before {report.rekeyed_at} were chained under a key that is not configured",
                )
            ring = _DISABLED
        if event_id != prev_id + 1:
            missing = f"{prev_id + 1}" if event_id == prev_id + 2 else f"{prev_id + 1}-{event_id - 1}"
            return Finding(
                "events",
                prev_id + 1,
                "deleted",
                f"event(s) {missing} are missing: the trail jumps from event {prev_id} to event {event_id}",
            )
        mac = bytes(row["mac"] or b"")
        expected = ring.chain_mac(b"" if anchor else prev_mac, event_bytes(*tuple(row)[:7]))
        if not hmac.compare_digest(expected, mac):
            return _classify(conn, row, prev_mac, ring, first=event_id == 1)
        if anchor and (problem := _anchor_problem(row, prev_id, prev_mac)):
            return Finding("events", event_id, "deleted", problem)
        if row["kind"] == "chain-started" and row["actor"] == STORE_ACTOR:
            report.legacy_events = json.loads(row["detail"] or "{}").get("chained", 0)
        prev_id, prev_mac = event_id, mac
        report.events += 1
        report.last_event = event_id
    return None


def _anchor_problem(row, prev_id: int, prev_mac: bytes) -> str | None:
    """An anchor names the row it follows; the trail before it must end there."""
    detail = json.loads(row["detail"] or "{}")
    named_id = detail.get("last") if row["kind"] == "chain-started" else detail.get("previous")
    named_mac = detail.get("last_mac") if row["kind"] == "chain-started" else detail.get("previous_mac")
    if named_id is None:
        return None if prev_id == 0 else "the anchor names no row, yet rows come before it"
    if named_id != prev_id or named_mac != prev_mac.hex():
        return (
            f"the chain's anchor follows event {named_id}, but the trail before it ends at event {prev_id} "
            "with another MAC: rows before it were deleted or rewritten"
        )
    return None


def _classify(conn: sqlite3.Connection, row, prev_mac: bytes, ring: KeyRing, first: bool) -> Finding:
    """Why a row's MAC does not follow: moved here from elsewhere, its predecessor replaced, or edited."""
    event_id = row["id"]
    content = tuple(row)[1:7]
    mac = bytes(row["mac"] or b"")
    window = conn.execute(
        _EVENT_SELECT + " WHERE id BETWEEN ? AND ? ORDER BY id", (event_id - _WINDOW, event_id + _WINDOW)
    ).fetchall()
    predecessors = [b""] + [bytes(r["mac"] or b"") for r in window]
    for k in [r["id"] for r in window]:
        if k == event_id:
            continue
        encoded = event_bytes(k, *content)
        if any(hmac.compare_digest(ring.chain_mac(p, encoded), mac) for p in predecessors):
            return Finding(
                "events", event_id, "reordered", f"this row was written as event {k} and moved here (its id changed)"
            )
    encoded = event_bytes(event_id, *content)
    if any(p != prev_mac and hmac.compare_digest(ring.chain_mac(p, encoded), mac) for p in predecessors):
        return Finding(
            "events",
            event_id,
            "reordered",
            f"the row is as written but does not follow event {event_id - 1}: rows before it were moved or replaced",
        )
    if first and not head_follows(conn, ring):
        return Finding(
            "events",
            event_id,
            "unverifiable",
            "no row checks under this key ring (neither the first nor the last): the whole trail was "
            "rewritten, or this is not the gateway's key",
        )
    return Finding("events", event_id, "edited", "its content does not match its MAC (changed after it was written)")


def _walk_messages(conn: sqlite3.Connection, report: AuditReport) -> Finding | None:
    expected = None
    for row in conn.execute(f"SELECT {_CHECK_SELECT} FROM messages ORDER BY id"):
        message_id = row["id"]
        if expected is not None and message_id != expected:
            return Finding(
                "messages",
                expected,
                "deleted",
                f"message(s) {expected}-{message_id - 1} are missing: the log jumps to message {message_id}",
            )
        if (problem := message_problem(conn, row)) is not None:
            return Finding("messages", message_id, "altered", problem.removeprefix(f"{ALTERED}: "))
        report.messages += 1
        report.purged += bool(row["purged_at"])
        expected = message_id + 1
    return None


def _cross_check(conn: sqlite3.Connection) -> Finding | None:
    """What the chain alone cannot show: its last rows deleted, a message row deleted, a purge not recorded."""
    orphan = conn.execute(
        "SELECT e.id, e.message_id FROM events e WHERE e.message_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = e.message_id) ORDER BY e.id LIMIT 1"
    ).fetchone()
    if orphan is not None:
        return Finding(
            "messages", orphan[1], "deleted", f"event {orphan[0]} is about this message, which is no longer stored"
        )
    silent = conn.execute(
        "SELECT m.id FROM messages m WHERE NOT EXISTS "
        "(SELECT 1 FROM events e WHERE e.message_id = m.id AND e.kind = 'received') ORDER BY m.id LIMIT 1"
    ).fetchone()
    if silent is not None:
        return Finding(
            "messages",
            silent[0],
            "missing",
            "its 'received' event is not in the trail: events were deleted from the end of the trail",
        )
    ranges = []
    for (detail,) in conn.execute("SELECT detail FROM events WHERE kind = 'purged'"):
        ranges += [tuple(r) for r in json.loads(detail or "{}").get("ranges", [])]
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    ranges = merged
    starts = [a for a, _ in ranges]
    for (message_id,) in conn.execute("SELECT id FROM messages WHERE purged_at IS NOT NULL ORDER BY id"):
        i = bisect.bisect_right(starts, message_id) - 1
        if i < 0 or ranges[i][1] < message_id:
            return Finding("messages", message_id, "altered", "its body was removed, but no 'purged' event names it")
    return None


def rehash_message(conn: sqlite3.Connection, message_id: int, sha256: str) -> None:
    """Replace a message's stored hash (``herald keys rotate`` re-hashing under the ring) and stamp it again.

    Only a row that checks now is stamped again: re-hashing must not launder
    an alteration (:class:`~gateway.errors.StoreError` names what is wrong).
    """
    if (problem := check_message(conn, message_id)) is not None:
        raise StoreError(f"message {message_id}: {problem}; its hash was left as it was")
    conn.execute("UPDATE messages SET sha256 = ? WHERE id = ?", (sha256, message_id))
    stamp_message(conn, message_id)
