"""Reading HL7 files for herald send / convert / explain: batches, malformed batches and files with no message."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from synthetic_adt import adt_text

from gateway.app.cli import main
from gateway.app.replay import ReplayError, collect_messages, split_messages

MSG = adt_text().rstrip("\r").split("\r")  # MSH, EVN, PID, PV1


def lines(*parts: str) -> bytes:
    return ("\r".join(parts) + "\r").encode()


def test_a_batch_splits_into_its_messages_without_the_envelope():
    """FHS/BHS ... BTS/FTS around two messages gives the two messages, envelope lines dropped."""
    found = split_messages(lines("FHS|^~\\&", "BHS|^~\\&", *MSG, *MSG, "BTS|2", "FTS|1"))
    assert found == [lines(*MSG), lines(*MSG)]


@pytest.mark.parametrize(
    ("content", "line", "envelope"),
    [
        (lines("BHS|^~\\&", MSG[0], MSG[1], "BHS|^~\\&", *MSG[2:], "BTS|1"), 5, "BHS"),
        (lines(MSG[0], MSG[1], "FHS|^~\\&", *MSG[2:]), 4, "FHS"),
        (lines(*MSG[:3], "BTS|1", MSG[3]), 5, "BTS"),
    ],
    ids=["bhs-inside", "fhs-inside", "segment-after-bts"],
)
def test_a_segment_after_an_envelope_line_inside_a_message_is_refused(content, line, envelope):
    """D2: a BHS/FHS (or BTS) splitting a message is a malformed batch, refused naming the line."""
    with pytest.raises(ReplayError, match=f"line {line}: .* after the {envelope}"):
        split_messages(content)


def test_a_segment_before_the_first_msh_is_refused():
    """Segments ahead of the first MSH belong to no message: refused, not dropped."""
    with pytest.raises(ReplayError, match="line 1: EVN segment before the first MSH"):
        split_messages(lines(MSG[1], *MSG))


def test_collect_messages_names_every_file_without_a_message(tmp_path: Path):
    """A folder with a file holding no MSH is refused naming that file, not skipped silently."""
    (tmp_path / "a.hl7").write_bytes(lines(*MSG))
    (tmp_path / "b.hl7").write_bytes(lines(*MSG[1:]))
    (tmp_path / "c.txt").write_text("just a note\n")
    with pytest.raises(ReplayError) as raised:
        collect_messages([tmp_path])
    assert str(raised.value).splitlines() == [
        f"{tmp_path / 'b.hl7'}: no HL7 message (text starting with MSH) found",
        f"{tmp_path / 'c.txt'}: no HL7 message (text starting with MSH) found",
    ]


def test_send_refuses_a_folder_with_a_file_without_a_message_before_sending(tmp_path: Path):
    """herald send exits 2 naming the file with no MSH and sends nothing (no server is contacted)."""
    (tmp_path / "good.hl7").write_bytes(lines(*MSG))
    (tmp_path / "stray.hl7").write_bytes(lines(*MSG[1:]))
    result = CliRunner().invoke(main, ["send", "127.0.0.1:9", str(tmp_path), "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'stray.hl7'}: no HL7 message" in result.stderr
    assert "nothing was sent" in result.stderr


def test_convert_refuses_a_malformed_batch_naming_file_and_line(tmp_path: Path):
    """herald convert exits 2 on a BHS inside a message, naming the file and the line."""
    path = tmp_path / "bad_batch.hl7"
    path.write_bytes(lines("BHS|^~\\&", MSG[0], MSG[1], "BHS|^~\\&", *MSG[2:], "BTS|1"))
    result = CliRunner().invoke(main, ["convert", str(path)])
    assert result.exit_code == 2, result.output
    assert f"herald convert: {path}: line 5: PID segment after the BHS at line 4" in result.stderr


def test_explain_is_convert_explain(tmp_path: Path):
    """herald explain FILE prints what herald convert FILE --explain prints."""
    path = tmp_path / "a01.hl7"
    path.write_bytes(lines(*MSG))
    explained = CliRunner().invoke(main, ["explain", str(path)])
    converted = CliRunner().invoke(main, ["convert", str(path), "--explain"])
    assert explained.exit_code == 0, explained.output
    assert explained.output == converted.output
    assert "PV1-3" in explained.output
