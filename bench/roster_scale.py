"""Roster at scale: import a synthetic roster of a million members, then time matching against it.

Generates a roster CSV of N synthetic members (deterministic seed; invented
names, streets and towns; MBIs in the CMS format), imports it with
``herald roster import`` in a child process (the production path: staging,
one transaction, blocking keys), and reports the import's wall time, the time
the write lock was held, the database size and the child's peak RSS. Then it
times ``gateway.matching.match_patient`` over ``gateway.store.StoredRoster``
(the lookups the pipeline workers use, on a read-only connection) for a
bounded set of queries: members with typos and no identifiers, and people
who are on no roster. Every phase is bounded; the temporary folder is deleted
unless ``--keep``.

    .venv/bin/python bench/roster_scale.py                      # 1,000,000 members, 2,000 queries
    .venv/bin/python bench/roster_scale.py --members 100000 --queries 500 --json
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.matching import PatientQuery, load_model, make_person, match_patient  # noqa: E402
from gateway.store import StoredRoster, open_database, roster_count  # noqa: E402

ACO = "ACO-BENCH"
ENCOUNTER = "2026-11-20"
# Syllables for invented names: combinations give tens of thousands of family names.
FAMILY_HEADS = [
    "Ash",
    "Bel",
    "Brack",
    "Cal",
    "Carr",
    "Dal",
    "Dun",
    "Ell",
    "Fair",
    "Fen",
    "Gal",
    "Gar",
    "Hal",
    "Hart",
    "Hol",
    "Kel",
    "Kin",
    "Lang",
    "Lind",
    "Mar",
    "Mel",
    "Mor",
    "Nor",
    "Oak",
    "Pem",
    "Pen",
    "Quill",
    "Ral",
    "Red",
    "Ros",
    "Sal",
    "Sel",
    "Stan",
    "Tal",
    "Thorn",
    "Tre",
    "Ul",
    "Van",
    "Wal",
    "Wen",
    "Whit",
    "Wil",
    "Win",
    "Yar",
    "Zel",
    "Abe",
    "Bran",
    "Cor",
    "Dra",
    "Esk",
    "Fal",
    "Grim",
    "Hask",
    "Ivor",
    "Jass",
    "Kess",
    "Lor",
    "Mab",
    "Nev",
]
FAMILY_TAILS = [
    "berg",
    "bright",
    "brook",
    "burn",
    "by",
    "dale",
    "den",
    "ford",
    "gate",
    "ham",
    "hill",
    "holt",
    "ington",
    "ley",
    "low",
    "mere",
    "more",
    "ner",
    "orth",
    "ridge",
    "ros",
    "sen",
    "shaw",
    "stead",
    "ston",
    "ter",
    "ton",
    "vale",
    "wick",
    "win",
    "wood",
    "worth",
    "ard",
    "ett",
    "ick",
    "is",
    "kin",
    "man",
    "nett",
    "ow",
]
GIVEN = [
    "Ada",
    "Alden",
    "Alma",
    "Amos",
    "Anika",
    "Ansel",
    "Aria",
    "Arlo",
    "Astrid",
    "Beatrix",
    "Bennett",
    "Bram",
    "Calla",
    "Cassius",
    "Celeste",
    "Cyrus",
    "Dalia",
    "Darius",
    "Delphine",
    "Desmond",
    "Edith",
    "Elias",
    "Elowen",
    "Emrys",
    "Esme",
    "Ezra",
    "Fenna",
    "Florian",
    "Freya",
    "Gideon",
    "Greta",
    "Hale",
    "Hazel",
    "Ida",
    "Imogen",
    "Ines",
    "Ivo",
    "Jasper",
    "Juno",
    "Kai",
    "Kira",
    "Lars",
    "Leona",
    "Linus",
    "Lyra",
    "Mabel",
    "Magnus",
    "Maren",
    "Milo",
    "Mira",
    "Nell",
    "Nico",
    "Noor",
    "Odile",
    "Orla",
    "Otto",
    "Pella",
    "Quentin",
    "Rhea",
    "Rowan",
    "Sabine",
    "Silas",
    "Soren",
    "Tamsin",
    "Teodor",
    "Thea",
    "Tobias",
    "Una",
    "Vera",
    "Viggo",
    "Wren",
    "Xander",
    "Yara",
    "Yusuf",
    "Zara",
    "Zeno",
    "Agnes",
    "Bruno",
    "Clara",
    "Dorian",
    "Elsa",
    "Felix",
    "Gemma",
    "Hugo",
    "Iris",
    "Jonas",
    "Katya",
    "Leo",
    "Maeve",
    "Nils",
    "Olive",
    "Pavel",
    "Rosa",
    "Stellan",
    "Tova",
    "Ulric",
    "Vita",
]
STREETS = [
    "Orchard",
    "Birch",
    "Maple",
    "Harbor",
    "Quarry",
    "Willow",
    "Meadow",
    "Lantern",
    "Copper",
    "Juniper",
    "Falcon",
    "Heron",
    "Granite",
    "Saddle",
    "Thistle",
    "Clover",
    "Ember",
    "Hollow",
    "Summit",
    "Cedar",
    "Alder",
    "Bramble",
]
STREET_KINDS = ["Street", "Avenue", "Road", "Lane", "Drive", "Court", "Way", "Place"]
TOWNS = [
    "Ashford Springs",
    "Belmere",
    "Copperton",
    "Dunmore Falls",
    "Eastwick Hollow",
    "Fairhaven Flats",
    "Glenrock",
    "Harrowgate",
    "Ironvale",
    "Juniper Bend",
    "Kestrel Point",
    "Larkspur",
    "Millbrook Crossing",
    "Northmere",
    "Oakridge Junction",
    "Pinecrest",
    "Quarry Hill",
    "Ravenholt",
    "Stonebridge",
    "Thornwick",
    "Umberfield",
]
STATES = ["IL", "IN", "WI", "IA", "MO", "OH", "MI", "KY", "MN", "NE"]
MBI_LETTERS = "ACDEFGHJKMNPQRTUVWXY"
MBI_ALNUM = MBI_LETTERS + "0123456789"


def mbi(rng: random.Random) -> str:
    """A random identifier in the CMS MBI format (C A AN N A AN N A A N N)."""
    return (
        str(rng.randint(1, 9))
        + rng.choice(MBI_LETTERS)
        + rng.choice(MBI_ALNUM)
        + str(rng.randint(0, 9))
        + rng.choice(MBI_LETTERS)
        + rng.choice(MBI_ALNUM)
        + str(rng.randint(0, 9))
        + rng.choice(MBI_LETTERS)
        + rng.choice(MBI_LETTERS)
        + f"{rng.randint(0, 99):02d}"
    )


def person(rng: random.Random, zips: list[str]) -> dict:
    """One invented person with a plausible address."""
    birth = date(1925, 1, 1) + timedelta(days=rng.randint(0, 80 * 365))
    zip_code = rng.choice(zips)
    return {
        "last_name": rng.choice(FAMILY_HEADS) + rng.choice(FAMILY_TAILS),
        "first_name": rng.choice(GIVEN),
        "middle_name": rng.choice(GIVEN)[0] if rng.random() < 0.6 else "",
        "birth_date": birth.isoformat(),
        "sex": rng.choice("MF"),
        "address_line": f"{rng.randint(1, 9999)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}",
        "city": TOWNS[int(zip_code) % len(TOWNS)],
        "state": STATES[int(zip_code) % len(STATES)],
        "zip": zip_code,
        "phone": f"{rng.randint(201, 989)}555{rng.randint(0, 9999):04d}",
    }


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


def typo(rng: random.Random, value: str) -> str:
    """One keying error: a swapped pair, a dropped or a changed letter."""
    if len(value) < 3:
        return value
    i = rng.randrange(len(value) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return value[:i] + value[i + 1] + value[i] + value[i + 2 :]
    if kind == 1:
        return value[:i] + value[i + 1 :]
    return value[:i] + rng.choice("AEIOURSTLN") + value[i + 1 :]


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20261120)
    parser.add_argument("--import-timeout", type=float, default=1200.0, help="seconds the import may take")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="bound on the query phase")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-roster-"))
    result: dict = {"members": args.members, "queries": args.queries, "seed": args.seed}
    try:
        roster_csv = tmp / "roster.csv"
        t0 = time.perf_counter()
        sample, zips = write_roster(roster_csv, args.members, args.seed)
        result["generate_s"] = round(time.perf_counter() - t0, 1)
        result["csv_mb"] = round(roster_csv.stat().st_size / 1e6, 1)
        data = tmp / "data"
        herald = [sys.executable, "-m", "gateway.cli"]
        t0 = time.perf_counter()
        done = subprocess.run(
            [*herald, "roster", "import", str(roster_csv), "--data", str(data), "--by", "bench"],
            capture_output=True,
            text=True,
            timeout=args.import_timeout,
            cwd=ROOT,
        )
        result["import_s"] = round(time.perf_counter() - t0, 1)
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            return 1
        result["import_output"] = done.stdout.strip().splitlines()
        # ru_maxrss of waited-for children, in KiB on Linux: the import was the only child.
        result["import_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        db = data / "herald.db"
        sizes = {p.name: p.stat().st_size for p in data.iterdir() if p.name.startswith("herald.db")}
        result["db_mb"] = round(sum(sizes.values()) / 1e6, 1)
        conn = open_database(db, readonly=True)
        result["keys_per_member"] = round(
            conn.execute("SELECT COUNT(*) FROM roster_keys").fetchone()[0] / roster_count(conn), 2
        )
        model = load_model(roster_size=roster_count(conn))  # as the pipeline scales its thresholds
        roster = StoredRoster(conn)
        work = queries(sample, zips, args.queries, args.seed)
        for _kind, q, _ in work[:20]:  # warm the page cache and the engine's caches
            match_patient(q, ENCOUNTER, roster, model)
        lookup_ms: list[float] = []
        match_ms: list[float] = []
        compared: list[int] = []
        found = wrong = false_positive = 0
        from gateway.matching import blocking_keys

        deadline = time.monotonic() + args.max_seconds
        ran = 0
        for kind, q, expected in work:
            if time.monotonic() > deadline:
                break
            t = time.perf_counter()
            rows = roster.by_blocking_keys(blocking_keys(q.person))
            lookup_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            match = match_patient(q, ENCOUNTER, roster, model)
            match_ms.append((time.perf_counter() - t) * 1000)
            compared.append(len(rows))
            ran += 1
            if kind == "member":
                if match.member_id == expected or any(c.member["member_id"] == expected for c in match.candidates):
                    found += 1
                elif match.member_id:
                    wrong += 1
            elif match.grade in ("certain", "probable"):
                false_positive += 1
        conn.close()
        members_run = (ran + 1) // 2
        result.update(
            {
                "queries_run": ran,
                "cut_by_time": ran < len(work),
                "lookup_ms": {"p50": round(statistics.median(lookup_ms), 3), "p99": round(pct(lookup_ms, 0.99), 3)},
                "match_ms": {"p50": round(statistics.median(match_ms), 3), "p99": round(pct(match_ms, 0.99), 3)},
                "candidates": {"mean": round(statistics.mean(compared), 1), "max": max(compared)},
                "members_found_or_offered": f"{found}/{members_run}",
                "members_given_the_wrong_member": wrong,
                "non_members_routed": f"{false_positive}/{ran - members_run}",
            }
        )
    finally:
        if args.keep:
            result["kept"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>32}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
