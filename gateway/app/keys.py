"""The keys that protect PHI at rest, as the CLI manages them: make, rotate, count, and open a file drop.

``herald keys init`` writes a key file; ``herald keys rotate`` appends a key
and seals every value again under it, in small transactions through the
store's writer (a running gateway keeps taking messages, and picks the new
key up from the file within a second); ``herald keys status`` says how many
values each key seals; ``herald outbox open`` reads a sealed file drop and
audits that it did.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.app.roster import opened_store
from gateway.config import Config
from gateway.delivery.worker import open_file_drop
from gateway.matching.roster import DERIVATION
from gateway.store import keys as keys_module
from gateway.store import open_roster_snapshot, roster_path
from gateway.store.keys import KEYS_ENV, KeyRing, KeyRingError, add_key, load_ring, new_key_file
from gateway.store.outbox import notification_message_id
from gateway.store.roster_import import reseal_roster, roster_key_counts
from gateway.store.rotation import (
    SEALED_COLUMNS,
    digests_keyed,
    empty_the_log,
    key_counts,
    rehash_digests,
    reseal_batch,
)
from gateway.store.schema import check_keys, open_database

__all__ = [
    "KeyStatus",
    "Rotation",
    "check_key_ring",
    "init_key_file",
    "key_ring",
    "key_status",
    "open_outbox_file",
    "rotate_keys",
]

#: Values sealed again per store job during a rotation: one small transaction each.
ROTATION_BATCH = 200


def key_ring(config: Config, environ: Mapping[str, str] | None = None) -> KeyRing:
    """The ring the configuration names: ``HERALD_KEYS``, else ``[security] key_file``; disabled when off."""
    return load_ring(config.key_path, config.encrypt_at_rest, environ)


def check_key_ring(config: Config, keys: KeyRing) -> None:
    """Refuse (:class:`KeyRingError`) a ring that is not the one the database and roster file were written with."""
    if config.database.exists():
        conn = open_database(config.database, readonly=True, keys=keys)
        try:
            check_keys(conn, config.database)
        finally:
            conn.close()
    if roster_path(config.database).exists():
        open_roster_snapshot(config.database, keys).close()


def init_key_file(path: Path) -> Path:
    """Make a new key file (0600, in a 0700 folder); refuses to overwrite one."""
    return new_key_file(path)


@dataclass
class Rotation:
    """What a rotation did."""

    added: str | None  # the key appended to the file (None: --no-new-key, or keys from the environment)
    sealing_key: str
    sealed: Counter = field(default_factory=Counter)  # per column, values sealed again
    digests: int = 0  # message digests made again (plain SHA-256 or the disabled ring's)
    roster_members: int = 0
    checkpointed: bool = False  # the write-ahead log was emptied (no older page left in it)
    seconds: float = 0.0


def rotate_keys(
    config: Config,
    *,
    new_key: bool = True,
    batch: int = ROTATION_BATCH,
    progress: Callable[[str, int], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Rotation:
    """Append a key to the key file (unless ``new_key`` is false) and seal every value under it.

    Every sealed or plaintext value of the database is sealed again,
    ``batch`` at a time, one writer transaction each; message digests that are
    not this ring's keyed digests are made again; the roster file is
    republished with every member sealed under the new key. ``progress`` is
    told (column, values done so far) as it goes. Keys that come from
    ``HERALD_KEYS`` cannot be appended to: add one there, restart Herald, and
    rotate with ``new_key=False``.
    """
    environ = os.environ if environ is None else environ
    if not config.encrypt_at_rest:
        raise KeyRingError("encryption at rest is off ([security] encrypt_at_rest = false): there is nothing to seal")
    started = time.monotonic()
    added = None
    if new_key:
        if environ.get(KEYS_ENV, "").strip():
            raise KeyRingError(
                f"the keys come from ${KEYS_ENV}: append a key there, restart Herald, then run "
                "herald keys rotate --no-new-key"
            )
        key_ring(config, environ)  # the file exists and is private before it is appended to
        added = add_key(config.key_path)
        # A running gateway's ring reads the file again at most once a second when it seals: after
        # two, everything it seals is under the new key, so the pass below leaves nothing behind.
        time.sleep(2 * keys_module.REFRESH_SECONDS)
    keys = key_ring(config, environ)
    report = Rotation(added, keys.current_id)
    tell = progress or (lambda _name, _done: None)
    with opened_store(config.database, keys=keys) as store:
        for column in SEALED_COLUMNS:
            after, done = None, 0
            while True:
                n, after = store.call(reseal_batch, column.name, after, batch)
                done += n
                if n:
                    tell(column.name, done)
                if after is None:
                    break
            report.sealed[column.name] = done
        if not store.read(digests_keyed):
            after, done = 0, 0
            while after is not None:
                n, after = store.call(rehash_digests, after, batch)
                done += n
                tell("messages.sha256", done)
            report.digests = done
    report.roster_members = reseal_roster(roster_path(config.database), keys, DERIVATION, database=config.database)
    if report.roster_members:
        tell("roster members", report.roster_members)
    report.checkpointed = empty_the_log(config.database)
    report.seconds = time.monotonic() - started
    return report


@dataclass
class KeyStatus:
    """How many values each key seals, per column (key id None: plaintext written before)."""

    source: str
    ids: tuple[str, ...]
    sealing_key: str
    fingerprint: str
    columns: dict[str, Counter]
    roster: dict[str | None, int]
    digests_keyed: bool

    def totals(self) -> Counter:
        """Values per key id, every column and the roster together."""
        total: Counter = Counter()
        for counts in self.columns.values():
            total.update(counts)
        total.update(self.roster)
        return total


def key_status(config: Config, environ: Mapping[str, str] | None = None) -> KeyStatus:
    """Count, per key id, the values it seals in the database and the roster file (read-only)."""
    keys = key_ring(config, environ)
    conn = open_database(config.database, readonly=True, keys=keys)
    try:
        check_keys(conn, config.database)
        columns = key_counts(conn)
        keyed = digests_keyed(conn)
    finally:
        conn.close()
    roster = roster_key_counts(roster_path(config.database), keys)
    return KeyStatus(keys.source, keys.ids, keys.current_id, keys.fingerprint, columns, roster, keyed)


def open_outbox_file(config: Config, path: Path, by: str) -> bytes:
    """The Bundle of a sealed file drop; the reading is audited first (a ``phi-read`` event by ``cli:<by>``).

    Raises :class:`KeyRingError` when it does not open, ``ValueError`` when it is not a sealed drop.
    """
    keys = key_ring(config)
    notification_id, payload = open_file_drop(path, keys)
    with opened_store(config.database, keys=keys) as store:
        message_id = store.read(notification_message_id, notification_id)
        detail = {"notification": notification_id, "file": path.name}
        store.record_reads(f"cli:{by}", "outbox open", [message_id] if message_id is not None else [], detail)
    return payload
