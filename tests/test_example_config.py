"""The example configuration ships, works as it is, and `herald check-config` says so (issue 15)."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from gateway.app.cli import main
from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "herald.example.toml"
NO_ENV_KEYS = {"HERALD_KEYS": ""}  # the key file the example names, not the test session's ring


def run(*args, cwd: Path):
    """The CLI as an operator runs it in ``cwd`` (the folder the example was copied to)."""
    import os

    here = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], env=NO_ENV_KEYS)
    finally:
        os.chdir(here)


def test_the_example_works_as_shipped_with_the_commands_it_names(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "herald.example.toml")
    assert run("certs", "init", "--dir", "certs", "--client", "ehr-interface", cwd=tmp_path).exit_code == 0
    keys = run("keys", "init", "--key-file", "keys/herald.key", cwd=tmp_path)
    assert keys.exit_code == 0, keys.output
    checked = run("check-config", "--config", "herald.example.toml", cwd=tmp_path)
    assert checked.exit_code == 0, checked.output
    assert "config OK" in checked.output and "encryption at rest: on" in checked.output
    # The README's old block broke the sample roster's import ("--aco says A1234"); this one does not.
    imported = run(
        "roster", "import", ROOT / "sample_messages" / "roster.csv", "--config", "herald.example.toml", cwd=tmp_path
    )
    assert imported.exit_code == 0, imported.output
    assert (tmp_path / "herald-data" / "roster.db").exists(), "data_dir is relative to the config file"


def test_every_path_in_a_config_file_is_relative_to_the_file(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "herald.toml")
    cfg = load_config(folder / "herald.toml")
    assert cfg.data_dir == folder / "herald-data"
    assert cfg.key_file == folder / "keys" / "herald.key"
    assert Path(cfg.tls_cert) == folder / "certs" / "server.pem"
    assert load_config(folder / "herald.toml", data_dir=tmp_path / "x").data_dir == tmp_path / "x", "--data wins"


def test_check_config_names_what_is_missing(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "herald.example.toml")
    result = run("check-config", "--config", "herald.example.toml", cwd=tmp_path)
    assert result.exit_code == 1
    assert "tls.cert" in result.output and "herald certs init" in result.output
