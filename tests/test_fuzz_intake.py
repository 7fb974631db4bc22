"""Fuzzing the connection's path: framing, the header reader and the limit scan.

Properties of the pure parts first (hypothesis): the header reader and the
limit scan raise nothing but MessageError on any bytes; the scan finds a limit
passed exactly when a reference that splits everything does; framing gives
the same frames however the bytes are cut into reads.

Then a real ``herald serve`` (``make_service``, a plain TCP listener on
127.0.0.1, its own process) is fed random byte streams and mutated valid
frames: every complete frame is answered with a well-formed ACK (or the
connection closed cleanly after an oversized one), the server never dies, and
a well-behaved client is served normally after each hostile one.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import HERALD, ROOT, SAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mllp import FrameCollector, connect

from gateway.app.replay import read_ack, split_messages
from gateway.errors import MessageError
from gateway.header import control_id_guess, read_header, read_header_leniently, read_msh
from gateway.limits import HEADER_FIELDS, LimitExceeded, Limits, scan

SAMPLE_MESSAGES = [m for p in sorted(SAMPLES.rglob("*.hl7")) for m in split_messages(p.read_bytes())]
#: What the well-behaved client sends (MSH-15 AL: it is answered CA).
GOOD = split_messages((SAMPLES / "epic-v251-a01-admit-from-ed.hl7").read_bytes())[0]
SMALL = Limits(
    segments=8, fields=30, repetitions=3, components=12, field_length=300, control_id_length=20, header_field_length=64
)
#: Bytes that mean something to MLLP or HL7, which random bytes rarely hit.
SPECIAL = [b"\x0b", b"\x1c\r", b"\x1c", b"\r", b"\n", b"\r\n", b"|", b"^", b"~", b"\\", b"&", b"MSH|^~\\&|", b'""']


# -- strategies -------------------------------------------------------------------------------------


def chunks() -> st.SearchStrategy[bytes]:
    """Bytes rich in separators and framing characters."""
    return st.lists(
        st.one_of(st.binary(max_size=40), st.sampled_from(SPECIAL), st.sampled_from(SPECIAL).map(lambda b: b * 40)),
        max_size=30,
    ).map(b"".join)


@st.composite
def mutated(draw) -> bytes:
    """A sample message with a few mutations: bytes inserted, cut, duplicated, a separator flood."""
    raw = bytearray(draw(st.sampled_from(SAMPLE_MESSAGES)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["insert", "delete", "duplicate", "flood", "replace"]))
        if kind == "insert":
            raw[at:at] = draw(chunks())
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 60))]
        elif kind == "duplicate":
            piece = bytes(raw[at : at + draw(st.integers(1, 200))])
            raw[at:at] = piece * draw(st.integers(1, 30))
        elif kind == "flood":
            raw[at:at] = draw(st.sampled_from(SPECIAL)) * draw(st.integers(1, 400))
        elif raw:
            raw[min(at, len(raw) - 1)] = draw(st.integers(0, 255))
    return bytes(raw)


@st.composite
def structured(draw) -> bytes:
    """An MSH that reads, then segments of random separator density: around the SMALL limits."""
    cid = draw(st.sampled_from([b"C", b"C" * 20, b"C" * 21, b""]))
    app = draw(st.sampled_from([b"EPIC", b"E" * 64, b"E" * 65]))
    enc = draw(st.sampled_from([b"^~\\&", b"!@$%"]))
    comp, rep = enc[0:1], enc[1:2]
    text = st.text(alphabet="xy|^~&!@", max_size=120).map(lambda s: s.encode().replace(b"^", comp).replace(b"~", rep))
    lines = [b"MSH|" + enc + b"|" + app + b"|F|||20260301||ADT" + comp + b"A01|" + cid + b"|P|2.5.1"]
    for _ in range(draw(st.integers(0, 10))):
        name = draw(st.sampled_from([b"PID", b"OBX", b"NK1", b"ZX1", b"??x", b""]))
        body = draw(text) * draw(st.sampled_from([1, 1, 3, 10]))
        lines.append(name + b"|" + body)
    end = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\r"]))
    return end.join(lines) + end


# -- the header reader and the scan never raise anything but MessageError ---------------------------------


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=600), chunks(), mutated()))
def test_the_header_reader_raises_only_message_error(raw):
    """read_header and read_msh refuse with MessageError or read; the lenient readers never raise."""
    for read in (read_header, read_msh):
        try:
            header = read(raw)
        except MessageError as e:
            assert e.code in ("100", "101", "102") and e.location.startswith("MSH")
        else:
            assert header.field_separator and len(header.encoding_characters) in (4, 5)
    read_header_leniently(raw)
    control_id_guess(raw)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=600), chunks(), mutated(), structured()), st.sampled_from([SMALL, Limits()]))
def test_the_scan_raises_only_message_error(raw, limits):
    """scan on any bytes: None, LimitExceeded, or the header reader's MessageError; nothing else."""
    try:
        scan(raw, limits)
    except LimitExceeded as e:
        assert e.code in ("100", "102", "104") and e.limit in Limits.__dataclass_fields__
        assert e.sequence >= 1
    except MessageError:
        with pytest.raises(MessageError):
            read_msh(raw)


def reference_violations(raw: bytes, limits: Limits) -> set[tuple[str, str]]:
    """Every (limit, location) ``raw`` passes, found by splitting everything (slow and simple)."""
    header = read_msh(raw)
    fs, comp, rep = (header.field_separator + header.encoding_characters[:2]).encode("latin-1")
    fs, comp, rep = bytes([fs]), bytes([comp]), bytes([rep])
    lines = [line for line in raw.splitlines() if line]

    def name_of(line: bytes) -> str:
        ok = re.fullmatch(rb"[A-Z][A-Z0-9]{2}", line[:3]) and line[3:4] in (fs, b"")
        return line[:3].decode() if ok else "?"

    found = set()
    if len(lines) > limits.segments:
        found.add(("segments", name_of(lines[limits.segments])))
    msh = lines[0].split(fs)
    if len(msh) > 9 and len(msh[9]) > limits.control_id_length:
        found.add(("control_id_length", "MSH-10"))
    for n in HEADER_FIELDS:
        if n - 1 < len(msh) and len(msh[n - 1]) > limits.header_field_length:
            found.add(("header_field_length", f"MSH-{n}"))
    for line in lines:
        name = name_of(line)
        fields = line.split(fs)
        shift = 1 if name == "MSH" else 0
        if len(fields) - 1 > limits.fields:
            found.add(("fields", f"{name}-{limits.fields + 1}"))
        for i, value in enumerate(fields):
            if shift and i == 1:
                continue
            where = f"{name}-{i + shift}"
            if len(value.split(rep)) > limits.repetitions:
                found.add(("repetitions", where))
            if any(len(r.split(comp)) > limits.components for r in value.split(rep)):
                found.add(("components", where))
            if len(value) > limits.field_length:
                found.add(("field_length", where))
    return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structured())
def test_the_scan_finds_a_limit_passed_exactly_when_a_full_split_does(raw):
    """The scan's shortcuts (whole-message and per-segment counts) miss nothing and invent nothing."""
    expected = reference_violations(raw, SMALL)
    try:
        scan(raw, SMALL)
    except LimitExceeded as e:
        assert (e.limit, e.location) in expected
    else:
        assert expected == set()


# -- framing: the same frames however the bytes arrive -------------------------------------------------


def reference_frames(stream: bytes, max_length: int) -> tuple[list[bytes], bool]:
    """The complete frames in ``stream`` up to the first oversized one, and whether one was oversized."""
    frames, at = [], 0
    while True:
        start = stream.find(b"\x0b", at)
        if start < 0:
            return frames, False
        end = stream.find(b"\x1c\r", start + 1)
        if end < 0:
            return frames, len(stream) - start - 1 > max_length + 1
        if end - start - 1 > max_length:
            return frames, True
        frames.append(stream[start + 1 : end])
        at = end + 2


@settings(max_examples=150, deadline=None)
@given(st.one_of(chunks(), mutated().map(lambda m: b"\x0b" + m + b"\x1c\r")), st.lists(st.integers(1, 64), max_size=20))
def test_framing_is_the_same_however_the_reads_are_cut(stream, cuts):
    """Any stream cut into any reads gives the frames (and the refusal) a whole-stream reference finds."""
    p = FrameCollector(max_length=512)
    transport = connect(p)
    reads = itertools.accumulate(cuts)
    last = 0
    for at in [*reads, len(stream)]:
        if at > last and not transport.disconnecting:
            p.dataReceived(stream[last:at])
        last = max(last, at)
    frames, oversized = reference_frames(stream, 512)
    assert p.frames == frames
    assert bool(p.refused) == oversized


# -- a real server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """``herald serve`` on a free loopback port: 4 KB frames, conversion on the server's pipeline thread."""
    folder = tmp_path_factory.mktemp("fuzz")
    config = folder / "herald.toml"
    config.write_text("[server]\nmax_frame_bytes = 4096\nallow_plain = true\n\n[pipeline]\nworkers = 0\n")
    env = {**os.environ, "HERALD_KEYS": "k1 " + base64.b64encode(os.urandom(32)).decode()}
    proc = subprocess.Popen(
        [*HERALD, "serve", "--config", str(config), "--listen", "tcp:0:interface=127.0.0.1", "--data", str(folder)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log: list[str] = []
    port = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and port is None:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        found = re.search(r"\(ports \[(\d+)\]\)", line)
        port = int(found.group(1)) if found else None
    if port is None:
        proc.kill()
        proc.wait()
        pytest.fail("herald serve did not start:\n" + "".join(log))
    drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    drain.start()
    yield port, proc, log, time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    drain.join(timeout=5)


ANSWER_CODES = {"AA", "AE", "AR", "CA", "CE", "CR"}
_good = itertools.count(1)


def exchange(port: int, payload: bytes, timeout: float = 5.0) -> tuple[list[bytes], bool]:
    """Send ``payload`` on a new connection; read answers until all are in, or the server closes.

    Returns the answers and whether the server closed the connection.
    """
    complete, oversized = reference_frames(payload, 4096)
    # MSH-15 NE, ER or SU may ask for no accept ACK: those frames may go unanswered.
    needed = sum(1 for f in complete if _must_answer(f))
    answers: list[bytes] = []
    buffer = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.settimeout(0.3 if needed == 0 and not oversized else timeout)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(answers) >= len(complete) and not oversized:
                break
            if len(answers) >= needed and not oversized:
                s.settimeout(0.3)  # the rest are optional: a short wait for them
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                closed = True
                break
            buffer += data
            while b"\x1c\r" in buffer:
                one, buffer = buffer.split(b"\x1c\r", 1)
                assert one.startswith(b"\x0b"), one[:40]
                answers.append(one[1:])
    assert buffer == b"", "a partial answer frame"
    assert len(answers) >= needed or closed, (len(answers), needed)
    for ack in answers:
        assert read_ack(ack)[0] in ANSWER_CODES, ack[:200]
    return answers, closed


def _must_answer(frame: bytes) -> bool:
    header = read_header_leniently(frame)
    return header is None or not header.enhanced_mode or header.accept_ack_type.strip().upper() == "AL"


def served_normally(port: int) -> None:
    """A well-behaved client, after a hostile one, gets its message acknowledged AA."""
    f = GOOD.split(b"|", 10)
    f[9] = b"FUZZOK%d" % next(_good)  # a new MSH-10 each time: never a retransmission
    raw = b"|".join(f)
    answers, closed = exchange(port, b"\x0b" + raw + b"\x1c\r")
    assert [read_ack(a)[0] for a in answers] == ["CA"] and not closed


def server_alive(proc, log) -> None:
    assert proc.poll() is None, "".join(log[-30:])
    bad = [line for line in log if "Traceback" in line or "Unhandled" in line]
    assert not bad, "".join(log[-60:])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(chunks(), st.binary(max_size=300)), min_size=1, max_size=6).map(b"".join))
def test_random_byte_streams_are_answered_or_closed_and_the_server_lives(fuzz_server, stream):
    """Random bytes: each complete frame gets an ACK, or the server closes cleanly; it keeps serving others."""
    port, proc, log, _ = fuzz_server
    exchange(port, stream)
    served_normally(port)
    server_alive(proc, log)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutated(), min_size=1, max_size=3), st.booleans())
def test_mutated_valid_frames_are_answered_and_the_server_lives(fuzz_server, messages, cut_last):
    """Mutated sample messages, framed (the last perhaps cut off): answered frame by frame; the server lives."""
    port, proc, log, _ = fuzz_server
    payload = b"".join(b"\x0b" + m + b"\x1c\r" for m in messages)
    if cut_last:
        payload = payload[: -len(messages[-1]) // 2 - 2]
    exchange(port, payload)
    served_normally(port)
    server_alive(proc, log)


def test_after_the_fuzzing_the_log_has_no_phi_and_rejections_were_sampled(fuzz_server):
    """The server's log after the fuzzing: no patient names from the samples, and rejections summarised, not listed."""
    port, proc, log, started = fuzz_server
    served_normally(port)
    server_alive(proc, log)
    text = "".join(log)
    for name in (b"BRIGHTWATER", b"OSWALD"):
        assert name.decode() not in text
    # At most the sample (10) per 60-s window from 127.0.0.1: the windows since the server started, and one open.
    rejected_lines = sum("rejected a frame" in line or "middle of a frame" in line for line in log)
    assert rejected_lines <= 10 * (2 + int((time.monotonic() - started) // 60)), rejected_lines
