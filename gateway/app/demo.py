"""``herald demo``: the whole path on embedded defaults, in a temporary folder.

Starts the gateway on a free loopback port, imports ``sample_messages/roster.csv``,
replays ``sample_messages/`` over real MLLP, waits for the pipeline and the
deliveries, and prints one line per notification. The listener is mutual TLS,
as deployed: throwaway certificates (made as ``herald certs init`` makes them)
live in the temporary folder, and each sample sender is bound to the demo's
client certificate in ``[[senders]]``.
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

from gateway.app.certs import make_dev_certs
from gateway.app.operations import opened_store
from gateway.app.replay import collect_messages, replay_async
from gateway.app.roster import import_roster_file
from gateway.app.service import make_service
from gateway.config import load_config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.header import read_header_leniently
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
from gateway.store.keys import load_ring, new_key_file
from gateway.store.messages import messages_bundles
from mllp.client import client_options

SAMPLES = samples_dir()
WAIT_SECONDS = 60.0
#: The demo's client certificate (its subject CN, the identity [[senders]] names).
DEMO_CLIENT = "demo-ehr"


def run_demo(keep: bool = False, samples: Path = SAMPLES, out=None) -> int:
    """Run the demo; return the exit code."""
    out = out or sys.stdout
    folder = Path(tempfile.mkdtemp(prefix="herald-demo-"))
    messages = collect_messages(sorted(samples.glob("*.hl7")))
    cfg, certs = demo_config(folder, messages)
    new_key_file(cfg.key_path)  # a throwaway key, gone with the folder
    keys = load_ring(cfg.key_path, cfg.encrypt_at_rest)
    with opened_store(cfg.database, keys=keys) as store:
        roster = import_roster_file(store, samples / "roster.csv", by="herald demo")
    echo = lambda s="": click.echo(s, file=out)  # noqa: E731
    echo(f"Herald demo: data in {folder}")
    echo(f"  roster: {roster.added} members from sample_messages/roster.csv")
    result: dict = {}

    @defer.inlineCallbacks
    def main(reactor):
        gw = make_service(cfg, reactor, keys=keys)
        gw.service.startService()
        try:
            yield defer.gatherResults([lst.ready for lst in gw.listeners])
            port = gw.listening_ports()[0]
            echo(f"  listening on 127.0.0.1:{port} (MLLP over mutual TLS); replaying {len(messages)} sample messages")
            if gw.health is not None and (yield gw.health.ready) is not None:
                echo(f"  health and metrics on {gw.health.address} (/healthz, /readyz, /metrics)")
            if gw.console is not None:
                # Up while the demo runs, on the demo's throwaway certificate; it has no users yet (see --keep).
                echo(f"  web console on {(yield gw.console.ready)} (sign-in needs a user: see --keep)")
            cert, key = certs.client(DEMO_CLIENT)
            tls = client_options("localhost", certs.ca.read_bytes(), cert.read_bytes(), key.read_bytes())
            report = yield replay_async(reactor, "127.0.0.1", port, messages, timeout=10, tls=tls)
            result["report"] = report
            echo(f"  ACKs: {report.accepted} accepted of {report.sent} sent")
            conn = open_database(cfg.database, readonly=True, keys=keys)
            deadline = time.monotonic() + WAIT_SECONDS
            while time.monotonic() < deadline:
                if outstanding_work(conn) == 0:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            notes = [dict(r) for r in notifications_for(conn)]
            bundles = messages_bundles(conn, {n["message_id"] for n in notes})
            matches = {n["message_id"]: stored_match(conn, n["message_id"]) for n in notes}
            roster = open_roster_snapshot(cfg.database, keys)
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
        echo(
            f"The web console: herald users add NAME --role admin --config {folder}/herald.toml --data {folder}, then "
            f"herald serve --config {folder}/herald.toml --data {folder} (its log says where the console listens)"
        )
    else:
        shutil.rmtree(folder, ignore_errors=True)
    undelivered = [n for n in notes if n["state"] != "sent"]
    return 0 if notes and not undelivered and report.accepted == report.sent else 1


def demo_config(folder: Path, messages):
    """The demo's config: a tls: listener on a free loopback port, throwaway certificates in ``folder/certs``
    (the default [tls] place), and one [[senders]] entry per sample sender, bound to the demo's client."""
    certs = make_dev_certs(folder / "certs", clients=(DEMO_CLIENT,), days=1)
    headers = [read_header_leniently(raw) for _, raw in messages]
    senders = sorted({(h.sending_application, h.sending_facility) for h in headers if h is not None})
    lines = ["[server]", 'listen = ["tls:0:interface=127.0.0.1"]']
    lines += ["", "[health]", 'listen = "tcp:0:interface=127.0.0.1"']  # a free port: a running Herald may hold 9102
    lines += ["", "[console]", "enabled = true", 'listen = "tls:0:interface=127.0.0.1"']  # HTTPS, its certificate
    for application, facility in senders:
        # json.dumps writes a valid TOML basic string.
        lines += ["", "[[senders]]", f"application = {json.dumps(application)}", f"facility = {json.dumps(facility)}"]
        lines.append(f"identities = [{json.dumps(DEMO_CLIENT)}]")
    path = folder / "herald.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_config(path, data_dir=folder), certs


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
