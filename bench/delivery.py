"""Delivery figures (issue 12): notifications a second to a local FHIR receiver, and ACK-to-delivery latency.

Two measurements, in one run, against a real ``herald serve`` and a FHIR
receiver in its own process on 127.0.0.1 (twisted.web: ``POST
/fhir/$process-message`` answered 200, ``POST /token`` for SMART Backend
Services; it writes the time each POST arrived and the Bundle's
``identifier.value``, which is the message's MSH-10, to a file).

The server's configuration: the HIE as a ``fhir`` recipient at the receiver
(``[recipients.hie] channel = "fhir"``), the PCP and care-team recipients
disabled. There is no roster, so no patient matches and the HIE, which gets
every message, is the only recipient: one notification a message. The
delivery defaults apply (64 attempts at once, 4 to one destination; Herald
keeps up to 4 HTTP connections to it alive and sends one POST after another
on each).

1. **Delivery throughput** (``--messages``, default 5000): the messages are
   sent with mllp-load to a server whose delivery is paused (this script's
   ``_serve``: ``make_service`` as ``herald serve`` builds it, with
   ``DeliveryWorker.pause()`` before it starts), and routed by its pipeline;
   when every one has its notification pending, that server stops. Then
   ``herald serve`` starts on a copy of the folder and only delivers:
   notifications a second = count / (last arrival - first arrival), and
   also from the moment the server's port accepted connections. Once with no
   authorization and, unless ``--no-smart``, once on another copy with SMART
   Backend Services (an RS384 client assertion, checked by the receiver with
   PyJWT; the token cached by Herald).
2. **ACK-to-delivery latency** at a steady ``--rate`` (default 100 msgs/s)
   for ``--seconds`` (default 60): a fresh server with the pipeline on, warmed
   up first with ``--warm-up`` messages (default 20) sent and delivered and
   not counted (its pipeline workers start at the first message), the
   yardstick mllp-load (``../shared/tools/mllp-load``) run by this script's
   ``_load`` wrapper, which imports it unchanged and notes the wall-clock
   time each ACK arrived, per control id, with mllp-load's own latency for
   it. Each ACKed control id is matched to the receiver's arrival of its
   Bundle: p50/p95/p99/max of (arrival - ACK), the count matched, missing
   and duplicated.

The machine's core count and load average are printed with the figures.
Every wait is bounded, every process this script starts is stopped by its
pid (SIGTERM, then SIGKILL; the server's pipeline workers too), and the
temporary folder is deleted.

Run from the repository root::

    .venv/bin/python bench/delivery.py
    .venv/bin/python bench/delivery.py --messages 2000 --seconds 30 --rate 100 --no-smart
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.machinery import SourceFileLoader
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import (  # noqa: E402
    MLLP_LOAD,
    ROOT,
    Server,
    code_under_test,
    cpu_seconds,
    descendants,
    free_port,
    server_cpu,
    stop_leftovers,
    throwaway_key,
)

THIS = Path(__file__).resolve()
CLIENT_ID = "herald-bench"
#: The Bundle's business identifier (MSH-10) near its start: ``"identifier":{"system":"...","value":"..."}``.
_IDENTIFIER = re.compile(rb'"identifier":\{[^{}]*?"value":"([^"]*)"')


# -- the FHIR receiver (a child process of this script) -----------------------------


def serve_receiver(argv: list[str]) -> None:
    """``POST /fhir/$process-message`` (200) and ``POST /token``; each arrival written to ``--arrivals``.

    Lines: ``<unix time>,post,<Bundle.identifier.value>,<auth>`` (auth: none,
    ok) and ``<unix time>,token,<client id>,ok``. With ``--public-key`` a
    POST needs a bearer token this receiver issued (else 401), and a token
    request needs a client assertion signed by that key (else 400).
    """
    ap = argparse.ArgumentParser(prog="delivery.py _receiver")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--arrivals", type=Path, required=True)
    ap.add_argument("--public-key", type=Path, default=None)
    opts = ap.parse_args(argv)

    from urllib.parse import parse_qs

    import jwt
    from cryptography.hazmat.primitives import serialization
    from twisted.internet import reactor, task
    from twisted.web import resource, server

    public_key = serialization.load_pem_public_key(opts.public_key.read_bytes()) if opts.public_key else None
    token_url = f"http://127.0.0.1:{opts.port}/token"
    issued: set[str] = set()
    out = open(opts.arrivals, "a", buffering=1 << 16)  # noqa: SIM115 - closed at shutdown
    outcome = b'{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}'

    class Root(resource.Resource):
        isLeaf = True

        def render_POST(self, request):
            now = time.time()
            body = request.content.read()
            if request.path == b"/token":
                return self.token(request, body, now)
            if not request.path.endswith((b"/$process-message", b"/%24process-message")):
                request.setResponseCode(404)
                return b""
            auth = "none"
            if public_key is not None:
                given = (request.getHeader(b"authorization") or b"").decode("latin-1").removeprefix("Bearer ")
                if given not in issued:
                    request.setResponseCode(401)
                    request.setHeader(b"WWW-Authenticate", b'Bearer error="invalid_token"')
                    return b""
                auth = "ok"
            found = _IDENTIFIER.search(body, 0, 2048) if body.startswith(b'{"resourceType":"Bundle"') else None
            if found is None:
                request.setResponseCode(400)
                return b""
            out.write(f"{now:.6f},post,{found.group(1).decode('ascii', 'replace')},{auth}\n")
            request.setHeader(b"Content-Type", b"application/fhir+json")
            return outcome

        def token(self, request, body: bytes, now: float):
            form = parse_qs(body.decode("ascii", "replace"))
            try:
                claims = jwt.decode(
                    form["client_assertion"][0],
                    public_key,
                    algorithms=["RS384", "ES384"],
                    audience=token_url,
                    issuer=CLIENT_ID,
                    options={"require": ["exp", "jti", "iss", "sub", "aud"]},
                )
                if claims["sub"] != CLIENT_ID or form.get("grant_type") != ["client_credentials"]:
                    raise jwt.InvalidTokenError("sub or grant_type")
            except (KeyError, IndexError, jwt.InvalidTokenError, TypeError):
                request.setResponseCode(400)
                return b'{"error":"invalid_client"}'
            token = os.urandom(16).hex()
            issued.add(token)
            out.write(f"{now:.6f},token,{CLIENT_ID},ok\n")
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 300}).encode()

        def render_GET(self, request):
            request.setResponseCode(404)
            return b""

    site = server.Site(Root())
    site.log = lambda request: None  # no access log: it would cost the receiver a write a request
    reactor.listenTCP(opts.port, site, interface="127.0.0.1")
    task.LoopingCall(out.flush).start(0.25)
    reactor.addSystemEventTrigger("after", "shutdown", out.close)
    reactor.run()


@dataclass
class Receiver:
    """The FHIR receiver process, on a fixed port (notifications keep their target URL across restarts)."""

    port: int
    arrivals: Path
    public_key: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self, ready_seconds: float = 20.0) -> None:
        self.arrivals.write_text("")
        cmd = [sys.executable, str(THIS), "_receiver", "--port", str(self.port), "--arrivals", str(self.arrivals)]
        if self.public_key is not None:
            cmd += ["--public-key", str(self.public_key)]
        log = self.arrivals.with_suffix(".log")
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, ready_seconds, log)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float, log: Path) -> None:
    """Until ``port`` accepts connections (bounded); fails when ``proc`` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not accept connections within {seconds:g} s: {_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM by pid, SIGKILL after ``grace`` seconds; its own children the same way."""
    if proc is None or proc.poll() is not None:
        return
    children = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    stop_leftovers(children)


class LineReader:
    """The complete lines appended to a file since the last call (another process writes it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode("ascii", "replace").splitlines()


def read_arrivals(lines: list[str]) -> tuple[list[tuple[float, str, str]], int]:
    """(time, control id, auth) of each POST, and the count of tokens issued."""
    posts, tokens = [], 0
    for line in lines:
        when, kind, what, auth = line.split(",", 3)
        if kind == "post":
            posts.append((float(when), what, auth))
        else:
            tokens += 1
    return posts, tokens


# -- the load: mllp-load, with each ACK's arrival time per control id ---------------


def load_yardstick():
    """The shared mllp-load script as a module (its file has no .py suffix), unchanged."""
    loader = SourceFileLoader("mllp_load", str(MLLP_LOAD))
    spec = importlib.util.spec_from_loader("mllp_load", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def tracked_load(argv: list[str]) -> int:
    """Run mllp-load's ``main`` with ``argv`` after ``--``, writing ``<unix time>,<control id>,<verdict>,<ms>``
    to ``--log`` for every ACK as it arrives (verdict and latency are mllp-load's own)."""
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="delivery.py _load")
    ap.add_argument("--log", type=Path, required=True)
    opts = ap.parse_args(argv[:split])
    yardstick = load_yardstick()
    log = open(opts.log, "w", buffering=1 << 16)  # noqa: SIM115 - closed below
    runs = []
    flushed = [time.monotonic()]

    class TrackedRun(yardstick.Run):
        def __init__(self, args):
            super().__init__(args)
            runs.append(self)

    original = yardstick.check_ack

    def check_ack(ack: bytes, control_id: str) -> str:
        # mllp-load calls this as the ACK arrives, right after appending its latency.
        verdict = original(ack, control_id)
        log.write(f"{time.time():.6f},{control_id},{verdict},{runs[0].latencies[-1] * 1000:.3f}\n")
        if time.monotonic() - flushed[0] > 0.25:
            log.flush()
            flushed[0] = time.monotonic()
        return verdict

    yardstick.Run = TrackedRun
    yardstick.check_ack = check_ack
    sys.argv = ["mllp-load", *argv[split + 1 :]]
    try:
        return yardstick.main()
    finally:
        log.close()


class TrackedLoad:
    """mllp-load through :func:`tracked_load` as a child process, bounded by its --max-seconds plus a margin."""

    def __init__(self, port: int, n: int, connections: int, rate: float, max_seconds: float, log: Path) -> None:
        self.log = log
        self.max_seconds = max_seconds
        cmd = [sys.executable, str(THIS), "_load", "--log", str(log), "--", "--port", str(port)]
        cmd += ["-n", str(n), "-c", str(connections), "--max-seconds", str(max_seconds), "--json"]
        if rate:
            cmd += ["--rate", str(rate)]
        self.cmd = cmd
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.status: int | None = None
        self.cpu_s = 0.0

    def start(self) -> None:
        self.log.write_text("")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.out, stderr=self.err)

    def done(self) -> bool:
        """Whether it has exited (reaped here, with its CPU time)."""
        if self.status is not None:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if not pid:
            # mllp-load stops sending at --max-seconds; each message in flight may wait --timeout (10 s).
            if time.monotonic() - self.started > self.max_seconds + 60:
                os.kill(self.proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(self.proc.pid, 0)
            else:
                return False
        self.status = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.status
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return True

    def wait(self) -> dict:
        while not self.done():
            time.sleep(0.05)
        return self.result()

    def result(self) -> dict:
        self.out.seek(0)
        self.err.seek(0)
        lines = [ln for ln in self.out.read().decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"mllp-load printed no result ({self.status}): {self.err.read().decode()[-2000:]}")
        return json.loads(lines[-1]) | {"client_cpu_s": round(self.cpu_s, 3)}

    def stop(self) -> None:
        if self.proc is not None and self.status is None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.out.close()
        self.err.close()


def read_acks(lines: list[str]) -> list[tuple[float, str, str, float]]:
    """(unix time, control id, verdict, latency ms) of each ACK line of :func:`tracked_load`."""
    out = []
    for line in lines:
        when, control_id, verdict, ms = line.split(",")
        out.append((float(when), control_id, verdict, float(ms)))
    return out


# -- Herald: a server with delivery paused (a child process of this script) ---------


def serve_paused(argv: list[str]) -> None:
    """Run Herald as ``herald serve`` does, with its delivery worker paused: notifications stay pending."""
    ap = argparse.ArgumentParser(prog="delivery.py _serve")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--config", type=Path, default=None)
    opts = ap.parse_args(argv)

    from twisted.internet import defer, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from gateway.app.service import make_service
    from gateway.config import load_config

    cfg = load_config(opts.config, data_dir=opts.data, listen=[opts.listen], allow_plain=True)

    def run(reactor):
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
        gw = make_service(cfg, reactor)
        gw.delivery.pause()
        gw.service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", gw.service.stopService)
        return defer.Deferred()  # until SIGTERM

    task.react(run)


class PausedServer(Server):
    """:class:`Server` whose process is :func:`serve_paused`."""

    def command(self) -> list[str]:
        cmd = [sys.executable, str(THIS), "_serve", "--data", str(self.data_dir)]
        cmd += ["--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        return cmd if self.config is None else [*cmd, "--config", str(self.config)]


def herald_config(folder: Path, receiver: Receiver, smart_key: Path | None, name: str) -> Path:
    """A config: the HIE as a fhir recipient at ``receiver`` (SMART with ``smart_key``), no PCP, no care team."""
    text = (
        "[recipients.pcp]\nenabled = false\n\n[recipients.care_team]\nenabled = false\n\n"
        f'[recipients.hie]\nchannel = "fhir"\nurl = "{receiver.base}"\n'
    )
    if smart_key is not None:
        text += (
            f'\n[recipients.hie.auth]\ntoken_url = "{receiver.token_url}"\nclient_id = "{CLIENT_ID}"\n'
            f'key_file = "{smart_key}"\n'
        )
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def smart_keys(folder: Path) -> tuple[Path, Path]:
    """An RSA key for the SMART client assertion (RS384): (private PEM for Herald, public PEM for the receiver)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = folder / "smart-key.pem", folder / "smart-public.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def outbox_counts(database: Path) -> dict:
    """Messages by state and notifications by state (read-only; empty when unreadable)."""
    import sqlite3

    from gateway.store import open_database

    try:
        conn = open_database(database, readonly=True)
    except Exception:
        return {"messages": {}, "notifications": {}}
    try:
        return {
            "messages": dict(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall()),
            "notifications": dict(conn.execute("SELECT state, COUNT(*) FROM notifications GROUP BY state").fetchall()),
        }
    except sqlite3.Error:
        return {"messages": {}, "notifications": {}}
    finally:
        conn.close()


def start_herald(data: Path, config: Path, paused: bool = False) -> Server:
    """``herald serve`` (or the paused server) on a free port, started and accepting connections."""
    data.mkdir(exist_ok=True)
    if not (data / "keys" / "herald.key").exists():
        throwaway_key(data)
    server = (PausedServer if paused else Server)("herald", True, data, free_port(), config=config)
    server.start(ready_seconds=60)
    return server


def warm_up(server: Server, reader: LineReader, count: int, folder: Path, bound: float = 120.0) -> float:
    """Send ``count`` messages and wait (bounded) until the receiver has their notifications; their arrivals are
    consumed from ``reader``. The pipeline's workers are started, and import fhir.resources, at the first
    message (a few seconds): the steady figures are of a warm server. Returns the seconds it took."""
    if count < 1:
        return 0.0
    started = time.monotonic()
    load = TrackedLoad(server.port, count, 1, 0.0, 60.0, folder / "warm-up-acks.csv")
    load.start()
    try:
        ok = load.wait()["ok"]
    finally:
        load.stop()
    seen: set[str] = set()
    while len(seen) < ok and time.monotonic() - started < bound:
        time.sleep(0.1)
        seen |= {p[1] for p in read_arrivals(reader.new_lines())[0]}
    if len(seen) < ok:
        raise RuntimeError(f"warm-up: {len(seen)} of {ok} notifications delivered within {bound:g} s")
    return round(time.monotonic() - started, 2)


def percentiles(values: list[float]) -> dict:
    """p50, p95, p99 and max of ``values`` (None each when empty), the nearest-rank way mllp-load takes them."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

    return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": round(ordered[-1], 3)}


def machine() -> dict:
    """The core count and the load average, printed with every figure."""
    return {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


# -- 1. delivery throughput ------------------------------------------------------------


def preload(tmp: Path, receiver: Receiver, n: int, drain_seconds: float) -> tuple[Path, dict]:
    """A data folder holding ``n`` routed messages, each with one pending HIE notification."""
    data = tmp / "preloaded"
    server = start_herald(data, herald_config(tmp, receiver, None, "preload.toml"), paused=True)
    try:
        load = TrackedLoad(server.port, n, 4, 0.0, 300.0, tmp / "preload-acks.csv")
        load.start()
        try:
            result = load.wait()
        finally:
            load.stop()
        deadline = time.monotonic() + drain_seconds
        while True:
            counts = outbox_counts(server.database)
            routed = sum(v for k, v in counts["messages"].items() if k != "received")
            pending = counts["notifications"].get("pending", 0)
            if routed >= result["ok"] and pending >= result["ok"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"preload: not routed within {drain_seconds:g} s: {counts}")
            time.sleep(0.5)
    finally:
        server.stop()
    return data, {"load": result, "counts": counts}


def deliver_backlog(tmp: Path, source: Path, receiver: Receiver, smart_key: Path | None, expected: int, args) -> dict:
    """``herald serve`` on a copy of ``source``: time until the receiver has every notification."""
    label = "smart" if smart_key is not None else "plain"
    data = tmp / f"deliver-{label}"
    shutil.copytree(source, data)
    config = herald_config(tmp, receiver, smart_key, f"deliver-{label}.toml")
    receiver.start()
    reader = LineReader(receiver.arrivals)
    posts: list[tuple[float, str, str]] = []
    tokens = 0
    server = None
    try:
        load_before = os.getloadavg()[0]
        server = start_herald(data, config)
        ready = time.time()
        cpu_before = server_cpu(server)
        recv_before = cpu_seconds(receiver.proc.pid)
        deadline = time.monotonic() + args.drain_seconds
        while len({p[1] for p in posts}) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
            got, t = read_arrivals(reader.new_lines())
            posts += got
            tokens += t
        cpu_after = server_cpu(server)
        recv_cpu = cpu_seconds(receiver.proc.pid) - recv_before
        time.sleep(0.3)  # the receiver's writes of the last arrivals
        got, t = read_arrivals(reader.new_lines())
        posts += got
        tokens += t
        counts = outbox_counts(server.database)
    finally:
        if server is not None:
            server.stop()
        receiver.stop()
    ids = [p[1] for p in posts]
    first, last = (min(p[0] for p in posts), max(p[0] for p in posts)) if posts else (ready, ready)
    delivered = len(set(ids))
    return {
        "auth": label,
        "expected": expected,
        "delivered": delivered,
        "posts": len(posts),
        "duplicates": len(ids) - delivered,
        "authorized": sum(1 for p in posts if p[2] == "ok"),
        "tokens_issued": tokens,
        "per_s_first_to_last": round(delivered / max(last - first, 1e-3), 1),
        "per_s_from_ready": round(delivered / max(last - ready, 1e-3), 1),
        "seconds_first_to_last": round(last - first, 3),
        "seconds_from_ready": round(last - ready, 3),
        "server_cpu_us_per_notification": round(1e6 * (cpu_after[0] - cpu_before[0]) / max(delivered, 1)),
        "workers_cpu_us_per_notification": round(1e6 * (cpu_after[1] - cpu_before[1]) / max(delivered, 1)),
        "receiver_cpu_us_per_notification": round(1e6 * recv_cpu / max(delivered, 1)),
        "notifications": counts["notifications"],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "complete": delivered >= expected,
    }


# -- 2. ACK-to-delivery latency at a steady rate ---------------------------------------


def ack_to_delivery(
    acks: list[tuple[float, str, str, float]], posts: list[tuple[float, str, str]]
) -> tuple[list[float], dict]:
    """Milliseconds from each ok ACK to its Bundle's first arrival; with the counts matched, missing, duplicated."""
    acked = {cid: when for when, cid, verdict, _ in acks if verdict == "ok"}
    first: dict[str, float] = {}
    seen = 0
    for when, cid, _ in posts:
        seen += 1
        if cid not in first or when < first[cid]:
            first[cid] = when
    delays = [1000 * (first[cid] - when) for cid, when in acked.items() if cid in first]
    return delays, {
        "acked": len(acked),
        "matched": len(delays),
        "missing": len(acked) - len(delays),
        "duplicates": seen - len(first),
        "not_acked": len(set(first) - set(acked)),
    }


def steady_latency(tmp: Path, receiver: Receiver, smart_key: Path | None, args) -> dict:
    """A fresh server with the pipeline on, ``args.rate`` msgs/s for ``args.seconds``: ACK-to-delivery latency."""
    label = "smart" if smart_key is not None else "plain"
    data = tmp / f"steady-{label}"
    config = herald_config(tmp, receiver, smart_key, f"steady-{label}.toml")
    receiver.start()
    server = load = None
    try:
        server = start_herald(data, config)
        reader = LineReader(receiver.arrivals)
        warm = warm_up(server, reader, args.warm_up, tmp)
        load_before = os.getloadavg()[0]
        n = int(round(args.rate * args.seconds))
        load = TrackedLoad(server.port, n, args.connections, args.rate, args.seconds + 30, tmp / "steady-acks.csv")
        cpu_before = server_cpu(server)
        load.start()
        result = load.wait()
        acks = read_acks(LineReader(load.log).new_lines())
        posts: list[tuple[float, str, str]] = []
        wanted = {cid for _, cid, verdict, _ in acks if verdict == "ok"}
        deadline = time.monotonic() + args.drain_seconds
        while time.monotonic() < deadline:
            posts += read_arrivals(reader.new_lines())[0]
            if wanted <= {p[1] for p in posts}:
                break
            time.sleep(0.2)
        cpu_after = server_cpu(server)
        counts = outbox_counts(server.database)
    finally:
        if load is not None:
            load.stop()
        if server is not None:
            server.stop()
        receiver.stop()
    delays, matched = ack_to_delivery(acks, posts)
    done = max(result["ok"], 1)
    return {
        "auth": label,
        "rate": args.rate,
        "seconds": args.seconds,
        "connections": args.connections,
        "warm_up": {"messages": args.warm_up, "seconds": warm},
        "load": result,
        "ack_ms": percentiles([a[3] for a in acks]),
        "ack_to_delivery_ms": percentiles(delays),
        **matched,
        "server_cpu_us_per_msg": round(1e6 * (cpu_after[0] - cpu_before[0]) / done),
        "workers_cpu_us_per_msg": round(1e6 * (cpu_after[1] - cpu_before[1]) / done),
        "messages": counts["messages"],
        "notifications": counts["notifications"],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


# -- output ----------------------------------------------------------------------------


def _ms(d: dict) -> str:
    if d["p50"] is None:
        return "n/a"
    return f"p50 {d['p50']:.1f} / p95 {d['p95']:.1f} / p99 {d['p99']:.1f} / max {d['max']:.1f} ms"


def print_report(report: dict) -> None:
    m = report["machine"]
    print(code_under_test())
    print(f"machine: {m['cores']} cores, load average {m['load_average']} at the start (other work shows here)")
    print("herald serve: HIE as a fhir recipient (http://127.0.0.1, kept-alive connections), PCP and care team off,")
    print("no roster (one HIE notification a message), delivery defaults (64 at once, 4 a destination)")
    pre = report.get("preload")
    if pre:
        load = pre["load"]
        print(
            f"\npreload: {load['ok']} of {load['requested']} messages ACKed (mllp-load -c 4, {load['msgs_per_s']} "
            f"msgs/s) to a server with delivery paused; then notifications {pre['counts']['notifications']}"
        )
    for r in report.get("throughput", []):
        print(
            f"\ndelivery of the backlog, auth {r['auth']}: {r['delivered']} of {r['expected']} notifications at the "
            f"receiver ({r['posts']} POSTs, {r['duplicates']} duplicates, {r['authorized']} with a valid token, "
            f"{r['tokens_issued']} tokens issued)"
        )
        print(
            f"  {r['per_s_first_to_last']} notifications/s first to last arrival ({r['seconds_first_to_last']} s); "
            f"{r['per_s_from_ready']}/s from the server's port opening ({r['seconds_from_ready']} s)"
        )
        print(
            f"  CPU a notification: server {r['server_cpu_us_per_notification']} us, pipeline workers "
            f"{r['workers_cpu_us_per_notification']} us, receiver {r['receiver_cpu_us_per_notification']} us; "
            f"outbox at the end {r['notifications']}; load average {r['load_average'][0]}-{r['load_average'][1]}"
        )
    for r in report.get("latency", []):
        load = r["load"]
        print(
            f"\nsteady {r['rate']:g} msgs/s for {r['seconds']:g} s (mllp-load -c {r['connections']} --rate), "
            f"auth {r['auth']}: {load['ok']} ACKed of {load['requested']} ({load['msgs_per_s']} msgs/s), "
            f"{load['nack']} nacks, {load['timeout'] + load['conn_error']} errors"
        )
        warm = r["warm_up"]
        print(f"  warm-up: {warm['messages']} messages sent and delivered first, in {warm['seconds']} s")
        print(f"  ACK latency (mllp-load's):     {_ms(r['ack_ms'])}")
        print(f"  ACK to delivery at receiver:   {_ms(r['ack_to_delivery_ms'])}")
        print(
            f"  matched {r['matched']} of {r['acked']} ACKed; missing {r['missing']}, duplicates {r['duplicates']}, "
            f"delivered but not ACKed {r['not_acked']}"
        )
        print(
            f"  CPU a message: server {r['server_cpu_us_per_msg']} us, pipeline workers {r['workers_cpu_us_per_msg']} "
            f"us; messages {r['messages']}; notifications {r['notifications']}; load average "
            f"{r['load_average'][0]}-{r['load_average'][1]}"
        )


# -- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See bench/README.md, Delivery.")
    ap.add_argument("--messages", type=int, default=5000, help="backlog for the throughput figure (default 5000)")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the steady-rate run (default 60)")
    ap.add_argument("--rate", type=float, default=100.0, help="steady rate, messages a second (default 100)")
    ap.add_argument("--connections", type=int, default=1, help="mllp-load connections at the steady rate (1)")
    ap.add_argument("--no-smart", action="store_true", help="skip the SMART Backend Services runs")
    ap.add_argument("--smart-latency", action="store_true", help="also run the steady rate with SMART auth")
    ap.add_argument(
        "--only", choices=["throughput", "latency"], default=None, help="run only one of the two measurements"
    )
    ap.add_argument(
        "--drain-seconds", type=float, default=300.0, help="bound on each wait for routing or delivery (300)"
    )
    ap.add_argument(
        "--warm-up",
        type=int,
        default=20,
        help="messages sent and delivered before the steady load, not counted (default 20; 0: a cold server)",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (prints its path)")
    args = ap.parse_args(argv)
    if min(args.messages, args.seconds, args.rate, args.connections, args.drain_seconds) <= 0 or args.warm_up < 0:
        ap.error("--messages, --seconds, --rate, --connections, --drain-seconds must be positive; --warm-up >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_receiver"]:
        serve_receiver(argv[1:])
        return 0
    if argv[:1] == ["_load"]:
        return tracked_load(argv[1:])
    if argv[:1] == ["_serve"]:
        serve_paused(argv[1:])
        return 0
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-delivery-"))
    report: dict = {"machine": machine()}
    try:
        private, public = smart_keys(tmp)
        port = free_port()
        plain = Receiver(port, tmp / "arrivals.csv")
        smart = Receiver(port, tmp / "arrivals.csv", public_key=public)
        if args.only in (None, "throughput"):
            print(f"delivery: preloading {args.messages} messages ...", file=sys.stderr)
            source, report["preload"] = preload(tmp, plain, args.messages, args.drain_seconds)
            expected = report["preload"]["counts"]["notifications"].get("pending", 0)
            report["throughput"] = []
            for receiver, key in ((plain, None), *(() if args.no_smart else ((smart, private),))):
                print(f"delivery: delivering the backlog ({'smart' if key else 'plain'}) ...", file=sys.stderr)
                report["throughput"].append(deliver_backlog(tmp, source, receiver, key, expected, args))
        if args.only in (None, "latency"):
            report["latency"] = []
            runs = [(plain, None)] + ([(smart, private)] if args.smart_latency and not args.no_smart else [])
            for receiver, key in runs:
                print(f"delivery: {args.rate:g} msgs/s for {args.seconds:g} s ...", file=sys.stderr)
                report["latency"].append(steady_latency(tmp, receiver, key, args))
        report["machine_at_end"] = machine()
    finally:
        if args.keep:
            print(f"delivery: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    complete = all(r["complete"] for r in report.get("throughput", [])) and all(
        r["missing"] == 0 for r in report.get("latency", [])
    )
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
