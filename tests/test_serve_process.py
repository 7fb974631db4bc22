"""`herald serve`, `herald send` and `herald log` as separate processes, the way an analyst runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERALD = [sys.executable, "-m", "gateway.app.cli"]


def herald(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*HERALD, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def test_send_replays_samples_and_log_lists_them(herald_server, tmp_path):
    """`herald send` replays a folder and exits 0; `herald log list` on the running server's data shows them."""
    port, data, proc = herald_server
    roster = herald("roster", "import", "sample_messages/roster.csv", "--data", str(data))
    assert roster.returncode == 0, roster.stderr
    sent = herald("send", f"127.0.0.1:{port}", "sample_messages/", "--quiet")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    samples = len(list((ROOT / "sample_messages").rglob("*.hl7")))  # the vendor dialects' folders too
    assert f"sent {samples}, accepted {samples}, not accepted 0" in sent.stdout
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = herald("log", "list", "--data", str(data))
        if listing.stdout.count("routed") == samples:
            break
        time.sleep(0.2)
    assert listing.stdout.count("routed") == samples, listing.stdout
    shown = herald("log", "show", "1", "--data", str(data))
    assert shown.returncode == 0, shown.stderr
    assert "ack-sent" in shown.stdout and "delivered" in shown.stdout
    # Stopping is clean: SIGTERM ends the process with status 0.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_send_exits_1_when_a_message_is_rejected(herald_server, tmp_path):
    """`herald send` exits 1 and names the file and reason when a message is not accepted."""
    port, data, proc = herald_server
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"MSH|^~\\&|EHR|FAC|||20260101||ADT^A01||P|2.5\rPID|1||1^^^F^MR\r")
    good = ROOT / "sample_messages" / "cerner-v23-a01-admit.hl7"
    result = herald("send", f"127.0.0.1:{port}", str(good), str(bad), "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "bad.hl7: AR" in result.stderr and "MSH-10" in result.stderr
    assert "sent 2, accepted 1, not accepted 1" in result.stdout


def test_send_to_a_closed_port_fails_cleanly(tmp_path):
    """`herald send` to a port nobody listens on exits 1 with a connection error, not a traceback."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    result = herald("send", f"127.0.0.1:{port}", "sample_messages/cerner-v23-a01-admit.hl7", "--quiet")
    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_bad_config_fails_at_start_naming_the_key(tmp_path):
    """A config with a wrong type stops `herald serve` before it listens, naming the key."""
    cfg = tmp_path / "herald.toml"
    cfg.write_text('[delivery]\nmax_attempts = "three"\n')
    result = herald("serve", "--config", str(cfg), "--data", str(tmp_path / "d"))
    assert result.returncode != 0
    assert "delivery.max_attempts" in result.stderr


def test_serve_with_bad_endpoint_fails_at_start(tmp_path):
    """A listen string Twisted cannot parse stops `herald serve` with the endpoint named."""
    result = herald("serve", "--listen", "tcp:notaport", "--data", str(tmp_path / "d"))
    assert result.returncode != 0
    assert "server.listen" in result.stderr and "tcp:notaport" in result.stderr


def test_serve_port_in_use_fails_cleanly(herald_server, tmp_path):
    """A second server on a port already taken exits non-zero with a clear message."""
    port, data, proc = herald_server
    result = herald(
        "serve", "--listen", f"tcp:{port}:interface=127.0.0.1", "--allow-plain", "--data", str(tmp_path / "d2")
    )
    assert result.returncode != 0
    assert "could not listen" in result.stderr


if os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip("signals as on POSIX")


def test_demo_replays_every_sample_and_prints_its_notifications():
    """`herald demo` acknowledges every sample message, routes each, prints one line a notification, exits 0."""
    samples = len(list((ROOT / "sample_messages").glob("*.hl7")))
    result = herald("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"ACKs: {samples} accepted of {samples} sent" in out, out
    assert f"messages by state: routed {samples}" in out, out
    count = int(re.search(r"^(\d+) notifications:", out, re.M).group(1))
    lines = [ln for ln in out.splitlines() if ln.startswith("  notification-")]
    assert len(lines) == count > samples, out
    assert all(ln.endswith("[sent]") for ln in lines), out
    # The PCP of a matched patient is named; the cancel is shown as one.
    assert any("Dr. Lena Marsh" in ln and ln.rstrip().endswith("pcp [sent]") for ln in lines), out
    assert any("(A11 cancel)" in ln and "hie [sent]" in ln for ln in lines), out


def _with_msh15(raw: bytes, value: bytes, control_id: bytes) -> bytes:
    fields = raw.split(b"|", 15)
    fields[9] = control_id
    fields[14] = value
    return b"|".join(fields)


def test_send_does_not_wait_for_acks_msh15_says_not_to_send(herald_server, tmp_path):
    """MSH-15 NE (no accept ACK) and ER (only on error): `herald send` waited 30 s on each and called it an
    error (issue 15). Now it waits briefly, counts them as sent without an ACK asked for, and exits 0."""
    port, _, _ = herald_server
    folder = tmp_path / "quiet"
    folder.mkdir()
    raw = (ROOT / "sample_messages" / "epic-v251-a04-ed-registration.hl7").read_bytes()
    for i, mode in enumerate((b"NE", b"ER", b"AL")):
        (folder / f"{i}.hl7").write_bytes(_with_msh15(raw, mode, b"QUIET%d" % i))
    started = time.monotonic()
    sent = herald("send", f"127.0.0.1:{port}", str(folder), "--quiet", "--timeout", "20")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert time.monotonic() - started < 10
    assert "sent 3, accepted 1, not accepted 0, no ACK asked (MSH-15 NE/ER) 2, errors 0" in sent.stdout


def test_send_leaves_out_a_licence_file_in_a_folder_and_says_so(herald_server, tmp_path):
    """A corpus folder with a LICENSE.txt was refused whole (issue 15): now the file is left out, named."""
    port, _, _ = herald_server
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "LICENSE.txt").write_text("Apache License\nVersion 2.0, January 2004\n", encoding="utf-8")
    (folder / "a04.hl7").write_bytes((ROOT / "sample_messages" / "epic-v251-a04-ed-registration.hl7").read_bytes())
    sent = herald("send", f"127.0.0.1:{port}", str(folder), "--quiet")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "LICENSE.txt: " in sent.stderr and "left out" in sent.stderr
    assert "sent 1, accepted 1" in sent.stdout
    # Named explicitly, a file with no message is still an error: the operator asked for it.
    named = herald("send", f"127.0.0.1:{port}", str(folder / "LICENSE.txt"), "--quiet")
    assert named.returncode == 2
