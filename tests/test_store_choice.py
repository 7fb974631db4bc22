"""Choosing the store: ``[storage] store`` (SQLite by default, or a PostgreSQL server), and what a bad choice says."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from conftest import HERALD, ROOT

from gateway.config import STORE_ENV, load_config
from gateway.errors import ConfigError
from gateway.store.postgres import PostgresDatabase, redacted, translate


def config_with(tmp_path, text: str, **kw):
    path = tmp_path / "herald.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, data_dir=tmp_path / "data", **kw)


def test_the_default_is_a_sqlite_file_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    cfg = load_config(None, data_dir=tmp_path)
    assert cfg.database == tmp_path / "herald.db" and not cfg.on_postgres


def test_a_sqlite_url_names_a_file_relative_to_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    cfg = config_with(tmp_path, '[storage]\nstore = "sqlite:///log/gateway.db"\n')
    assert cfg.database == tmp_path / "data" / "log" / "gateway.db"


def test_a_postgresql_url_puts_the_store_on_the_server_and_the_node_files_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    cfg = config_with(tmp_path, '[storage]\nstore = "postgresql://herald:s3cret@db.example:5432/herald"\n')
    assert cfg.on_postgres and isinstance(cfg.database, PostgresDatabase)
    assert cfg.database.url == "postgresql://herald:s3cret@db.example:5432/herald"
    assert cfg.database.with_name("roster.db") == tmp_path / "data" / "roster.db"
    assert "s3cret" not in str(cfg.database) and "s3cret" not in repr(cfg.database), "no password in logs"


def test_the_environment_names_the_store_so_a_password_stays_out_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, "postgresql://herald@127.0.0.1:5/herald")
    cfg = config_with(tmp_path, '[storage]\nstore = "sqlite:///x.db"\n')
    assert cfg.database.url == "postgresql://herald@127.0.0.1:5/herald"


@pytest.mark.parametrize("value", ["mysql://db/herald", "/var/lib/herald.db", "sqlite://relative.db"])
def test_a_store_that_is_neither_says_which_setting_and_what_it_takes(tmp_path, monkeypatch, value):
    monkeypatch.delenv(STORE_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        config_with(tmp_path, f'[storage]\nstore = "{value}"\n')
    assert "storage.store" in str(e.value) and "postgresql://" in str(e.value)


def test_a_claim_lease_shorter_than_a_send_is_refused_on_postgresql(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, "postgresql://herald@127.0.0.1:5/herald")
    with pytest.raises(ConfigError) as e:
        config_with(tmp_path, "[storage]\nclaim_lease_seconds = 30\n[delivery]\ntimeout = 20\n")
    assert "storage.claim_lease_seconds" in str(e.value) and "twice delivery.timeout" in str(e.value)
    monkeypatch.delenv(STORE_ENV)
    config_with(tmp_path, "[storage]\nclaim_lease_seconds = 30\n[delivery]\ntimeout = 20\n")  # SQLite: no claims


def test_a_password_in_the_query_string_is_hidden_too(tmp_path):
    assert redacted("postgresql://u@h/d?sslmode=require&password=s3cret") == (
        "postgresql://u@h/d?sslmode=require&password=***"
    )
    assert "s3cret" not in repr(
        load_config(None, data_dir=tmp_path).__class__(storage_store="postgresql://u:s3cret@h/d")
    )


def test_redacted_hides_only_the_password():
    assert redacted("postgresql://u:p@h:1/d") == "postgresql://u:***@h:1/d"
    assert redacted("postgresql://u@h/d") == "postgresql://u@h/d"


@pytest.mark.parametrize(
    ("sqlite", "postgres"),
    [
        ("SELECT a FROM t WHERE b = ? AND c LIKE 'x%'", "SELECT a FROM t WHERE b = %s AND c LIKE 'x%%'"),
        ("SELECT '?' FROM t WHERE b = ?", "SELECT '?' FROM t WHERE b = %s"),
        ("INSERT OR IGNORE INTO t (a, b) VALUES (?, ?)", "INSERT INTO t (a, b) VALUES (%s, %s) ON CONFLICT DO NOTHING"),
        (
            "INSERT OR REPLACE INTO key_check (name, value) VALUES (?, ?)",
            "INSERT INTO key_check (name, value) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        ),
        ("BEGIN IMMEDIATE", "BEGIN"),
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB, r REAL, k TEXT COLLATE NOCASE) WITHOUT ROWID",
            "CREATE TABLE t (id BIGSERIAL PRIMARY KEY, b BYTEA, r DOUBLE PRECISION, k TEXT COLLATE herald_nocase)",
        ),
    ],
)
def test_statements_are_translated_once_each_into_postgresql(sqlite, postgres):
    assert translate(sqlite) == postgres


def test_serve_with_the_database_unreachable_says_so_without_a_traceback(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://herald:secret@127.0.0.1:{port}/herald"
    done = subprocess.run(
        [*HERALD, "serve", "--listen", "tcp:0:interface=127.0.0.1", "--allow-plain", "--data", str(tmp_path / "d")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, STORE_ENV: url},
    )
    assert done.returncode == 1
    assert "the store: cannot connect to postgresql://herald:***@127.0.0.1" in done.stderr
    assert "Traceback" not in done.stderr and "secret" not in done.stderr
