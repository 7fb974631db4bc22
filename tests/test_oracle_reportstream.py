"""CDC ReportStream's mapping inventory as a field-level oracle for PID, PD1, NK1, PV1/PV2, IN1 and MSH.

Each (pair, top-level element) case fails on a disagreeing leaf that is
neither a justified row of ``tests/oracles/reportstream_known_differences.toml``
nor covered by an open defect (``tests/oracles/open_defects.toml``: a strict
xfail). Skips when ``../shared/corpus`` is absent.
"""

from __future__ import annotations

import pytest
from oracles import reportstream as rs
from oracles.corpus import case_param, corpus_missing

pytestmark = pytest.mark.skipif(bool(corpus_missing()), reason=corpus_missing() or "corpus present")

CASES = [case_param(f"reportstream:{p.name}::{top}", p, top) for p in rs.pairs() for top in rs.top_elements(p)]


@pytest.mark.parametrize(("pair", "top"), CASES or [pytest.param(None, None, id="no-corpus")])
def test_herald_agrees_with_reportstream_or_the_difference_is_justified(pair, top):
    """Every leaf of ReportStream's expected element agrees with Herald or is a justified, listed difference."""
    assert rs.outcome_of(pair) == "converted", rs.outcome_of(pair)
    unexplained = [
        leaf
        for leaf in rs.leaves(pair)
        if (leaf.element == top or leaf.element.startswith(top + "."))
        and not leaf.agrees
        and rs.explained(pair, leaf) is None
    ]
    assert not unexplained, f"Herald: {rs.outcome_of(pair)}\n" + "\n".join(
        f"{leaf.element}: reportstream={leaf.expected!r} herald={leaf.herald!r}" for leaf in unexplained
    )


def test_every_segment_has_pairs():
    """The inventory gives pairs for each segment compared (so a segment cannot silently drop out of the table)."""
    found = {p.segment for p in rs.pairs()}
    assert found == set(rs.SEGMENTS)


def test_every_known_difference_still_occurs():
    """Each row of reportstream_known_differences.toml explains at least one disagreeing leaf today."""
    disagreeing = [(p, leaf) for p in rs.pairs() for leaf in rs.leaves(p) if not leaf.agrees]
    stale = [row for row in rs.known_rows() if not any(rs.row_covers(row, p, leaf) for p, leaf in disagreeing)]
    assert not stale, "rows that no longer occur: " + "; ".join(f"{r.get('segment')} {r['element']}" for r in stale)


def test_wrapping_keeps_their_segment_and_makes_an_adt_a01():
    """The re-wrapped message is ADT^A01 with their separators and segment, an EVN and a minimal PID/PV1."""
    text = "MSH|^~\\&#|||||20230501102531-0400||ORU^R01^ORU_R01|||2.5.1\rPID|1\rNK1|1|DOE^JANE\rOBR|1\r"
    wrapped = rs.wrap(text, "NK1").decode().split("\r")
    assert wrapped[0] == "MSH|^~\\&#|ORACLE||||20230501102531-0400||ADT^A01^ADT_A01|ORACLE-1||2.5.1"
    assert [line[:3] for line in wrapped if line] == ["MSH", "EVN", "PID", "NK1", "PV1"]
    assert "NK1|1|DOE^JANE" in wrapped
    assert rs.MINIMAL_PID in wrapped


def test_leaves_pair_list_items_by_content_not_position():
    """A Herald list in another order (or with an item missing) is compared item by item on content."""
    expected = [{"name": [{"family": "B"}, {"family": "A"}]}]
    actual = [{"name": [{"family": "A"}]}]
    leaves = rs._compare(expected, actual, "Patient")
    assert [(leaf.expected, leaf.agrees) for leaf in leaves] == [("B", False), ("A", True)]
