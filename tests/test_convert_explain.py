"""`herald convert FILE --explain`: the provenance the converter records as it maps."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import pytest
from click.testing import CliRunner
from synthetic_adt import adt, adt_text, segment

from gateway.app.cli import main
from gateway.conversion.convert import convert
from gateway.conversion.explain import explain_lines

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"


def test_trace_is_recorded_only_when_asked(vocab):
    """Without explain=True the converter records nothing; with it, each used field and its target."""
    assert convert(adt(), vocab, UTC).trace is None
    trace = convert(adt(), vocab, UTC, explain=True).trace
    used = {(seg.name, n, target) for seg, n, target in trace}
    assert ("PID", 5, "Patient.name") in used
    assert ("PV1", 19, "Encounter.identifier") in used
    assert ("PV1", 44, "Encounter.period.start") in used


def test_explaining_does_not_change_the_bundle(vocab):
    """The Bundle is the same with and without the trace."""
    plain = convert(adt("A03", pv1={45: "20260302100000"}), vocab, UTC)
    explained = convert(adt("A03", pv1={45: "20260302100000"}), vocab, UTC, explain=True)
    assert plain.bundle == explained.bundle


def test_explain_lists_mapped_fields_with_names_values_targets_and_unmapped_ones(vocab):
    """Each used field shows its HL7 name (per version), value and FHIR target; unused ones are listed apart."""
    msg = adt(pv1={18: "IN"}, after_pv1=(segment("ZPD", {1: "1", 2: "FALLRISK^Y"}),))
    lines = explain_lines(msg, convert(msg, vocab, UTC, explain=True))
    text = "\n".join(lines)
    mapped, _, unmapped = text.partition("Present but not mapped:")
    assert "PID-5         Patient name: TESTPATIENT^ALEX^Q^^^^L" in mapped
    assert "-> Patient.name" in mapped
    assert "PV1-18        Patient type: IN" in unmapped
    assert "ZPD-2         (not in HL7 2.5.1): FALLRISK^Y" in unmapped
    assert "PV1-18" not in mapped


def test_explain_names_fields_by_the_messages_version(vocab):
    """PID-7 is 'Date of birth' in v2.3 and 'Date time of birth' in v2.5.1 (hl7apy's names)."""
    older = adt(version="2.3")
    newer = adt(version="2.5.1")
    assert any(
        "PID-7         Date of birth" in line for line in explain_lines(older, convert(older, vocab, UTC, explain=True))
    )
    assert any(
        "PID-7         Date time of birth" in line
        for line in explain_lines(newer, convert(newer, vocab, UTC, explain=True))
    )


def test_explain_says_why_an_ssn_was_left_out(vocab):
    """A field used on purpose for nothing (an SSN) says so rather than looking unmapped."""
    msg = adt(pid={19: "123-45-6789"})
    text = "\n".join(explain_lines(msg, convert(msg, vocab, UTC, explain=True)))
    assert "(left out: SSNs are not forwarded)" in text


def test_explain_of_a_conversion_without_trace_is_refused(vocab):
    """explain_lines needs a conversion made with explain=True."""
    msg = adt()
    with pytest.raises(ValueError):
        explain_lines(msg, convert(msg, vocab, UTC))


def test_cli_convert_explain_prints_the_explanation(tmp_path):
    """`herald convert FILE --explain` prints the explanation of each message instead of JSON."""
    path = tmp_path / "a03.hl7"
    path.write_text(adt_text("A03", pv1={45: "20260302100000", 36: "01"}))
    result = CliRunner().invoke(main, ["convert", str(path), "--explain"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{path}: ADT^A03 v2.5.1 -> notification-discharge")
    assert "PV1-36        Discharge disposition: 01" in result.output
    assert "-> Encounter.hospitalization.dischargeDisposition" in result.output
    assert '"resourceType"' not in result.output


def test_cli_convert_explain_of_a_bad_message_exits_2(tmp_path):
    """--explain on a message that cannot be converted exits 2 naming the field, as convert does."""
    path = tmp_path / "no-pv1.hl7"
    path.write_text(adt_text().split("PV1|")[0])
    result = CliRunner().invoke(main, ["convert", str(path), "--explain"])
    assert result.exit_code == 2
    assert "PV1" in result.output
