"""Load the maps in ``mappings/``: trigger events (``tables.toml``) and HL7 v2
code tables (``tables/*.csv``, one file per table, each row with its source).

The converter reads these once per process; nothing here runs per message.
"""

from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ConfigError
from gateway.resources import mappings_dir

MAPPINGS_DIR = mappings_dir()

#: Encounter.status values an event rule may name; "from-visit" means: as the
#: IG's PV1 map derives it (finished when PV1-45 is valued, else table 0004).
ENCOUNTER_STATUSES = frozenset(
    {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown"}
)
FROM_VISIT = "from-visit"

#: The code tables the converter needs; a missing file is a start-up error.
REQUIRED_TABLES = (
    "0001-administrative-gender",
    "0002-marital-status",
    "0004-encounter-class",
    "0004-encounter-status",
    "0007-admission-type",
    "0052-diagnosis-use",
    "0063-relationship",
    "0085-observation-status",
    "0112-discharge-disposition",
    "0127-allergy-category",
    "0128-allergy-criticality",
    "0131-contact-role",
    "0190-address-type",
    "0190-address-use",
    "0217-encounter-priority",
    "0200-name-use",
    "0201-telecom-use",
    "0202-telecom-system",
    "0203-identifier-type",
    "0396-coding-systems",
    "0443-participation-type",
)


@dataclass(frozen=True, slots=True)
class Coding:
    """One row of a code table: the FHIR coding a v2 code becomes."""

    system: str
    code: str
    display: str = ""

    def as_fhir(self) -> dict:
        """The FHIR Coding as a plain dict (display only when known)."""
        out = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


@dataclass(frozen=True)
class EventRule:
    """How one trigger event becomes a notification.

    ``by_class`` overrides the notification and status for a PV1-2 patient
    class (e.g. an A04 for an emergency patient is an admission under way).
    """

    notification: str
    encounter_status: str
    display: str = ""
    starts_encounter: bool = False
    ends_encounter: bool = False
    retraction: bool = False
    source: str = ""
    by_class: dict[str, tuple[str, str]] = field(default_factory=dict)

    def for_class(self, patient_class: str) -> tuple[str, str]:
        """(notification event code, Encounter.status rule) for a PV1-2 class."""
        return self.by_class.get(patient_class, (self.notification, self.encounter_status))


@dataclass(frozen=True)
class Vocabulary:
    """The maps the converter reads; see ``mappings/`` for each row's source."""

    events: dict[str, EventRule]
    tables: dict[str, dict[str, Coding]]
    coding_systems: dict[str, str]
    identifier_systems: dict[str, str]
    mbi_authorities: frozenset[str]
    npi_authorities: frozenset[str]
    primary_care_roles: frozenset[str]


def load_vocabulary(path: Path | None = None) -> Vocabulary:
    """Read ``tables.toml`` and ``tables/*.csv`` beside it.

    Raises :class:`ConfigError` naming the file (and row) when something is
    missing or malformed.
    """
    path = path or MAPPINGS_DIR / "tables.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("mappings", f"{path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("mappings", f"{path}: {e}") from None
    tables = _load_tables(path.parent / "tables")
    try:
        events = {name: _event_rule(name, rule) for name, rule in data["events"].items()}
        coding_systems = {k.upper(): v.system for k, v in tables["0396-coding-systems"].items()}
        return Vocabulary(
            events=events,
            tables=tables,
            coding_systems=coding_systems,
            identifier_systems={k.upper(): v for k, v in data["identifier_systems"].items()},
            mbi_authorities=frozenset(v.upper() for v in data["mbi_authorities"]["values"]),
            npi_authorities=frozenset(v.upper() for v in data["npi_authorities"]["values"]),
            primary_care_roles=frozenset(v.upper() for v in data["primary_care_roles"]["values"]),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError("mappings", f"{path}: missing or malformed table entry {e}") from None


def _event_rule(name: str, rule: dict) -> EventRule:
    def status(value: str, where: str) -> str:
        if value != FROM_VISIT and value not in ENCOUNTER_STATUSES:
            raise ConfigError("mappings", f"events.{where}.encounter_status: {value!r} is not an Encounter.status")
        return value

    own_status = status(rule["encounter_status"], name)
    by_class = {
        cls.upper(): (
            override.get("notification", rule["notification"]),
            status(override.get("encounter_status", rule["encounter_status"]), f"{name}.by_class.{cls}"),
        )
        for cls, override in rule.get("by_class", {}).items()
    }
    return EventRule(
        notification=rule["notification"],
        encounter_status=own_status,
        display=rule.get("display", ""),
        starts_encounter=bool(rule.get("starts_encounter", False)),
        ends_encounter=bool(rule.get("ends_encounter", False)),
        retraction=bool(rule.get("retraction", False)),
        source=rule.get("source", ""),
        by_class=by_class,
    )


def _load_tables(folder: Path) -> dict[str, dict[str, Coding]]:
    tables: dict[str, dict[str, Coding]] = {}
    for csv_path in sorted(folder.glob("*.csv")):
        rows: dict[str, Coding] = {}
        with csv_path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"code", "fhir_system", "fhir_code", "source"} - set(reader.fieldnames or ())
            if missing:
                raise ConfigError("mappings", f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
            for line, row in enumerate(reader, start=2):
                code = (row["code"] or "").strip()
                if not code or not (row["source"] or "").strip():
                    raise ConfigError("mappings", f"{csv_path}: line {line}: a row needs a code and a source")
                if not (row["fhir_system"] or "").startswith(("http://", "https://", "urn:")):
                    raise ConfigError("mappings", f"{csv_path}: line {line}: fhir_system must be a URI")
                target = (row["fhir_code"] or "").strip()
                rows[code.upper()] = Coding(row["fhir_system"].strip(), target, (row.get("fhir_display") or "").strip())
        tables[csv_path.stem] = rows
    missing_tables = [t for t in REQUIRED_TABLES if t not in tables]
    if missing_tables:
        raise ConfigError("mappings", f"{folder}: missing code table(s) {', '.join(missing_tables)}")
    return tables
