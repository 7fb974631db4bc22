"""The web console's data: its users and sessions, and the blind index the message browser searches.

**Users and sessions.** A console user has a name, a role (``analyst`` or
``admin``) and an argon2 hash of the password (made and checked above the
store, in :mod:`gateway.app.console.auth`). A session is found by the SHA-256
of its cookie, never the cookie itself, so a copy of the database opens no
session; it names its user, its CSRF token and when it ends. Removing a user
or changing the password ends the user's sessions. Who added, changed or
removed a user, and every login, is in the audit trail.

**The blind index.** A message's patient is sealed at rest (its body and
Bundle), so the browser cannot search the columns. Instead each message has a
few *terms*, rows of ``message_terms(term, message_id)``, where ``term`` is a
keyed hash (:meth:`~gateway.store.keys.KeyRing.lookup_int`, 64 bits) of
``msg.<kind>:<normalised value>`` for the kinds in :data:`TERM_KINDS`: every
identifier but the MBI (``mrn``), the MBI, each family and given name, the
birth date. A search hashes what the analyst typed the same way and looks the
hash up: equality only (no prefix or fuzzy search), and what the table shows
to someone without the key is which messages share a value and how many do
(a term's frequency), not the value.

Terms are written in the transaction that records the pipeline's outcome
(:func:`index_message`, from the Bundle; from the stored v2 when there is no
Bundle). Three things are caught up by :func:`index_work`, which the console's
service runs in the background: messages stored before the index existed (the
back-fill, from the ids the migration noted), messages refused at intake
(never given an outcome), and messages whose bodies retention purged (their
terms are deleted: a purged message is no longer found by patient).
``herald index rebuild`` indexes everything again.

The hash is under the key ring's first key, which a rotation never retires,
so ``herald keys rotate`` leaves the index valid. Terms written while
encryption at rest was off are under the disabled ring's public key (anyone
can compute them); a search also tries those while :func:`plain_terms` says
some exist, until ``herald index rebuild`` hashes them under the ring.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import StoreError
from gateway.records import FAILED, MESSAGE_STATES, REJECTED
from gateway.store.events import append_event
from gateway.store.keys import KeyRing, KeyRingError
from gateway.store.sealing import keys_of, member_pseudonym, message_context

__all__ = [
    "CONSOLE_ROLES",
    "TERM_KINDS",
    "MessageSearch",
    "SearchPage",
    "add_user",
    "bundle_terms",
    "create_console_tables",
    "create_session",
    "end_session",
    "finish_rebuild",
    "index_message",
    "index_status",
    "index_work",
    "list_users",
    "login_record",
    "member_messages",
    "members_by_identifier",
    "messages_per_hour",
    "normalise_term",
    "plain_terms",
    "raw_terms",
    "rebuild_batch",
    "record_login",
    "remove_user",
    "review_of_message",
    "search_messages",
    "sender_stats",
    "senders",
    "session_of",
    "set_password",
    "term_keys",
    "user_names",
]

#: The roles a console user can have: an admin may also manage users and verify the audit trail.
CONSOLE_ROLES = ("analyst", "admin")

_TABLES = """
CREATE TABLE console_users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE console_sessions (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX console_sessions_name ON console_sessions (name);
CREATE TABLE console_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE message_terms (
    term INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (term, message_id)
) WITHOUT ROWID;
CREATE INDEX message_terms_message ON message_terms (message_id);
CREATE INDEX messages_control ON messages (control_id);
CREATE INDEX messages_received ON messages (received_at);
CREATE INDEX messages_sender_time ON messages (sending_application, sending_facility, received_at, state);
CREATE INDEX messages_state_time ON messages (state, received_at);
CREATE INDEX matches_member ON matches (member_id, aco_id) WHERE member_id IS NOT NULL
"""


def create_console_tables(conn: sqlite3.Connection) -> None:
    """Schema version 9: the console's tables and the indexes its pages read by; the back-fill's bounds.

    Nothing is indexed here (a large log would hold the migration, and the
    server's start, for minutes): the messages stored so far are indexed in
    the background by :func:`index_work`, from the first id to the last one
    noted now.
    """
    for statement in _TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    last_message = conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
    last_event = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
    _set_meta(
        conn,
        {
            "backfill_through": 0,
            "backfill_to": last_message,
            "rejections_through": last_message,
            "purges_through": last_event,
        },
    )


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT name, value FROM console_meta").fetchall())


def _set_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    conn.executemany(
        "INSERT INTO console_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        [(k, str(v)) for k, v in values.items()],
    )


# -- normalising and hashing terms -------------------------------------------------------------


# -- normalising and hashing terms -------------------------------------------------------------

#: What the blind index holds of a message's patient.
TERM_KINDS = ("mrn", "mbi", "family", "given", "birth")
#: The MBI's identifier system in a Bundle (the converter writes it).
_MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"

_DROP = re.compile(r"['’`.]")
_WORD = re.compile(r"[A-Z0-9]+")
_IDENTIFIER_DROP = re.compile(r"[\s-]")
_ISO_DATE = re.compile(r"(\d{4})-?(\d{2})?-?(\d{2})?$")


def _fold(value: str) -> str:
    if value.isascii():
        return value.upper()
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


def _name_terms(value: str) -> set[str]:
    """A name's terms: its letters and digits run together, and each word when there are several.

    ``"O'Brien-Smith"`` gives ``OBRIENSMITH``, ``OBRIEN`` and ``SMITH``; ``"Mary Ann"``
    gives ``MARYANN``, ``MARY`` and ``ANN``.
    """
    words = _WORD.findall(_DROP.sub("", _fold(value or "")))
    if not words:
        return set()
    found = {"".join(words)}
    if len(words) > 1:
        found.update(words)
    return found


def _date_term(value: str) -> str:
    """A birth date as ``YYYY-MM-DD`` (or ``YYYY-MM``, ``YYYY`` when that is all there is); '' when not a date."""
    m = _ISO_DATE.match((value or "").strip()[:10])
    if not m or (m.group(3) and not m.group(2)):
        return ""
    return "-".join(part for part in m.groups() if part)


def normalise_term(kind: str, value: str) -> str:
    """What a search for ``value`` as ``kind`` looks up: the form the index stores ('' when nothing is left).

    Names are folded to upper-case letters and digits run together (a search
    for one word of a several-word name finds it too); identifiers lose spaces
    and dashes; birth dates are ``YYYY-MM-DD`` (``YYYYMMDD`` is read too).
    """
    if kind not in TERM_KINDS:
        raise ValueError(f"{kind!r} is not a search term kind ({', '.join(TERM_KINDS)})")
    if kind in ("family", "given"):
        return "".join(_WORD.findall(_DROP.sub("", _fold(value or ""))))
    if kind == "birth":
        return _date_term(value)
    return _IDENTIFIER_DROP.sub("", value or "").upper()


def patient_terms(patient: dict) -> set[tuple[str, str]]:
    """The (kind, normalised value) terms of a Patient resource: identifiers, names, birth date."""
    terms: set[tuple[str, str]] = set()
    for identifier in patient.get("identifier") or ():
        value = normalise_term("mrn", str(identifier.get("value") or ""))
        if value:
            terms.add(("mbi" if identifier.get("system") == _MBI_SYSTEM else "mrn", value))
    for name in patient.get("name") or ():
        terms.update(("family", t) for t in _name_terms(str(name.get("family") or "")))
        for given in name.get("given") or ():
            terms.update(("given", t) for t in _name_terms(str(given)))
    birth = _date_term(str(patient.get("birthDate") or ""))
    if birth:
        terms.add(("birth", birth))
    return terms


def bundle_terms(bundle: dict) -> set[tuple[str, str]]:
    """The terms of every Patient in a Bundle (see :func:`patient_terms`)."""
    terms: set[tuple[str, str]] = set()
    for entry in bundle.get("entry") or ():
        resource = (entry or {}).get("resource") or {}
        if resource.get("resourceType") == "Patient":
            terms.update(patient_terms(resource))
    return terms


def _term_key(keys: KeyRing, kind: str, value: str) -> int:
    return keys.lookup_int(f"msg.{kind}:{value}".encode())


def term_keys(conn: sqlite3.Connection, kind: str, value: str) -> tuple[int, ...]:
    """The hashes a normalised term may be stored under: this ring's, and the disabled ring's while some are."""
    keys = keys_of(conn)
    mine = _term_key(keys, kind, value)
    if not keys.enabled or not plain_terms(conn):
        return (mine,)
    plain = _term_key(KeyRing.disabled(), kind, value)
    return (mine,) if plain == mine else (mine, plain)


def plain_terms(conn: sqlite3.Connection) -> bool:
    """Whether some terms were hashed with encryption at rest off (under the disabled ring's public key)."""
    row = conn.execute("SELECT value FROM console_meta WHERE name = 'plain_terms'").fetchone()
    return row is not None and row[0] == "1"


def raw_terms(raw: bytes, charset: str = "") -> set[tuple[str, str]]:
    """The terms of a stored v2 message's first PID (PID-3, PID-5, PID-7), for a message with no Bundle.

    A plain split on the separators MSH declares: a message refused at intake
    may be malformed, so nothing is found rather than anything raised.
    """
    text = raw.decode("utf-8", errors="replace") if "8859" not in charset else raw.decode("latin-1")
    segments = [s for s in re.split(r"[\r\n]+", text) if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        return set()
    fs, encoding = segments[0][3], segments[0][4:8]
    cs = encoding[0] if encoding else "^"
    rs = encoding[1] if len(encoding) > 1 else "~"
    ss = encoding[3] if len(encoding) > 3 else "&"
    terms: set[tuple[str, str]] = set()
    for segment in segments[1:]:
        if not segment.startswith("PID" + fs):
            continue
        fields = [*segment.split(fs), "", "", "", "", "", "", "", ""]
        field_at = fields.__getitem__
        for rep in field_at(3).split(rs):
            comps = rep.split(cs)
            value = normalise_term("mrn", comps[0].split(ss)[0])
            if value:
                terms.add(("mbi" if len(comps) > 4 and comps[4] == "MB" else "mrn", value))
        for rep in field_at(5).split(rs):
            comps = [c.split(ss)[0] for c in rep.split(cs)]
            terms.update(("family", t) for t in _name_terms(comps[0]))
            for given in comps[1:3]:
                terms.update(("given", t) for t in _name_terms(given))
        digits = re.sub(r"\D", "", field_at(7).split(cs)[0])[:8]
        birth = _date_term(f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}" if len(digits) == 8 else digits[:4])
        if birth:
            terms.add(("birth", birth))
        break
    return terms


def _insert_terms(conn: sqlite3.Connection, message_id: int, terms: Iterable[tuple[str, str]]) -> int:
    keys = keys_of(conn)
    rows = [(_term_key(keys, kind, value), message_id) for kind, value in terms]
    if rows:
        conn.executemany("INSERT OR IGNORE INTO message_terms (term, message_id) VALUES (?, ?)", rows)
        if not keys.enabled and not plain_terms(conn):
            _set_meta(conn, {"plain_terms": 1})
    return len(rows)


def index_message(conn: sqlite3.Connection, message_id: int, fhir_json: str | None, patient: dict | None = None) -> int:
    """Index one message's patient (in the caller's transaction): the Patient resource when the pipeline
    handed it over (no second parse of the whole Bundle on the writer), else from its Bundle, else from
    its stored v2.

    Called as the pipeline's outcome is recorded; returns how many terms.
    """
    if patient is not None:
        return _insert_terms(conn, message_id, patient_terms(patient))
    if fhir_json:
        try:
            return _insert_terms(conn, message_id, bundle_terms(json.loads(fhir_json)))
        except (ValueError, AttributeError, TypeError):
            return 0
    return _insert_terms(conn, message_id, _stored_raw_terms(conn, message_id))


def _stored_raw_terms(conn: sqlite3.Connection, message_id: int) -> set[tuple[str, str]]:
    row = conn.execute("SELECT raw, charset, purged_at FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None or row["purged_at"] or not row["raw"]:
        return set()
    try:
        raw = keys_of(conn).open(row["raw"], message_context("raw", message_id))
    except KeyRingError:
        return set()  # altered after it was stored: the integrity check says so elsewhere
    return raw_terms(raw, row["charset"] or "")


def _message_terms(conn: sqlite3.Connection, row: sqlite3.Row) -> set[tuple[str, str]]:
    """A stored message's terms, its sealed Bundle (or v2) opened; none when purged or not yet processed."""
    if row["purged_at"]:
        return set()
    keys = keys_of(conn)
    try:
        if row["fhir"] is not None:
            return bundle_terms(json.loads(keys.open_text(row["fhir"], message_context("fhir", row["id"])) or "{}"))
        if row["state"] in (REJECTED, FAILED) and row["raw"]:
            return raw_terms(keys.open(row["raw"], message_context("raw", row["id"])), row["charset"] or "")
    except (KeyRingError, ValueError, AttributeError, TypeError):
        pass
    return set()


_INDEX_COLUMNS = "id, state, raw, charset, fhir, purged_at"


def index_work(conn: sqlite3.Connection, batch: int = 500) -> dict[str, int]:
    """One step of the index's background work (a writer job): back-fill, intake refusals, purges.

    Each part does at most ``batch`` messages (or purge events) and moves its
    mark in ``console_meta``; returns what it did (counts only), all zero when
    nothing was left to do.
    """
    meta = _meta(conn)
    done = {"backfilled": 0, "refusals": 0, "purged": 0}
    through, to = int(meta.get("backfill_through", 0)), int(meta.get("backfill_to", 0))
    if through < to:
        rows = conn.execute(
            f"SELECT {_INDEX_COLUMNS} FROM messages WHERE id > ? AND id <= ? ORDER BY id LIMIT ?", (through, to, batch)
        ).fetchall()
        for row in rows:
            _insert_terms(conn, row["id"], _message_terms(conn, row))
        done["backfilled"] = len(rows)
        _set_meta(conn, {"backfill_through": rows[-1]["id"] if len(rows) == batch else to})
    # Refused at intake: stored with state rejected and never given an outcome.
    mark = int(meta.get("rejections_through", 0))
    rows = conn.execute(
        f"SELECT {_INDEX_COLUMNS} FROM messages WHERE state IN (?, ?) AND id > ? AND fhir IS NULL ORDER BY id LIMIT ?",
        (REJECTED, FAILED, mark, batch),
    ).fetchall()
    for row in rows:
        _insert_terms(conn, row["id"], _message_terms(conn, row))
    last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
    done["refusals"] = len(rows)
    _set_meta(conn, {"rejections_through": rows[-1]["id"] if len(rows) == batch else max(mark, last)})
    # Purged by retention: the purge event names the messages as id ranges.
    mark = int(meta.get("purges_through", 0))
    last_event = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
    upto = min(last_event, mark + batch * 20)
    purges = conn.execute(
        "SELECT detail FROM events WHERE id > ? AND id <= ? AND kind = 'purged' ORDER BY id", (mark, upto)
    ).fetchall()
    for (detail,) in purges:
        try:
            ranges = json.loads(detail or "{}").get("ranges") or []
        except ValueError:
            ranges = []
        for first, last_id in ranges:
            done["purged"] += conn.execute(
                "DELETE FROM message_terms WHERE message_id BETWEEN ? AND ?", (first, last_id)
            ).rowcount
    if upto > mark:
        _set_meta(conn, {"purges_through": upto})
    return done


def index_status(conn: sqlite3.Connection) -> dict[str, int | bool]:
    """How far the index is: the back-fill's marks, terms stored, and whether plaintext-era terms remain."""
    meta = _meta(conn)
    return {
        "backfill_through": int(meta.get("backfill_through", 0)),
        "backfill_to": int(meta.get("backfill_to", 0)),
        "terms": conn.execute("SELECT COUNT(*) FROM message_terms").fetchone()[0],
        "messages": conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0],
        "plain_terms": plain_terms(conn),
    }


def rebuild_batch(conn: sqlite3.Connection, after_id: int, batch: int) -> tuple[int, int]:
    """Index again the next ``batch`` messages after ``after_id`` (their old terms deleted first).

    Returns (messages done, the last id done; ``after_id`` when none was left).
    """
    rows = conn.execute(
        f"SELECT {_INDEX_COLUMNS} FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after_id, batch)
    ).fetchall()
    if not rows:
        return 0, after_id
    conn.execute("DELETE FROM message_terms WHERE message_id BETWEEN ? AND ?", (rows[0]["id"], rows[-1]["id"]))
    for row in rows:
        _insert_terms(conn, row["id"], _message_terms(conn, row))
    return len(rows), rows[-1]["id"]


def finish_rebuild(conn: sqlite3.Connection, through_id: int, now: str, by: str) -> None:
    """After a rebuild up to ``through_id``: the back-fill and the refusals' mark past it, and it audited."""
    meta = _meta(conn)
    values: dict[str, Any] = {
        "backfill_through": max(int(meta.get("backfill_through", 0)), through_id),
        "rejections_through": max(int(meta.get("rejections_through", 0)), through_id),
    }
    if keys_of(conn).enabled:
        values["plain_terms"] = 0
    _set_meta(conn, values)
    append_event(conn, now, None, None, "cli", "index-rebuilt", {"by": by, "through": through_id})


# -- searching the log ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageSearch:
    """What the message browser searches by; every field optional, all given ones must hold.

    ``terms`` are (kind, normalised value) pairs of the blind index
    (:func:`normalise_term`); the others are plain columns of ``messages``.
    ``since`` and ``until`` are ISO 8601 (UTC) bounds of ``received_at``
    (``until`` excluded). ``sender`` is ``APPLICATION|FACILITY``, ``APPLICATION``
    (any facility) or ``|FACILITY`` (any application).
    """

    terms: tuple[tuple[str, str], ...] = ()
    control_id: str = ""
    sender: str = ""
    message_type: str = ""
    trigger_event: str = ""
    state: str = ""
    since: str = ""
    until: str = ""

    @property
    def reads_phi(self) -> bool:
        """Whether the search names a patient (the results then tell something about that patient)."""
        return bool(self.terms)


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of results, newest first, and the message ids to page on from (None: no more that way)."""

    rows: list[dict] = field(default_factory=list)
    older: int | None = None  # ``before`` of the next page: the last row here, when older results exist
    newer: int | None = None  # ``after`` of the page before: the first row here, when newer results exist


_LIST_COLUMNS = (
    "m.id, m.received_at, m.sending_application, m.sending_facility, m.message_type, m.trigger_event, "
    "m.control_id, m.state, m.reason, m.flag, m.ack_code"
)


#: The order terms are looked up in: the rarest kind first (an MRN names one patient; a given name thousands).
_SELECTIVITY = {"mrn": 0, "mbi": 1, "birth": 2, "family": 3, "given": 4}


def _sql(
    conn: sqlite3.Connection, query: MessageSearch, cursor: tuple[str, int, bool] | None
) -> tuple[str, list[Any], str]:
    """The FROM and WHERE of a search, and the column it pages on (``cursor``: received_at, id, older?).

    With patient terms, the rarest drives the query: its index rows, newest
    message first (ids are given in the order messages arrive), each checked
    against the other terms in the same index before its message row is read
    (``CROSS JOIN`` keeps that order); the page is in id order. Without, the
    time index (or the sender's, or the state's) gives the rows in time order,
    the page in (received_at, id) order; the time bounds and the cursor's are
    merged into one range, so the scan starts where the page does. The two
    orders are the same unless the clock was set back.
    """
    where: list[str] = []
    args: list[Any] = []
    terms = sorted(query.terms, key=lambda t: _SELECTIVITY.get(t[0], 9))
    source = "messages m"
    for n, (kind, value) in enumerate(terms):
        hashes = term_keys(conn, kind, value)
        marks = ",".join("?" * len(hashes))
        if n == 0:
            source = "message_terms t CROSS JOIN messages m ON m.id = t.message_id"
            where.append(f"t.term IN ({marks})")
        else:
            where.append(
                f"EXISTS (SELECT 1 FROM message_terms u WHERE u.term IN ({marks}) AND u.message_id = t.message_id)"
            )
        args += hashes
    if query.control_id:
        where.append("m.control_id = ?")
        args.append(query.control_id)
    if query.sender:
        application, _, facility = query.sender.partition("|")
        if application:
            where.append("m.sending_application = ?")
            args.append(application)
        if facility:
            where.append("m.sending_facility = ?")
            args.append(facility)
    for column, value in (
        ("message_type", query.message_type),
        ("trigger_event", query.trigger_event),
        ("state", query.state),
    ):
        if value:
            where.append(f"m.{column} = ?")
            args.append(value)
    lower, upper = query.since, query.until  # >= lower, < upper
    tie = None
    if cursor is not None:
        at, message_id, older = cursor
        if terms:
            where.append("t.message_id < ?" if older else "t.message_id > ?")
            args.append(message_id)
        elif older:  # rows before (at, id): received_at <= at, and at the same time a lower id
            tie = ("m.received_at < ? OR m.id < ?", [at, message_id])
            if not upper or at < upper:
                where.append("m.received_at <= ?")
                args.append(at)
                upper = ""
        else:
            tie = ("m.received_at > ? OR m.id > ?", [at, message_id])
            if not lower or at >= lower:
                lower = at
    if lower:
        where.append("m.received_at >= ?")
        args.append(lower)
    if upper:
        where.append("m.received_at < ?")
        args.append(upper)
    if tie is not None:
        where.append(f"({tie[0]})")
        args += tie[1]
    tail = f"FROM {source}" + (" WHERE " + " AND ".join(where) if where else "")
    return tail, args, "t.message_id" if terms else "m.received_at {o}, m.id"


def _cursor(conn: sqlite3.Connection, message_id: int, older: bool) -> tuple[str, int, bool]:
    row = conn.execute("SELECT received_at FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        raise StoreError(f"before/after: no message {message_id}")
    return row[0], message_id, older


def _order(paging: str, direction: str) -> str:
    return (paging.replace("{o}", direction) if "{o}" in paging else paging) + f" {direction}"


def search_messages(
    conn: sqlite3.Connection,
    query: MessageSearch,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int = 50,
) -> SearchPage:
    """A page of the messages ``query`` finds, newest first: header fields and state, no body.

    Paged by keyset: ``before`` (a message id) gives the page of results
    older than that message, ``after`` the page of newer ones; a page costs
    the same however deep. Newest is by arrival: the message id (a search by
    patient) or the time received, then the id (any other search).
    """
    newest_first = after is None or before is not None
    cursor = None
    if before is not None or after is not None:
        cursor = _cursor(conn, before if before is not None else after, newest_first)
    tail, args, paging = _sql(conn, query, cursor)
    order = _order(paging, "DESC" if newest_first else "ASC")
    sql = f"SELECT {_LIST_COLUMNS} {tail} ORDER BY {order} LIMIT ?"
    rows = [dict(r) for r in conn.execute(sql, (*args, limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    if not rows:
        return SearchPage([], None, None)
    if newest_first:
        older = rows[-1]["id"] if more else None
        newer = rows[0]["id"] if before is not None and _exists(conn, query, rows[0], False) else None
    else:
        rows.reverse()
        newer = rows[0]["id"] if more else None
        older = rows[-1]["id"] if _exists(conn, query, rows[-1], True) else None
    return SearchPage(rows, older, newer)


def _exists(conn: sqlite3.Connection, query: MessageSearch, row: dict, older: bool) -> bool:
    tail, args, paging = _sql(conn, query, (row["received_at"], row["id"], older))
    sql = f"SELECT 1 {tail} ORDER BY {_order(paging, 'DESC' if older else 'ASC')} LIMIT 1"
    return conn.execute(sql, args).fetchone() is not None


# -- senders and volume ----------------------------------------------------------------------------


def senders(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Every sender (MSH-3, MSH-4) in the log: a few index seeks each, not a scan of the log."""
    found: list[tuple[str, str]] = []
    application = conn.execute(
        "SELECT MIN(sending_application) FROM messages WHERE sending_application IS NOT NULL"
    ).fetchone()[0]
    facility = None
    while application is not None:
        # The next facility of this application, else the first of the next application.
        if facility is None:
            row = conn.execute(
                "SELECT MIN(sending_facility) FROM messages WHERE sending_application = ? "
                "AND sending_facility IS NOT NULL",
                (application,),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT MIN(sending_facility) FROM messages WHERE sending_application = ? AND sending_facility > ?",
                (application, facility),
            ).fetchone()
        facility = row[0]
        if facility is not None:
            found.append((application, facility))
            continue
        application = conn.execute(
            "SELECT MIN(sending_application) FROM messages WHERE sending_application > ?", (application,)
        ).fetchone()[0]
    return found


def sender_stats(conn: sqlite3.Connection, since: str | None = None) -> list[dict]:
    """Per sender (MSH-3, MSH-4) since ``since``: messages, refused and failed ones, the last one's time and id.

    Senders with no message in the window are left out; busiest first. Each
    sender's figures are one range of the (sender, time, state) index.
    """
    out = []
    for application, facility in senders(conn):
        row = conn.execute(
            "SELECT COUNT(*) AS messages, SUM(CASE WHEN state = ? THEN 1 ELSE 0 END) AS rejected, "
            "SUM(CASE WHEN state = ? THEN 1 ELSE 0 END) AS failed, "
            "MAX(received_at) AS last_at FROM messages "
            "WHERE sending_application = ? AND sending_facility = ? AND received_at >= ?",
            (REJECTED, FAILED, application, facility, since or ""),
        ).fetchone()
        if not row["messages"]:
            continue
        last = conn.execute(
            "SELECT id FROM messages WHERE sending_application = ? AND sending_facility = ? AND received_at = ? "
            "ORDER BY id DESC LIMIT 1",
            (application, facility, row["last_at"]),
        ).fetchone()[0]
        out.append({"sending_application": application, "sending_facility": facility, **dict(row), "last_id": last})
    out.sort(key=lambda r: (-r["messages"], r["sending_application"], r["sending_facility"]))
    return out


def messages_per_hour(conn: sqlite3.Connection, since: str) -> list[tuple[str, int, int]]:
    """(hour as ``YYYY-MM-DDTHH``, messages, refused or failed) for each hour since ``since`` that had any.

    Counted per state from the (state, time) index alone: no message row is read.
    """
    hours: dict[str, list[int]] = {}
    for state in MESSAGE_STATES:
        rows = conn.execute(
            "SELECT substr(received_at, 1, 13) AS hour, COUNT(*) FROM messages "
            "WHERE state = ? AND received_at >= ? GROUP BY hour",
            (state, since),
        )
        for hour, count in rows:
            figures = hours.setdefault(hour, [0, 0])
            figures[0] += count
            if state in (REJECTED, FAILED):
                figures[1] += count
    return [(hour, n, bad) for hour, (n, bad) in sorted(hours.items())]


def member_messages(conn: sqlite3.Connection, aco_id: str, member_id: str, limit: int = 100) -> list[dict]:
    """The messages matched to one roster member (who matched), newest first: header fields, grade, method."""
    rows = conn.execute(
        f"SELECT {_LIST_COLUMNS}, x.grade, x.method FROM matches x JOIN messages m ON m.id = x.message_id "
        "WHERE x.member_id = ? AND x.aco_id = ? ORDER BY m.id DESC LIMIT ?",
        (member_id, aco_id, limit),
    )
    return [dict(r) for r in rows]


def review_of_message(conn: sqlite3.Connection, message_id: int) -> dict | None:
    """The review a message opened (its id and state), if any."""
    row = conn.execute("SELECT id, state FROM reviews WHERE message_id = ?", (message_id,)).fetchone()
    return dict(row) if row else None


def members_by_identifier(roster, kind: str, value: str, limit: int = 50) -> list[dict]:
    """Roster members (a ``RosterSnapshot``'s) by member id, MBI or MRN (any assigning authority), opened.

    A member id that is an MBI is looked up as the pseudonym the roster stores
    it under (:func:`~gateway.store.sealing.member_pseudonym`).
    """
    select = roster.member_select
    conn = roster.conn
    value = value.strip()
    if kind == "member":
        ids = {value, member_pseudonym(roster.keys, value)}
        acos = [r[0] for r in conn.execute("SELECT DISTINCT aco_id FROM roster_members")]
        rows = []
        for aco_id in acos:  # each one a lookup in the (aco_id, member_id) index
            for member_id in ids:
                rows += conn.execute(
                    f"SELECT {select} FROM roster_members r WHERE r.aco_id = ? AND r.member_id = ?",
                    (aco_id, member_id),
                ).fetchall()
    elif kind == "mbi":
        column = "mbi_hash" if roster.sealed else "mbi"
        rows = conn.execute(
            f"SELECT {select} FROM roster_members r WHERE r.{column} = ? AND r.{column} != '' LIMIT ?",
            (roster.mbi_key(value.replace("-", "").upper()), limit),
        ).fetchall()
    elif kind == "mrn":
        column = "mrn_hash" if roster.sealed else "mrn"
        rows = conn.execute(
            f"SELECT {select} FROM roster_members r WHERE r.{column} = ? AND r.{column} != '' LIMIT ?",
            (roster.mrn_key(value), limit),
        ).fetchall()
    else:
        raise ValueError(f"{kind!r} is not member, mbi or mrn")
    return [roster.row(r) for r in rows[:limit]]


# -- users, sessions, logins ----------------------------------------------------------------------------


def user_names(conn: sqlite3.Connection) -> list[str]:
    """Every console user's name."""
    return [r[0] for r in conn.execute("SELECT name FROM console_users ORDER BY name")]


def list_users(conn: sqlite3.Connection) -> list[dict]:
    """Console users (name, role, when added and last changed), no hashes; with their open sessions."""
    rows = conn.execute(
        "SELECT u.name, u.role, u.created_at, u.updated_at, "
        "(SELECT COUNT(*) FROM console_sessions s WHERE s.name = u.name) AS sessions "
        "FROM console_users u ORDER BY u.name"
    )
    return [dict(r) for r in rows]


def add_user(conn: sqlite3.Connection, name: str, role: str, password_hash: str, now: str, by: str) -> None:
    """Add a console user (audited); :class:`StoreError` when the name is taken or the role unknown."""
    if role not in CONSOLE_ROLES:
        raise StoreError(f"role: {role!r} is not one of {', '.join(CONSOLE_ROLES)}")
    if conn.execute("SELECT 1 FROM console_users WHERE name = ?", (name,)).fetchone():
        raise StoreError(f"there is already a console user {name!r}")
    conn.execute(
        "INSERT INTO console_users (name, role, password_hash, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        (name, role, password_hash, now, now),
    )
    append_event(conn, now, None, None, "console", "console-user-added", {"name": name, "role": role, "by": by})


def set_password(conn: sqlite3.Connection, name: str, password_hash: str, now: str, by: str) -> None:
    """Change a user's password hash and end the user's sessions (audited when ``by`` says who asked).

    ``by`` empty: the login's own rehash to stronger parameters (not an event).
    """
    cur = conn.execute(
        "UPDATE console_users SET password_hash = ?, updated_at = ? WHERE name = ?", (password_hash, now, name)
    )
    if cur.rowcount != 1:
        raise StoreError(f"no console user {name!r}")
    if by:
        conn.execute("DELETE FROM console_sessions WHERE name = ?", (name,))
        append_event(conn, now, None, None, "console", "console-password-changed", {"name": name, "by": by})


def remove_user(conn: sqlite3.Connection, name: str, now: str, by: str) -> None:
    """Remove a user and end the user's sessions (audited); :class:`StoreError` when there is none."""
    if conn.execute("DELETE FROM console_users WHERE name = ?", (name,)).rowcount != 1:
        raise StoreError(f"no console user {name!r}")
    conn.execute("DELETE FROM console_sessions WHERE name = ?", (name,))
    append_event(conn, now, None, None, "console", "console-user-removed", {"name": name, "by": by})


def login_record(conn: sqlite3.Connection, name: str) -> tuple[str, str] | None:
    """(role, password hash) of a user, for checking a login; None when there is no such user."""
    row = conn.execute("SELECT role, password_hash FROM console_users WHERE name = ?", (name,)).fetchone()
    return None if row is None else (row["role"], row["password_hash"])


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_session(
    conn: sqlite3.Connection,
    token: str,
    name: str,
    csrf: str,
    now_seconds: float,
    lifetime: float,
    now: str,
    client: str,
) -> None:
    """Open a session for ``name`` (stored by the hash of ``token``) and audit the login; expired ones go."""
    conn.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now_seconds,))
    conn.execute(
        "INSERT INTO console_sessions (token_hash, name, csrf, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
        (_token_hash(token), name, csrf, now_seconds, now_seconds + lifetime),
    )
    append_event(conn, now, None, None, "console", "console-login", {"by": name, "client": client})


def record_login(conn: sqlite3.Connection, name: str, now: str, client: str, reason: str) -> None:
    """Audit a refused login (the name as typed, the client's address, why: password, unknown, throttled)."""
    detail = {"name": name[:64], "client": client, "reason": reason}
    append_event(conn, now, None, None, "console", "console-login-refused", detail)


def session_of(conn: sqlite3.Connection, token: str, now_seconds: float) -> dict | None:
    """The live session of a cookie's token: its user's name and role, its CSRF token; None when none is."""
    row = conn.execute(
        "SELECT s.name, u.role, s.csrf, s.expires_at FROM console_sessions s JOIN console_users u ON u.name = s.name "
        "WHERE s.token_hash = ? AND s.expires_at > ?",
        (_token_hash(token), now_seconds),
    ).fetchone()
    return dict(row) if row else None


def end_session(conn: sqlite3.Connection, token: str, now: str) -> None:
    """Log out: forget the session (audited when there was one)."""
    row = conn.execute("SELECT name FROM console_sessions WHERE token_hash = ?", (_token_hash(token),)).fetchone()
    if row is None:
        return
    conn.execute("DELETE FROM console_sessions WHERE token_hash = ?", (_token_hash(token),))
    append_event(conn, now, None, None, "console", "console-logout", {"by": row["name"]})
