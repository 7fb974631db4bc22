"""Roster at scale: import a synthetic roster of a million members, then time matching against it.

Generates a roster CSV of N synthetic members (deterministic seed; invented
names, streets and towns; MBIs in the CMS format), imports it with
``herald roster import`` in a child process (the production path: a copy of
the roster file, staged, applied, published by rename), and reports the
import's wall time, the database and roster file sizes and the child's peak
RSS. With ``--serve`` a ``herald serve`` runs on the same data folder during
the import and a paced client sends it an ADT message every 50 ms: the ACK
codes and their latency show whether intake ever waited on the import.
Then it times ``gateway.matching.match_patient`` over
``gateway.store.StoredRoster`` (the lookups the pipeline workers use, on the
published roster file) for a bounded set of queries: members with typos and
no identifiers, and people who are on no roster. Every phase is bounded; the
temporary folder is deleted unless ``--keep``.

    .venv/bin/python bench/roster_scale.py                      # 1,000,000 members, 2,000 queries
    .venv/bin/python bench/roster_scale.py --members 100000 --queries 500 --serve --json
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import Server, free_port  # noqa: E402
from synthetic_people import FAMILY_HEADS, FAMILY_TAILS, mbi, person, typo  # noqa: E402

from gateway.matching import (  # noqa: E402
    PatientQuery,
    blocking_keys,
    load_model,
    make_person,
    match_patient,
    members_to_compare,
)
from gateway.store import StoredRoster, open_roster_snapshot, roster_count  # noqa: E402
from gateway.store.keys import KeyRing, new_key_file  # noqa: E402

ACO = "ACO-BENCH"
ENCOUNTER = "2026-11-20"
COLUMNS = [
    "member_id",
    "mbi",
    "last_name",
    "first_name",
    "middle_name",
    "birth_date",
    "sex",
    "address_line",
    "city",
    "state",
    "zip",
    "phone",
    "aco_id",
    "pcp_npi",
    "pcp_name",
    "effective_start",
]


def write_roster(path: Path, members: int, seed: int) -> tuple[list[dict], list[str]]:
    """Write ``members`` rows; return a sample of them (every 997th, for queries) and the ZIP codes used."""
    rng = random.Random(seed)
    zips = sorted({f"{rng.randint(10000, 99999)}" for _ in range(4000)})
    sample = []
    seen_mbi: set[str] = set()
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for i in range(members):
            p = person(rng, zips)
            ident = mbi(rng)
            while ident in seen_mbi:
                ident = mbi(rng)
            seen_mbi.add(ident)
            row = {
                "member_id": f"B{i:08d}",
                "mbi": ident,
                **p,
                "aco_id": ACO,
                "pcp_npi": "1234567893",
                "pcp_name": "Dr. Bench",
                "effective_start": "2026-01-01",
            }
            out.writerow([row[c] for c in COLUMNS])
            if i % 997 == 0:
                sample.append(row)
    return sample, zips


def queries(sample: list[dict], zips: list[str], count: int, seed: int) -> list[tuple[str, PatientQuery, str]]:
    """Half members with a typo in one or two fields and no identifiers; half people on no roster."""
    rng = random.Random(seed + 1)
    out = []
    for n in range(count):
        if n % 2 == 0:
            m = dict(sample[(n // 2) % len(sample)])
            for field in rng.sample(["last_name", "first_name", "address_line", "phone"], k=rng.randint(1, 2)):
                m[field] = typo(rng, m[field]) if field != "phone" else ""
            kind, expected = "member", m["member_id"]
        else:
            m = person(rng, zips)
            m["last_name"] = rng.choice(FAMILY_HEADS) + rng.choice(FAMILY_TAILS) + rng.choice(["e", "s", "er", ""])
            kind, expected = "non-member", ""
        p = make_person(
            given=m["first_name"],
            family=m["last_name"],
            middle=m["middle_name"],
            birth_date=m["birth_date"],
            sex=m["sex"],
            street=m["address_line"],
            city=m["city"],
            state=m["state"],
            zip=m["zip"],
            phone=m["phone"],
        )
        out.append((kind, PatientQuery("", (), p), expected))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


ADMIT = ROOT / "sample_messages" / "epic-v251-a01-admit-from-ed.hl7"


class PacedSender(threading.Thread):
    """Sends an ADT message every ``interval`` seconds on one MLLP connection until stopped (bounded)."""

    def __init__(self, port: int, interval: float = 0.05, limit: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.limit = limit
        self.stop = threading.Event()
        self.codes: Counter = Counter()
        self.latency_ms: list[float] = []
        self.errors: list[str] = []
        text = ADMIT.read_bytes().split(b"\x1c")[0].strip(b"\x0b\r\n")
        self.template = text.replace(b"\n", b"\r")

    def message(self, n: int) -> bytes:
        segments = self.template.split(b"\r")
        fields = segments[0].split(b"|")
        fields[9] = f"ROSTERBENCH{n:07d}".encode()
        segments[0] = b"|".join(fields)
        return b"\x0b" + b"\r".join(segments) + b"\x1c\r"

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                for n in range(self.limit):
                    if self.stop.is_set():
                        break
                    t = time.perf_counter()
                    sock.sendall(self.message(n))
                    reply = b""
                    while not reply.endswith(b"\x1c\r"):
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("the server closed the connection")
                        reply += chunk
                    self.latency_ms.append((time.perf_counter() - t) * 1000)
                    msa = next((seg for seg in reply.strip(b"\x0b\x1c\r").split(b"\r") if seg.startswith(b"MSA")), b"")
                    self.codes[msa.split(b"|")[1].decode() if msa else "?"] += 1
                    self.stop.wait(self.interval)
        except OSError as e:
            self.errors.append(f"{type(e).__name__}: {e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20261120)
    parser.add_argument("--import-timeout", type=float, default=1200.0, help="seconds the import may take")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="bound on the query phase")
    parser.add_argument("--serve", action="store_true", help="run herald serve and a paced client during the import")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="time queries only, on a folder an earlier run kept (--keep)"
    )
    parser.add_argument("--max-compared", type=int, default=None, help="override blocking.max_compared")
    parser.add_argument("--max-bucket", type=int, default=None, help="override blocking.max_bucket")
    parser.add_argument("--max-prefiltered", type=int, default=None, help="override blocking.max_prefiltered")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    if args.reuse:
        return time_queries(args, args.reuse, {"reused": str(args.reuse), "queries": args.queries})
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-roster-"))
    result: dict = {"members": args.members, "queries": args.queries, "seed": args.seed}
    server = None
    try:
        roster_csv = tmp / "roster.csv"
        t0 = time.perf_counter()
        sample, zips = write_roster(roster_csv, args.members, args.seed)
        (tmp / "sample.json").write_text(json.dumps({"sample": sample, "zips": zips, "seed": args.seed}))
        result["generate_s"] = round(time.perf_counter() - t0, 1)
        result["csv_mb"] = round(roster_csv.stat().st_size / 1e6, 1)
        data = tmp / "data"
        data.mkdir()
        # Encryption at rest is on, as in production: a key ring of the bench's own (keys/herald.key).
        new_key_file(data / "keys" / "herald.key")
        sender = None
        if args.serve:
            server = Server("herald", True, data, free_port())
            server.start()
            sender = PacedSender(server.port)
            sender.start()
            time.sleep(1.0)  # a few ACKs before the import starts
        herald = [sys.executable, "-m", "gateway.app.cli"]
        t0 = time.perf_counter()
        done = subprocess.run(
            [*herald, "roster", "import", str(roster_csv), "--data", str(data), "--by", "bench"],
            capture_output=True,
            text=True,
            timeout=args.import_timeout,
            cwd=ROOT,
        )
        result["import_s"] = round(time.perf_counter() - t0, 1)
        # ru_maxrss of waited-for children, in KiB on Linux: so far only the import has been waited for.
        result["import_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if sender is not None:
            time.sleep(1.0)
            sender.stop.set()
            sender.join(timeout=30)
            server.stop()  # before the query phase: it would compete for the two cores
            lat = sender.latency_ms
            result["intake_during_import"] = {
                "acks": dict(sender.codes),
                "ack_ms": {
                    "p50": round(statistics.median(lat), 1),
                    "p99": round(pct(lat, 0.99), 1),
                    "max": round(max(lat), 1),
                }
                if lat
                else None,
                "client_errors": sender.errors,
            }
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            return 1
        result["import_output"] = done.stdout.strip().splitlines()
        sizes = {p.name: p.stat().st_size for p in data.iterdir() if p.name.startswith(("herald.db", "roster.db"))}
        result["files_mb"] = {name: round(size / 1e6, 1) for name, size in sorted(sizes.items())}
        result["db_mb"] = round(sum(sizes.values()) / 1e6, 1)
        if args.keep:
            result["kept"] = str(tmp)
        return time_queries(args, tmp, result)
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def time_queries(args, folder: Path, result: dict) -> int:
    """Time matching over the roster published in ``folder``/data; print ``result`` with the figures."""
    saved = json.loads((folder / "sample.json").read_text())
    sample, zips, seed = saved["sample"], saved["zips"], saved["seed"]
    data = folder / "data"
    keys = KeyRing.load(data / "keys" / "herald.key", environ={}) if (data / "keys" / "herald.key").exists() else None
    snapshot = open_roster_snapshot(data / "herald.db", keys)
    conn = snapshot.conn
    result["keys_per_member"] = round(
        conn.execute("SELECT COUNT(*) FROM roster_keys").fetchone()[0] / roster_count(snapshot), 2
    )
    blocking = {
        k: getattr(args, k) for k in ("max_compared", "max_bucket", "max_prefiltered") if getattr(args, k) is not None
    }
    model = load_model(roster_size=snapshot.size(), **blocking)  # as the pipeline scales its thresholds
    roster = StoredRoster(snapshot)
    work = queries(sample, zips, args.queries, seed)
    for _kind, q, _ in work[:20]:  # warm the page cache and the engine's caches
        match_patient(q, ENCOUNTER, roster, model)
    lookup_ms: list[float] = []
    match_ms: list[float] = []
    blocked: list[int] = []
    compared: list[int] = []
    found = routed = wrong = false_positive = non_member_possible = 0
    outcomes: list[tuple] = []
    deadline = time.monotonic() + args.max_seconds
    ran = 0
    for kind, q, expected in work:
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        short, refs = members_to_compare(q.person, blocking_keys(q.person), roster, model)
        roster.members(refs)
        lookup_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        match = match_patient(q, ENCOUNTER, roster, model)
        match_ms.append((time.perf_counter() - t) * 1000)
        blocked.append(short.blocked)
        compared.append(len(refs))
        ran += 1
        if kind == "member":
            if match.member_id == expected or any(c.member["member_id"] == expected for c in match.candidates):
                found += 1
            if match.member_id == expected and match.grade in ("certain", "probable"):
                routed += 1
            if match.member_id and match.member_id != expected:
                wrong += 1  # another member chosen, whatever the grade
        elif match.grade in ("certain", "probable"):
            false_positive += 1
        elif match.grade == "possible":
            non_member_possible += 1
        outcomes.append((match.grade, match.method, match.member_id))
    # The same queries comparing every member that shares a usable key (no shortlist): what the cut costs.
    everyone = load_model(roster_size=snapshot.size(), max_compared=10**9, max_prefiltered=10**9)
    differ = 0
    for (_kind, q, _), outcome in zip(work, outcomes, strict=False):  # work may have been cut by time
        full = match_patient(q, ENCOUNTER, roster, everyone)
        differ += outcome != (full.grade, full.method, full.member_id)
    snapshot.close()
    members_run = (ran + 1) // 2
    result.update(
        {
            "blocking": {
                "max_compared": model.max_compared,
                "max_prefiltered": model.max_prefiltered,
                "max_bucket": model.max_bucket,
            },
            "queries_run": ran,
            "cut_by_time": ran < len(work),
            "lookup_ms": {"p50": round(statistics.median(lookup_ms), 3), "p99": round(pct(lookup_ms, 0.99), 3)},
            "match_ms": {
                "p50": round(statistics.median(match_ms), 3),
                "p99": round(pct(match_ms, 0.99), 3),
                "max": round(max(match_ms), 3),
            },
            "sharing_a_key": {"mean": round(statistics.mean(blocked), 1), "max": max(blocked)},
            "compared": {"mean": round(statistics.mean(compared), 1), "max": max(compared)},
            "members_found_or_offered": f"{found}/{members_run}",
            "members_routed_certain_or_probable": f"{routed}/{members_run}",
            "members_given_the_wrong_member": wrong,
            "non_members_routed": f"{false_positive}/{ran - members_run}",
            "non_members_to_review": f"{non_member_possible}/{ran - members_run}",
            "outcomes_differing_from_comparing_all": f"{differ}/{ran}",
        }
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>32}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
