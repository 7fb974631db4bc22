"""Load the code tables in ``mappings/`` (HL7 v2 table values -> FHIR codes)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ConfigError

MAPPINGS_DIR = Path(__file__).resolve().parent.parent / "mappings"


@dataclass(frozen=True)
class EventRule:
    """How one trigger event becomes a notification."""

    notification: str
    encounter_status: str
    status_by_class: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Vocabulary:
    """The maps the converter reads; see ``mappings/tables.toml`` for the sources."""

    events: dict[str, EventRule]
    gender: dict[str, str]
    patient_class: dict[str, dict[str, str]]
    coding_systems: dict[str, str]
    identifier_systems: dict[str, str]
    mbi_authorities: frozenset[str]


def load_vocabulary(path: Path | None = None) -> Vocabulary:
    """Read ``tables.toml``; raise :class:`ConfigError` naming the table when it is malformed."""
    path = path or MAPPINGS_DIR / "tables.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("mappings", f"{path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("mappings", f"{path}: {e}") from None
    try:
        by_class = data.get("events_by_class", {})
        events = {
            name: EventRule(
                notification=rule["notification"],
                encounter_status=rule["encounter_status"],
                status_by_class={k: v["encounter_status"] for k, v in by_class.get(name, {}).items()},
            )
            for name, rule in data["events"].items()
        }
        return Vocabulary(
            events=events,
            gender={k.upper(): v for k, v in data["gender"].items()},
            patient_class={k.upper(): v for k, v in data["patient_class"].items()},
            coding_systems={k.upper(): v for k, v in data["coding_systems"].items()},
            identifier_systems={k.upper(): v for k, v in data["identifier_systems"].items()},
            mbi_authorities=frozenset(v.upper() for v in data["mbi_authorities"]["values"]),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError("mappings", f"{path}: missing or malformed table entry {e}") from None
