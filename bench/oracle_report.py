"""Print how Herald's conversion compares with other projects' corpora and expected output.

Three tables, from ``../shared/corpus`` (the same code and data as the
``tests/test_oracle_*.py`` tests, see ``tests/oracles/``):

1. per ADT corpus: messages converted / not converted / rejected / crashed;
2. per segment (ReportStream mapping inventory): leaves compared, agreeing,
   justified differences, differences covered by an open defect, unexplained,
   the agreement rate (agreeing / compared) and the rate in scope (agreeing /
   (compared - justified)); a pair Herald could not convert counts all its
   leaves as defect (or unexplained);
3. the differences from Microsoft FHIR-Converter's A01/A03/A04 bundles, each
   with its reason or its open defect.

Then the open defects. Run from the repository root:
``.venv/bin/python bench/oracle_report.py`` (``--details`` also lists every
rejection and every disagreeing ReportStream leaf). Exits 1 when a message
crashed or a difference is unexplained, 2 when the corpus is absent.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from oracles import msft  # noqa: E402
from oracles import reportstream as rs  # noqa: E402
from oracles.corpus import (  # noqa: E402
    ADT_CORPORA,
    CONVERTED,
    NOT_CONVERTED,
    REJECTED,
    corpus_cases,
    corpus_missing,
    defects_for,
    herald_outcome,
    open_defects,
)


def corpus_table(details: bool) -> int:
    """Print converted / not converted / rejected / crashed per corpus; return the number of crashes."""
    print("ADT corpora (../shared/corpus): what Herald does with each message")
    print(f"  {'corpus':38} {'messages':>8} {'converted':>9} {'not conv.':>9} {'rejected':>8} {'crashed':>7}")
    crashes = 0
    reasons: Counter = Counter()
    for corpus in ADT_CORPORA:
        counts: Counter = Counter()
        for case in corpus_cases(corpus):
            try:
                outcome = herald_outcome(case.raw, case.file_error)
            except Exception:  # a crash is what this counts
                counts["crashed"] += 1
                print(f"  CRASH {case.case_id}\n{traceback.format_exc()}", file=sys.stderr)
                continue
            counts[outcome.kind] += 1
            if outcome.kind != CONVERTED:
                # Group by the reason's first clause (a malformed file's "line N: " is left out).
                reason = re.sub(r"^line \d+: ", "", outcome.reason)
                reasons[(corpus, outcome.kind, outcome.location, reason.split(":")[0][:70])] += 1
                if details:
                    print(f"    {case.case_id}: {outcome.describe()[:160]}")
        total = sum(counts.values())
        crashes += counts["crashed"]
        print(
            f"  {corpus:38} {total:>8} {counts[CONVERTED]:>9} {counts[NOT_CONVERTED]:>9} "
            f"{counts[REJECTED]:>8} {counts['crashed']:>7}"
        )
    print("\n  reasons (corpus, outcome, location: reason) and how many:")
    for (corpus, kind, location, reason), n in sorted(reasons.items()):
        print(f"    {n:>3}  {corpus:34} {kind:13} {location}: {reason}")
    return crashes


def segment_table(details: bool) -> int:
    """Print per-segment agreement with ReportStream; return the number of unexplained leaves."""
    print("\nReportStream mapping inventory: agreement per segment (leaves of their expected resource)")
    print(
        f"  {'segment':8} {'pairs':>5} {'compared':>8} {'agree':>6} {'justified':>9} {'defect':>6} "
        f"{'unexplained':>11} {'agreement':>9} {'in scope':>8}"
    )
    unexplained_total = 0
    total: Counter = Counter()
    for segment in rs.SEGMENTS:
        counts: Counter = Counter()
        pairs = [p for p in rs.pairs() if p.segment == segment]
        for pair in pairs:
            converted = rs.outcome_of(pair) == CONVERTED
            for leaf in rs.leaves(pair):
                counts["compared"] += 1
                top = ".".join(leaf.element.split(".")[:2])
                if not converted:  # nothing to agree with: the failure is the difference
                    counts["defect" if defects_for(f"reportstream:{pair.name}::{top}") else "unexplained"] += 1
                elif leaf.agrees:
                    counts["agree"] += 1
                elif rs.explained(pair, leaf):
                    counts["justified"] += 1
                elif defects_for(f"reportstream:{pair.name}::{top}"):
                    counts["defect"] += 1
                else:
                    counts["unexplained"] += 1
                    if details:
                        print(f"    UNEXPLAINED {pair.name} {leaf.element}: {leaf.expected!r} vs {leaf.herald!r}")
        unexplained_total += counts["unexplained"]
        total.update(counts)
        total["pairs"] += len(pairs)
        _segment_row(segment, len(pairs), counts)
    _segment_row("all", total["pairs"], total)
    return unexplained_total


def _segment_row(label: str, pairs: int, counts: Counter) -> None:
    rate = counts["agree"] / counts["compared"] if counts["compared"] else 0.0
    in_scope = counts["compared"] - counts["justified"]
    scoped = counts["agree"] / in_scope if in_scope else 1.0
    print(
        f"  {label:8} {pairs:>5} {counts['compared']:>8} {counts['agree']:>6} {counts['justified']:>9} "
        f"{counts['defect']:>6} {counts['unexplained']:>11} {rate:>8.1%} {scoped:>8.1%}"
    )


def msft_list() -> int:
    """Print every difference from Microsoft's expected bundles with its reason; return how many are unexplained."""
    print("\nMicrosoft FHIR-Converter, A01/A03/A04: differences per aspect (all six messages)")
    print(f"  {'aspect':24} {'differences':>11} {'justified':>9} {'defect':>6} {'unexplained':>11}")
    by_aspect: dict[str, Counter] = {a: Counter() for a in msft.ASPECTS}
    for pair in msft.pairs():
        for d in msft.differences(pair.stem):
            c = by_aspect[d.aspect]
            c["differences"] += 1
            if msft.explained(d) is not None:
                c["justified"] += 1
            elif defects_for(f"msft:{pair.stem}::{d.aspect}"):
                c["defect"] += 1
            else:
                c["unexplained"] += 1
    for aspect, c in by_aspect.items():
        print(f"  {aspect:24} {c['differences']:>11} {c['justified']:>9} {c['defect']:>6} {c['unexplained']:>11}")
    print("\nMicrosoft FHIR-Converter, A01/A03/A04: differences and why")
    unexplained = 0
    for pair in msft.pairs():
        diffs = msft.differences(pair.stem)
        print(f"  {pair.stem}: {len(diffs)} differences")
        for d in diffs:
            row = msft.explained(d)
            found = defects_for(f"msft:{pair.stem}::{d.aspect}")
            if row is not None:
                why = "justified: " + row["reason"]
            elif found:
                why = "DEFECT " + ", ".join(x.id for x in found)
            else:
                why = "UNEXPLAINED"
                unexplained += 1
            print(f"    {d.describe()}\n        {why}")
    return unexplained


def defect_list() -> None:
    """Print the open defects (tests/oracles/open_defects.toml)."""
    print("\nOpen converter defects (tests/oracles/open_defects.toml)")
    if not open_defects():
        print("  (none)")
    for d in open_defects():
        print(f"  {d.id}: {d.title}\n      field: {d.field}\n      expected: {d.expected}\n      Herald: {d.herald}")


def main(argv: list[str] | None = None) -> int:
    """Print the tables; the exit status says whether anything crashed or is unexplained."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--details", action="store_true", help="list every rejection and unexplained leaf")
    args = parser.parse_args(argv)
    missing = corpus_missing()
    if missing:
        print(f"oracle_report: {missing}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    crashes = corpus_table(args.details)
    unexplained = segment_table(args.details)
    unexplained += msft_list()
    defect_list()
    print(f"\n{crashes} crashed, {unexplained} unexplained differences ({time.perf_counter() - start:.1f} s)")
    return 1 if crashes or unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
