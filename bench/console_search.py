"""The web console's message search on a large log: p50/p99 of each kind of search.

Writes a synthetic message log (default 1,000,000 messages over 30 days from
20 senders, 200,000 invented patients) in Herald's schema, sealed as the
product seals it: each body and Bundle sealed under a fresh key ring bound to
its row, the keyed digest and the row digest as intake writes them, and the
patient's terms written by the same function the pipeline calls
(``gateway.store.console.index_message``). Audit events are not written (the
searches do not read them). Then times the console's searches through
``gateway.store.console.search_messages`` on a read-only connection, as the
console runs them: by MRN, by family and given name, by control id, by sender
and a day's time range, the newest page, refused messages, and the senders
page's and the chart's queries.

    .venv/bin/python bench/console_search.py                 # 1,000,000 messages: ~8 min on 2 idle cores
    .venv/bin/python bench/console_search.py -n 100000 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_people import mbi, person  # noqa: E402

from gateway.conversion.convert import convert  # noqa: E402
from gateway.conversion.v2 import V2Message  # noqa: E402
from gateway.conversion.vocabulary import load_vocabulary  # noqa: E402
from gateway.records import RECEIVED, IntakeRecord  # noqa: E402
from gateway.store import migrate, open_database  # noqa: E402
from gateway.store.console import (  # noqa: E402
    MessageSearch,
    index_message,
    messages_per_hour,
    normalise_term,
    search_messages,
    sender_stats,
)
from gateway.store.integrity import intake_digest  # noqa: E402
from gateway.store.keys import KeyRing  # noqa: E402
from gateway.store.sealing import message_context  # noqa: E402

START = datetime(2026, 10, 1, tzinfo=UTC)
#: Placeholders in the template message, replaced per message.
FAMILY, GIVEN, MIDDLE, DOB, MRN, MBI, CONTROL, APP, FAC, WHEN, EVENT = (
    "FAMILYQQ",
    "GIVENQQ",
    "MIDQQ",
    "19990909",
    "MRNQQ00000",
    "9QQ9QQ9QQ99",
    "CTRLQQ000000000",
    "APPQQ",
    "FACQQ",
    "20990101010101",
    "A01",
)
TEMPLATE = "\r".join(
    [
        f"MSH|^~\\&|{APP}|{FAC}|HERALD|ACO|{WHEN}||ADT^{EVENT}^ADT_A01|{CONTROL}|P|2.5.1",
        f"EVN|{EVENT}|{WHEN}",
        f"PID|1||{MRN}^^^{FAC}^MR~{MBI}^^^CMS^MB||{FAMILY}^{GIVEN}^{MIDDLE}^^^^L||{DOB}|F|||"
        "12 Orchard Lane^^Springfield^IL^62701^USA^H||^PRN^PH^^1^217^5550123",
        "PV1|1|E|ED^01^A^FACQQ||||1112223334^JONES^ROBERT^^^^^^NPI|||EMR||||7|||"
        "1112223334^JONES^ROBERT^^^^^^NPI|E|V1^^^FACQQ^VN|MCR|||||||||||||||||01||||FACQQ||||" + WHEN,
    ]
)
STATES = [("routed", 0.95), ("unmatched", 0.02), ("review", 0.01), ("rejected", 0.015), ("failed", 0.005)]
EVENTS = [("A01", 0.25), ("A03", 0.25), ("A04", 0.35), ("A08", 0.15)]


def templates() -> tuple[str, str]:
    """The raw v2 and the Bundle JSON of the template message, converted once by the real converter."""
    raw = TEMPLATE.replace(WHEN, "20261001010101").replace(CONTROL, "CTRLQQ000000000") + "\r"
    conversion = convert(V2Message(raw.encode()), load_vocabulary(), UTC, START)
    bundle = json.dumps(conversion.bundle, ensure_ascii=False, separators=(",", ":"))
    bundle = bundle.replace("2026-10-01T01:01:01", "2099-01-01T01:01:01")
    return TEMPLATE + "\r", bundle


def pick(rng: random.Random, weighted: list[tuple[str, float]]) -> str:
    x = rng.random()
    for value, weight in weighted:
        x -= weight
        if x < 0:
            return value
    return weighted[-1][0]


def generate(db: Path, keys: KeyRing, n: int, patients: int, days: int, senders: int, seed: int) -> dict:
    """Write ``n`` messages; return what the queries need (samples of patients, control ids, senders)."""
    rng = random.Random(seed)
    raw_template, fhir_template = templates()
    zips = [f"{rng.randint(10000, 99999)}" for _ in range(2000)]
    people = []
    for i in range(patients):
        p = person(rng, zips)
        people.append((p["last_name"].upper(), p["first_name"].upper(), p["birth_date"], f"M{i:08d}", mbi(rng)))
    pairs = [(f"EHR{s:02d}", f"FAC{s:02d}") for s in range(senders)]
    weights = [1 / (s + 1) for s in range(senders)]  # a few busy senders, many quiet ones
    conn = open_database(db, keys=keys)
    migrate(conn)
    conn.execute("PRAGMA synchronous=OFF")  # a bulk load; the product's FULL is for intake
    step = timedelta(days=days) / n
    sample = {"patients": rng.sample(people, 1000), "controls": [], "senders": pairs}
    started = time.monotonic()
    batch = 20_000
    for first in range(1, n + 1, batch):
        conn.execute("BEGIN")
        for message_id in range(first, min(first + batch, n + 1)):
            family, given, birth, mrn, member_mbi = rng.choice(people)
            application, facility = rng.choices(pairs, weights)[0]
            event = pick(rng, EVENTS)
            state = pick(rng, STATES)
            moment = START + step * message_id + timedelta(milliseconds=rng.randint(0, 500))
            at = moment.isoformat(timespec="milliseconds")
            control = f"{application}{message_id:010d}"
            values = {
                FAMILY: family,
                GIVEN: given,
                MIDDLE: "",
                DOB: birth.replace("-", ""),
                MRN: mrn,
                MBI: member_mbi,
                CONTROL: control,
                APP: application,
                FAC: facility,
                WHEN: moment.strftime("%Y%m%d%H%M%S"),
            }
            text = raw_template.replace("ADT^A01", f"ADT^{event}").replace("EVN|A01", f"EVN|{event}")
            for placeholder, value in values.items():
                text = text.replace(placeholder, value)
            raw = text.encode("utf-8")
            fhir = None
            if state not in ("rejected", "failed"):
                fhir = (
                    fhir_template.replace(FAMILY, family)
                    .replace(GIVEN, given)
                    .replace("1999-09-09", birth)
                    .replace(MRN, mrn)
                    .replace(MBI, member_mbi)
                    .replace(CONTROL, control)
                )
            record = IntakeRecord(
                raw=raw,
                peer="tcp:10.0.0.5:50000",
                state=RECEIVED if state != "rejected" else "rejected",
                ack_code="AA" if state != "rejected" else "AR",
                sending_application=application,
                sending_facility=facility,
                message_type="ADT",
                trigger_event=event,
                control_id=control,
                version="2.5.1",
                charset="",
            )
            digest = keys.digest(raw)
            conn.execute(
                "INSERT INTO messages (id, received_at, peer, sending_application, sending_facility, message_type, "
                "trigger_event, control_id, version, processing_id, accept_ack_type, application_ack_type, charset, "
                "sha256, raw, state, reason, flag, ack_code, updated_at, digest, fhir) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message_id,
                    at,
                    record.peer,
                    application,
                    facility,
                    "ADT",
                    event,
                    control,
                    "2.5.1",
                    "P",
                    "",
                    "",
                    "",
                    digest,
                    keys.seal(raw, message_context("raw", message_id)),
                    state,
                    "PID-7: not a valid date" if state in ("rejected", "failed") else None,
                    None,
                    record.ack_code,
                    at,
                    intake_digest(keys, message_id, at, record, digest, None),
                    keys.seal_text(fhir, message_context("fhir", message_id)),
                ),
            )
            index_message(conn, message_id, fhir)
            if message_id % 997 == 0:
                sample["controls"].append(control)
        conn.execute("COMMIT")
        done = min(first + batch - 1, n)
        rate = done / (time.monotonic() - started)
        print(f"\r  {done:,} of {n:,} messages written ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    sample["end"] = START + timedelta(days=days)
    return sample


def timed(conn, make_query, count: int, rng: random.Random) -> tuple[list[float], int]:
    """Run ``count`` searches (``make_query(rng)`` gives the arguments); their times in ms and rows found."""
    times, found = [], 0
    for _ in range(count):
        fn, args, kwargs = make_query(rng)
        t0 = time.perf_counter()
        result = fn(conn, *args, **kwargs)
        times.append((time.perf_counter() - t0) * 1000)
        found += len(result.rows) if hasattr(result, "rows") else len(result)
    return times, found


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--messages", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--queries", type=int, default=200, help="Searches of each kind.")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--data", type=Path, default=None, help="Folder for the database (default: a temporary one).")
    parser.add_argument("--keep", action="store_true", help="Keep the database (prints where).")
    args = parser.parse_args()
    folder = args.data or Path(tempfile.mkdtemp(prefix="herald-console-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "herald.db"
    keys = KeyRing([("bench", os.urandom(32))], "bench key")
    print(
        f"console search: {args.messages:,} messages, {args.patients:,} patients, {args.senders} senders, "
        f"{args.days} days; {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    try:
        t0 = time.monotonic()
        sample = generate(db, keys, args.messages, args.patients, args.days, args.senders, args.seed)
        written = time.monotonic() - t0
        size = sum(p.stat().st_size for p in folder.glob("herald.db*")) / 1e9
        conn = open_database(db, readonly=True, keys=keys)
        terms = conn.execute("SELECT COUNT(*) FROM message_terms").fetchone()[0]
        print(f"  written in {written:.0f} s; {size:.2f} GB; {terms:,} index terms", file=sys.stderr)
        end = sample["end"]
        day = lambda rng: end - timedelta(days=rng.randint(1, args.days - 1))  # noqa: E731
        iso = lambda moment: moment.isoformat(timespec="milliseconds")  # noqa: E731

        def by_mrn(rng):
            p = rng.choice(sample["patients"])
            return search_messages, (MessageSearch(terms=(("mrn", normalise_term("mrn", p[3])),)),), {}

        def by_name(rng):
            p = rng.choice(sample["patients"])
            terms = (("family", normalise_term("family", p[0])), ("given", normalise_term("given", p[1])))
            return search_messages, (MessageSearch(terms=terms),), {}

        def by_family(rng):
            p = rng.choice(sample["patients"])
            return search_messages, (MessageSearch(terms=(("family", normalise_term("family", p[0])),)),), {}

        def by_name_and_birth(rng):
            p = rng.choice(sample["patients"])
            terms = (("family", normalise_term("family", p[0])), ("birth", p[2]))
            return search_messages, (MessageSearch(terms=terms),), {}

        def by_control(rng):
            return search_messages, (MessageSearch(control_id=rng.choice(sample["controls"])),), {}

        def by_sender_day(rng):
            application, facility = rng.choice(sample["senders"])
            start = day(rng)
            query = MessageSearch(
                sender=f"{application}|{facility}", since=iso(start), until=iso(start + timedelta(days=1))
            )
            return search_messages, (query,), {}

        def by_day(rng):
            start = day(rng)
            return search_messages, (MessageSearch(since=iso(start), until=iso(start + timedelta(days=1))),), {}

        def by_day_second_page(rng):
            start = day(rng)
            query = MessageSearch(since=iso(start), until=iso(start + timedelta(days=1)))
            first = search_messages(conn, query)
            return search_messages, (query,), {"before": first.older}

        def newest(rng):
            return search_messages, (MessageSearch(),), {}

        def refused(rng):
            return search_messages, (MessageSearch(state="rejected"),), {}

        def refused_a00(rng):
            return search_messages, (MessageSearch(state="failed", trigger_event="A08"),), {}

        def senders_week(rng):
            return sender_stats, (iso(end - timedelta(days=7)),), {}

        def senders_day(rng):
            return sender_stats, (iso(end - timedelta(days=1)),), {}

        def hourly(rng):
            return messages_per_hour, (iso(end - timedelta(hours=48)),), {}

        kinds = [
            ("MRN", by_mrn, args.queries),
            ("family + given name", by_name, args.queries),
            ("family name alone", by_family, args.queries),
            ("family name + birth date", by_name_and_birth, args.queries),
            ("control id", by_control, args.queries),
            ("sender + one day", by_sender_day, args.queries),
            ("one day (time range only)", by_day, args.queries),
            ("one day, second page", by_day_second_page, args.queries),
            ("newest page (no filter)", newest, args.queries),
            ("state rejected", refused, args.queries),
            ("state failed + A08", refused_a00, args.queries),
            ("senders page, last 24 h", senders_day, max(10, args.queries // 10)),
            ("senders page, last 7 days", senders_week, max(10, args.queries // 10)),
            ("volume per hour, last 48 h", hourly, max(10, args.queries // 10)),
        ]
        rng = random.Random(args.seed + 1)
        print(f"\n{'search':<30} {'runs':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'rows/run':>9}")
        for name, make, count in kinds:
            times, found = timed(conn, make, count, rng)
            print(
                f"{name:<30} {count:>5} {statistics.median(times):>8.2f} {pct(times, 0.99):>8.2f} "
                f"{max(times):>8.2f} {found / count:>9.1f}"
            )
        conn.close()
    finally:
        if args.keep:
            print(f"\nkept {db}", file=sys.stderr)
        elif args.data is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
