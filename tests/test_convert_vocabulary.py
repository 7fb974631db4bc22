"""The maps in mappings/: every row has a source, and a broken map fails at start naming the file."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from gateway.conversion.vocabulary import MAPPINGS_DIR, REQUIRED_TABLES, load_vocabulary
from gateway.errors import ConfigError


@pytest.fixture
def mappings(tmp_path) -> Path:
    """A copy of mappings/ to break."""
    target = tmp_path / "mappings"
    shutil.copytree(MAPPINGS_DIR, target)
    return target


def test_every_code_table_row_names_its_source():
    """Each row of every CSV in mappings/tables has a code, a FHIR system URI and a source."""
    for path in sorted((MAPPINGS_DIR / "tables").glob("*.csv")):
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, path.name
        for row in rows:
            assert row["code"].strip() and row["source"].strip(), (path.name, row)
            assert row["fhir_system"].startswith(("http://", "https://", "urn:")), (path.name, row)
    assert {p.stem for p in (MAPPINGS_DIR / "tables").glob("*.csv")} >= set(REQUIRED_TABLES)


def test_table_0112_is_herald_s_own_and_says_so():
    """The IG has no 0112 map: every row of Herald's says it is Herald's, from the UB-04 codes."""
    with (MAPPINGS_DIR / "tables" / "0112-discharge-disposition.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["source"].startswith("Herald: NUBC UB-04") for r in rows)
    assert {r["fhir_code"] for r in rows} <= {
        "home",
        "alt-home",
        "other-hcf",
        "hosp",
        "long",
        "aadvice",
        "exp",
        "psy",
        "rehab",
        "snf",
        "oth",
    }


def test_missing_code_table_is_a_config_error(mappings):
    """A required table that is not there stops the start naming it."""
    (mappings / "tables" / "0112-discharge-disposition.csv").unlink()
    with pytest.raises(ConfigError, match="0112-discharge-disposition"):
        load_vocabulary(mappings / "tables.toml")


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("01,Home,http://x.org,home,Home,\n", "line 2: a row needs a code and a source"),
        ("01,Home,not a uri,home,Home,Herald\n", "line 2: fhir_system must be a URI"),
    ],
)
def test_bad_code_table_row_is_a_config_error_naming_file_and_line(mappings, line, words):
    """A row without a source or with a system that is no URI names the file and line."""
    path = mappings / "tables" / "0112-discharge-disposition.csv"
    path.write_text("code,display,fhir_system,fhir_code,fhir_display,source\n" + line, encoding="utf-8")
    with pytest.raises(ConfigError, match=words):
        load_vocabulary(mappings / "tables.toml")


def test_code_table_without_source_column_is_a_config_error(mappings):
    """A CSV without the source column is refused."""
    path = mappings / "tables" / "0001-administrative-gender.csv"
    path.write_text("code,fhir_system,fhir_code\nF,http://hl7.org/fhir/administrative-gender,female\n")
    with pytest.raises(ConfigError, match="missing column"):
        load_vocabulary(mappings / "tables.toml")


def test_event_with_an_unknown_encounter_status_is_a_config_error(mappings):
    """An event rule naming a status FHIR does not have fails at start."""
    toml = mappings / "tables.toml"
    toml.write_text(toml.read_text().replace('encounter_status = "cancelled"', 'encounter_status = "voided"', 1))
    with pytest.raises(ConfigError, match="events.A11.encounter_status"):
        load_vocabulary(toml)
