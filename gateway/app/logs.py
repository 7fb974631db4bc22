"""The process log: text or JSON lines through ``twisted.logger``, a level, a file reopened on SIGHUP.

No patient data reaches the log, by construction: an event from Herald's own
code (namespaces ``gateway.*`` and ``mllp.*``) is rendered from the format
fields whose names are in :data:`SAFE_FIELDS` only (ids, codes, counts,
senders, peers, destinations, states, reasons Herald wrote itself); any other
field shows as ``<name withheld>`` in the text and is left out of the JSON
object. A new field name must be added here, on purpose, before its value is
ever written. A failure is written as its exception's type and the stack (file,
line, function), never its message: an exception's text may quote the data it
choked on. Events of other libraries (Twisted's own "starting on" lines) are
rendered as they are; Herald's data does not pass through them.

``[logging] format = "json"`` writes one object a line: ``time`` (ISO 8601 UTC),
``level``, ``namespace``, ``text`` and the safe fields by name.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from string import Formatter
from typing import TextIO

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)

from gateway.records import Notification

__all__ = [
    "SAFE_FIELDS",
    "LogDestination",
    "delivery_logged",
    "event_record",
    "log_observer",
    "on_hangup",
    "safe_text",
    "start_logging",
]

#: Format fields written to the log. Each is an id, a code, a count, a system's name or address, or
#: words Herald's code wrote from those (never a value read from a message's PID, NK1, IN1, ...).
SAFE_FIELDS = frozenset(
    {
        # ids, codes, states and counts
        "id",
        "message_id",
        "control_id",
        "notification",
        "code",
        "kind",
        "state",
        "generation",
        "attempt",
        "attempts",
        "count",
        "n",
        "frames",
        "batches",
        # systems: senders (MSH-3|MSH-4), message types, peers, certificates, destinations, endpoints
        "sender",
        "message_type",
        "peer",
        "subject",
        "transport",
        "destination",
        "channel",
        "spec",
        "address",
        "where",
        "client",
        "path",
        "certificate",
        "cap",
        "limit",
        # why: Herald's words about codes, settings and systems
        "reason",
        "reasons",
        "error",
        "e",
        "why",
        "said",
        "loaded",
        # sizes and times
        "seconds",
        "delay",
        "hours",
        "timeout",
        "lifetime",
        "window",
        "sample",
        "free",
        "reserve",
        "resume",
    }
)
#: Namespaces whose events are rendered from SAFE_FIELDS only.
HERALD_NAMESPACES = ("gateway", "mllp")
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
_RESERVED = ("time", "level", "namespace", "text", "error_type", "traceback")


def _herald(event: dict) -> bool:
    return _is_herald_namespace(event.get("log_namespace") or "")


@lru_cache(maxsize=256)
def _is_herald_namespace(namespace: str) -> bool:
    return any(namespace == n or namespace.startswith(n + ".") for n in HERALD_NAMESPACES)


@lru_cache(maxsize=1024)
def _template(fmt: str) -> tuple | None:
    """A format string's parts, read once: (literal, field name or None, spec, conversion); None when unreadable.

    A field that may never be written (not in SAFE_FIELDS, a dotted or indexed
    name, a nested spec) comes back with its name as ``<name withheld>`` in the
    literal and no field. Formats are constants in the code, so the cache holds
    a few dozen entries; it is bounded all the same.
    """
    try:
        parsed = list(Formatter().parse(fmt))
    except ValueError:
        return None
    parts = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            parts.append((literal, None, "", None))
        elif name not in SAFE_FIELDS or "{" in (spec or ""):
            # Plain names only: "{x.attr}", "{x[0]}" and "{f()}" would reach past the whitelist.
            parts.append((f"{literal}<{name} withheld>", None, "", None))
        else:
            parts.append((literal, name, spec or "", conversion))
    return tuple(parts)


def safe_text(event: dict) -> str:
    """The event's text, rendered from its safe fields only (Herald's events; others as Twisted renders them)."""
    if not _herald(event):
        return formatEvent(event)
    fmt = event.get("log_format")
    if not fmt:
        return ""
    parts = _template(fmt)
    if parts is None:
        return "<unreadable log format>"
    out = []
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        if name not in event:
            out.append(f"<{name} withheld>")
            continue
        value = event[name]
        if conversion == "r":
            value = repr(value)
        elif conversion in ("s", "a"):
            value = str(value) if conversion == "s" else ascii(value)
        try:
            out.append(format(value, spec))
        except (TypeError, ValueError):
            out.append(str(value))
    return "".join(out)


def _json_value(value):
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, bool | int | float | str) for v in value):
        return list(value)
    if isinstance(value, dict) and all(isinstance(v, bool | int | float | str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    return str(value)


def _failure(event: dict) -> tuple[str, list[str]] | None:
    """(the exception's type, the stack as ``file:line in function``) of an event's failure; no message."""
    failure = event.get("log_failure")
    if failure is None:
        return None
    kind = getattr(failure.type, "__module__", "") + "." + getattr(failure.type, "__qualname__", str(failure.type))
    frames = [f"{filename}:{line} in {function}" for function, filename, line, *_ in failure.frames or ()]
    return kind.removeprefix("builtins."), frames


@lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _stamp(stamp: float | None) -> str:
    """``stamp`` (epoch seconds; None: now) as ISO 8601 UTC with milliseconds, as ``isoformat`` writes it.

    The second's text is cached: lines come many a second, and formatting a
    datetime each time was a tenth of a line's cost.
    """
    if stamp is None:
        stamp = time.time()
    whole = math.floor(stamp)
    millis = min(int((stamp - whole) * 1000), 999)
    return f"{_second(whole)}.{millis:03d}+00:00"


def event_record(event: dict) -> dict:
    """An event as the JSON line writes it: time, level, namespace, text, the safe fields, a failure's type."""
    level = event.get("log_level")
    record: dict = {
        "time": _stamp(event.get("log_time")),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace") or "",
        "text": safe_text(event),
    }
    if _herald(event):
        for name in sorted(SAFE_FIELDS & event.keys()):
            record[f"field_{name}" if name in _RESERVED else name] = _json_value(event[name])
    failed = _failure(event)
    if failed is not None:
        record["error_type"], record["traceback"] = failed
    return record


class LogDestination:
    """Where log lines go: a file (reopened on SIGHUP, after logrotate moved it) or a stream.

    Lines come from several threads (the store's writer logs too) and from
    signal handlers (Twisted logs "Received SIGTERM" in its handler, on the
    main thread, maybe in the middle of another line): so no lock, which such
    a handler could wait on forever. Each line is one ``write(2)`` on the
    file descriptor, whole (``O_APPEND`` keeps lines from threads apart), and a
    reopen swaps the file under the same descriptor number with ``dup2``, so no
    line is written to a closed or reused descriptor. A stream without a
    descriptor (a test's StringIO) is written to as it is.
    """

    def __init__(self, path: Path | None = None, stream: TextIO | None = None) -> None:
        self.path = path
        self._stream = stream if stream is not None else sys.stderr
        self._fd: int | None = None
        if path is not None:
            self._fd = self._open(path)
        else:
            try:
                self._fd = self._stream.fileno()
                self._stream.flush()  # what Python buffered before goes first
            except (AttributeError, OSError, ValueError):
                self._fd = None

    @staticmethod
    def _open(path: Path) -> int:
        # 0640: the log holds no patient data, and an operations group may read it.
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, line: str) -> None:
        fd = self._fd
        if fd is None:
            self._stream.write(line)
            self._stream.flush()
            return
        data = line.encode("utf-8", "replace")
        while data:
            try:
                written = os.write(fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # a log that cannot be written (a full disk, a closed pipe) must not stop the gateway
            data = data[written:]

    def reopen(self) -> bool:
        """Open the file by its name again (a new file after a rename); False when writing to a stream."""
        if self.path is None or self._fd is None:
            return False
        new = self._open(self.path)
        try:
            os.dup2(new, self._fd, inheritable=False)  # atomically: the descriptor now names the new file
        finally:
            os.close(new)
        return True

    def close(self) -> None:
        if self.path is not None and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def json_observer(destination: LogDestination) -> Callable[[dict], None]:
    """An observer writing one JSON object a line."""

    def observe(event: dict) -> None:
        destination.write(json.dumps(event_record(event), ensure_ascii=False, default=str) + "\n")

    return observe


def text_observer(destination: LogDestination) -> Callable[[dict], None]:
    """An observer writing ``TIME [NAMESPACE#LEVEL] TEXT`` lines, a failure's type and stack indented below."""

    def observe(event: dict) -> None:
        # Not through event_record: a text line needs no JSON values of the fields.
        level = event.get("log_level")
        line = (
            f"{_stamp(event.get('log_time'))} [{event.get('log_namespace') or ''}#"
            f"{level.name if level is not None else 'info'}] {safe_text(event)}\n"
        )
        failed = _failure(event)
        if failed is not None:
            kind, stack = failed
            frames = "".join(f"      {f}\n" for f in stack)
            line += f"    Traceback (the exception's message withheld): {kind}\n{frames}"
        destination.write(line)

    return observe


def start_logging(
    fmt: str = "text", level: str = "info", path: Path | None = None, stream: TextIO | None = None
) -> LogDestination:
    """Send the process's log to ``path`` (or ``stream``, standard error by default) as ``fmt`` lines at ``level``.

    Raises OSError when the file cannot be opened. Call once, before the
    gateway starts (Twisted buffers what was logged before and writes it then).
    """
    destination = LogDestination(path, stream)
    globalLogBeginner.beginLoggingTo([log_observer(fmt, level, destination)], redirectStandardIO=False)
    return destination


def log_observer(fmt: str, level: str, destination: LogDestination):
    """The observer :func:`start_logging` installs: ``fmt`` lines (text or json) of events at ``level`` or above."""
    observer = json_observer(destination) if fmt == "json" else text_observer(destination)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])])


def on_hangup(reactor, action: Callable[[], None]) -> None:
    """At each SIGHUP run ``action`` on the reactor's thread, then what handled SIGHUP before.

    Installed after the gateway started, it goes before the pipeline's handler
    (which reloads the sender profiles) and keeps it: one signal, both jobs.
    """
    previous = signal.getsignal(signal.SIGHUP)

    def handler(signum, frame) -> None:
        reactor.callFromThread(action)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, handler)


_delivery_log = Logger(namespace="gateway.delivery.attempts")


def delivery_logged(notification: Notification, state: str, seconds: float) -> None:
    """A ``DeliveryWorker`` observer: one line per attempt (notification id, destination, channel, state)."""
    emit = _delivery_log.warn if state == "dead" else _delivery_log.info
    emit(
        "notification {notification} to {destination} over {channel}: {state} after {seconds:.3f} s "
        "(attempt {attempt}, message {message_id})",
        notification=notification.id,
        destination=notification.target,
        channel=notification.channel,
        state=state,
        seconds=seconds,
        attempt=notification.attempts + 1,
        message_id=notification.message_id,
    )
