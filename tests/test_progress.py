"""Progress on long CLI work (issue 15): `roster import`, `keys rotate` and `send` draw a bar on stderr when stderr is
a terminal (here a pseudo-terminal), none when it is a pipe, and always end with their summary."""

from __future__ import annotations

import base64
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_messages"
HERALD = [sys.executable, "-c", "from gateway.app.cli import main; main()"]
KEY_A = f"a {base64.b64encode(b'A' * 32).decode()}"
KEY_B = f"b {base64.b64encode(b'B' * 32).decode()}"


def run(*args, tty: bool, keys: str = KEY_A) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI, its stderr a pseudo-terminal when ``tty``."""
    env = {**os.environ, "HERALD_KEYS": keys}
    if not tty:
        done = subprocess.run([*HERALD, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        return done.returncode, done.stdout, done.stderr
    main_end, child_end = pty.openpty()
    proc = subprocess.Popen([*HERALD, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=child_end, env=env)
    os.close(child_end)
    err = b""
    while True:
        try:
            chunk = os.read(main_end, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read()
    proc.wait(timeout=120)
    os.close(main_end)
    return proc.returncode, out.decode(), err.decode(errors="replace")


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    code, out, err = run("roster", "import", str(SAMPLES / "roster.csv"), "--data", str(folder), tty=False)
    assert code == 0, out + err
    return folder


def test_roster_import_draws_a_bar_on_a_terminal_only(data):
    """On a terminal the rows read move a bar to 100%; piped, no bar; the summary is printed either way."""
    code, out, err = run("roster", "import", str(SAMPLES / "roster.csv"), "--data", str(data), tty=True)
    assert code == 0, out + err
    assert "reading roster.csv" in err and "100%" in err and "[####" in err, err
    assert "of 5 rows" in out
    code, out, err = run("roster", "import", str(SAMPLES / "roster.csv"), "--data", str(data), tty=False)
    assert code == 0 and "of 5 rows" in out
    assert "reading" not in err and "%" not in err, err


def test_keys_rotate_draws_a_bar_over_the_values_it_seals(data):
    """Every value sealed under key a, sealed again under b: a bar to 100% on a terminal, then the summary."""
    ring = f"{KEY_A};{KEY_B}"
    code, out, err = run("keys", "rotate", "--no-new-key", "--data", str(data), tty=True, keys=ring)
    assert code == 0, out + err
    assert "sealing" in err and "100%" in err, err
    assert "sealed under b" in out and "roster members" in out
    code, out, err = run("keys", "rotate", "--no-new-key", "--data", str(data), tty=False, keys=ring)
    assert code == 0 and "sealed under b" in out
    assert "%" not in err, err


def test_send_draws_a_bar_on_a_terminal_only(tmp_path):
    """`herald send` of a folder: a bar on a terminal, none in a pipe; the one-line summary on stdout always."""
    from test_logs import start_serve, stop, write_config

    write_config(tmp_path)
    proc, port, _ = start_serve(tmp_path)
    try:
        sent_on_a_terminal_and_in_a_pipe(port)
    finally:
        stop(proc)


def sent_on_a_terminal_and_in_a_pipe(port: int) -> None:
    code, out, err = run("send", f"127.0.0.1:{port}", str(SAMPLES / "epic"), tty=True)
    assert code == 0, out + err
    assert "sending" in err and "100%" in err, err
    assert out.startswith("sent ") and out.count("\n") == 1
    code, out, err = run("send", f"127.0.0.1:{port}", str(SAMPLES / "epic"), tty=False)
    assert code == 0, out + err
    assert "sending" not in err and out.startswith("sent ")
