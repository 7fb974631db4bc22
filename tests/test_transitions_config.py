"""[transitions], [alerts."FACILITY"] and [cds_hooks]: read with paths relative to the file, bad values named."""

from __future__ import annotations

import pytest

from gateway.app.transitions_service import alert_targets, load_pcp_phones
from gateway.config import load_config
from gateway.errors import ConfigError

GOOD = """
[transitions]
ed_close_hours = 12
snf_facilities = ["MAPLE"]
pcp_phones = "phones.csv"

[transitions.acos."A1"]
name = "Lakeshore ACO"

[alerts."LSR"]
mllp = { host = "10.0.0.5", port = 6661, ca = "certs/ed-ca.pem" }
message = "ORU^R01"

[cds_hooks]
listen = "tls:8443"
[[cds_hooks.issuers]]
iss = "https://ehr.example"
jwks = "jwks.json"
facility = "LSR"
"""


def test_the_sections_are_read_with_paths_relative_to_the_file(tmp_path):
    """Every file a section names is relative to the config file; the alert's target is mllp://host:port."""
    path = tmp_path / "herald.toml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.transitions_ed_close_hours == 12
    assert cfg.transitions_snf_facilities == ("MAPLE",)
    assert cfg.transitions_pcp_phones == tmp_path / "phones.csv"
    assert cfg.alerts["LSR"]["message"] == "ORU^R01"
    assert cfg.alerts["LSR"]["cds_hooks"] is True
    assert cfg.alerts["LSR"]["mllp"]["ca"] == str(tmp_path / "certs" / "ed-ca.pem")
    assert cfg.cds_hooks_issuers[0]["jwks"] == str(tmp_path / "jwks.json")
    assert alert_targets(cfg) == {"mllp://10.0.0.5:6661": cfg.alerts["LSR"]["mllp"]}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[transitions]\ned_close_hours = 0\n", "transitions.ed_close_hours"),
        ("[transitions]\nsnf_facilities = ['']\n", "transitions.snf_facilities"),
        ('[transitions.acos."A1"]\nphone = "1"\n', "transitions.acos.A1.phone"),
        ('[alerts."LSR"]\nmessage = "ADT^A01"\n', "alerts.LSR.message"),
        ('[alerts."LSR"]\nmllp = { port = 1 }\n', "alerts.LSR.mllp.host"),
        ('[alerts."LSR"]\nmllp = { host = "h", port = 70000 }\n', "alerts.LSR.mllp.port"),
        ('[alerts."LSR"]\nmllp = { host = "h", port = 1, colour = "red" }\n', "alerts.LSR.mllp.colour"),
        ('[alerts."LSR"]\ncds_hooks = "yes"\n', "alerts.LSR.cds_hooks"),
        ('[cds_hooks]\nlisten = "tls:8443"\n', "cds_hooks.issuers"),
        ('[cds_hooks]\nlisten = "tcp:8443"\n[[cds_hooks.issuers]]\niss = "a"\njwks = "b"\n', "cds_hooks.listen"),
        ('[cds_hooks]\nlisten = "tls:8443"\n[[cds_hooks.issuers]]\niss = "a"\n', "cds_hooks.issuers[1].jwks"),
        ('[cds_hooks]\nlisten = "ssl:8443"\n[[cds_hooks.issuers]]\niss = "a"\njwks = "b"\n', "cds_hooks.listen"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path, text, key):
    """A wrong value fails at start with the setting's name."""
    path = tmp_path / "herald.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key, caught.value


def test_the_pcp_phone_file_needs_its_columns(tmp_path):
    """pcp_phones is a CSV of npi,phone; another file is refused naming the setting."""
    good = tmp_path / "phones.csv"
    good.write_text("npi,phone\n1234567893,203-555-0100\n")
    assert load_pcp_phones(good) == {"1234567893": "203-555-0100"}
    bad = tmp_path / "bad.csv"
    bad.write_text("doctor,number\nx,y\n")
    with pytest.raises(ConfigError, match="transitions.pcp_phones"):
        load_pcp_phones(bad)
