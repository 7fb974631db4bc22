"""The analyst's side of sender profiles: `herald profile check|test|diff`, `convert --profile`, `herald reload`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.app.cli import main
from gateway.pipeline.runner import reload_request_path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_messages"
SHIPPED = ROOT / "mappings" / "senders"
MEDITECH = SAMPLES / "meditech"
MEDITECH_ADMIT = MEDITECH / "meditech-a01-inpatient-admit.hl7"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def explain(result) -> str:
    return f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def config_with(tmp_path: Path, folder: Path, unknown: str = "default") -> Path:
    """A config file whose [profiles] folder is ``folder``."""
    path = tmp_path / "herald.toml"
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n[profiles]\nfolder = "{folder}"\nunknown_senders = "{unknown}"\n',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def senders(tmp_path) -> Path:
    """A copy of the shipped profiles an analyst can edit."""
    folder = tmp_path / "senders"
    shutil.copytree(SHIPPED, folder)
    return folder


# -- check -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in SHIPPED.glob("*.toml")))
def test_profile_check_passes_every_shipped_profile(name):
    """`herald profile check NAME` exits 0 and says what the profile matches and holds."""
    result = run("profile", "check", name)
    assert result.exit_code == 0, explain(result)
    assert result.output.startswith(f"ok: {name} (")


def test_profile_check_of_a_bad_file_exits_2_naming_file_key_and_reason(tmp_path):
    """A bad draft is refused with exit 2 and one line: file, key, reason."""
    draft = tmp_path / "draft.toml"
    draft.write_text('extends = "meditech"\n[match]\napplication = "MT*"\n[codes."PV1.2"]\nIN = "INPT"\n')
    result = run("profile", "check", draft)
    assert result.exit_code == 2, explain(result)
    assert f"herald profile check: {draft}: codes.\"PV1.2\".IN: 'INPT' is not a code of HL7 table 0004" in result.output
    assert "Traceback" not in result.output


def test_profile_check_of_a_draft_that_ties_with_a_shipped_profile_is_refused(tmp_path):
    """A draft is checked with the folder it would join: a tie with a shipped profile is found."""
    draft = tmp_path / "mine.toml"
    draft.write_text('[match]\napplication = "EPIC"\nfacility = "R*"\n')  # as specific as epic-riverview
    result = run("profile", "check", draft)
    assert result.exit_code == 2, explain(result)
    assert "match: ties with" in result.output


def test_profile_check_of_an_unknown_name_exits_2():
    """A name that is no profile in the folder is refused, listing the known ones."""
    result = run("profile", "check", "cerner-somewhere")
    assert result.exit_code == 2, explain(result)
    assert "no profile 'cerner-somewhere'" in result.output and "meditech-bayside" in result.output


# -- test --------------------------------------------------------------------


def test_profile_test_summarises_each_message(tmp_path):
    """`herald profile test` prints ids, class, event, times with offsets and translated codes per message."""
    result = run("profile", "test", "meditech-bayside", MEDITECH)
    assert result.exit_code == 0, explain(result)
    out = result.output
    assert "sample_messages/meditech/meditech-a01-inpatient-admit.hl7" in out
    assert "event: A01 -> notification-admit (Encounter in-progress)" in out
    assert "MB http://hl7.org/fhir/sid/us-mbi|4QW7HN2TK58" in out
    assert "MR urn:oid:2.16.840.1.113883.19.5.3|M000412877" in out
    assert "class: PV1-2 IN -> I -> IMP (inpatient encounter)" in out
    assert "class: PV1-2 ER -> E -> EMER (emergency)" in out
    assert "times: start 2026-12-02T03:35:00-05:00; Bundle.timestamp 2026-12-02T06:52:00-05:00" in out
    assert "codes translated: PV1-2 IN -> I; PV1-14 PHY -> 1; PV1-36 SNF -> 03; PV1-10 IM -> MED" in out
    assert "discharge disposition: snf (Skilled nursing facility)" in out
    assert out.count("valid R4: yes") == 3
    assert "3 message(s), 3 converted to valid FHIR R4" in out


def test_profile_test_warns_of_fields_the_profile_expected(tmp_path):
    """A message without what the profile expects (ZPD-2, PV1-44) is converted, with a warning for each."""
    message = tmp_path / "no-zpd.hl7"
    text = MEDITECH_ADMIT.read_bytes().replace(b"\rZPD|1|4QW7HN2TK58|N", b"").replace(b"|202612020335\r", b"|\r")
    message.write_bytes(text)
    result = run("profile", "test", "meditech-bayside", message)
    assert result.exit_code == 0, explain(result)
    assert "warning: ZPD.2 (MB): expected by the profile but empty or absent" in result.output
    assert "warning: PV1-44: expected by the profile but empty or absent" in result.output


def test_profile_test_says_when_the_pipeline_would_choose_another_profile():
    """Forcing a profile on another sender's message works, with a note that it would not be chosen."""
    result = run("profile", "test", "meditech-bayside", SAMPLES / "epic" / "epic-a04-ed-registration.hl7")
    assert result.exit_code == 0, explain(result)
    assert "note: the pipeline would choose 'epic-riverview' for MSH-3 'EPIC', MSH-4 'RVH'" in result.output


def test_an_analyst_edits_a_draft_and_tests_it(tmp_path, senders):
    """The round trip: copy a profile, add a local code, `profile test` the draft: the new code is translated."""
    draft = tmp_path / "meditech-bayside.toml"
    draft.write_text(
        (senders / "meditech-bayside.toml").read_text() + '\n[codes."PV1.4"]\nERA = "E"\n', encoding="utf-8"
    )
    message = tmp_path / "admit.hl7"
    message.write_bytes(MEDITECH_ADMIT.read_bytes().replace(b"|3N^312^B^BCH||", b"|3N^312^B^BCH|ERA|"))
    result = run("profile", "test", draft, message, "--config", config_with(tmp_path, senders))
    assert result.exit_code == 0, explain(result)
    assert "codes translated: PV1-2 IN -> I; PV1-14 ER -> 7; PV1-10 IM -> MED; PV1-4 ERA -> E" in result.output


def test_profile_test_of_a_bad_profile_exits_2(tmp_path):
    """A profile that does not load stops `profile test` with exit 2 and the file, key and reason."""
    draft = tmp_path / "broken.toml"
    draft.write_text('timezone = "Eastern"\n[match]\napplication = "X"\n')
    result = run("profile", "test", draft, MEDITECH_ADMIT)
    assert result.exit_code == 2, explain(result)
    assert f"{draft}: timezone: 'Eastern' is not an IANA time zone name" in result.output


def test_profile_test_exits_1_when_a_message_does_not_convert(tmp_path):
    """A message the converter refuses is reported with its error, and the command exits 1."""
    message = tmp_path / "no-pv1.hl7"
    message.write_bytes(b"MSH|^~\\&|MEDITECH|BCH|HERALD|ACO|202612020652||ADT^A01|X1|P|2.4\rPID|1||M1^^^BCH^MR\r")
    result = run("profile", "test", "meditech-bayside", message)
    assert result.exit_code == 1, explain(result)
    assert "error: PV1: the ADT message has no PV1 segment" in result.output


# -- diff --------------------------------------------------------------------


def test_profile_diff_says_which_profile_and_why_and_what_it_changed():
    """`herald profile diff` names the chosen profile, why, the one it beat, and the FHIR differences."""
    result = run("profile", "diff", MEDITECH_ADMIT)
    assert result.exit_code == 0, explain(result)
    out = result.output
    assert "profile: meditech-bayside" in out
    assert "why: MSH-3 'MEDITECH' matches MEDITECH*, MSH-4 'BCH' matches BCH (2 criteria, 1 exact)" in out
    assert "also matches, less specific: meditech (MSH-3 MEDITECH*)" in out
    assert "PV1-2: IN -> I  [local code (HL7 table 0004)]" in out
    assert "Encounter.class.code: IN -> IMP" in out
    assert "Encounter.period.start: 2026-12-02T03:35:00+00:00 -> 2026-12-02T03:35:00-05:00" in out
    assert "Patient.identifier[1].system: urn:herald:id:MEDITECH-BCH -> http://hl7.org/fhir/sid/us-mbi" in out
    assert "warning gone: PV1-2: not a table 0004 value" in out


def test_profile_diff_of_an_unknown_sender_says_it_has_no_profile(tmp_path):
    """A sender no profile matches gets the default profile, and the diff says so (and finds no difference)."""
    message = tmp_path / "other.hl7"
    message.write_bytes(MEDITECH_ADMIT.read_bytes().replace(b"|MEDITECH|BCH|", b"|NEWEHR|NEWHOSP|"))
    result = run("profile", "diff", message)
    assert result.exit_code == 0, explain(result)
    assert "profile: default" in result.output and "no profile matches MSH-3 'NEWEHR'" in result.output
    assert "(no difference)" in result.output


# -- convert -----------------------------------------------------------------


def test_convert_picks_the_senders_profile():
    """`herald convert` reads a message with the profile its MSH-3/MSH-4 select, and says which."""
    result = run("convert", MEDITECH_ADMIT)
    assert result.exit_code == 0, explain(result)
    bundle = json.loads(result.stdout)
    assert bundle["entry"][1]["resource"]["class"]["code"] == "IMP"
    assert "sender profile meditech-bayside (6 change(s)" in result.output


def test_convert_with_the_default_profile_shows_the_standard_maps_alone():
    """`--profile default` converts as if the sender had no profile: class IN without a system."""
    result = run("convert", MEDITECH_ADMIT, "--profile", "default")
    assert result.exit_code == 0, explain(result)
    assert json.loads(result.stdout)["entry"][1]["resource"]["class"] == {"code": "IN"}


def test_convert_with_a_profile_file(tmp_path):
    """`--profile FILE.toml` uses a draft file (checked with the configured folder)."""
    draft = tmp_path / "bayside-draft.toml"
    draft.write_text(
        'extends = "meditech"\ntimezone = "America/Chicago"\n[match]\napplication = "MT-DRAFT"\n', encoding="utf-8"
    )
    result = run("convert", MEDITECH_ADMIT, "--profile", draft)
    assert result.exit_code == 0, explain(result)
    encounter = json.loads(result.stdout)["entry"][1]["resource"]
    assert encounter["class"]["code"] == "IMP" and encounter["period"]["start"].endswith("-06:00")


# -- reload and serve --------------------------------------------------------


def test_reload_checks_the_profiles_then_asks_the_server(tmp_path, senders):
    """`herald reload` checks the folder, then writes the file the server watches."""
    config = config_with(tmp_path, senders)
    (tmp_path / "data").mkdir()
    result = run("reload", "--config", config)
    assert result.exit_code == 0, explain(result)
    assert "9 profiles" in result.output and "check out" in result.output
    assert reload_request_path(tmp_path / "data").is_file()


def test_reload_of_a_bad_folder_asks_nothing(tmp_path, senders):
    """A folder that does not load: exit 2 with file, key and reason; the server is not asked."""
    bad = '[match]\napplication = "EPIC*"\n[[identifiers]]\nfield = "ZPD.2"\ntype = "MB"\n'
    (senders / "epic.toml").write_text(bad, encoding="utf-8")
    config = config_with(tmp_path, senders)
    (tmp_path / "data").mkdir()
    result = run("reload", "--config", config)
    assert result.exit_code == 2, explain(result)
    assert f"herald reload: {senders / 'epic.toml'}: identifiers[1].field: ZPD is a Z-segment" in result.output
    assert "nothing was reloaded" in result.output
    assert not reload_request_path(tmp_path / "data").exists()


def test_serve_refuses_to_start_with_a_bad_profile(tmp_path, senders):
    """`herald serve` says which profile is bad (file, key, reason) before it listens."""
    (senders / "athena.toml").write_text('timezone = "Pacific"\n[match]\napplication = "ATHENA*"\n')
    config = config_with(tmp_path, senders)
    result = run("serve", "--config", config, "--listen", "tcp:0:interface=127.0.0.1", "--allow-plain")
    assert result.exit_code == 1, explain(result)
    assert f"sender profile {senders / 'athena.toml'}: timezone: 'Pacific' is not an IANA" in result.output


def test_readme_documents_the_profile_commands():
    """Every profile command, and the file format, is in the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for text in ("herald profile check", "herald profile test", "herald profile diff", "herald reload", "[profiles]"):
        assert text in readme, text
