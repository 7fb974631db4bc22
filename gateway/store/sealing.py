"""What of a Herald database is sealed, bound to which row, and what is stored as a keyed hash.

Every sealed value is bound to a *context* (AES-GCM associated data) that
names its table, column and row, so a value copied to another row does not
open. The contexts are written here, once, for the writers, the readers and
``herald keys rotate``:

====================================  ==========================================
value                                 context
====================================  ==========================================
``messages.raw``                      ``messages.raw:<id>``
``messages.fhir``                     ``messages.fhir:<id>``
``notifications.payload``             ``notifications.payload:<notification id>``
``reviews.candidates``                ``reviews.candidates:<message id>``
``confirmed_links.mrn``               ``confirmed_links.mrn:<mrn hash>:<authority>:<aco>``
a file drop (``<id>.json.sealed``)    ``outbox:<notification id>``
roster: ``phi`` and ``person``        ``roster.<column>:<aco id>\\x1f<member id>``
``episode_events.event``              ``episode_events.event:<message id>``
``episodes.state``                    ``episodes.state:<episode key>``
``tasks.resource``                    ``tasks.resource:<task id>``
====================================  ==========================================

An episode (care transitions) is found by its *episode key*, the keyed hash
of its facility and visit number (:func:`episode_key`): the visit number is
never stored in the clear.

A message's id is reserved inside the writer's transaction (the next rowid,
read under its write lock) so its body is sealed once, with its own id.

Keyed hashes (:meth:`~gateway.store.keys.KeyRing.lookup`) carry a prefix per
kind of value, so equal values of different kinds do not share a hash. A
database first written with encryption off holds hashes under the disabled
ring's public key; lookups try those too until ``herald keys rotate`` has
hashed them again.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3

from gateway.store.keys import KeyRing

__all__ = [
    "OUTBOX_SUFFIX",
    "ROSTER_PHI_COLUMNS",
    "block_hash",
    "candidates_context",
    "episode_event_context",
    "episode_key",
    "episode_state_context",
    "file_drop_context",
    "keys_of",
    "link_context",
    "message_context",
    "message_digest_matches",
    "mrn_hash",
    "mbi_hash",
    "mrn_hashes",
    "payload_context",
    "roster_context",
    "row_digest",
    "task_context",
    "term_hash",
]

#: A sealed file drop's name: ``<notification id>.json.sealed``.
OUTBOX_SUFFIX = ".json.sealed"

#: A roster member's columns that identify the patient, sealed together (a JSON list, in this
#: order) in ``roster_members.phi``: one open per member read, not one per column. The
#: others (ACO and member ids, assigning authority, sex, state, PCP, care manager,
#: attribution dates, opt-out) stay readable: imports and counts filter on them.
ROSTER_PHI_COLUMNS = (
    "mbi",
    "mrn",
    "last_name",
    "first_name",
    "middle_name",
    "name_suffix",
    "birth_date",
    "address_line",
    "city",
    "zip",
    "phone",
)


def keys_of(conn: sqlite3.Connection) -> KeyRing:
    """The key ring a connection was opened with (``open_database(keys=...)``); the disabled ring otherwise."""
    return getattr(conn, "keys", None) or KeyRing.disabled()


def message_context(column: str, message_id: int) -> bytes:
    """The context of ``messages.<column>`` (raw, fhir) of one message."""
    return b"messages.%s:%d" % (column.encode("ascii"), message_id)


def payload_context(notification_id: str) -> bytes:
    """The context of a notification's stored payload (rows from before schema version 2)."""
    return b"notifications.payload:" + notification_id.encode("utf-8")


def attribution_context(notification_id: str) -> bytes:
    """The context of a notification's attribution (ACO, PCP, care manager, for its summary)."""
    return b"notifications.attribution:" + notification_id.encode("utf-8")


def candidates_context(message_id: int) -> bytes:
    """The context of a review's candidates (one review per message)."""
    return b"reviews.candidates:%d" % message_id


def episode_event_context(message_id: int) -> bytes:
    """The context of a message's episode event (care transitions): one per message."""
    return b"episode_events.event:%d" % message_id


def episode_state_context(key: str) -> bytes:
    """The context of an episode's folded state: its episode key."""
    return b"episodes.state:" + key.encode("ascii")


def task_context(task_id: str) -> bytes:
    """The context of a worklist task's FHIR Task: the task's id."""
    return b"tasks.resource:" + task_id.encode("utf-8")


def episode_key(keys: KeyRing, facility: str, visit: str) -> str:
    """The keyed hash an episode is found by: its facility and visit number."""
    return keys.lookup("episode:" + facility + "\x1f" + visit)


def file_drop_context(notification_id: str) -> bytes:
    """The context of a sealed file drop: its notification id (the file's name)."""
    return b"outbox:" + notification_id.encode("utf-8")


def mrn_hash(keys: KeyRing, mrn: str) -> str:
    """The keyed hash an MRN is found by (confirmed links, the roster's MRN index)."""
    return keys.lookup("mrn:" + mrn)


def mbi_hash(keys: KeyRing, mbi: str) -> str:
    """The keyed hash a roster member's MBI is found by."""
    return keys.lookup("mbi:" + mbi)


#: CMS's MBI format (11 characters; no S, L, O, I, B or Z among the letters).
_L = "[AC-HJKMNP-RT-Y]"
_MBI = re.compile(rf"[1-9]{_L}[AC-HJKMNP-RT-Y0-9][0-9]{_L}[AC-HJKMNP-RT-Y0-9][0-9]{_L}{{2}}[0-9]{{2}}")


def member_pseudonym(keys: KeyRing, member_id: str) -> str:
    """The member id Herald stores for ``member_id``: itself, unless it is an MBI.

    CMS's files (SSP, CCLF8) carry no member id of their own, so the MBI is
    the member id; stored as it is, the MBI would be readable in roster.db and
    in every match, review and audit event that names the member. An MBI is
    replaced by ``MBI-`` and 12 characters of its keyed hash: stable across
    imports (the same file gives the same ids), and not the MBI.
    """
    value = member_id.strip().upper().replace("-", "")
    if not _MBI.fullmatch(value):
        return member_id
    return "MBI-" + keys.lookup("member-id:" + value)[:12].upper()


def block_hash(keys: KeyRing, key: str) -> int:
    """A blocking key as the roster stores it: a keyed, signed 64-bit hash (collisions only add candidates)."""
    return keys.lookup_int(b"block:" + key.encode("utf-8"))


def term_hash(keys: KeyRing, term: str) -> str:
    """A name or birth-date term as the roster counts it: a keyed hash."""
    return keys.lookup("term:" + term)


def row_digest(keys: KeyRing, values: tuple) -> str:
    """A keyed digest of a roster member's values: an import compares it to tell changed members from unchanged."""
    return keys.digest(json.dumps(values, ensure_ascii=False).encode("utf-8"))


def mrn_hashes(keys: KeyRing, mrn: str) -> tuple[str, ...]:
    """The hashes an MRN may be stored under: this ring's, and the disabled ring's (rows from when it was off)."""
    mine, plain = mrn_hash(keys, mrn), mrn_hash(KeyRing.disabled(), mrn)
    return (mine,) if mine == plain else (mine, plain)


def link_context(hashed_mrn: str, authority: str, aco_id: str) -> bytes:
    """The context of a confirmed link's sealed MRN: its primary key."""
    return f"confirmed_links.mrn:{hashed_mrn}:{authority.upper()}:{aco_id}".encode()


def roster_context(column: str, aco_id: str, member_id: str) -> bytes:
    """The context of a roster member's sealed column: the member's (ACO, member id), unique in the file."""
    return f"roster.{column}:{aco_id}\x1f{member_id}".encode()


def message_digest_matches(keys: KeyRing, stored: str, raw: bytes, digest: str) -> bool:
    """Whether a stored message digest is that of ``raw`` (``digest``: this ring's).

    Digests from before encryption at rest are a plain SHA-256 (64 hex
    digits); from a time it was off, the disabled ring's keyed hash.
    """
    if stored == digest:
        return True
    if len(stored) == 64:
        return stored == hashlib.sha256(raw).hexdigest()
    return keys.enabled and stored == KeyRing.disabled().digest(raw)
