"""Configuration: defaults, TOML checks that name the key, overrides and recipients."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, Recipient, load_config
from gateway.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "herald.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_with_no_file():
    """load_config(None) works: default data folder, listener, zone and a file drop per role."""
    cfg = load_config(None)
    assert cfg.data_dir == Path("herald-data")
    assert cfg.database == Path("herald-data") / "herald.db"
    assert cfg.listen == ("tls:2575:interface=127.0.0.1",)
    assert cfg.timezone == "UTC"
    assert str(cfg.tzinfo) == "UTC"
    assert set(cfg.recipients) == {"pcp", "care_team", "hie"}
    assert cfg.recipients["care_team"] == Recipient(
        "care_team", True, "file", Path("herald-data") / "outbox" / "care-team"
    )
    assert cfg.pipeline_workers >= 1


def test_empty_file_gives_the_defaults(tmp_path):
    """An empty config file is the same as none."""
    assert load_config(write(tmp_path, "")) == load_config(None)


def test_settings_are_read_from_the_file(tmp_path):
    """Every section's keys land on the Config attribute they name."""
    cfg = load_config(
        write(
            tmp_path,
            """
[server]
listen = ["tcp:2600", "tcp:2601:interface=127.0.0.1"]
allow_plain = true
max_frame_bytes = 2048
idle_timeout = 30
application = "GW"
facility = "HIE"
data_dir = "/srv/herald"

[conversion]
timezone = "America/New_York"

[pipeline]
batch_size = 8
workers = 0

[delivery]
max_attempts = 3
backoff_initial = 0.5
backoff_max = 60
timeout = 10
concurrency = 4
poll_interval = 0.25
""",
        )
    )
    assert cfg.listen == ("tcp:2600", "tcp:2601:interface=127.0.0.1")
    assert (cfg.max_frame_bytes, cfg.idle_timeout, cfg.application, cfg.facility) == (2048, 30, "GW", "HIE")
    assert cfg.data_dir == Path("/srv/herald")
    assert cfg.timezone == "America/New_York"
    assert (cfg.pipeline_batch, cfg.pipeline_workers) == (8, 0)
    assert (cfg.delivery_max_attempts, cfg.delivery_backoff_initial, cfg.delivery_backoff_max) == (3, 0.5, 60)
    assert (cfg.delivery_timeout, cfg.delivery_concurrency, cfg.delivery_poll_interval) == (10, 4, 0.25)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[database]\npath = 'x'\n", "database"),
        ("timezone = 'UTC'\n", "timezone"),
        ("[server]\nport = 2575\n", "server.port"),
        ("[conversion]\ntz = 'UTC'\n", "conversion.tz"),
        ("[recipients.pcp]\nemail = 'a@b'\n", "recipients.pcp.email"),
        ("[recipients.billing]\nchannel = 'file'\n", "recipients.billing"),
    ],
)
def test_unknown_section_or_key_names_it(tmp_path, text, key):
    """An unknown section, setting or recipient role fails naming it."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key
    assert "unknown" in caught.value.reason


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nmax_frame_bytes = '1MB'\n", "server.max_frame_bytes"),
        ("[server]\nmax_frame_bytes = 2048.5\n", "server.max_frame_bytes"),
        ("[server]\nidle_timeout = true\n", "server.idle_timeout"),
        ("[server]\nlisten = 'tcp:2575'\n", "server.listen"),
        ("[server]\nlisten = []\n", "server.listen"),
        ("[server]\nlisten = [2575]\n", "server.listen"),
        ("[pipeline]\nbatch_size = true\n", "pipeline.batch_size"),
        ("[conversion]\ntimezone = 5\n", "conversion.timezone"),
        ("server = 1\n", "server"),
        ("recipients = 'all'\n", "recipients"),
        ("[recipients]\npcp = 'file'\n", "recipients.pcp"),
        ("[recipients.hie]\nenabled = 'yes'\n", "recipients.hie.enabled"),
        ("[recipients.hie]\ndirectory = 5\n", "recipients.hie.directory"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, text, key):
    """A value of the wrong type (bool is not a number) fails naming the key."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key
    assert str(caught.value).startswith(f"config: {key}: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nmax_frame_bytes = 10\n", "server.max_frame_bytes"),
        ("[server]\nidle_timeout = 0\n", "server.idle_timeout"),
        ("[server]\napplication = 'A|B'\n", "server.application"),
        ("[server]\nfacility = ''\n", "server.facility"),
        ("[pipeline]\nbatch_size = 0\n", "pipeline.batch_size"),
        ("[pipeline]\nworkers = -1\n", "pipeline.workers"),
        ("[delivery]\nmax_attempts = -1\n", "delivery.max_attempts"),
        ("[delivery]\nretry_hours = 0\n", "delivery.retry_hours"),
        ("[delivery]\nbackoff_initial = 100\nbackoff_max = 10\n", "delivery.backoff_initial"),
        ("[delivery]\nconcurrency = 0\n", "delivery.concurrency"),
        ("[delivery]\ntimeout = 0\n", "delivery.timeout"),
        ("[delivery]\npoll_interval = -1\n", "delivery.poll_interval"),
    ],
)
def test_impossible_value_names_the_key(tmp_path, text, key):
    """A value of the right type but out of range fails naming the key."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "EST5EDT+", "", "../etc/passwd"])
def test_bad_timezone_is_rejected(tmp_path, zone):
    """A timezone that is not an IANA name fails naming conversion.timezone."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[conversion]\ntimezone = '{zone}'\n"))
    assert caught.value.key == "conversion.timezone"


def test_missing_file_and_bad_toml_name_the_option(tmp_path):
    """A config path that does not exist or is not TOML fails naming --config."""
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "nope.toml")
    assert missing.value.key == "--config"
    with pytest.raises(ConfigError) as broken:
        load_config(write(tmp_path, "[server\n"))
    assert broken.value.key == "--config"
    assert "not valid TOML" in broken.value.reason


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[recipients.hie]\nchannel = 'fhir'\n", "recipients.hie.url"),
        ("[recipients.hie]\nchannel = 'fhir'\nurl = 'ftp://hie.example/fhir'\n", "recipients.hie.url"),
        ("[recipients.hie]\nchannel = 'smtp'\n", "recipients.hie.channel"),
    ],
)
def test_recipient_channel_problems_name_the_key(tmp_path, text, key):
    """A fhir recipient needs an http(s) URL; only known channels are accepted."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key


def test_fhir_recipient_target_is_the_process_message_endpoint(tmp_path):
    """A fhir recipient posts to [base]/$process-message (not doubled when already given)."""
    cfg = load_config(
        write(
            tmp_path,
            """
[recipients.hie]
channel = "fhir"
url = "https://hie.example/fhir/"

[recipients.pcp]
channel = "fhir"
url = "https://pcp.example/fhir/$process-message"
""",
        )
    )
    assert cfg.recipients["hie"] == Recipient("hie", True, "fhir", None, "https://hie.example/fhir/")
    assert cfg.recipients["hie"].target == "https://hie.example/fhir/$process-message"
    assert cfg.recipients["pcp"].target == "https://pcp.example/fhir/$process-message"


def test_disabled_recipient_is_not_returned(tmp_path):
    """Config.recipient(role) is None for a disabled role and for one never configured."""
    cfg = load_config(write(tmp_path, "[recipients.care_team]\nenabled = false\n"))
    assert cfg.recipient("care_team") is None
    assert cfg.recipient("pcp") is not None
    assert Config(recipients={}).recipient("hie") is None


def test_command_line_overrides_win_over_the_file(tmp_path):
    """--data and --listen replace server.data_dir and server.listen from the file."""
    path = write(tmp_path, "[server]\ndata_dir = '/from/file'\nlisten = ['tcp:1']\nallow_plain = true\n")
    cfg = load_config(path, data_dir=tmp_path / "cli", listen=["tcp:2", "tcp:3"])
    assert cfg.data_dir == tmp_path / "cli"
    assert cfg.listen == ("tcp:2", "tcp:3")
    assert cfg.recipients["hie"].directory == tmp_path / "cli" / "outbox" / "hie"
    assert load_config(path, listen=[]).listen == ("tcp:1",)


def test_relative_recipient_directory_is_under_the_data_folder(tmp_path):
    """A relative file-drop directory is resolved under data_dir; an absolute one is kept."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    cfg = load_config(
        write(
            tmp_path,
            f"""
[server]
data_dir = "{data}"

[recipients.pcp]
directory = "drops/pcp"

[recipients.hie]
directory = "{elsewhere}"
""",
        )
    )
    assert cfg.recipients["pcp"].directory == data / "drops" / "pcp"
    assert cfg.recipients["hie"].directory == elsewhere
    assert cfg.recipients["care_team"].directory == data / "outbox" / "care-team"
    assert cfg.recipients["pcp"].target == str(data / "drops" / "pcp")


def test_data_dir_expands_the_home_folder():
    """A data_dir starting with ~ is expanded."""
    assert load_config(None, data_dir="~/herald").data_dir == Path.home() / "herald"


def test_roster_and_matching_sections_are_read(tmp_path):
    """[roster] and [matching] settings reach the Config; the model loads with the thresholds."""
    from gateway.config import match_model

    cfg = load_config(
        write(
            tmp_path,
            """
[roster]
aco_id = "A1234"
format = "ssp"
columns = { member_id = "Patient No", birth_date = "DOB" }
strict = true

[matching]
certain = 40
probable = 25.5
possible = 15
route_probable = false
""",
        )
    )
    assert (cfg.roster_aco_id, cfg.roster_format) == ("A1234", "ssp")
    assert cfg.roster_columns == {"member_id": "Patient No", "birth_date": "DOB"}
    assert cfg.roster_strict is True
    assert (cfg.matching_certain, cfg.matching_probable, cfg.matching_possible) == (40, 25.5, 15)
    assert cfg.matching_route_probable is False
    model = match_model(cfg)
    assert (model.certain, model.probable, model.possible) == (40.0, 25.5, 15.0)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[roster]\nformat = "xlsx"', "roster.format", "is not one of"),
        ("[roster]\naco_id = 7", "roster.aco_id", "expected str"),
        ('[roster]\ncolumns = { shoe_size = "Shoe" }', "roster.columns.shoe_size", "unknown roster column"),
        ('[roster]\ncolumns = { member_id = "" }', "roster.columns.member_id", "header name"),
        ("[roster]\nsheet = 1", "roster.sheet", "unknown setting"),
        ('[roster]\nstrict = "yes"', "roster.strict", "expected bool"),
        ("[matching]\nprobable = 50", "matching.probable", "need certain >= probable >= possible"),
        ("[matching]\ncertain = 30\nprobable = 30", "matching.probable", "must be below matching.certain"),
        ("[matching]\npossible = 30", "matching.possible", "thresholds"),
        ('[matching]\nroute_probable = "yes"', "matching.route_probable", "expected bool"),
        ('[matching]\nmodel = "nowhere.toml"', "matching.model", "does not exist"),
        ("[matching]\ncertain = nan", "matching.certain", "finite"),
    ],
)
def test_bad_roster_or_matching_setting_names_the_key(tmp_path, text, key, words):
    """A bad [roster] or [matching] setting fails at start naming the key."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key, caught.value
    assert words in caught.value.reason


def test_matching_model_path_is_relative_to_the_config_file(tmp_path):
    """A model file named in the config is found next to the config, and a broken one names the key."""
    (tmp_path / "model.toml").write_text("[thresholds]\nroster_size = 'large'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[matching]\nmodel = "model.toml"'))
    assert caught.value.key == "matching.model"
    assert "model.toml: thresholds.roster_size" in caught.value.reason


def test_the_pipeline_validates_a_spread_sample_of_bundles():
    """validate_sample 0.02 validates about one message in fifty, spread over consecutive ids, the same ones on
    a re-run; 1 validates all, 0 none; out of range is refused naming the key."""
    from gateway.pipeline.workers import validated

    chosen = [i for i in range(1, 10_001) if validated(i, 0.02)]
    assert 170 <= len(chosen) <= 230
    assert max(b - a for a, b in zip(chosen, chosen[1:], strict=False)) < 400
    assert chosen == [i for i in range(1, 10_001) if validated(i, 0.02)]
    assert all(validated(i, 1) for i in range(100)) and not any(validated(i, 0) for i in range(100))


def test_validate_sample_is_checked_and_the_environment_wins(tmp_path, monkeypatch):
    """[pipeline] validate_sample = 2 is refused; HERALD_VALIDATE_SAMPLE overrides the file (the suite sets 1)."""
    from gateway.config import VALIDATE_SAMPLE_ENV

    path = tmp_path / "h.toml"
    path.write_text("[pipeline]\nvalidate_sample = 0.5\n")
    monkeypatch.setenv(VALIDATE_SAMPLE_ENV, "1")
    assert load_config(path).pipeline_validate_sample == 1.0
    monkeypatch.delenv(VALIDATE_SAMPLE_ENV)
    assert load_config(path).pipeline_validate_sample == 0.5
    path.write_text("[pipeline]\nvalidate_sample = 2\n")
    with pytest.raises(ConfigError, match="pipeline.validate_sample"):
        load_config(path)
