"""A day of care transitions for a 20,000-member ACO: the tasks and e-alerts it makes, and the SNF report's time.

Synthetic people (``synthetic_people``) on one ACO's roster, and 30 days of
their hospital and SNF traffic before the day measured, so the day has a
history (readmissions, a third ED visit, SNF stays to report on). Every
message goes through the real pieces, in this process, in order: the store
(``record_frame``), the pipeline stage (``process_message``, matching against
the sealed roster), the outcome's write (with the episode event and its
flags), then the transitions service's deciding and write, hour by hour on
the measured day, on a clock the script sets. E-alerts are queued in the
outbox (not sent: no ED listens here).

Daily volumes per 20,000 members (*chosen*, of the order of Medicare
fee-for-service utilisation: roughly 600-700 ED visits and 250-300 inpatient
stays per 1,000 beneficiaries a year, about a fifth of inpatient discharges
going to a SNF):

- ED visits: 36 a day (a quarter become an admission; one in five never gets
  its A03 and is closed after 24 h);
- direct admissions: 6 a day (with those from the ED, about 15 stays a day);
- transfers (A02) on half the stays, an update (A08) on each;
- discharges: 70% home, 10% home health, 14% to a SNF (half of the SNFs send
  their own ADT), 3% died, 3% to another hospital;
- SNF stays of 8-30 days: 60% home, 20% back to hospital (a re-hospitalisation).

On the measured day the connected hospitals also send about 1,800 messages
about people on no roster (the ACO's members are a small share of a
hospital's patients; those are converted and matched, then only the HIE is
told). Some member messages arrive up to an hour late, out of order.

Usage (from the repository root)::

    .venv/bin/python bench/care_day.py            # 20,000 members, 30 days of history
    .venv/bin/python bench/care_day.py --members 5000 --history 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_throughput import bench_keys, make_roster  # noqa: E402
from synthetic_people import person  # noqa: E402

from gateway.app.roster import import_members  # noqa: E402
from gateway.app.transitions_service import TransitionsService, episode_flags_function  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.conversion.vocabulary import load_vocabulary  # noqa: E402
from gateway.header import read_msh  # noqa: E402
from gateway.pipeline.process import MatchPolicy, process_message  # noqa: E402
from gateway.records import RECEIVED, IntakeRecord, PendingMessage  # noqa: E402
from gateway.store import Store, StoredRoster, open_database, open_roster_snapshot  # noqa: E402
from gateway.store import messages as stored_messages  # noqa: E402
from gateway.store import transitions as stored_transitions  # noqa: E402
from gateway.store.schema import iso  # noqa: E402

ACO = "ACO-BENCH"
HOSPITALS = ("HOSP-A", "HOSP-B", "HOSP-C")
SNFS_FED = ("MAPLE", "OAK", "BIRCH", "CEDAR")  # send their own ADT
SNFS_QUIET = ("PINE", "ELM", "ASPEN", "WILLOW")  # do not: a discharge to one stands for the stay
DAY0 = datetime(2026, 3, 2, tzinfo=UTC)  # the first day of history (a Monday)


class _Reactor:
    """What the store needs of a reactor when nothing runs one: its seconds (outbox due times)."""

    def seconds(self) -> float:
        return time.time()

    def callFromThread(self, fn, *args):  # noqa: N802 - Twisted's name
        fn(*args)


def hl7(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


def message(
    trigger: str,
    who: dict,
    visit: str,
    facility: str,
    at: datetime,
    *,
    klass="I",
    admitted=None,
    discharged=None,
    disposition="",
    destination="",
    n=0,
) -> tuple[datetime, bytes]:
    pv1 = [""] * 46
    pv1[0], pv1[1], pv1[2] = "PV1", "1", klass
    pv1[3] = f"{'ED' if klass == 'E' else 'WARD'}^{n % 40}^1^{facility}"
    pv1[19] = f"{visit}^^^{facility}^VN"
    pv1[36], pv1[37] = disposition, destination
    pv1[44] = hl7(admitted) if admitted else ""
    pv1[45] = hl7(discharged) if discharged else ""
    ident = f"{who['mrn']}^^^{facility}^MR" + (f"~{who['mbi']}^^^CMS^MB" if who.get("mbi") else "")
    segments = [
        f"MSH|^~\\&|EHR|{facility}|HERALD|ACO|{hl7(at)}||ADT^{trigger}^ADT_A01|{facility}{n:09d}|P|2.5.1",
        f"EVN|{trigger}|{hl7(at)}",
        f"PID|1||{ident}||{who['last_name']}^{who['first_name']}||{who['birth_date'].replace('-', '')}|{who['sex']}",
        "|".join(pv1).rstrip("|"),
    ]
    return at, ("\r".join(segments) + "\r").encode("ascii", "replace")


def traffic(members: list[dict], days: int, rng: random.Random, others: int) -> list[tuple[datetime, bytes]]:
    """Every message of ``days`` days (the last one measured), each with the time it is sent."""
    out: list[tuple[datetime, bytes]] = []
    scale = len(members) / 20_000  # the volumes below are per 20,000 members
    counter = iter(range(10**9))
    end = DAY0 + timedelta(days=days)

    def add(*args, **kw):
        at = args[4]
        if at < end:
            out.append(message(*args, **kw, n=next(counter)))

    def hospital_stay(who, facility, start, via_visit=None):
        visit = via_visit or f"V{next(counter)}"
        if via_visit is None:
            add("A01", who, visit, facility, start, admitted=start)
        else:
            add("A01", who, visit, facility, start, admitted=start)  # the ED visit becomes an admission
        length = timedelta(hours=rng.randint(30, 150))
        if rng.random() < 0.5:
            add("A02", who, visit, facility, start + length / 3, admitted=start)
        add("A08", who, visit, facility, start + length / 2, admitted=start)
        left = start + length
        roll = rng.random()
        if roll < 0.70:
            disposition, destination = "01", ""
        elif roll < 0.80:
            disposition, destination = "06", ""
        elif roll < 0.94:
            disposition, destination = "03", rng.choice(SNFS_FED + SNFS_QUIET)
        elif roll < 0.97:
            disposition, destination = "20", ""
        else:
            disposition, destination = "02", ""
        add(
            "A03",
            who,
            visit,
            facility,
            left,
            admitted=start,
            discharged=left,
            disposition=disposition,
            destination=destination,
        )
        if destination in SNFS_FED:
            snf_stay(who, destination, left + timedelta(hours=2))

    def snf_stay(who, snf, start):
        visit = f"S{next(counter)}"
        add("A01", who, visit, snf, start, admitted=start)
        left = start + timedelta(days=rng.randint(8, 30), hours=rng.randint(0, 8))
        roll = rng.random()
        disposition = (
            "01" if roll < 0.45 else "06" if roll < 0.60 else "02" if roll < 0.80 else "20" if roll < 0.85 else ""
        )
        if not disposition:
            return  # still there at the end
        add("A03", who, visit, snf, left, admitted=start, discharged=left, disposition=disposition)
        if disposition == "02":
            hospital_stay(who, rng.choice(HOSPITALS), left + timedelta(hours=1))

    for day in range(days):
        base = DAY0 + timedelta(days=day)
        for _ in range(_poisson(rng, 36 * scale)):
            who = rng.choice(members)
            facility = rng.choice(HOSPITALS)
            start = base + timedelta(minutes=rng.randint(0, 1439))
            visit = f"E{next(counter)}"
            add("A04", who, visit, facility, start, klass="E", admitted=start)
            roll = rng.random()
            if roll < 0.25:
                hospital_stay(who, facility, start + timedelta(hours=4), via_visit=visit)
            elif roll < 0.45:
                pass  # never discharged: the sweep closes it after 24 h
            else:
                left = start + timedelta(hours=rng.randint(2, 8))
                add("A03", who, visit, facility, left, klass="E", admitted=start, discharged=left, disposition="01")
        for _ in range(_poisson(rng, 6 * scale)):
            hospital_stay(rng.choice(members), rng.choice(HOSPITALS), base + timedelta(minutes=rng.randint(0, 1439)))
    last = DAY0 + timedelta(days=days - 1)
    zips = [f"{60000 + i}" for i in range(50)]
    for _ in range(others):
        who = {**person(rng, zips), "mrn": f"X{next(counter)}"}
        facility = rng.choice(HOSPITALS)
        at = last + timedelta(minutes=rng.randint(0, 1439))
        trigger, klass = rng.choice((("A04", "E"), ("A01", "I"), ("A03", "I"), ("A08", "I")))
        add(trigger, who, f"O{next(counter)}", facility, at, klass=klass, admitted=at)
    # Some messages arrive up to an hour late (an interface engine's queue): sent out of order.
    late = [(at + timedelta(minutes=rng.randint(1, 60)) if rng.random() < 0.05 else at, raw) for at, raw in out]
    return sorted(late, key=lambda item: item[0])


def _poisson(rng: random.Random, mean: float) -> int:
    count, limit, product = 0, pow(2.718281828459045, -mean), rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--history", type=int, default=30, help="days of traffic before the day measured")
    parser.add_argument("--others", type=int, default=1800, help="messages about people on no roster, that day")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the data folder (its path is printed)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="herald-care-day-"))
    try:
        return run(args, folder)
    finally:
        if args.keep:
            print(f"data folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def run(args, folder: Path) -> int:
    rng = random.Random(args.seed)
    keys = bench_keys(folder, "on")
    alerts = "\n".join(f'[alerts."{h}"]\nmllp = {{ host = "127.0.0.1", port = 2599 }}' for h in HOSPITALS)
    snfs = ", ".join(f'"{s}"' for s in SNFS_FED)
    (folder / "herald.toml").write_text(
        f'[transitions]\nsnf_facilities = [{snfs}]\n\n[transitions.acos."{ACO}"]\nname = "Bench ACO"\n\n{alerts}\n'
    )
    config = load_config(folder / "herald.toml", data_dir=folder)
    roster = [dataclasses.replace(m, aco_id=ACO) for m in make_roster(args.members, seed=args.seed)]
    t0 = time.perf_counter()
    import_members(config.database, roster, "bench-roster.csv", keys=keys)
    print(f"roster: {len(roster)} members imported in {time.perf_counter() - t0:.1f} s")
    members = [{**dataclasses.asdict(m), "mrn": f"H{m.mrn}"} for m in roster]
    days = args.history + 1
    t0 = time.perf_counter()
    sent = traffic(members, days, rng, args.others)
    day = DAY0 + timedelta(days=args.history)
    print(
        f"traffic: {len(sent)} messages over {days} days, {sum(at >= day for at, _ in sent)} on the day "
        f"({time.perf_counter() - t0:.1f} s to write)"
    )

    now = [DAY0]
    store = Store(config.database, reactor=_Reactor(), clock=lambda: now[0], keys=keys)
    store.use_episode_flags(episode_flags_function(frozenset(config.transitions_snf_facilities)))
    store.start()
    service = TransitionsService(store, config, _Reactor(), clock=lambda: now[0])
    vocab = load_vocabulary()
    snapshot = open_roster_snapshot(config.database, keys)
    links = open_database(config.database, readonly=True, keys=keys)
    lookups = StoredRoster(snapshot, links)
    policy = MatchPolicy.from_config(config, snapshot.size())
    timing = Counter()
    written_day = Counter()

    def process(batch: list[tuple[datetime, bytes]]) -> None:
        ids = []
        t = time.perf_counter()
        for _, raw in batch:
            h = read_msh(raw)
            record = IntakeRecord(
                raw,
                "bench",
                RECEIVED,
                "AA",
                h.sending_application,
                h.sending_facility,
                h.message_type,
                h.trigger_event,
                h.control_id,
                h.version,
            )
            ids.append(store.call(stored_messages.record_frame, record, iso(now[0])).message_id)
        timing["store frames"] += time.perf_counter() - t
        t = time.perf_counter()
        received = iso(now[0])
        outcomes = [
            process_message(
                PendingMessage(mid, raw, received, ""),
                vocab,
                config.tzinfo,
                lookups,
                config.recipients,
                validate=False,
                policy=policy,
            )
            for mid, (_, raw) in zip(ids, batch, strict=True)
        ]
        timing["pipeline (process_message)"] += time.perf_counter() - t
        t = time.perf_counter()
        store.call(stored_messages.apply_outcomes, outcomes, iso(now[0]), time.time())
        timing["outcomes written"] += time.perf_counter() - t

    def transitions(measured: bool) -> None:
        t = time.perf_counter()
        while True:
            change, taken = service.decide_pending(service.BATCH)
            if not taken:
                break
            counts = store.call(stored_transitions.apply_transitions, change, iso(now[0]), time.time())
            if measured:
                written_day.update(counts)
                written_day.update(Counter(t["code"] for t in change.get("tasks", ())))
        change, _ = service.decide_stale()
        if change:
            counts = store.call(stored_transitions.apply_transitions, change, iso(now[0]), time.time())
            if measured:
                written_day.update(counts)
                written_day.update(Counter(t["code"] for t in change.get("tasks", ())))
        timing["transitions"] += time.perf_counter() - t

    t0 = time.perf_counter()
    history = [item for item in sent if item[0] < day]
    for d in range(args.history):
        end = DAY0 + timedelta(days=d + 1)
        batch = [item for item in history if DAY0 + timedelta(days=d) <= item[0] < end]
        now[0] = end
        process(batch)
        transitions(False)
    print(f"history: {len(history)} messages processed in {time.perf_counter() - t0:.1f} s")

    timing.clear()
    t0 = time.perf_counter()
    today = [item for item in sent if item[0] >= day]
    for hour in range(24):
        end = day + timedelta(hours=hour + 1)
        now[0] = end
        process([item for item in today if day + timedelta(hours=hour) <= item[0] < end])
        transitions(True)
    elapsed = time.perf_counter() - t0
    print(f"\nthe day ({day.date()}): {len(today)} messages in {elapsed:.1f} s ({len(today) / elapsed:.0f}/s)")
    for name, seconds in timing.items():
        print(f"  {name:28} {seconds:6.1f} s")
    conn = open_database(config.database, readonly=True, keys=keys)
    states = dict(
        conn.execute(
            "SELECT state, COUNT(*) FROM messages WHERE received_at > ? GROUP BY state", (iso(day),)
        ).fetchall()
    )
    print(f"  messages by state: {states}")
    print("made that day:")
    print(f"  episodes written (new or changed)  {written_day['episodes']}")
    print(f"  tasks made                          {written_day['tasks']}")
    for code in (
        "tcm-contact",
        "home-visit",
        "medication-reconciliation",
        "face-to-face",
        "snf-coordination",
        "ed-follow-up",
    ):
        if written_day[code]:
            print(f"    {code:32} {written_day[code]}")
    print(f"  tasks closed (readmission, cancel)  {written_day['closed_tasks']}")
    print(f"  ED e-alerts queued (MDM^T02)        {written_day['notifications']}")
    flagged = Counter()
    for (detail,) in conn.execute("SELECT detail FROM events WHERE kind = 'flagged' AND at >= ?", (iso(day),)):
        flagged.update(json.loads(detail)["flags"])
    print(f"  flags on member notifications       {dict(flagged)}")
    open_tasks = conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'requested'").fetchone()[0]
    episodes = conn.execute("SELECT COUNT(*) FROM episodes").fetchone()[0]
    print(f"in the store: {episodes} episodes, {open_tasks} open tasks")
    conn.close()
    store.close()
    links.close()
    snapshot.close()

    from click.testing import CliRunner

    from gateway.app.cli import main as herald

    first, last = (day - timedelta(days=args.history)).date().isoformat(), day.date().isoformat()
    t0 = time.perf_counter()
    result = CliRunner().invoke(
        herald,
        [
            "snf",
            "report",
            "--from",
            first,
            "--to",
            last,
            "--config",
            str(folder / "herald.toml"),
            "--data",
            str(folder),
        ],
        env={"HERALD_KEYS": (folder / "keys" / "herald.key").read_text()},
    )
    seconds = time.perf_counter() - t0
    print(f"\nherald snf report --from {first} --to {last}: {seconds:.2f} s (exit {result.exit_code})")
    print("\n".join("  " + line for line in result.output.splitlines()))
    return 0 if result.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
