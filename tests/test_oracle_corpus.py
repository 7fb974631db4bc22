"""The shared ADT corpus: every message converts, is not converted with a reason, or is rejected with a reason.

Reads ``../shared/corpus`` (skips when it is absent). What Herald must do with
the notable files, and which rejection locations are legitimate, is data in
``tests/oracles/corpus_expectations.toml``; open converter defects are in
``tests/oracles/open_defects.toml`` and make their cases strict xfails.
"""

from __future__ import annotations

import pytest
from oracles.corpus import (
    ADT_CORPORA,
    CONVERTED,
    CORPUS,
    NOT_CONVERTED,
    REJECTED,
    accepted_rejections,
    case_param,
    corpus_cases,
    corpus_missing,
    expectation,
    expectation_covers,
    herald_outcome,
    index_files,
    load_table,
)

pytestmark = pytest.mark.skipif(bool(corpus_missing()), reason=corpus_missing() or "corpus present")

CASES = [case_param(c.case_id, c) for corpus in ADT_CORPORA for c in corpus_cases(corpus)]


@pytest.mark.parametrize("case", CASES or [pytest.param(None, id="no-corpus")])
def test_corpus_message_has_a_clear_outcome(case):
    """Each corpus message converts to a valid Bundle, or is not converted / rejected with a legitimate reason."""
    outcome = herald_outcome(case.raw, case.file_error)  # a crash (any other exception) fails here
    if outcome.kind == CONVERTED:
        bundle = outcome.conversion.bundle
        assert bundle["type"] == "message"
        assert bundle["entry"][0]["resource"]["resourceType"] == "MessageHeader"
    else:
        assert outcome.reason.strip(), outcome.describe()
        assert outcome.location, outcome.describe()
    if outcome.kind == REJECTED:
        allowed = accepted_rejections()
        assert outcome.location in allowed, f"rejected at a location not judged legitimate: {outcome.describe()}"
    if outcome.kind == NOT_CONVERTED:
        assert outcome.location == "MSH-9", outcome.describe()
    expected = expectation(case.case_id)
    if expected is not None:
        assert outcome.kind == expected["outcome"], f"{expected['why']} -- Herald: {outcome.describe()}"
        if "location" in expected:
            assert outcome.location == expected["location"], f"{expected['why']} -- Herald: {outcome.describe()}"


@pytest.mark.parametrize("corpus", sorted(ADT_CORPORA))
def test_every_indexed_corpus_file_is_read(corpus):
    """Every message file an INDEX.tsv names exists and yields at least one case, so none is skipped silently."""
    read = {c.file for c in corpus_cases(corpus)}
    missing = [name for name in index_files(corpus) if name not in read]
    assert not missing, f"{corpus}: files named in INDEX.tsv but not read: {missing}"


def test_expectation_rows_each_match_a_corpus_file():
    """Every row of corpus_expectations.toml names at least one corpus message (no stale rows)."""
    ids = [c.case_id for corpus in ADT_CORPORA for c in corpus_cases(corpus)]
    stale = [
        row["case"]
        for row in load_table("corpus_expectations.toml")["expect"]
        if not any(expectation_covers(row, i) for i in ids)
    ]
    assert not stale, f"rows matching no corpus message: {stale}"


def test_python_hl7_batch_files_split_into_their_messages():
    """FHS/BHS files are split into each MSH's message: sample_file1.hl7 holds three, sample_batch1.hl7 two."""
    counts = {c.file: c.count for c in corpus_cases("python-hl7")}
    assert counts["sample_file1.hl7"] == 3
    assert counts["sample_batch1.hl7"] == 2
    assert counts["sample_batch.hl7"] == 1
    assert (CORPUS / "python-hl7" / "sample_file1.hl7").read_bytes().count(b"MSH|") == 3
