"""Structured logs (issue 15): safe rendering by a field whitelist, JSON lines, levels, a file reopened on SIGHUP,
and a real `herald serve` whose JSON log of a day's sample traffic holds ids and states but no patient data."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from gateway.app.logs import LogDestination, event_record, log_observer, safe_text

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_messages"
#: The CLI as a process. (Not `python -m gateway.app.cli`: run as __main__, that module is imported a second
#: time by the command modules it registers.)
HERALD = [sys.executable, "-c", "from gateway.app.cli import main; main()"]


def event(fmt: str, namespace: str = "gateway.intake.receiver", level=LogLevel.info, **fields) -> dict:
    return {"log_format": fmt, "log_namespace": namespace, "log_level": level, "log_time": 1767225600.0, **fields}


# -- rendering -------------------------------------------------------------------------------------


def test_only_whitelisted_fields_are_rendered():
    """A field not in SAFE_FIELDS is withheld from the text and left out of the record; safe ones are kept."""
    e = event(
        "accepted {control_id} from {sender} for {patient_name} born {dob:>10}",
        control_id="C1",
        sender="EPIC|GH",
        patient_name="DOE^JANE",
        dob="19800101",
    )
    record = event_record(e)
    assert record["text"] == "accepted C1 from EPIC|GH for <patient_name withheld> born <dob withheld>"
    assert record["control_id"] == "C1" and record["sender"] == "EPIC|GH"
    assert "patient_name" not in record and "dob" not in record
    assert "DOE" not in json.dumps(record) and "19800101" not in json.dumps(record)


def test_attribute_and_index_access_are_withheld_even_on_safe_names():
    """ "{id.name}" or "{reason[0]}" would reach past the whitelist: withheld."""
    e = event("{id.real} {reason[0]} {count:d} {seconds:.2f}", id=7, reason="xyz", count=3, seconds=1.23456)
    assert safe_text(e) == "<id.real withheld> <reason[0] withheld> 3 1.23"


@pytest.mark.parametrize("stamp", [1767225600.0, 1767225600.0015, 1767225659.999, 1767225600.5, 1767311999.25])
def test_a_line_time_is_what_isoformat_writes(stamp):
    """The cached second plus milliseconds reads as datetime.isoformat(timespec="milliseconds") does."""
    from datetime import UTC, datetime

    expected = datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
    assert event_record(event("x", log_time=stamp))["time"] == expected
    stream = io.StringIO()
    log_observer("text", "info", LogDestination(stream=stream))(event("x", log_time=stamp))
    assert stream.getvalue().startswith(expected + " [gateway.intake.receiver#info] x")


def test_the_same_format_renders_each_event_from_its_own_fields():
    """A format is read once and kept; each event still gets its own values, and a missing field is withheld."""
    fmt = "message {message_id} from {sender}: {state}"
    first = safe_text(event(fmt, message_id=1, sender="A|B", state="received"))
    second = safe_text(event(fmt, message_id=2, sender="C|D"))
    assert first == "message 1 from A|B: received"
    assert second == "message 2 from C|D: <state withheld>"


def test_a_failure_is_its_type_and_stack_never_its_message():
    """An exception's text may quote the data it choked on: the record keeps its type and frames only."""
    try:
        raise ValueError("PID-5 DOE^JANE is not a name")
    except ValueError:
        failure = Failure()
    record = event_record(event("could not convert message {id}", id=12, log_failure=failure))
    assert record["error_type"] == "ValueError"
    assert record["traceback"] and all(re.match(r".+:\d+ in \S+", f) for f in record["traceback"])
    assert "DOE" not in json.dumps(record)


def test_other_libraries_events_are_rendered_as_they_are():
    """Twisted's own lines (no Herald data passes through them) keep their text."""
    e = {"log_format": "{log_text}", "log_text": "Site starting on 9102", "log_namespace": "log_legacy"}
    assert event_record(e)["text"] == "Site starting on 9102"


def test_json_lines_with_a_level_filter():
    """format json at level warn: one JSON object a line, info events dropped."""
    out = io.StringIO()
    observer = log_observer("json", "warn", LogDestination(stream=out))
    observer(event("accepted {control_id}", control_id="C1"))
    observer(event("rejected a frame from {peer}: {reason}", level=LogLevel.warn, peer="10.0.0.9:5000", reason="r"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "warn" and record["peer"] == "10.0.0.9:5000"
    assert record["time"] == "2026-01-01T00:00:00.000+00:00"
    assert record["namespace"] == "gateway.intake.receiver"


def test_text_lines_say_time_namespace_level_and_text():
    """format text: ``TIME [NAMESPACE#LEVEL] TEXT``, a failure's type and stack indented under it."""
    out = io.StringIO()
    observer = log_observer("text", "debug", LogDestination(stream=out))
    try:
        raise ZeroDivisionError("the message is withheld")
    except ZeroDivisionError:
        observer(event("batch {n} failed", level=LogLevel.error, n=2, log_failure=Failure()))
    first, second, *frames = out.getvalue().splitlines()
    assert first == "2026-01-01T00:00:00.000+00:00 [gateway.intake.receiver#error] batch 2 failed"
    assert second.strip() == "Traceback (the exception's message withheld): ZeroDivisionError"
    assert frames


def test_the_log_file_is_reopened_by_name(tmp_path):
    """After a rename (logrotate), reopen writes to a new file of the same name; the old one gets nothing more."""
    path = tmp_path / "herald.log"
    destination = LogDestination(path)
    destination.write("one\n")
    path.rename(tmp_path / "herald.log.1")
    destination.write("two\n")
    assert destination.reopen()
    destination.write("three\n")
    destination.close()
    assert (tmp_path / "herald.log.1").read_text() == "one\ntwo\n"
    assert path.read_text() == "three\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert not LogDestination(stream=io.StringIO()).reopen(), "nothing to reopen on a stream"


def test_lines_from_many_threads_and_a_signal_handler_stay_whole(tmp_path):
    """Lines written at once from threads, and from a signal handler on the main thread (Twisted logs "Received
    SIGTERM" in one), come out whole and all there: one write(2) a line, no lock a handler could wait on."""
    import os
    import threading

    path = tmp_path / "herald.log"
    destination = LogDestination(path)
    previous = signal.signal(signal.SIGUSR1, lambda *_: destination.write("from the handler\n"))
    try:

        def lines(name: str) -> None:
            for i in range(500):
                destination.write(f"{name} {i} " + "x" * 200 + "\n")

        threads = [threading.Thread(target=lines, args=(f"t{n}",)) for n in range(4)]
        for t in threads:
            t.start()
        for _ in range(10):
            os.kill(os.getpid(), signal.SIGUSR1)
            lines("main")
        for t in threads:
            t.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        destination.close()
    written = path.read_text().splitlines()
    assert written.count("from the handler") == 10
    body = [ln for ln in written if ln != "from the handler"]
    assert len(body) == 4 * 500 + 10 * 500
    assert all(re.fullmatch(r"(t\d|main) \d+ x{200}", ln) for ln in body)


def test_the_delivery_observer_logs_ids_destination_and_state():
    """Each delivery attempt is one line: notification id, destination, channel, state (a dead one warns)."""
    from twisted.logger import globalLogPublisher

    from gateway.app.logs import delivery_logged
    from gateway.records import Notification

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        n = Notification("n-1", 5, "hie", "HIE", "fhir", "https://hie.example/fhir/$process-message", "admit")
        delivery_logged(n, "dead", 1.5)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    record = event_record(next(e for e in seen if e.get("log_namespace") == "gateway.delivery.attempts"))
    assert record["level"] == "warn"
    assert record["text"] == (
        "notification n-1 to https://hie.example/fhir/$process-message over fhir: dead after 1.500 s "
        "(attempt 1, message 5)"
    )
    assert Logger  # the house's logger is what writes these


# -- a real herald serve ---------------------------------------------------------------------------


#: Which components of which fields are the patient's own data: PID-3 id, PID-5 family and given name, PID-7
#: birth date, PID-11 street and city, PID-13 number and e-mail; NK1-2 family and given name. (Not codes such as
#: PID-13's "Internet", nor a ZIP code's five digits, which a port number or an id may hold by chance.)
PHI_COMPONENTS = {"PID": {3: (0,), 5: (0, 1), 7: (0,), 11: (0, 2), 13: (0, 3)}, "NK1": {2: (0, 1)}}


def phi_of(raw: bytes) -> set[str]:
    """The patient data a message carries (values of 4 characters or more)."""
    text = raw.decode("latin-1")
    fs, cs, rs = text[3], text[4], text[5]
    found: set[str] = set()
    for segment in re.split(r"\r\n|\r|\n", text):
        fields = segment.split(fs)
        for i, components in PHI_COMPONENTS.get(fields[0], {}).items():
            for rep in fields[i].split(rs) if i < len(fields) else ():
                parts = rep.split(cs)
                found.update(parts[c] for c in components if c < len(parts) and len(parts[c]) >= 4)
    return found


def start_serve(folder: Path, *extra: str) -> tuple[subprocess.Popen, int, list[str]]:
    """`herald serve` on a free loopback port; returns (process, MLLP port, the stderr lines so far and later)."""
    proc = subprocess.Popen(
        [*HERALD, "serve", "--config", str(folder / "herald.toml"), *extra],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and port is None:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"\(ports \[(\d+)\]\)", line)
        port = int(found.group(1)) if found else None
    if port is None:
        proc.kill()
        proc.wait()
        pytest.fail("herald serve did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, port, lines


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_config(folder: Path, **logging) -> None:
    settings = "".join(f'{k} = "{v}"\n' for k, v in logging.items())
    (folder / "herald.toml").write_text(
        '[server]\nlisten = ["tcp:0:interface=127.0.0.1"]\nallow_plain = true\ndata_dir = "data"\n\n'
        f'[health]\nlisten = "tcp:0:interface=127.0.0.1"\n\n[logging]\n{settings}'
    )


def wait_for(predicate, seconds: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"waited {seconds} s for {what}")


def mllp_exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x0b" + raw + b"\x1c\x0d")
        answer = b""
        while not answer.endswith(b"\x1c\x0d"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_json_logs_of_real_traffic_hold_ids_and_states_but_no_patient_data(tmp_path):
    """`herald serve --log-format json`: the samples are accepted, routed and delivered, one rejected frame carries a
    patient's PID; every line is a JSON object, each message, connection and delivery is logged with its ids, and
    no name, MRN, birth date, street or phone of any test message appears anywhere in the log."""
    from gateway.app.replay import collect_messages

    write_config(tmp_path, format="json", file="herald.log", level="info")
    proc, port, _ = start_serve(tmp_path)
    log = tmp_path / "herald.log"
    messages = collect_messages(sorted(SAMPLES.rglob("*.hl7")))
    rejected = (
        b"MSH|^~\\&|EHR|FAC|||20260101||ADT^A01||P|2.5\r"
        b"PID|1||ZQMRN48213^^^FAC^MR||WIBBLESWORTH^PERPETUA^Q||19391224|F|||77 QUILLON LANE^^ELMTOWN^VT^05001\r"
    )
    try:
        sent = subprocess.run(
            [*HERALD, "send", f"127.0.0.1:{port}", *(str(p) for p in sorted(SAMPLES.rglob("*.hl7"))), "--quiet"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert b"MSA|AR" in mllp_exchange(port, rejected)
        wait_for(lambda: log.read_text().count('"state": "sent"') >= len(messages), what="the deliveries")
    finally:
        stop(proc)
    text = log.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "namespace", "text"} <= r.keys() for r in records)
    accepted = [r for r in records if r.get("kind") == "accepted"]
    assert sorted(r["control_id"] for r in accepted) == sorted(read_control_id(raw) for _, raw in messages)
    assert all(r["state"] == "received" and r["code"].startswith("ACK ") and "|" in r["sender"] for r in accepted)
    assert any(r["text"].endswith("opened (plain)") for r in records)
    assert any("closed after" in r["text"] for r in records)
    assert any(r["namespace"] == "gateway.delivery.attempts" and r["state"] == "sent" for r in records)
    assert any("rejected a frame" in r["text"] for r in records)
    secrets = set().union(*(phi_of(raw) for _, raw in messages)) | phi_of(rejected)
    assert {"WIBBLESWORTH", "PERPETUA", "ZQMRN48213", "19391224", "77 QUILLON LANE"} <= secrets
    assert len(secrets) > 40, "the samples' patients are many"
    low = text.lower()
    assert sorted(s for s in secrets if s.lower() in low) == []


def read_control_id(raw: bytes) -> str:
    from gateway.header import read_header

    return read_header(raw).control_id


def test_sighup_reloads_the_profiles_and_reopens_the_log_file(tmp_path):
    """`kill -HUP` on herald serve: after logrotate's rename the log goes on in a new file of the same name, which
    says the profiles were reloaded (as `herald reload` asks); the renamed file gets nothing more."""
    profiles = tmp_path / "senders"
    shutil.copytree(ROOT / "mappings" / "senders", profiles)
    write_config(tmp_path, file="herald.log")
    with open(tmp_path / "herald.toml", "a") as f:
        f.write(f'\n[profiles]\nfolder = "{profiles.name}"\n')
    proc, port, stderr = start_serve(tmp_path)
    log, rotated = tmp_path / "herald.log", tmp_path / "herald.log.1"
    try:
        wait_for(lambda: "MLLP listening" in log.read_text(), what="the first lines")
        log.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.exists() and "sender profiles reloaded" in log.read_text(), what="the reload, logged")
        mllp_exchange(port, (SAMPLES / "cerner-v23-a01-admit.hl7").read_bytes().replace(b"\n", b"\r"))
        wait_for(lambda: "accepted message 1" in log.read_text(), what="the message, logged")
        assert proc.poll() is None, "SIGHUP must not stop the server"
    finally:
        stop(proc)
    assert proc.returncode == 0, "".join(stderr)
    new = log.read_text()
    assert f"SIGHUP: log file {log} reopened" in new
    assert re.search(r"sender profiles reloaded: .*\d+", new), new
    old = rotated.read_text()
    assert "MLLP listening" in old and "accepted message" not in old and "SIGHUP" not in old
