"""The keys that protect PHI at rest: a key ring read from a file or an environment variable.

A key ring is a list of named 256-bit keys, oldest first. The newest one
seals (encrypts) new data; every one of them opens data sealed under it, so a
rotation adds a key, re-seals in the background, and retires the old key only
when nothing needs it. Three uses, each with its own key derived by HKDF-SHA256
(RFC 5869), so no two uses ever share key material:

- **sealing** (AES-256-GCM, NIST SP 800-38D): message bodies, Bundles, outbox
  payloads, roster demographics. A sealed value names its key id, carries a
  fresh 96-bit nonce, and is bound to a *context* (associated data: which
  table, column and row it belongs to), so a sealed value moved to another row
  does not open;
- **lookup hashes** (HMAC-SHA256): fields that must be found by equality
  (identifiers, blocking keys) are stored as keyed hashes, which match without
  revealing the value;
- **the audit chain** (HMAC-SHA256 over each event row and the previous row's
  MAC).

Lookup hashes and the audit chain use the ring's *first* key: they must stay
the same across a rotation (a re-hash would rewrite the whole trail), so the
first key is never retired. The file format is one key a line, ``<id> <base64
of 32 bytes>``; ``#`` starts a comment. The same text, with ``;`` or newlines
between keys, may come from the environment variable :data:`KEYS_ENV`.

A ring read from a file follows it: when a rotation appends a key, a running
gateway (and each pipeline worker) reads the file again, at most once a second
when sealing, and at once when it meets a value sealed under a key it lacks.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import StoreError

__all__ = [
    "KEYS_ENV",
    "SEALED_PREFIX",
    "KeyRing",
    "KeyRingError",
    "MissingKey",
    "add_key",
    "is_sealed",
    "load_ring",
    "new_key_file",
]

#: The environment variable that may hold the key ring's text instead of a file.
KEYS_ENV = "HERALD_KEYS"
#: Every sealed value starts with these bytes. A NUL first: no HL7 message, JSON
#: document or text Herald stores starts with one, so plaintext is never mistaken for it.
SEALED_PREFIX = b"\x00HK1"
_NONCE = 12
_ID = re.compile(r"[A-Za-z0-9._-]{1,32}\Z")
#: How often (seconds) a ring read from a file looks whether a rotation added a key.
REFRESH_SECONDS = 1.0


class KeyRingError(StoreError):
    """The key ring cannot be read, or a sealed value cannot be opened with it."""


class MissingKey(KeyRingError):
    """No key is configured: neither the environment variable nor the key file holds one."""


def is_sealed(value: bytes | str | None) -> bool:
    """Whether ``value`` was sealed by a key ring (plaintext written before encryption was on is not)."""
    if value is None:
        return False
    if isinstance(value, str):
        return value.startswith(SEALED_PREFIX.decode("latin-1"))
    return bytes(value[: len(SEALED_PREFIX)]) == SEALED_PREFIX


def _derive(key: bytes, use: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"herald " + use).derive(key)


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class KeyRing:
    """Named keys, oldest first; the newest seals. ``KeyRing.disabled()`` stores plaintext."""

    def __init__(self, keys: list[tuple[str, bytes]], source: str = "") -> None:
        if not keys:
            raise KeyRingError(f"{source or 'the key ring'}: no keys")
        seen: set[str] = set()
        for key_id, raw in keys:
            if not _ID.match(key_id):
                raise KeyRingError(f"{source}: key id {key_id!r} must be 1-32 letters, digits, '.', '_' or '-'")
            if key_id in seen:
                raise KeyRingError(f"{source}: key id {key_id!r} appears twice")
            if len(raw) != 32:
                raise KeyRingError(f"{source}: key {key_id!r} must be 32 bytes (base64 of 32 random bytes)")
            seen.add(key_id)
        self.source = source
        self.ids = tuple(k for k, _ in keys)
        self._aead = {k: AESGCM(_derive(raw, b"seal")) for k, raw in keys}
        # What each key is, to tell a file that only gained keys from one whose keys changed.
        self._key_checks = {k: hashlib.sha256(raw).digest() for k, raw in keys}
        first = keys[0][1]
        self._lookup_key = _derive(first, b"lookup")
        # Keyed once; each hash copies it (half the cost of keying an HMAC per value).
        self._lookup_mac = hmac.new(self._lookup_key, digestmod=hashlib.sha256)
        self._chain_key = _derive(first, b"audit chain")
        self._chain_mac = hmac.new(self._chain_key, digestmod=hashlib.sha256)  # keyed once; copied per row
        #: Names the first key (hence the lookups) without revealing it: a database
        #: records it, so a wrong key is refused by name instead of failing row by row.
        self.fingerprint = hmac.new(_derive(first, b"check"), b"herald key check", hashlib.sha256).hexdigest()[:16]
        self.enabled = True
        self._path: Path | None = None
        self._identity: tuple[int, int, int] | None = None
        self._next_refresh = 0.0

    #: Whether :meth:`seal_text` gives bytes when disabled too (:meth:`binary`).
    text_as_bytes = False
    _binary: KeyRing | None = None

    def binary(self) -> KeyRing:
        """This ring for a database whose sealed columns are binary (PostgreSQL's BYTEA): text is written
        as its UTF-8 bytes when disabled too, since a binary column does not keep text as it is.

        An enabled ring seals text to bytes already: it is itself. SQLite keeps text in those columns.
        """
        if self.enabled or self.text_as_bytes:
            return self
        if self._binary is None:
            ring = copy.copy(self)
            ring.text_as_bytes = True
            self._binary = ring
        return self._binary

    @classmethod
    def disabled(cls) -> KeyRing:
        """A ring that seals nothing (``encrypt_at_rest = false``): values are stored as given.

        Lookup hashes and the audit chain still work, under a fixed key that is
        no secret: they then prove integrity against accidents, not against an
        attacker who can read the code.
        """
        global _DISABLED
        if _DISABLED is None:
            ring = cls([("none", hashlib.sha256(b"herald: encryption at rest is off").digest())], "disabled")
            ring.enabled = False
            _DISABLED = ring
        return _DISABLED

    # -- reading ------------------------------------------------------------------

    @classmethod
    def from_text(cls, text: str, source: str) -> KeyRing:
        """Parse ``<id> <base64>`` entries, one a line (or separated by ``;``)."""
        keys = []
        entries = [e for line in text.splitlines() for e in line.split("#", 1)[0].split(";")]
        for n, entry in enumerate(entries, 1):
            line = entry.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise KeyRingError(f"{source}: entry {n}: expected '<key id> <base64 key>'")
            try:
                raw = base64.b64decode(parts[1], validate=True)
            except ValueError:
                raise KeyRingError(f"{source}: key {parts[0]!r} is not base64") from None
            keys.append((parts[0], raw))
        return cls(keys, source)

    @classmethod
    def load(cls, path: Path | None, environ: Mapping[str, str] | None = None) -> KeyRing:
        """The ring from :data:`KEYS_ENV` when set, else from ``path``.

        A key file others can read is refused: the keys are worth as much as
        the PHI they protect.
        """
        environ = os.environ if environ is None else environ
        text = environ.get(KEYS_ENV, "")
        if text.strip():
            return cls.from_text(text, f"${KEYS_ENV}")
        if path is None:
            raise MissingKey(f"no key: set {KEYS_ENV} or a key file (herald keys init)")
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise MissingKey(f"{path}: no key file (make one with: herald keys init --key-file {path})") from None
        if mode & 0o077:
            raise KeyRingError(f"{path}: the key file is readable by others (mode {mode & 0o777:o}); chmod 600 it")
        identity = _file_identity(path)
        ring = cls.from_text(path.read_text(encoding="ascii", errors="replace"), str(path))
        ring._path, ring._identity = path, identity
        ring._next_refresh = time.monotonic() + REFRESH_SECONDS
        return ring

    def refresh(self) -> bool:
        """Read the key file again if it changed; True when it gained keys (a rotation added one).

        Only appended keys are taken: a file whose existing keys changed or went
        is refused (:class:`KeyRingError`), and this ring stays as it was.
        """
        if self._path is None:
            return False
        identity = _file_identity(self._path)
        if identity == self._identity:
            return False
        fresh = KeyRing.load(self._path, environ={})
        kept = fresh.ids[: len(self.ids)]
        if kept != self.ids or any(fresh._key_checks[k] != self._key_checks[k] for k in self.ids):
            raise KeyRingError(f"{self._path}: its keys changed (only appending a key is allowed); restart Herald")
        # The new keys first, then the ids that name them: a thread reading the ids meanwhile
        # finds every key it names.
        self._aead = fresh._aead
        self._key_checks = fresh._key_checks
        self.ids = fresh.ids
        self._identity = fresh._identity
        return True

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_SECONDS
        try:
            self.refresh()
        except (KeyRingError, OSError, ValueError):
            pass  # keep sealing with the keys in hand; a value under a key we lack says so when opened

    # -- using ----------------------------------------------------------------------

    @property
    def current_id(self) -> str:
        """The id of the key that seals new values."""
        return self.ids[-1]

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """``plaintext`` encrypted under the newest key, bound to ``context``; as given when disabled."""
        if not self.enabled:
            return plaintext
        if self._path is not None:
            self._maybe_refresh()
        key_id = self.current_id.encode("ascii")
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._aead[self.current_id].encrypt(nonce, plaintext, context)
        return SEALED_PREFIX + bytes([len(key_id)]) + key_id + nonce + sealed

    def open(self, value: bytes, context: bytes) -> bytes:
        """The plaintext of a sealed ``value`` (plaintext passes through); :class:`KeyRingError` if it won't open.

        A value that does not open was sealed under a key this ring does not
        hold, or was altered, or was moved from another row (its context).
        """
        value = bytes(value)
        if not is_sealed(value):
            return value
        start = len(SEALED_PREFIX)
        n = value[start]
        key_id = value[start + 1 : start + 1 + n].decode("ascii", "replace")
        body = value[start + 1 + n :]
        aead = self._aead.get(key_id)
        if aead is None and self._path is not None:
            try:
                self.refresh()  # sealed by a rotation that added a key since this ring was read
            except (KeyRingError, OSError, ValueError):
                pass  # said below: the key is lacking
            aead = self._aead.get(key_id)
        if aead is None:
            raise KeyRingError(f"a value is sealed under key {key_id!r}, which the key ring ({self.source}) lacks")
        try:
            return aead.decrypt(body[:_NONCE], body[_NONCE:], context)
        except InvalidTag:
            raise KeyRingError(
                f"a value sealed under key {key_id!r} does not open: altered, or not from here"
            ) from None

    def key_of(self, value: bytes | str | None) -> str | None:
        """The id of the key a sealed value is under (None for plaintext)."""
        if isinstance(value, str):
            value = value.encode("latin-1")
        if not is_sealed(value):
            return None
        start = len(SEALED_PREFIX)
        return bytes(value[start + 1 : start + 1 + value[start]]).decode("ascii", "replace")

    def seal_text(self, text: str | None, context: bytes) -> bytes | str | None:
        """A text column's value sealed (bytes), or the text itself when disabled (None stays None).

        Disabled, on a binary column (:meth:`binary`): the text's UTF-8 bytes, which :meth:`open_text` reads.
        """
        if text is None:
            return None
        if self.enabled:
            return self.seal(text.encode("utf-8"), context)
        return text.encode("utf-8") if self.text_as_bytes else text

    def open_text(self, value: bytes | str | None, context: bytes) -> str | None:
        """The text of a column written by :meth:`seal_text` (or plaintext from before)."""
        if value is None:
            return None
        if isinstance(value, str):
            return value
        return self.open(value, context).decode("utf-8")

    def lookup(self, value: str) -> str:
        """A keyed hash of ``value`` for equality lookups (hex, 32 characters): same value, same hash."""
        mac = self._lookup_mac.copy()
        mac.update(value.encode("utf-8"))
        return mac.hexdigest()[:32]

    def digest(self, value: bytes) -> str:
        """A keyed hash of bytes (hex, 32 characters): a message's digest that cannot be confirmed by guessing."""
        mac = self._lookup_mac.copy()
        mac.update(value)
        return mac.hexdigest()[:32]

    def lookup_int(self, value: bytes) -> int:
        """A keyed hash of ``value`` as a signed 64-bit integer (for integer-keyed indexes)."""
        mac = self._lookup_mac.copy()
        mac.update(value)
        return int.from_bytes(mac.digest()[:8], "big", signed=True)

    def chain_mac(self, previous: bytes, row: bytes) -> bytes:
        """The audit chain's MAC of ``row`` following ``previous`` (the MAC of the row before)."""
        mac = self._chain_mac.copy()
        mac.update(previous)
        mac.update(row)
        return mac.digest()


_DISABLED: KeyRing | None = None


def load_ring(key_file: Path | None, enabled: bool = True, environ: Mapping[str, str] | None = None) -> KeyRing:
    """The ring a configuration names: :data:`KEYS_ENV` or ``key_file`` when ``enabled``, else the disabled ring."""
    if not enabled:
        return KeyRing.disabled()
    return KeyRing.load(key_file, environ)


def new_key_file(path: Path, key_id: str = "k1") -> Path:
    """Write a new key file holding one random key (mode 0600, in a folder of mode 0700); refuse to overwrite."""
    if not path.parent.exists():
        from gateway.store.files import private_folder

        private_folder(path.parent)  # 0700, and each folder made above it, whatever the umask
    line = f"{key_id} {base64.b64encode(secrets.token_bytes(32)).decode('ascii')}\n"
    header = "# Herald's keys for PHI at rest: '<id> <base64 of 32 bytes>', oldest first; the last seals.\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyRingError(f"{path} exists; Herald never overwrites a key file") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(header + line)
    return path


def add_key(path: Path) -> str:
    """Append a new random key to the ring in ``path`` (the next to seal); return its id."""
    ring = KeyRing.load(path, environ={})
    n = len(ring.ids) + 1
    while f"k{n}" in ring.ids:
        n += 1
    key_id = f"k{n}"
    with open(path, "a", encoding="ascii") as f:
        f.write(f"{key_id} {base64.b64encode(secrets.token_bytes(32)).decode('ascii')}\n")
    return key_id
