"""Pipeline throughput: ADT messages converted, matched and routed per second.

Two modes.

``inprocess`` times the pipeline functions in this process, on one thread,
over N synthetic ADT messages (A01/A03/A04 mix, every message a distinct
patient, a share of them on a generated roster of R members that was imported
into a SQLite file with ``gateway.app.roster.import_members``). Four figures:

* convert: ``V2Message`` + ``convert`` (v2 parse, plain-dict FHIR Bundle);
* convert + validate: the above plus ``validate_bundle`` (fhir.resources R4B);
* process_message: the whole stage as ``PipelineWorker._process`` runs it:
  parse, convert, validate, match with real roster lookups on a read-only
  SQLite connection (one read transaction per batch), route, JSON-encode;
* the same as deployed: only the ``[pipeline] validate_sample`` share of the
  Bundles (0.02 by default, chosen by message id as the workers choose) is
  validated; the rest are proven valid by the converter's tests.

The store's write of the outcomes is not in these figures; ``e2e`` has it.

``e2e`` runs the real server. The roster is imported into a fresh data folder,
``herald serve`` starts with the default configuration (file-drop recipients
for PCP, care team and HIE, each file fsynced), mllp-load replays the
generated messages (one file each), and the database is polled read-only
until no message is ``received`` and no notification is pending (bounded).

* ``--e2e live`` (default): messages are sent while the pipeline runs.
  routed/s = messages that left ``received`` / (last ``messages.updated_at``
  - first ``received_at``); sent/s = notifications in state ``sent`` / (last
  sent ``updated_at`` - first ``received_at``). While the load runs the
  pipeline can go no faster than intake, so this is a lower bound.
* ``--e2e backlog``: all messages are first stored by an instrumented server
  whose pipeline is disconnected; then ``herald serve`` starts on the same
  folder and works the backlog off (as after a restart). The window starts
  when its port accepts connections: the pipeline's own capacity, store
  writes and deliveries included, with no intake competing.

``--encryption`` (both modes): ``on`` (default) seals PHI at rest with a
throwaway key ring, as deployed: the roster's members and the lookups on it
(process_message opens each candidate it reads), and in ``e2e`` the stored
bodies and Bundles too; ``off`` stores them unsealed (``encrypt_at_rest =
false``); ``both`` runs on and off alternately, ``--rounds`` times each, and
prints the medians side by side.

Examples (from the repository root)::

    .venv/bin/python bench/pipeline_throughput.py inprocess -n 5000
    .venv/bin/python bench/pipeline_throughput.py inprocess -n 2000 --profile
    .venv/bin/python bench/pipeline_throughput.py e2e -n 3000
    .venv/bin/python bench/pipeline_throughput.py e2e -n 3000 --e2e backlog
    .venv/bin/python bench/pipeline_throughput.py inprocess -n 2000 --encryption both --rounds 3
    .venv/bin/python bench/pipeline_throughput.py e2e -n 2000 --e2e backlog --encryption both --rounds 2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import (  # noqa: E402
    Server,
    code_under_test,
    encryption_off_config,
    free_port,
    run_mllp_load,
    server_cpu,
)
from synthetic_people import mbi, person, typo  # noqa: E402

from gateway.app.roster import import_members  # noqa: E402
from gateway.config import DEFAULT_VALIDATE_SAMPLE, Config, default_recipients  # noqa: E402
from gateway.conversion.convert import convert, validate_bundle  # noqa: E402
from gateway.conversion.v2 import V2Message  # noqa: E402
from gateway.conversion.vocabulary import load_vocabulary  # noqa: E402
from gateway.matching.roster import RosterMember  # noqa: E402
from gateway.pipeline.process import MatchPolicy, process_message  # noqa: E402
from gateway.pipeline.workers import validated  # noqa: E402
from gateway.records import PendingMessage  # noqa: E402
from gateway.store import StoredRoster, open_database, open_roster_snapshot  # noqa: E402
from gateway.store.keys import KeyRing, new_key_file  # noqa: E402

BATCH = Config.pipeline_batch  # the default [pipeline] batch_size
ROSTER_AUTHORITY = "BENCHHOSP"
OTHER_AUTHORITY = "OTHERHOSP"
EVENTS = (("A01", "I", "ADT_A01"), ("A03", "I", "ADT_A03"), ("A04", "E", "ADT_A01"))
BASE_TIME = datetime(2026, 11, 20, 8, 0, 0)


# -- synthetic data ------------------------------------------------------------


def _npi(i: int) -> str:
    """A 10-digit NPI that passes the Luhn check (prefix 80840)."""
    base = f"1{i:08d}"
    digits = [int(d) for d in "80840" + base]
    total = 0
    for k, d in enumerate(reversed(digits)):
        if k % 2 == 0:  # doubled: these sit at odd positions once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return base + str((10 - total % 10) % 10)


def _zips(rng: random.Random) -> list[str]:
    return sorted({f"{rng.randint(10000, 99999)}" for _ in range(400)})


def make_roster(count: int, seed: int = 7) -> list[RosterMember]:
    """``count`` invented members (``synthetic_people``) with distinct MBI and MRN, in two ACOs and 50 practices."""
    rng = random.Random(seed)
    zips = _zips(rng)
    members = []
    seen: set[str] = set()
    for i in range(count):
        ident = mbi(rng)
        while ident in seen:
            ident = mbi(rng)
        seen.add(ident)
        pcp = i % 50
        members.append(
            RosterMember(
                aco_id=f"ACO-{'AB'[i % 2]}",
                member_id=f"M{i:07d}",
                mbi=ident,
                mrn=f"{10_000_000 + i}",
                mrn_authority=ROSTER_AUTHORITY,
                pcp_npi=_npi(pcp),
                pcp_name=f"Dr. Bench Practice {pcp}",
                care_manager=f"care-team-{'ab'[i % 2]}@aco.example",
                effective_start="2020-01-01",
                effective_end="",
                **person(rng, zips),
            )
        )
    return members


def make_messages(
    count: int, roster: list[RosterMember], match_ratio: float, seed: int = 7
) -> tuple[list[bytes], list[tuple[str, str]]]:
    """``count`` ADT messages, each a distinct patient; about ``match_ratio`` of them on the roster.

    Roster patients are found in turn by MBI, by MRN and by demographics
    alone (the hospital's copy of the name, birth date, sex, address and
    phone, with one keying error in the street or the phone left out a
    third of the time); the others are invented people on no roster. Returns
    the messages and, for each, the intended match method and member id ("" for
    a patient on no roster), for checking the outcome.
    """
    rng = random.Random(seed + 1)
    zips = _zips(random.Random(seed))
    messages: list[bytes] = []
    intended: list[tuple[str, str]] = []
    matched = 0
    for i in range(count):
        event, patient_class, structure = EVENTS[i % 3]
        moment = BASE_TIME + timedelta(seconds=i)
        ts = moment.strftime("%Y%m%d%H%M%S")
        on_roster = roster and (matched + 1) <= match_ratio * (i + 1) and matched < len(roster)
        member_id = ""
        if on_roster:
            m = roster[matched]
            member_id = m.member_id
            method = ("mbi", "mrn", "demographics")[matched % 3]
            matched += 1
            who = {f: getattr(m, f) for f in ("last_name", "first_name", "middle_name", "birth_date", "sex")}
            who.update({f: getattr(m, f) for f in ("address_line", "city", "state", "zip", "phone")})
            if method == "mbi":
                pid3 = f"{60_000_000 + i}^^^{OTHER_AUTHORITY}^MR~{m.mbi}^^^CMS^MB"
            elif method == "mrn":
                pid3 = f"{m.mrn}^^^{ROSTER_AUTHORITY}^MR"
            else:
                pid3 = f"{60_000_000 + i}^^^{OTHER_AUTHORITY}^MR"
                if i % 3 == 0:
                    who["phone"] = ""
                elif i % 3 == 1:
                    who["address_line"] = typo(rng, who["address_line"])
        else:
            method = "none"
            who = person(rng, zips)
            pid3 = f"{80_000_000 + i}^^^{ROSTER_AUTHORITY}^MR"
        intended.append((method, member_id))
        control_id = f"BENCH{i:09d}"
        end = ts + "-0500" if event == "A03" else ""
        dob = who["birth_date"].replace("-", "")
        phone = who["phone"]
        telecom = f"^PRN^PH^^1^{phone[:3]}^{phone[3:]}" if phone else ""
        segments = [
            f"MSH|^~\\&|BENCHEHR|BENCHHOSP|HERALD|ACO|{ts}-0500||ADT^{event}^{structure}|{control_id}|P|2.5.1"
            "|||AL|NE||UNICODE UTF-8",
            f"EVN|{event}|{ts}-0500",
            f"PID|1||{pid3}||{who['last_name']}^{who['first_name']}^{who['middle_name']}^^^^L||{dob}|{who['sex']}"
            f"|||{who['address_line']}^^{who['city']}^{who['state']}^{who['zip']}^USA^H||{telecom}",
            "PD1|||SPRINGFIELD PRIMARY CARE^^1234|1234567893^WELBY^MARCUS^^^^^^NPI",
            f"PV1|1|{patient_class}|4N^{400 + i % 50}^A^BENCHHOSP||||1112223334^JONES^ROBERT^^^^^^NPI|||MED||||7|||"
            f"1112223334^JONES^ROBERT^^^^^^NPI|IN|V{i:09d}^^^BENCHHOSP^VN|MCR|||||||||||||||||01||||BENCHHOSP||||"
            f"{ts}-0500|{end}",
            "PV2|||R07.9^Chest pain, unspecified^I10",
            f"DG1|1||I21.4^Non-ST elevation myocardial infarction^I10||{ts}-0500|A",
        ]
        messages.append(("\r".join(segments) + "\r").encode("utf-8"))
    return messages, intended


# -- in-process ------------------------------------------------------------------


def _rate(count: int, seconds: float) -> dict:
    return {"messages": count, "seconds": round(seconds, 3), "msgs_per_s": round(count / seconds, 1)}


def bench_keys(folder: Path, encryption: str) -> KeyRing:
    """A throwaway key ring in ``folder`` (``<folder>/keys/herald.key``, where Herald looks by default), or the
    disabled ring when encryption at rest is off."""
    if encryption == "off":
        return KeyRing.disabled()
    return KeyRing.load(new_key_file(folder / "keys" / "herald.key"), environ={})


def run_inprocess(args, encryption: str = "on") -> dict:
    """Time convert, convert + validate and process_message over the same messages."""
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-pipeline-"))
    try:
        roster = make_roster(args.roster)
        db = tmp / "herald.db"
        keys = bench_keys(tmp, encryption)
        t0 = time.perf_counter()
        import_members(db, roster, "bench-roster.csv", keys=keys)
        import_s = time.perf_counter() - t0
        raws, intended = make_messages(args.n, roster, args.match_ratio)
        # The thresholds of this roster's size, as the pipeline's workers load them.
        policy = MatchPolicy.from_config(Config(), roster_size=len(roster))
        received = datetime.now(UTC).isoformat(timespec="milliseconds")
        pending = [PendingMessage(i + 1, raw, received, "UNICODE UTF-8") for i, raw in enumerate(raws)]
        vocab = load_vocabulary()
        tz = UTC
        recipients = default_recipients(tmp)  # file drops for every role, as the default config
        conn = open_database(db, readonly=True, keys=keys)
        lookups = StoredRoster(open_roster_snapshot(db, keys), conn)

        def convert_only(batch):
            for p in batch:
                convert(V2Message(p.raw, p.charset), vocab, tz, datetime.fromisoformat(p.received_at))

        def convert_validate(batch):
            for p in batch:
                c = convert(V2Message(p.raw, p.charset), vocab, tz, datetime.fromisoformat(p.received_at))
                validate_bundle(c.bundle)

        def full(batch, sample: float = 1.0):
            outcomes = []
            for start in range(0, len(batch), BATCH):
                conn.execute("BEGIN")  # one roster snapshot per batch, as the pipeline's workers do
                try:
                    for p in batch[start : start + BATCH]:
                        outcomes.append(
                            process_message(
                                p, vocab, tz, lookups, recipients, policy=policy, validate=validated(p.id, sample)
                            )
                        )
                finally:
                    conn.execute("COMMIT")
            return outcomes

        def as_deployed(batch):
            # The Bundles validated are the sample the workers validate ([pipeline] validate_sample).
            return full(batch, DEFAULT_VALIDATE_SAMPLE)

        full(pending[:50])  # warm up: imports fhir.resources and builds its models
        results: dict = {
            "mode": "inprocess",
            "encryption": encryption,
            "roster_members": len(roster),
            "roster_import_s": round(import_s, 3),
            "intended_matches": dict(Counter(method for method, _ in intended)),
        }
        stages = (
            ("convert", convert_only),
            ("convert+validate", convert_validate),
            ("process_message", full),
            ("process_message_deployed", as_deployed),
        )
        for name, fn in stages:
            best = None
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn(pending)
                seconds = time.perf_counter() - t0
                best = seconds if best is None else min(best, seconds)
            results[name] = _rate(len(pending), best)
        outcomes = full(pending)
        results["states"] = dict(Counter(o.state for o in outcomes))
        results["match_methods"] = dict(Counter(o.match.method if o.match else "-" for o in outcomes))
        results["notifications"] = sum(len(o.notifications) for o in outcomes)
        results["match_outcomes"] = match_outcomes(intended, [o.match for o in outcomes])
        failed = [o.reason for o in outcomes if o.state == "failed"]
        if failed:
            results["failed_reasons"] = dict(Counter(failed).most_common(3))
        if args.profile:
            results["profile"] = profile_process_message(pending[: args.profile_n], full, args.profile_out)
        conn.close()
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def match_outcomes(intended: list[tuple[str, str]], matches: list) -> dict:
    """How the patients on no roster and the roster patients found by demographics alone were graded.

    A patient on no roster graded ``certain`` or ``probable`` is a wrong route
    (their notification, PHI, goes to a member's PCP); ``possible`` puts them in
    the review queue. A roster patient is ``found`` when graded certain or
    probable with their own member chosen, ``offered`` when graded possible with
    their member among the candidates, ``wrong`` when another member is chosen.
    """
    strangers: Counter = Counter()
    members: Counter = Counter()
    for (method, member_id), match in zip(intended, matches, strict=True):
        grade = match.grade if match else "none"
        if method == "none":
            strangers["patients"] += 1
            strangers[grade] += 1
        elif method == "demographics":
            members["patients"] += 1
            chosen = match.member_id if match else None
            if grade in ("certain", "probable") and chosen == member_id:
                members["found"] += 1
            elif chosen is not None and chosen != member_id:
                members["wrong"] += 1
            elif grade == "possible" and any(c.member["member_id"] == member_id for c in match.candidates):
                members["offered"] += 1
            else:
                members["missed"] += 1
    return {
        "on_no_roster": {
            "patients": strangers["patients"],
            "certain_or_probable": strangers["certain"] + strangers["probable"],
            "possible": strangers["possible"],
            "none": strangers["none"],
        },
        "by_demographics": {k: members[k] for k in ("patients", "found", "offered", "wrong", "missed")},
    }


def profile_process_message(pending: list[PendingMessage], full, out: Path | None) -> str:
    """cProfile ``process_message`` over ``pending``; the top functions by own time and by total."""
    prof = cProfile.Profile()
    prof.enable()
    full(pending)
    prof.disable()
    if out is not None:
        prof.dump_stats(str(out))
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.strip_dirs()
    text.write(f"cProfile of process_message over {len(pending)} messages, by own time (tottime):\n")
    stats.sort_stats("tottime").print_stats(25)
    text.write("by cumulative time:\n")
    stats.sort_stats("cumulative").print_stats(30)
    return text.getvalue()


# -- end-to-end ------------------------------------------------------------------


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def poll_until_done(database: Path, expected: int, bound_seconds: float) -> tuple[dict, bool]:
    """Poll read-only until ``expected`` messages are stored, none is ``received`` and no
    notification is pending or retrying, or ``bound_seconds`` pass. Returns the final snapshot."""
    deadline = time.monotonic() + bound_seconds
    conn = open_database(database, readonly=True)
    try:
        while True:
            snap = snapshot(conn)
            done = (
                snap["stored"] >= expected
                and snap["states"].get("received", 0) == 0
                and snap["notifications"].get("pending", 0) + snap["notifications"].get("retrying", 0) == 0
            )
            if done or time.monotonic() >= deadline:
                return snap, done
            time.sleep(0.25)
    finally:
        conn.close()


def snapshot(conn) -> dict:
    """Counts and time stamps the figures are computed from (read-only queries)."""
    row = conn.execute(
        "SELECT COUNT(*), MIN(received_at), MAX(received_at), "
        "MAX(CASE WHEN state != 'received' THEN updated_at END) FROM messages"
    ).fetchone()
    states = dict(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
    notes = dict(conn.execute("SELECT state, COUNT(*) FROM notifications GROUP BY state").fetchall())
    roles = dict(conn.execute("SELECT recipient_role, COUNT(*) FROM notifications GROUP BY recipient_role").fetchall())
    last_sent = conn.execute("SELECT MAX(updated_at) FROM notifications WHERE state = 'sent'").fetchone()[0]
    grades = dict(conn.execute("SELECT grade, COUNT(*) FROM matches GROUP BY grade").fetchall())
    return {
        "stored": row[0],
        "first_received": row[1],
        "last_received": row[2],
        "last_state_change": row[3],
        "last_sent": last_sent,
        "states": states,
        "notifications": notes,
        "notifications_by_role": roles,
        "match_grades": grades,
    }


def _span(start: datetime | None, end: str | None) -> float | None:
    end_at = _when(end)
    if start is None or end_at is None:
        return None
    return max((end_at - start).total_seconds(), 1e-3)


def run_e2e(args, encryption: str = "on") -> dict:
    """Send the generated messages to a real server and time the pipeline and deliveries."""
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-e2e-"))
    server = None
    try:
        data = tmp / "data"
        data.mkdir()
        files = tmp / "messages"
        files.mkdir()
        roster = make_roster(args.roster)
        keys = bench_keys(data, encryption)
        config = args.config if encryption == "on" else encryption_off_config(tmp, args.config)
        import_members(data / "herald.db", roster, "bench-roster.csv", keys=keys)
        raws, intended = make_messages(args.n, roster, args.match_ratio)
        intended = Counter(method for method, _ in intended)
        for i, raw in enumerate(raws):
            (files / f"{i:07d}.hl7").write_bytes(raw)
        load_args = ["--files", str(files)]
        result: dict = {
            "mode": f"e2e-{args.e2e}",
            "encryption": encryption,
            "roster_members": len(roster),
            "intended_matches": dict(intended),
        }
        if args.config is not None:
            result["config"] = f"--config {args.config}"

        if args.e2e == "backlog":
            # Phase 1: store everything with the pipeline disconnected.
            server = Server("instrumented", False, data, free_port(), config=config)
            server.start()
            result["load"] = run_mllp_load(server.port, args.n, args.c, args.max_seconds, load_args)
            server.stop()
            server = None
        server = Server("herald", True, data, free_port(), config=config)
        server.start()
        window_start = datetime.now(UTC)  # port open: the pipeline started moments before
        cpu_before = server_cpu(server)
        if args.e2e == "live":
            result["load"] = run_mllp_load(server.port, args.n, args.c, args.max_seconds, load_args)
        expected = result["load"]["ok"]
        snap, done = poll_until_done(data / "herald.db", expected, args.drain_seconds)
        cpu_after = server_cpu(server)
        result["server_cpu_s"] = round(cpu_after[0] - cpu_before[0], 3)
        result["workers_cpu_s"] = round(cpu_after[1] - cpu_before[1], 3)
        result["drained"] = done
        result["snapshot"] = snap
        start = _when(snap["first_received"]) if args.e2e == "live" else window_start
        processed = snap["stored"] - snap["states"].get("received", 0)
        routed_s = _span(start, snap["last_state_change"])
        sent = snap["notifications"].get("sent", 0)
        sent_s = _span(start, snap["last_sent"])
        result["window_from"] = "first received_at" if args.e2e == "live" else "server ready"
        result["processed"] = processed
        result["routed_per_s"] = round(processed / routed_s, 1) if routed_s else None
        result["routed_window_s"] = round(routed_s, 3) if routed_s else None
        result["sent"] = sent
        result["sent_per_s"] = round(sent / sent_s, 1) if sent_s else None
        result["sent_window_s"] = round(sent_s, 3) if sent_s else None
        if args.e2e == "live" and snap["last_received"] and snap["last_state_change"]:
            lag = _when(snap["last_state_change"]) - _when(snap["last_received"])
            result["routing_lag_after_last_ack_s"] = round(lag.total_seconds(), 3)
        return result
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"bench: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- output ------------------------------------------------------------------------


def print_inprocess(r: dict) -> None:
    print(code_under_test())
    print(
        f"in-process, one thread: {r['convert']['messages']} synthetic ADT messages (A01/A03/A04), "
        f"roster of {r['roster_members']} members in SQLite (imported in {r['roster_import_s']} s)"
    )
    print(f"intended: {r['intended_matches']}; outcome states: {r['states']}; match methods: {r['match_methods']}")
    print(f"notifications built: {r['notifications']}")
    off, demo = r["match_outcomes"]["on_no_roster"], r["match_outcomes"]["by_demographics"]
    print(
        f"patients on no roster: {off['patients']}, of them certain/probable (wrong routes) "
        f"{off['certain_or_probable']}, possible (review) {off['possible']}; roster patients matched by "
        f"demographics alone: {demo['patients']}, found {demo['found']}, offered for review {demo['offered']}, "
        f"wrong member {demo['wrong']}, missed {demo['missed']}"
    )
    if "failed_reasons" in r:
        print(f"FAILED messages (the figures are not comparable): {r['failed_reasons']}")
    print()
    print(f"{'stage':<44} {'msgs/s':>9} {'us/msg':>9}")
    labels = {
        "convert": "convert (V2Message + convert)",
        "convert+validate": "convert + validate (fhir.resources R4B)",
        "process_message": "process_message (+ match, route, JSON)",
        "process_message_deployed": f"the same, {DEFAULT_VALIDATE_SAMPLE:g} of Bundles validated",
    }
    for key, label in labels.items():
        if key not in r:
            continue
        s = r[key]
        print(f"{label:<44} {s['msgs_per_s']:>9.1f} {1e6 * s['seconds'] / s['messages']:>9.0f}")
    if "profile" in r:
        print()
        print(r["profile"])


def print_e2e(r: dict) -> None:
    load, snap = r["load"], r["snapshot"]
    print(code_under_test())
    config = r.get("config") or "default config (file drops for pcp, care_team, hie, fsynced)"
    print(f"end-to-end ({r['mode']}): herald serve, {config}")
    print(f"roster {r['roster_members']} members; intended matches {r['intended_matches']}")
    print(
        f"intake (mllp-load -c {load['connections']}): {load['ok']} ACKed of {load['requested']}, "
        f"{load['msgs_per_s']} msgs/s, ACK p50 {load['ack_ms_p50']} ms, p99 {load['ack_ms_p99']} ms"
    )
    print(f"messages by state: {snap['states']}; match grades: {snap['match_grades']}")
    print(f"notifications by state: {snap['notifications']}; by role: {snap['notifications_by_role']}")
    if not r["drained"]:
        print("NOTE: the drain bound (--drain-seconds) was reached before the work was done; figures are partial.")
    print()
    routed = f"messages routed (left received), from {r['window_from']}"
    sent = f"notifications delivered (sent), from {r['window_from']}"
    print(f"{'figure':<58} {'count':>7} {'window s':>9} {'per s':>8}")
    print(f"{routed:<58} {r['processed']:>7} {_num(r['routed_window_s'])} {_num(r['routed_per_s'], 8)}")
    print(f"{sent:<58} {r['sent']:>7} {_num(r['sent_window_s'])} {_num(r['sent_per_s'], 8)}")
    done = max(1, r["processed"])
    print(
        f"CPU from server ready to drained: server process {r['server_cpu_s']} s "
        f"({1e6 * r['server_cpu_s'] / done:.0f} us a routed message), pipeline workers {r['workers_cpu_s']} s "
        f"({1e6 * r['workers_cpu_s'] / done:.0f} us a routed message)"
    )
    if "routing_lag_after_last_ack_s" in r:
        print(f"last state change came {r['routing_lag_after_last_ack_s']} s after the last message was received")


def _num(value, width: int = 9) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'n/a':>{width}}"


# -- command line ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See bench/README.md.")
    ap.add_argument("mode", choices=["inprocess", "e2e"], help="inprocess: time the functions; e2e: a real server")
    ap.add_argument("-n", type=int, default=None, help="messages (default 5000 inprocess, 3000 e2e)")
    ap.add_argument("--roster", type=int, default=10_000, help="roster members to generate (default 10000)")
    ap.add_argument(
        "--match-ratio", type=float, default=0.6, help="share of messages whose patient is on the roster (0.6)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="inprocess: runs per stage, best kept (default 1)")
    ap.add_argument("--profile", action="store_true", help="inprocess: also cProfile process_message")
    ap.add_argument("--profile-n", type=int, default=2000, help="messages to profile (default 2000)")
    ap.add_argument("--profile-out", type=Path, default=None, help="also write the raw cProfile stats here")
    ap.add_argument(
        "--e2e", choices=["live", "backlog"], default="live", help="e2e: send while routing, or drain a backlog"
    )
    ap.add_argument("-c", type=int, default=1, help="e2e: mllp-load connections (default 1)")
    ap.add_argument(
        "--config",
        type=Path,
        default=None,
        help="e2e: a TOML file passed to herald serve --config (e.g. recipients disabled, pipeline.workers)",
    )
    ap.add_argument("--max-seconds", type=float, default=300.0, help="e2e: bound on the mllp-load run (300)")
    ap.add_argument(
        "--drain-seconds", type=float, default=300.0, help="e2e: bound on waiting for routing and delivery (300)"
    )
    ap.add_argument(
        "--encryption",
        choices=["on", "off", "both"],
        default="on",
        help="encryption at rest: on (default, a throwaway key ring), off (encrypt_at_rest = false), "
        "both: alternate on and off",
    )
    ap.add_argument("--rounds", type=int, default=1, help="runs per encryption mode (default 1); medians shown")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--keep", action="store_true", help="e2e: keep the temporary folder")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 5000 if args.mode == "inprocess" else 3000
    if args.n < 1 or args.roster < 0 or not 0 <= args.match_ratio <= 1 or min(args.repeat, args.rounds, args.c) < 1:
        ap.error("counts must be positive and --match-ratio between 0 and 1")
    if args.roster >= 360_000:
        ap.error("--roster must be below 360000 (distinct MBIs)")
    if args.config is not None:
        args.config = args.config.resolve()  # the server runs in the repository root
    return args


def print_encryption_medians(results: list[dict]) -> None:
    """The medians per encryption mode (on, off) of the rounds run alternately, and the difference."""
    import statistics

    def per_message(r: dict) -> dict[str, float | None]:
        if r["mode"] == "inprocess":
            s = r["process_message"]
            return {"process_message us/msg": 1e6 * s["seconds"] / s["messages"], "msgs/s": s["msgs_per_s"]}
        done = max(1, r["processed"])
        return {
            "server us/msg": 1e6 * r["server_cpu_s"] / done,
            "workers us/msg": 1e6 * r["workers_cpu_s"] / done,
            "routed/s": r["routed_per_s"],
            "sent/s": r["sent_per_s"],
        }

    figures: dict[str, dict[str, list[float]]] = {}
    for r in results:
        for k, v in per_message(r).items():
            if v is not None:
                figures.setdefault(r["encryption"], {}).setdefault(k, []).append(v)
    if set(figures) != {"on", "off"}:
        return
    print(f"\nmedians of {len(results) // 2} alternating round(s) each, encryption at rest on and off:")
    print(f"{'figure':<26} {'on':>10} {'off':>10} {'on - off':>10}")
    for k in figures["on"]:
        on, off = statistics.median(figures["on"][k]), statistics.median(figures["off"][k])
        print(f"{k:<26} {on:>10.1f} {off:>10.1f} {on - off:>+10.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = ["on", "off"] if args.encryption == "both" else [args.encryption]
    results = []
    for round_number in range(1, args.rounds + 1):
        for encryption in modes:  # alternating, so drift in the machine's speed hits both alike
            if len(modes) > 1 and not args.json:
                print(f"\n== round {round_number}, encryption at rest {encryption} ==")
            result = run_inprocess(args, encryption) if args.mode == "inprocess" else run_e2e(args, encryption)
            results.append(result)
            if args.json:
                continue
            if args.mode == "inprocess":
                print_inprocess(result)
            else:
                print_e2e(result)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2, default=str))
    elif len(modes) > 1:
        print_encryption_medians(results)
    if args.mode == "inprocess":
        return 1 if any("failed_reasons" in r for r in results) else 0
    return 0 if all(r["drained"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
