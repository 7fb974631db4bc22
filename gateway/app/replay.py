"""Replay HL7 files over MLLP (``herald send`` and the demo)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
from twisted.internet import defer

from gateway.errors import HeraldError, MessageError
from gateway.header import read_msh
from mllp import AckTimeout, connect
from mllp.client import client_endpoint, describe_loss

_LINE_END = re.compile(rb"(\r\n|\r|\n)")
_BATCH_LINES = (b"FHS", b"BHS", b"BTS", b"FTS")
# A segment line: a three-character name and a field separator (not a letter,
# digit or space). Lines that are not segments (free text) are not judged.
_SEGMENT_LINE = re.compile(rb"^[A-Z][A-Z0-9]{2}[^A-Za-z0-9\s]")


class ReplayError(HeraldError):
    """A path could not be read, or its content is not a well-formed sequence of messages."""


def split_messages(data: bytes) -> list[bytes]:
    """Split file content into messages: each begins at a line starting ``MSH``.

    MLLP framing bytes and batch envelope lines (FHS/BHS/BTS/FTS) around the
    messages are dropped; the message bytes, line endings and charset are
    kept as they are. A malformed batch is refused, not stitched together:
    a segment after an envelope line but before the next MSH (a BHS or FHS
    in the middle of a message, segments after a BTS), or before the first
    MSH of a file that has one, belongs to no message, and raises
    :class:`ReplayError` naming the line.
    """
    data = data.replace(b"\x0b", b"").replace(b"\x1c", b"")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    parts = _LINE_END.split(data)
    has_msh = any(parts[i].startswith(b"MSH") for i in range(0, len(parts), 2))
    messages: list[bytes] = []
    current: bytearray | None = None
    envelope = b""  # the envelope line seen since the current message's MSH
    envelope_line = 0
    for i in range(0, len(parts), 2):
        line = parts[i]
        sep = parts[i + 1] if i + 1 < len(parts) else b""
        number = i // 2 + 1
        if line.startswith(b"MSH"):
            if current is not None:
                messages.append(bytes(current))
            current, envelope = bytearray(line + sep), b""
        elif line[:3] in _BATCH_LINES:
            envelope, envelope_line = line[:3], number
        elif not _SEGMENT_LINE.match(line):
            if current is not None and not envelope:
                current += line + sep
        elif current is None:
            if has_msh:
                raise ReplayError(
                    f"line {number}: {line[:3].decode('latin-1')} segment before the first MSH belongs to no message"
                )
        elif envelope:
            raise ReplayError(
                f"line {number}: {line[:3].decode('latin-1')} segment after the {envelope.decode()} at line "
                f"{envelope_line}, inside a message: the batch is malformed (a message must not be split by an "
                "envelope line)"
            )
        else:
            current += line + sep
    if current is not None:
        messages.append(bytes(current))
    out = []
    for m in messages:
        body = m.rstrip(b"\r\n")
        if body:
            out.append(body + b"\r")
    return out


NO_MESSAGE = "no HL7 message (text starting with MSH) found"


def collect_messages(paths, skipped: list[str] | None = None) -> list[tuple[str, bytes]]:
    """Every message in the files and folders given (folders: ``*.hl7`` and ``*.txt``, sorted).

    Raises :class:`ReplayError` naming every file that cannot be read, holds
    no message or is a malformed batch (one line each), so that nothing is
    sent from a set the operator must fix. A ``.txt`` file found in a folder
    that holds no HL7 at all (a ``LICENSE.txt``, a ``README.txt``) is not an
    error: it is left out and named in ``skipped``, so nothing is skipped silently.
    """
    out: list[tuple[str, bytes]] = []
    problems: list[str] = []
    for p in map(Path, paths):
        in_folder = p.is_dir()
        files = (
            sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".hl7", ".txt"))
            if in_folder
            else [p]
        )
        for f in files:
            if in_folder and f.suffix.lower() == ".txt" and skipped is not None and not _holds_hl7(f):
                skipped.append(f"{f}: {NO_MESSAGE}; left out")
                continue
            try:
                found = split_messages(f.read_bytes())
            except OSError as e:
                problems.append(f"{f}: cannot read: {e.strerror}")
                continue
            except ReplayError as e:
                problems.append(f"{f}: {e}")
                continue
            if not found:
                problems.append(f"{f}: {NO_MESSAGE}")
            for i, m in enumerate(found, 1):
                out.append((f"{f}" + (f" message {i}" if len(found) > 1 else ""), m))
    if problems:
        raise ReplayError("\n".join(problems))
    return out


def _holds_hl7(path: Path) -> bool:
    """Whether a file has any line that starts like an HL7 segment header (MSH, FHS, BHS)."""
    try:
        data = path.read_bytes()
    except OSError:
        return True  # reading it again names the error
    return any(line[:3] in (b"MSH", b"FHS", b"BHS") for line in _LINE_END.split(data.lstrip(b"\xef\xbb\xbf")))


@dataclass
class ReplayReport:
    """What a replay did."""

    sent: int = 0
    accepted: int = 0
    #: Sent with MSH-15 NE or ER and no accept ACK came, as the standard says (no error reported).
    unanswered: int = 0
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


#: Seconds to wait for an ACK the message did not ask for (MSH-15 NE) or asked for only on error (ER).
QUIET_WAIT = 0.5


def _accept_ack_type(raw: bytes) -> str:
    try:
        return read_msh(raw).accept_ack_type.strip().upper()
    except MessageError:
        return ""


@defer.inlineCallbacks
def replay_async(reactor, host: str, port: int, messages, timeout: float = 30.0, progress=None, tls=None):
    """Send each (where, bytes) on one connection, one at a time; fire with a ReplayReport.

    ``tls``: client TLS options (``mllp.client.client_options``) for a tls: listener; None for plain TCP.
    """
    report = ReplayReport()
    start = time.perf_counter()
    client = None
    for where, raw in messages:
        if client is None:
            try:
                client = yield connect(client_endpoint(reactor, host, port, tls, timeout), reactor)
            except Exception as e:
                report.errors += 1
                report.failures.append(f"{where}: cannot connect to {host}:{port}: {e}")
                break
        report.sent += 1
        asks = _accept_ack_type(raw)
        # MSH-15 NE asks for no accept ACK, ER for one only on an error: wait briefly, not the full timeout.
        quiet = asks in ("NE", "ER")
        try:
            ack = yield client.send(raw, min(timeout, QUIET_WAIT) if quiet else timeout)
        except AckTimeout as e:
            client = None  # the client closes a connection whose ACK did not come (a late one would mismatch)
            if quiet:
                report.unanswered += 1
            else:
                report.errors += 1
                report.failures.append(f"{where}: {e}")
        except Exception as e:
            report.errors += 1
            report.failures.append(f"{where}: connection lost before the ACK ({describe_loss(e)})")
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


def replay(host: str, port: int, messages, timeout: float = 30.0, progress: bool = True, tls=None) -> ReplayReport:
    """Blocking replay for the CLI (runs the reactor), with a progress bar on stderr."""
    from twisted.internet import task

    result: list[ReplayReport] = []

    def run(reactor):
        if progress:
            bar = click.progressbar(length=len(messages), label="sending", file=click.get_text_stream("stderr"))
            bar.__enter__()
            d = replay_async(reactor, host, port, messages, timeout, bar.update, tls)
            d.addBoth(lambda r: (bar.__exit__(None, None, None), r)[1])
        else:
            d = replay_async(reactor, host, port, messages, timeout, tls=tls)
        return d.addCallback(result.append)

    try:
        task.react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return result[0]
