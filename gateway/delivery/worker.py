"""Delivery: send outbox notifications, retry with backoff and jitter, dead-letter only when it is hopeless.

Channels (where a notification's settings come from: its recipient directory
entry, else ``channel_settings`` by destination, else ``[recipients]``):

* ``file``: one JSON file per notification, ``<notification id>.json``, written
  to a temporary name, fsynced and renamed, so a reader never sees half a file.
  A file drop is PHI at rest: in a folder under the data folder (the default
  ``outbox/``) it is sealed with the key ring, ``<notification id>.json.sealed``
  (read with ``herald outbox open FILE``), and private (0600 in a 0700 folder);
  a recipient's own share outside it is written as plain JSON unless its
  ``encrypt = true`` (see ``Config.file_drop_sealed``). A digest recipient's
  ``ndjson`` file channel gets one file per digest, a Bundle a line.
* ``fhir``: ``POST [base]/$process-message`` (:mod:`gateway.delivery.fhir`).
* ``mllp``: the v2 message as received (or the notification's own v2
  payload, an ED alert) to an MLLP listener (:mod:`gateway.delivery.mllp_forward`).
* ``direct``: S/MIME signed and encrypted email through the ``[direct]``
  relay (:mod:`gateway.delivery.direct`), the summary with the Bundle; a
  digest recipient gets one email per digest with every Bundle attached.

The notification id is the Bundle id and stays the same across retries, so a
receiver can drop duplicates (delivery is at least once). Each destination
has its own concurrency slots and circuit breaker (:mod:`gateway.delivery.policy`),
so a dead or stalled receiver never holds up another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent

from gateway.config import Config
from gateway.delivery.channels import (
    DeliveryFailed,
    DirectDestination,
    FhirDestination,
    HttpConnections,
    MllpDestination,
    OutboundNotification,
    SendResult,
)
from gateway.delivery.direct import DirectChannel
from gateway.delivery.directory_cache import DirectoryCache
from gateway.delivery.fhir import FhirChannel
from gateway.delivery.mllp_forward import MllpForwardChannel
from gateway.delivery.policy import CircuitBreaker, DestinationSlots, retry_delay
from gateway.delivery.routing import payload_builder
from gateway.delivery.summary import notification_summary
from gateway.errors import ConfigError
from gateway.records import DEAD, RETRYING, SENT, DeliveryAttempt, Notification
from gateway.store import Store
from gateway.store.files import FILE_MODE, private_folder
from gateway.store.keys import KeyRing
from gateway.store.sealing import OUTBOX_SUFFIX, file_drop_context


def _load_syncfs():
    """libc's syncfs(2) on Linux (one flush for a whole batch of files), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_syncfs = _load_syncfs()


def _flush_folder(directory: Path, whole_filesystem: bool) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        if whole_filesystem and _syncfs is not None:
            if _syncfs(fd) != 0:
                raise OSError(ctypes_errno(), "syncfs failed")
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _is_under(directory: Path, root: Path | None) -> bool:
    return root is not None and directory.resolve().is_relative_to(root.resolve())


def write_files_atomically(
    items: list[tuple[Path, str, bytes]], private_root: Path | None = None
) -> list[BaseException | None]:
    """Write several files so that each appears whole or not at all, and durably.

    Under ``private_root`` (the data folder) a file is created 0600 and a
    missing folder 0700, whatever the umask; elsewhere (a recipient's share)
    the umask decides.

    Each file is written under a temporary name; the data is flushed to disk;
    the files are renamed into place; the renames are flushed. On Linux the two
    flushes are one ``syncfs`` each for the whole batch (measured here: about
    70-180 us a file against 300-375 us with an fsync per file); elsewhere each
    file and folder is fsynced. Returns, per item, None or the error that
    stopped it.
    """
    results: list[BaseException | None] = [None] * len(items)
    written: list[tuple[int, Path, Path]] = []
    # Each folder is resolved and made once a batch (a batch is mostly a few recipients' folders, many files each).
    ready: dict[Path, bool] = {}
    for i, (directory, name, data) in enumerate(items):
        tmp = directory / f".{name}.tmp"
        try:
            private = ready.get(directory)
            if private is None:
                private = _is_under(directory, private_root)
                if private:
                    private_folder(directory)
                else:
                    directory.mkdir(parents=True, exist_ok=True)
                ready[directory] = private
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE if private else 0o666)
            try:
                view = memoryview(data)
                while view:  # os.write, not a file object: no buffer, no fstat or ioctl a file
                    view = view[os.write(fd, view) :]
                if _syncfs is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
            written.append((i, tmp, directory / name))
        except OSError as e:
            results[i] = e
    folders = sorted({final.parent for _, _, final in written})
    if _syncfs is not None:
        # syncfs flushes one filesystem: one folder per device stands for the rest.
        folders = list({os.stat(f).st_dev: f for f in folders}.values())
        try:
            for directory in folders:
                _flush_folder(directory, whole_filesystem=True)
        except OSError as e:
            for i, _, _ in written:
                results[i] = e
            return results
    for i, tmp, final in written:
        try:
            os.replace(tmp, final)
        except OSError as e:
            results[i] = e
    for directory in folders:
        try:
            _flush_folder(directory, whole_filesystem=_syncfs is not None)
        except OSError as e:
            device = os.stat(directory).st_dev
            for i, _, final in written:
                if final.parent == directory or (_syncfs is not None and os.stat(final.parent).st_dev == device):
                    results[i] = e
    return results


def notification_payloads(notifications: list[Notification]) -> list[bytes | DeliveryFailed]:
    """The bytes each notification sends (JSON work: call it off the reactor).

    A stored payload (rows from before schema version 2) is sent as stored;
    otherwise the Bundle is built from the message's stored Bundle, parsed
    once for all its recipients in the list.
    """
    builders: dict[int, Callable[[Notification], str]] = {}
    out: list[bytes | DeliveryFailed] = []
    for n in notifications:
        if n.payload is not None:
            out.append(n.payload.encode("utf-8"))
        elif n.bundle is None:
            out.append(DeliveryFailed("the message has no stored Bundle to send", permanent=True))
        else:
            if n.message_id not in builders:
                builders[n.message_id] = payload_builder(n.bundle)
            out.append(builders[n.message_id](n).encode("utf-8"))
    return out


def file_drop_name(n: Notification, sealed: bool) -> str:
    """A notification's file name: ``<id>.json``, or ``<id>.json.sealed`` when sealed."""
    return n.id + (OUTBOX_SUFFIX if sealed else ".json")


def write_notification_files(
    notifications: list[Notification],
    keys: KeyRing | None = None,
    sealed: Callable[[str], bool] | None = None,
    private_root: Path | None = None,
) -> list[BaseException | None]:
    """Build each notification's Bundle and write it as ``<target>/<id>.json`` (see write_files_atomically).

    Where ``sealed(target)`` says so (and ``keys`` seals), the Bundle is sealed
    with ``keys`` and bound to the notification's id, as ``<id>.json.sealed``.
    """
    payloads = notification_payloads(notifications)
    results: list[BaseException | None] = [p if isinstance(p, BaseException) else None for p in payloads]
    todo = [i for i, p in enumerate(payloads) if not isinstance(p, BaseException)]
    items = []
    for i in todo:
        n = notifications[i]
        seal = keys is not None and keys.enabled and sealed is not None and sealed(n.target)
        data = keys.seal(payloads[i], file_drop_context(n.id)) if seal else payloads[i]
        items.append((Path(n.target), file_drop_name(n, seal), data))
    for i, error in zip(todo, write_files_atomically(items, private_root), strict=True):
        results[i] = error
    return results


def open_file_drop(path: Path, keys: KeyRing) -> tuple[str, bytes]:
    """The notification id and Bundle (JSON bytes) of a sealed file drop ``<id>.json.sealed``.

    Raises :class:`~gateway.store.keys.KeyRingError` when it does not open
    (another ring's, altered, or renamed: its name is its context).
    """
    if not path.name.endswith(OUTBOX_SUFFIX):
        raise ValueError(f"{path.name} is not a sealed file drop (<notification id>{OUTBOX_SUFFIX})")
    notification_id = path.name[: -len(OUTBOX_SUFFIX)]
    return notification_id, keys.open(path.read_bytes(), file_drop_context(notification_id))


class _FileDropBatch:
    """Gathers the file-drop sends of one reactor turn into one thread job."""

    def __init__(
        self,
        reactor,
        write: Callable[[list[Notification]], list] = write_notification_files,
        name: Callable[[Notification], str] = lambda n: f"{n.id}.json",
    ) -> None:
        self.reactor = reactor
        self.write = write
        self.name = name
        self.waiting: list[tuple[Notification, defer.Deferred]] = []

    def send(self, n: Notification) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if not self.waiting:
            self.reactor.callLater(0, self._flush)
        self.waiting.append((n, d))
        return d

    def _flush(self) -> None:
        batch, self.waiting = self.waiting, []
        job = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.write, [n for n, _ in batch])

        def fire(results):
            for (n, d), error in zip(batch, results, strict=True):
                if error is None:
                    d.callback(f"wrote {self.name(n)}")
                elif isinstance(error, DeliveryFailed):
                    d.errback(error)
                else:
                    d.errback(
                        DeliveryFailed(
                            f"cannot write the file: {getattr(error, 'strerror', None) or error}", permanent=False
                        )
                    )

        def failed(f):
            for _, d in batch:
                d.errback(f)

        job.addCallbacks(fire, failed)


class DeliveryWorker(Service):
    """Polls the outbox and delivers due notifications, a bounded number at a time."""

    _log = Logger()

    def __init__(
        self,
        store: Store,
        reactor,
        max_attempts: int = Config.delivery_max_attempts,
        backoff_initial: float = Config.delivery_backoff_initial,
        backoff_max: float = Config.delivery_backoff_max,
        timeout: float = Config.delivery_timeout,
        concurrency: int = Config.delivery_concurrency,
        poll_interval: float = Config.delivery_poll_interval,
        agent=None,
        retry_horizon: float = Config.delivery_retry_hours * 3600,
        per_destination: int = Config.delivery_per_destination,
        fhir_settings: Mapping[str, Mapping] | None = None,
        clock: Callable[[], datetime] | None = None,
        rng: Callable[[], float] = random.random,
        keys: KeyRing | None = None,
        file_drop_sealed: Callable[[str], bool] | None = None,
        private_root: Path | None = None,
        channel_settings: Mapping[str, Mapping[str, Any]] | None = None,
        direct_relay: Mapping[str, Any] | None = None,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 30.0,
        breaker_cap: float = 600.0,
    ) -> None:
        """``keys`` seals the file drops ``file_drop_sealed(target folder)`` names (none without it);
        files under ``private_root`` (the data folder) are private (see :func:`write_notification_files`).

        ``channel_settings``: a channel's settings by destination (the outbox
        row's target) for notifications with no directory entry (ED alerts).
        ``direct_relay``: the ``[direct]`` relay settings for Direct channels.
        After ``breaker_threshold`` retryable failures in a row a destination
        rests ``breaker_cooldown`` seconds (doubling while it keeps failing, up to ``breaker_cap``)."""
        self.store = store
        self.reactor = reactor
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.agent = agent or Agent(reactor, connectTimeout=timeout)
        self.retry_horizon = retry_horizon
        #: At most ``per_destination`` attempts at once to one destination, ``concurrency`` in all.
        self._slots = DestinationSlots(per_destination=min(per_destination, concurrency), total=concurrency)
        self._waiting: set[str] = set()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.rng = rng
        # Kept-alive HTTP connections for every FHIR channel: as many idle a destination as it has slots.
        self._http = HttpConnections(reactor, per_host=self._slots.per_destination)
        # One channel per FHIR endpoint (it holds the endpoint's token cache). Made now, so a bad
        # TLS file or SMART key fails at start naming its key, not at the first notification.
        self._fhir: dict[str, FhirChannel] = {
            target: FhirChannel(
                FhirDestination.from_settings(
                    {"url": target, "timeout": timeout, **{k: v for k, v in settings.items() if k != "url"}},
                    "recipients",
                ),
                reactor,
                connections=self._http,
            )
            for target, settings in (fhir_settings or {}).items()
        }
        self._inflight: set[str] = set()
        self._attempts: dict[str, defer.Deferred] = {}
        if file_drop_sealed is not None:
            config_sealed = file_drop_sealed

            def file_drop_sealed(target: str) -> bool:
                # A directory entry's own ``encrypt`` wins over the config's rule for its folder.
                chosen = self._file_encrypt.get(target)
                return config_sealed(target) if chosen is None else chosen

        write = functools.partial(
            write_notification_files, keys=keys, sealed=file_drop_sealed, private_root=private_root
        )
        sealing = keys is not None and keys.enabled and file_drop_sealed is not None
        self._sealed = (lambda target: bool(file_drop_sealed(target))) if sealing else (lambda target: False)
        self._private_root = private_root
        self._keys = keys
        self._files = _FileDropBatch(reactor, write, lambda n: file_drop_name(n, self._sealed(n.target)))
        self._channel_settings = dict(channel_settings or {})
        self._direct_relay = dict(direct_relay or {})
        self._channels: dict[tuple[str, str], Any] = {}
        self._directory = DirectoryCache()
        self._entries: dict = {}
        self._file_encrypt: dict[str, bool] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown = breaker_cooldown
        self.breaker_cap = breaker_cap
        #: Called after every attempt as ``observer(notification, state, seconds)`` (state: sent, retrying
        #: or dead; seconds from the attempt's start): metrics and logs hang here.
        self.observers: list[Callable[[Notification, str, float], None]] = []
        self._started_at: dict[str, float] = {}
        self._records: list[tuple[DeliveryAttempt, defer.Deferred]] = []
        self._call = None
        self._polling = False
        self._again = False
        self.delivered = 0
        #: Paused (:meth:`pause`): no notification is taken until :meth:`resume`.
        self.paused = False

    def startService(self) -> None:
        super().startService()
        self.wake()

    #: Seconds a stop waits for attempts under way before it cancels them (recorded as retryable).
    stop_grace = 5.0

    def stopService(self):
        """Stop polling; wait up to :attr:`stop_grace` for attempts under way, then cancel the rest.

        A cancelled attempt closes its connection and is recorded as a failure
        to retry, so a stalled receiver cannot hold a shutdown longer than the grace.
        """
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        pending = list(self._attempts.values())
        if not pending:
            return self._http.close()
        done = defer.DeferredList(pending)
        timer = self.reactor.callLater(self.stop_grace, lambda: [d.cancel() for d in list(self._attempts.values())])

        def stopped(result):
            if timer.active():
                timer.cancel()
            return self._http.close()  # no kept-alive connection outlives the worker

        return done.addBoth(stopped)

    def pause(self) -> None:
        """Take no new notification (the disk is short of space); attempts under way finish and are recorded."""
        self.paused = True

    def resume(self) -> None:
        """Deliver again: look for due notifications now."""
        self.paused = False
        self.wake()

    def wake(self) -> None:
        """Look for due notifications now (called when the pipeline writes the outbox)."""
        if not self.running or self.paused:
            return
        if self._polling:
            self._again = True
            return
        self._poll()

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self.reactor.seconds() + delay:
                return
            self._call.cancel()
        self._call = self.reactor.callLater(delay, self._poll)

    @defer.inlineCallbacks
    def _poll(self):
        if self._polling or not self.running or self.paused:
            return
        self._polling = True
        # What waited (a busy or resting destination) is looked at afresh each poll; within one poll
        # it is skipped, so the poll reaches other destinations' notifications.
        self._waiting.clear()
        try:
            while True:
                self._again = False
                room = self.concurrency - len(self._inflight)
                if room <= 0:
                    break
                skip = self._inflight | self._waiting
                self._entries = yield self.store.submit_read(self._directory.entries)
                if not self.running or self.paused:
                    break  # stopped while the directory was read: the store may be stopping too
                due = yield self.store.due_notifications(self.reactor.seconds(), room, tuple(skip))
                if not self.running or self.paused:
                    # Stopped (or paused) while the outbox was read: start nothing that stopService
                    # would not wait for, and whose record would reach a stopped store.
                    break
                started = 0
                for n in due:
                    breaker = self._breaker(n.target)
                    if breaker.state == "open":
                        # The destination rests: its notifications wait without spending attempts.
                        self._waiting.add(n.id)
                        self._schedule(max(breaker.reopens_in(), self.poll_interval))
                        continue
                    # A file drop is our own disk, written in batches: it may use every slot; a receiver
                    # across the network gets per_destination, so a stalled one holds only its own.
                    limit = self.concurrency if n.channel == "file" else None
                    if not self._slots.take(n.target, limit):
                        # Its destination has all its slots busy (a slow or stalled receiver): it
                        # waits, and the rest of this poll goes to other destinations.
                        self._waiting.add(n.id)
                        continue
                    if not breaker.allow():
                        # Half-open, and its one trial is already under way.
                        self._slots.give(n.target)
                        self._waiting.add(n.id)
                        continue
                    self._inflight.add(n.id)
                    self._attempt(n)
                    started += 1
                if not self._again and len(due) < room:
                    break
                if not started and due:
                    break
        except Exception:
            self._log.failure("polling the outbox failed")
        finally:
            self._polling = False
        self._schedule(self.poll_interval)

    def _breaker(self, target: str) -> CircuitBreaker:
        breaker = self._breakers.get(target)
        if breaker is None:
            breaker = self._breakers[target] = CircuitBreaker(
                self.reactor.seconds, self.breaker_threshold, self.breaker_cooldown, self.breaker_cap
            )
        return breaker

    def breaker_states(self) -> dict[str, str]:
        """Each destination's circuit breaker: closed, open or half-open."""
        return {target: b.state for target, b in sorted(self._breakers.items())}

    def _attempt(self, n: Notification) -> None:
        self._started_at[n.id] = self.reactor.seconds()
        d = defer.maybeDeferred(self._send, n)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(n,), errbackArgs=(n,))
        d.addErrback(lambda f: self._log.failure("recording a delivery attempt failed", f))
        d.addBoth(lambda _: self._done(n))
        if not d.called:
            self._attempts[n.id] = d

    def _observe(self, n: Notification, state: str) -> None:
        seconds = self.reactor.seconds() - self._started_at.get(n.id, self.reactor.seconds())
        for observer in self.observers:
            try:
                observer(n, state, seconds)
            except Exception:
                self._log.failure("a delivery observer failed")

    def _done(self, n: Notification) -> None:
        self._started_at.pop(n.id, None)
        self._inflight.discard(n.id)
        self._attempts.pop(n.id, None)
        self._slots.give(n.target)
        # A slot came free: what waited for one is looked at again.
        self._waiting.clear()
        if self.running:
            self._schedule(0)

    def _record(
        self, n: Notification, outcome: str, detail: str, state: str, next_at: float, status: int | None = None
    ) -> defer.Deferred:
        """Queue an attempt's record; the attempts of one reactor turn are written in one store job."""
        d: defer.Deferred = defer.Deferred()
        if not self._records:
            self.reactor.callLater(0, self._flush_records)
        started = self._started_at.get(n.id)
        elapsed = None if started is None else round((self.reactor.seconds() - started) * 1000)
        attempt = DeliveryAttempt(n.id, n.message_id, n.attempts + 1, outcome, detail, state, next_at, status, elapsed)
        self._records.append((attempt, d))
        return d

    def _flush_records(self) -> None:
        batch, self._records = self._records, []
        job = self.store.record_attempts([a for a, _ in batch])

        def fire(result):
            for _, d in batch:
                d.callback(None)

        def failed(f):
            for _, d in batch:
                d.errback(f)

        job.addCallbacks(fire, failed)

    def _succeeded(self, result, n: Notification):
        self.delivered += 1
        self._breaker(n.target).succeeded()
        detail, status = (result.detail, result.status) if isinstance(result, SendResult) else (result, None)
        record = self._record(n, "ok", detail, SENT, 0.0, status)
        self._observe(n, SENT)
        return record

    def _failed(self, failure, n: Notification):
        attempt = n.attempts + 1
        error = failure.value
        status = getattr(error, "status", None)
        record = functools.partial(self._record, status=status)
        reason = (
            failure.getErrorMessage()
            if failure.check(DeliveryFailed)
            else (f"{failure.type.__name__}: {failure.getErrorMessage()}")
        )
        if getattr(error, "permanent", False):
            self._log.warn("notification {id} is dead: {reason} (permanent)", id=n.id, reason=reason)
            self._observe(n, DEAD)
            return record(n, "error", f"{reason} (permanent: not retried)", DEAD, 0.0)
        self._breaker(n.target).failed()
        if self.max_attempts and attempt >= self.max_attempts:
            self._log.warn(
                "notification {id} is dead after {attempts} attempts: {reason}",
                id=n.id,
                attempts=attempt,
                reason=reason,
            )
            self._observe(n, DEAD)
            return record(n, "error", reason, DEAD, 0.0)
        delay = retry_delay(attempt, self.backoff_initial, self.backoff_max, self.rng)
        asked = getattr(error, "retry_after", None)
        if asked is not None:
            delay = max(delay, min(asked, self.backoff_max))
        if self._past_horizon(n, delay):
            hours = self.retry_horizon / 3600
            self._log.warn(
                "notification {id} is dead: still failing {hours:g} h after it was queued: {reason}",
                id=n.id,
                hours=hours,
                reason=reason,
            )
            self._observe(n, DEAD)
            return record(n, "error", f"{reason} (past the {hours:g} h retry horizon)", DEAD, 0.0)
        self._log.info(
            "notification {id} attempt {attempt} failed ({reason}); retrying in {delay:.1f} s",
            id=n.id,
            attempt=attempt,
            reason=reason,
            delay=delay,
        )
        self._observe(n, RETRYING)
        return record(n, "error", reason, RETRYING, self.reactor.seconds() + delay)

    def _past_horizon(self, n: Notification, delay: float) -> bool:
        """Whether the next try would fall past the retry horizon, counted from when the row was queued."""
        if not n.created_at:
            return False
        try:
            queued = datetime.fromisoformat(n.created_at)
        except ValueError:
            return False
        waited = (self.clock() - queued).total_seconds()
        return waited + delay > self.retry_horizon

    # -- channels -------------------------------------------------------------

    def _settings_for(self, n: Notification) -> tuple[Mapping[str, Any], str, Any]:
        """(channel settings, where they are configured, the directory entry or None) for ``n``."""
        if n.recipient_id:
            entry = self._entries.get(n.recipient_id)
            if entry is not None:
                channels = entry.channels or (
                    self._entries[entry.practice].channels if entry.practice in self._entries else ()
                )
                if n.channel_index < len(channels) and channels[n.channel_index].get("channel") == n.channel:
                    return channels[n.channel_index], f"recipient {entry.id} channels[{n.channel_index}]", entry
            if n.target not in self._channel_settings:
                raise DeliveryFailed(
                    f"recipient {n.recipient_id} no longer has this {n.channel} channel in the directory",
                    permanent=True,
                )
        if n.target in self._channel_settings:
            return self._channel_settings[n.target], f"destination {n.target}", None
        return {}, "recipients", None

    def _channel(self, kind: str, settings: Mapping[str, Any], where: str, make: Callable[[], Any]):
        """One channel object per settings (it holds a FHIR endpoint's token cache); made again when they change."""
        key = (kind, json.dumps(settings, sort_keys=True, default=str))
        channel = self._channels.get(key)
        if channel is None:
            try:
                channel = self._channels[key] = make()
            except ConfigError as e:
                raise DeliveryFailed(f"{where}: {e}", permanent=True) from None
        return channel

    def _send(self, n: Notification):
        if n.channel == "file" and not n.recipient_id:
            return self._files.send(n)
        settings, where, entry = self._settings_for(n)
        digest = entry is not None and entry.mode == "digest"
        if n.channel == "file":
            if "encrypt" in settings:
                self._file_encrypt[n.target] = bool(settings["encrypt"])
            if digest and settings.get("format") == "ndjson":
                return self._send_digest(n, entry, settings)
            return self._files.send(n)
        if n.channel == "fhir":
            return self._send_fhir(n, settings, where)
        if n.channel == "mllp":
            return self._send_mllp(n, settings, where)
        if n.channel == "direct":
            if digest:
                return self._send_digest(n, entry, settings, where)
            return self._send_direct(n, settings, where)
        raise DeliveryFailed(f"unknown channel {n.channel!r}", permanent=True)

    @defer.inlineCallbacks
    def _payload(self, n: Notification):
        (payload,) = yield threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), notification_payloads, [n]
        )
        if isinstance(payload, DeliveryFailed):
            raise payload
        return payload

    @defer.inlineCallbacks
    def _send_fhir(self, n: Notification, settings: Mapping[str, Any], where: str):
        payload = yield self._payload(n)
        channel = self._fhir.get(n.target) if not settings else None
        if channel is None:
            if settings:
                channel = self._channel(
                    "fhir",
                    settings,
                    where,
                    lambda: FhirChannel(
                        FhirDestination.from_settings(
                            {"timeout": self.timeout, **{k: v for k, v in settings.items() if k != "channel"}}, where
                        ),
                        self.reactor,
                        connections=self._http,
                    ),
                )
            else:
                # A row queued for an endpoint the config no longer names: sent with the defaults.
                channel = self._fhir[n.target] = FhirChannel(
                    FhirDestination(url=n.target, timeout=self.timeout), self.reactor, connections=self._http
                )
        result = yield channel.send(OutboundNotification(n.id, payload))
        return result

    @defer.inlineCallbacks
    def _send_mllp(self, n: Notification, settings: Mapping[str, Any], where: str):
        if n.payload is not None:
            message = n.payload.encode("utf-8")  # its own v2 message (an ED alert)
        elif n.original is not None:
            message = n.original
        else:
            raise DeliveryFailed(
                "the v2 message's body is no longer stored (retention purged it): nothing to forward",
                permanent=True,
            )
        channel = self._channel(
            "mllp",
            settings,
            where,
            lambda: MllpForwardChannel(
                MllpDestination.from_settings(
                    {"timeout": self.timeout, **{k: v for k, v in settings.items() if k != "channel"}}, where
                ),
                self.reactor,
            ),
        )
        result = yield channel.send(OutboundNotification(n.id, b"", original=message))
        return result

    def _direct_channel(self, settings: Mapping[str, Any], where: str) -> DirectChannel:
        if not self._direct_relay:
            raise DeliveryFailed(f"{where}: a direct channel needs the [direct] relay settings", permanent=True)
        return self._channel(
            "direct",
            {**settings, "relay": self._direct_relay},
            where,
            lambda: DirectChannel(DirectDestination.from_settings(settings, self._direct_relay, where), self.reactor),
        )

    @defer.inlineCallbacks
    def _send_direct(self, n: Notification, settings: Mapping[str, Any], where: str):
        channel = self._direct_channel(settings, where)
        payload = yield self._payload(n)
        summary = yield threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), _summary, payload, n.attribution
        )
        result = yield channel.send(OutboundNotification(n.id, payload, summary=summary))
        return result

    # -- digests ---------------------------------------------------------------

    @defer.inlineCallbacks
    def _send_digest(self, n: Notification, entry, settings: Mapping[str, Any], where: str = ""):
        """Send every due notification of ``n``'s recipient and channel as one digest; record each.

        The others are claimed (in flight) so no poll starts them alone; the
        digest's id is a hash of its notifications' ids, the same on a retry
        of the same digest.
        """
        group = yield self.store.due_for_recipient(
            n.recipient_id, n.channel_index, self.reactor.seconds(), tuple(self._inflight - {n.id})
        )
        others = [m for m in group if m.id != n.id and m.id not in self._inflight]
        for m in others:
            self._inflight.add(m.id)
        members = [n, *others]
        digest_id = "digest-" + hashlib.sha256("\n".join(sorted(m.id for m in members)).encode()).hexdigest()[:24]
        try:
            payloads = yield threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), notification_payloads, members
            )
            good = [(m, p) for m, p in zip(members, payloads, strict=True) if not isinstance(p, BaseException)]
            for m, p in zip(members, payloads, strict=True):
                if isinstance(p, BaseException) and m is not n:
                    self._record_outcome(m, Failure(p))
            if not good:
                raise DeliveryFailed("no notification in the digest has a Bundle to send", permanent=True)
            if n.channel == "file":
                detail = yield threads.deferToThreadPool(
                    self.reactor,
                    self.reactor.getThreadPool(),
                    self._write_digest_file,
                    digest_id,
                    n.target,
                    [p for _, p in good],
                )
            else:
                channel = self._direct_channel(settings, where)
                summary = yield threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), _digest_summary, good
                )
                item = OutboundNotification(
                    digest_id, b"", summary=summary, attachments=tuple((f"{m.id}.json", p) for m, p in good)
                )
                detail = (yield channel.send(item)).detail
        except Exception:
            failure = Failure()
            for m in others:
                self._record_outcome(m, failure)
            raise
        for m in others:
            self._record_outcome(m, f"{detail} (digest {digest_id})")
        return f"{detail} (digest {digest_id})"

    def _record_outcome(self, m: Notification, outcome) -> None:
        """Record one digest member's outcome as its own attempt, and free it."""
        d = self._failed(outcome, m) if isinstance(outcome, Failure) else self._succeeded(outcome, m)
        d.addErrback(lambda f: self._log.failure("recording a delivery attempt failed", f))
        d.addBoth(lambda _: (self._inflight.discard(m.id), self._started_at.pop(m.id, None)))

    def _write_digest_file(self, digest_id: str, target: str, payloads: list[bytes]) -> str:
        data = b"".join(p.rstrip(b"\n") + b"\n" for p in payloads)
        sealed = self._sealed(target)
        name = digest_id + (".ndjson" + OUTBOX_SUFFIX.removeprefix(".json") if sealed else ".ndjson")
        if sealed:
            data = self._keys.seal(data, file_drop_context(digest_id))
        (error,) = write_files_atomically([(Path(target), name, data)], self._private_root)
        if error is not None:
            raise DeliveryFailed(
                f"cannot write the digest: {getattr(error, 'strerror', None) or error}", permanent=False
            )
        return f"wrote {name} ({len(payloads)} notifications)"


def _summary(payload: bytes, attribution: Mapping | None) -> str:
    return notification_summary(json.loads(payload), attribution)


def _digest_summary(members: list[tuple[Notification, bytes]]) -> str:
    parts = [f"Daily digest: {len(members)} encounter notification(s).", ""]
    for i, (m, payload) in enumerate(members, 1):
        parts.append(f"{i}. ({m.id}.json)")
        parts.append(_summary(payload, m.attribution))
        parts.append("")
    return "\n".join(parts)
