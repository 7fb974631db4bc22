"""``herald demo``: the whole path on embedded defaults, in a temporary folder.

Starts the gateway on a free loopback port, imports ``sample_messages/roster.csv``,
replays ``sample_messages/`` over real MLLP, waits for the pipeline and the
deliveries, and prints one line per notification.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
from twisted.internet import defer, task

from gateway.app.replay import collect_messages, replay_async
from gateway.app.service import make_service
from gateway.config import load_config
from gateway.matching.roster import import_roster_file
from gateway.resources import samples_dir
from gateway.store import PENDING, RETRYING, notifications_for, open_database

SAMPLES = samples_dir()
WAIT_SECONDS = 60.0


def run_demo(keep: bool = False, samples: Path = SAMPLES, out=None) -> int:
    """Run the demo; return the exit code."""
    out = out or sys.stdout
    folder = Path(tempfile.mkdtemp(prefix="herald-demo-"))
    cfg = load_config(None, data_dir=folder, listen=["tcp:0:interface=127.0.0.1"])
    roster = import_roster_file(cfg.database, samples / "roster.csv", by="herald demo")
    messages = collect_messages(sorted(samples.glob("*.hl7")))
    echo = lambda s="": click.echo(s, file=out)  # noqa: E731
    echo(f"Herald demo: data in {folder}")
    echo(f"  roster: {roster.added} members from sample_messages/roster.csv")
    result: dict = {}

    @defer.inlineCallbacks
    def main(reactor):
        gw = make_service(cfg, reactor)
        gw.service.startService()
        try:
            yield defer.gatherResults([lst.ready for lst in gw.listeners])
            port = gw.listening_ports()[0]
            echo(f"  listening on 127.0.0.1:{port} (MLLP); replaying {len(messages)} sample messages")
            report = yield replay_async(reactor, "127.0.0.1", port, messages, timeout=10)
            result["report"] = report
            echo(f"  ACKs: {report.accepted} accepted of {report.sent} sent")
            conn = open_database(cfg.database, readonly=True)
            deadline = time.monotonic() + WAIT_SECONDS
            while time.monotonic() < deadline:
                busy = conn.execute(
                    "SELECT (SELECT COUNT(*) FROM messages WHERE state = 'received') + "
                    "(SELECT COUNT(*) FROM notifications WHERE state IN (?, ?))",
                    (PENDING, RETRYING),
                ).fetchone()[0]
                if busy == 0:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            result["notifications"] = [dict(r) for r in notifications_for(conn)]
            result["states"] = dict(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
            conn.close()
        finally:
            yield gw.service.stopService()

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            echo("Herald demo failed.")
            return 1
    report = result["report"]
    notes = result["notifications"]
    echo(f"  messages by state: {', '.join(f'{k} {v}' for k, v in sorted(result['states'].items()))}")
    echo(f"\n{len(notes)} notifications:")
    rows = []
    for n in notes:
        s = json.loads(n["summary"])
        trigger = s.get("trigger", "?") + (" cancel" if s.get("retraction") else "")
        rows.append(
            (
                f"{s['event']} ({trigger})",
                s["patient"][:22],
                s["facility"][:10],
                (s["pcp"] or "(not on roster)")[:22],
                f"{n['recipient_role']} [{n['state']}]",
            )
        )
    width = max([len("EVENT (V2 TRIGGER)"), *(len(r[0]) for r in rows)])
    echo(f"  {'EVENT (V2 TRIGGER)':<{width}} {'PATIENT':<22} {'FACILITY':<10} {'PCP':<22} TO")
    for event, patient, facility, pcp, to in rows:
        echo(f"  {event:<{width}} {patient:<22} {facility:<10} {pcp:<22} {to}")
    for where, code, reason in report.acks:
        if code not in ("AA", "CA"):
            echo(f"  not accepted: {Path(where).name}: {code} {reason}")
    if keep:
        echo(f"\nData kept in {folder}; try: herald log list --data {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    undelivered = [n for n in notes if n["state"] != "sent"]
    return 0 if notes and not undelivered and report.accepted == report.sent else 1
