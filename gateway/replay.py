"""Replay HL7 files over MLLP (``herald send`` and the demo)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint

from gateway.errors import HeraldError
from mllp import AckTimeout, connect

_MSH_START = re.compile(rb"(?:^|[\r\n])(?=MSH)")
_BATCH_LINES = (b"FHS", b"BHS", b"BTS", b"FTS")


class ReplayError(HeraldError):
    """A path could not be read."""


def split_messages(data: bytes) -> list[bytes]:
    """Split file content into messages: each begins at a line starting ``MSH``.

    MLLP framing bytes and batch envelope lines (FHS/BHS/BTS/FTS) are dropped;
    the message bytes, line endings and charset are kept as they are.
    """
    data = data.replace(b"\x0b", b"").replace(b"\x1c", b"")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    starts = [m.start() for m in _MSH_START.finditer(data)]
    messages = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        chunk = data[start:end].lstrip(b"\r\n")
        lines = re.split(rb"(\r\n|\r|\n)", chunk)
        kept = bytearray()
        for j in range(0, len(lines), 2):
            line = lines[j]
            sep = lines[j + 1] if j + 1 < len(lines) else b""
            if line[:3] in _BATCH_LINES:
                continue
            kept += line + sep
        body = bytes(kept).rstrip(b"\r\n")
        if body:
            messages.append(body + b"\r")
    return messages


def collect_messages(paths) -> list[tuple[str, bytes]]:
    """Every message in the files and folders given (folders: ``*.hl7`` and ``*.txt``, sorted)."""
    out: list[tuple[str, bytes]] = []
    for p in map(Path, paths):
        files = (
            sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".hl7", ".txt"))
            if p.is_dir()
            else [p]
        )
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as e:
                raise ReplayError(f"{f}: cannot read: {e.strerror}") from None
            found = split_messages(data)
            for i, m in enumerate(found, 1):
                out.append((f"{f}" + (f" message {i}" if len(found) > 1 else ""), m))
    return out


@dataclass
class ReplayReport:
    """What a replay did."""

    sent: int = 0
    accepted: int = 0
    errors: int = 0
    seconds: float = 0.0
    acks: list[tuple[str, str, str]] = field(default_factory=list)  # (where, MSA-1, MSA-3)
    failures: list[str] = field(default_factory=list)


def read_ack(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3 or ERR text) from an ACK."""
    text = ack.decode("latin-1")
    segs = [s for s in re.split(r"\r\n|\r|\n", text) if s]
    if not segs or not segs[0].startswith("MSH") or len(segs[0]) < 4:
        return "", "", "not an HL7 ACK"
    fs = segs[0][3]
    code = control = reason = ""
    for s in segs:
        f = s.split(fs)
        if f[0] == "MSA":
            code = f[1] if len(f) > 1 else ""
            control = f[2] if len(f) > 2 else ""
            reason = f[3] if len(f) > 3 else ""
        elif f[0] == "ERR" and len(f) > 8 and f[8]:
            reason = f[8]
    return code, control, reason


@defer.inlineCallbacks
def replay_async(reactor, host: str, port: int, messages, timeout: float = 30.0, progress=None):
    """Send each (where, bytes) on one connection, one at a time; fire with a ReplayReport."""
    report = ReplayReport()
    start = time.perf_counter()
    client = None
    for where, raw in messages:
        if client is None:
            try:
                client = yield connect(TCP4ClientEndpoint(reactor, host, port, timeout=timeout), reactor)
            except Exception as e:
                report.errors += 1
                report.failures.append(f"{where}: cannot connect to {host}:{port}: {e}")
                break
        report.sent += 1
        try:
            ack = yield client.send(raw, timeout)
        except AckTimeout as e:
            report.errors += 1
            report.failures.append(f"{where}: {e}")
            client = None
        except Exception as e:
            report.errors += 1
            report.failures.append(f"{where}: connection lost before the ACK ({e.__class__.__name__})")
            client = None
        else:
            code, _, reason = read_ack(ack)
            report.acks.append((where, code, reason))
            if code in ("AA", "CA"):
                report.accepted += 1
            else:
                report.failures.append(f"{where}: {code or 'no MSA'} {reason}".rstrip())
        if progress is not None:
            progress(1)
    if client is not None:
        client.transport.loseConnection()
    report.seconds = time.perf_counter() - start
    return report


def replay(host: str, port: int, messages, timeout: float = 30.0, progress: bool = True) -> ReplayReport:
    """Blocking replay for the CLI (runs the reactor), with a progress bar on stderr."""
    from twisted.internet import task

    result: list[ReplayReport] = []

    def run(reactor):
        if progress:
            bar = click.progressbar(length=len(messages), label="sending", file=click.get_text_stream("stderr"))
            bar.__enter__()
            d = replay_async(reactor, host, port, messages, timeout, bar.update)
            d.addBoth(lambda r: (bar.__exit__(None, None, None), r)[1])
        else:
            d = replay_async(reactor, host, port, messages, timeout)
        return d.addCallback(result.append)

    try:
        task.react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return result[0]
