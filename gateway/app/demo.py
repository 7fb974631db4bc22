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

from gateway.app.operations import opened_store
from gateway.app.replay import collect_messages, replay_async
from gateway.app.roster import import_roster_file
from gateway.app.service import make_service
from gateway.config import load_config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.resources import samples_dir
from gateway.store import (
    count_by_state,
    notifications_for,
    open_database,
    open_roster_snapshot,
    outstanding_work,
    roster_member,
    stored_match,
)
from gateway.store.messages import messages_bundles

SAMPLES = samples_dir()
WAIT_SECONDS = 60.0


def run_demo(keep: bool = False, samples: Path = SAMPLES, out=None) -> int:
    """Run the demo; return the exit code."""
    out = out or sys.stdout
    folder = Path(tempfile.mkdtemp(prefix="herald-demo-"))
    cfg = load_config(None, data_dir=folder, listen=["tcp:0:interface=127.0.0.1"])
    with opened_store(cfg.database) as store:
        roster = import_roster_file(store, samples / "roster.csv", by="herald demo")
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
                if outstanding_work(conn) == 0:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            notes = [dict(r) for r in notifications_for(conn)]
            bundles = messages_bundles(conn, {n["message_id"] for n in notes})
            matches = {n["message_id"]: stored_match(conn, n["message_id"]) for n in notes}
            roster = open_roster_snapshot(cfg.database)
            for n in notes:
                n["about"] = describe_bundle(json.loads(bundles[n["message_id"]]))
                m = matches[n["message_id"]]
                member = roster_member(roster, m["aco_id"], m["member_id"]) if m and m["member_id"] else None
                opted_out = (member or {}).get("opted_out") in (1, "1", True)  # routed as off the roster
                n["pcp"] = "" if opted_out else (member or {}).get("pcp_name") or ""
            roster.close()
            result["notifications"] = notes
            result["states"] = count_by_state(conn)
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
    vocab = load_vocabulary()
    echo(f"  messages by state: {', '.join(f'{k} {v}' for k, v in sorted(result['states'].items()))}")
    echo(f"\n{len(notes)} notifications:")
    rows = []
    for n in notes:
        s = n["about"]
        rule = vocab.events.get(s["trigger"])
        trigger = s["trigger"] + (" cancel" if rule is not None and rule.retraction else "")
        rows.append(
            (
                f"{s['event']} ({trigger})",
                s["patient"][:22],
                s["facility"][:10],
                (n["pcp"] or "(not on roster)")[:22],
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


def describe_bundle(bundle: dict) -> dict[str, str]:
    """What a person reads first about a notification, taken from its Bundle.

    The event code and the v2 trigger (MessageHeader), the patient's name
    (the first Patient.name), the facility (the Encounter's serviceProvider).
    The outbox keeps none of this: it is PHI, and the Bundle already holds it.
    """
    resources = {e["fullUrl"]: e["resource"] for e in bundle.get("entry", ())}
    kinds = {r["resourceType"]: r for r in reversed(list(resources.values()))}
    header, patient, encounter = kinds.get("MessageHeader", {}), kinds.get("Patient", {}), kinds.get("Encounter", {})
    name = (patient.get("name") or [{}])[0]
    given = (name.get("given") or [""])[0]
    provider = resources.get((encounter.get("serviceProvider") or {}).get("reference", ""), {})
    return {
        "event": header.get("eventCoding", {}).get("code", "?"),
        "trigger": ((header.get("reason") or {}).get("coding") or [{}])[0].get("code", "?"),
        "patient": " ".join(x for x in (given, name.get("family", "")) if x) or "(no name)",
        "facility": provider.get("name", ""),
    }
