"""Microsoft FHIR-Converter's expected bundles as a field-level oracle for A01, A03 and A04.

Each (message, aspect) case fails on a difference that is neither a justified
row of ``tests/oracles/msft_known_differences.toml`` nor covered by an open
defect (``tests/oracles/open_defects.toml``, which makes the case a strict
xfail). Skips when ``../shared/corpus`` is absent.
"""

from __future__ import annotations

import pytest
from oracles import msft
from oracles.corpus import case_param, corpus_missing

pytestmark = pytest.mark.skipif(bool(corpus_missing()), reason=corpus_missing() or "corpus present")

CASES = [case_param(f"msft:{p.stem}::{aspect}", p.stem, aspect) for p in msft.pairs() for aspect in msft.ASPECTS]


@pytest.mark.parametrize(("stem", "aspect"), CASES or [pytest.param(None, None, id="no-corpus")])
def test_herald_agrees_with_microsoft_or_the_difference_is_justified(stem, aspect):
    """Every difference from Microsoft's expected bundle on this aspect is a justified, listed one."""
    unexplained = [d for d in msft.differences(stem) if d.aspect == aspect and msft.explained(d) is None]
    assert not unexplained, "\n".join(d.describe() for d in unexplained)


def test_the_pairs_are_the_a01_a03_a04_messages():
    """INDEX.tsv pairs six A01/A03/A04 messages with expected bundles, and each message converts."""
    stems = [p.stem for p in msft.pairs()]
    assert stems == ["ADT-A01-01", "ADT-A01-02", "ADT-A03-01", "ADT-A04-01", "ADT04-23", "ADT04-28"]
    for stem in stems:
        assert all(d.element != msft.NOT_CONVERTED for d in msft.differences(stem)), f"{stem} did not convert"


def test_every_known_difference_still_occurs():
    """Each row of msft_known_differences.toml explains at least one current difference (the table stays honest)."""
    found = [d for p in msft.pairs() for d in msft.differences(p.stem)]
    stale = [row for row in msft.known_rows() if not any(msft.row_covers(row, d) for d in found)]
    assert not stale, "rows that no longer occur: " + "; ".join(f"{r['case']} {r['element']}" for r in stale)


def test_facts_follow_references_and_compare_instants_in_utc():
    """The fact extractor resolves Encounter references and treats equal instants in other offsets as equal."""
    bundle = {
        "entry": [
            {
                "fullUrl": "urn:uuid:p1",
                "resource": {
                    "resourceType": "Practitioner",
                    "id": "p1",
                    "identifier": [{"value": "42"}],
                    "name": [{"family": "Quill"}],
                },
            },
            {
                "resource": {
                    "resourceType": "Encounter",
                    "id": "e1",
                    "period": {"start": "2015-02-08T15:54:19+05:30"},
                    "participant": [
                        {"type": [{"coding": [{"code": "ATND"}]}], "individual": {"reference": "urn:uuid:p1"}}
                    ],
                }
            },
        ]
    }
    f = msft.facts(bundle, "herald")
    assert f["Encounter.participant"] == {"Encounter.participant[ATND]": "42 Quill"}
    assert f["Encounter.period"]["Encounter.period.start"] == "2015-02-08T10:24:19+00:00"
