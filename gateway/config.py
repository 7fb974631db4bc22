"""Configuration: one TOML file, every setting with a default.

``load_config(None)`` gives a working configuration with no file at all. Any
unknown key, wrong type or impossible value fails at start with
:class:`~gateway.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import ConfigError
from gateway.records import MEMBER_COLUMNS, ROLES

CHANNELS = ("file", "fhir")


@dataclass(frozen=True)
class Recipient:
    """Where notifications for one role go."""

    role: str
    enabled: bool = True
    channel: str = "file"
    directory: Path | None = None  # file channel
    url: str = ""  # fhir channel: base URL; $process-message is appended

    @property
    def target(self) -> str:
        if self.channel == "file":
            return str(self.directory)
        base = self.url.rstrip("/")
        return base if base.endswith("$process-message") else base + "/$process-message"


@dataclass(frozen=True)
class Config:
    """Herald's settings (see README.md, "Configuration")."""

    data_dir: Path = Path("herald-data")
    listen: tuple[str, ...] = ("tcp:2575:interface=127.0.0.1",)
    max_frame_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    application: str = "HERALD"
    facility: str = "HERALD"
    timezone: str = "UTC"
    pipeline_batch: int = 64
    pipeline_enabled: bool = True
    pipeline_workers: int = field(default_factory=lambda: _default_workers())
    delivery_max_attempts: int = 8
    delivery_backoff_initial: float = 2.0
    delivery_backoff_max: float = 600.0
    delivery_timeout: float = 30.0
    delivery_concurrency: int = 16
    delivery_poll_interval: float = 1.0
    recipients: dict[str, Recipient] = field(default_factory=dict)
    roster_aco_id: str = ""
    roster_format: str = "auto"
    roster_columns: dict[str, str] = field(default_factory=dict)
    roster_strict: bool = False  # a column no roster column reads refuses the file (`roster import --strict`)
    matching_model: Path | None = None
    matching_certain: float | None = None
    matching_probable: float | None = None
    matching_possible: float | None = None
    matching_route_probable: bool = True

    @property
    def database(self) -> Path:
        return self.data_dir / "herald.db"

    @property
    def tzinfo(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def recipient(self, role: str) -> Recipient | None:
        r = self.recipients.get(role)
        return r if r is not None and r.enabled else None


_SCHEMA: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    # section -> key -> (Config attribute, accepted types)
    "server": {
        "listen": ("listen", list),
        "max_frame_bytes": ("max_frame_bytes", int),
        "idle_timeout": ("idle_timeout", (int, float)),
        "application": ("application", str),
        "facility": ("facility", str),
        "data_dir": ("data_dir", str),
    },
    "conversion": {"timezone": ("timezone", str)},
    "pipeline": {
        "batch_size": ("pipeline_batch", int),
        "workers": ("pipeline_workers", int),
        "enabled": ("pipeline_enabled", bool),
    },
    "delivery": {
        "max_attempts": ("delivery_max_attempts", int),
        "backoff_initial": ("delivery_backoff_initial", (int, float)),
        "backoff_max": ("delivery_backoff_max", (int, float)),
        "timeout": ("delivery_timeout", (int, float)),
        "concurrency": ("delivery_concurrency", int),
        "poll_interval": ("delivery_poll_interval", (int, float)),
    },
    "roster": {
        "aco_id": ("roster_aco_id", str),
        "format": ("roster_format", str),
        "columns": ("roster_columns", dict),
        "strict": ("roster_strict", bool),
    },
    "matching": {
        "model": ("matching_model", str),
        "certain": ("matching_certain", (int, float)),
        "probable": ("matching_probable", (int, float)),
        "possible": ("matching_possible", (int, float)),
        "route_probable": ("matching_route_probable", bool),
    },
}

ROSTER_FORMATS = ("auto", "csv", "ssp", "cclf8")

_RECIPIENT_KEYS = {"enabled": bool, "channel": str, "directory": str, "url": str}


#: Each role's file drop, under the data folder's ``outbox/``, when no directory is configured.
OUTBOX_FOLDERS = {"pcp": "pcp", "care_team": "care-team", "hie": "hie"}


def default_recipients(data_dir: Path) -> dict[str, Recipient]:
    """File drops under the data folder for every role: what works with no config."""
    return {role: Recipient(role, True, "file", data_dir / "outbox" / OUTBOX_FOLDERS[role]) for role in ROLES}


def load_config(
    path: Path | str | None = None,
    *,
    data_dir: Path | str | None = None,
    listen: list[str] | tuple[str, ...] | None = None,
) -> Config:
    """Read a TOML config (or none), apply command-line overrides, check everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"{p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{p} is not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    for section, content in raw.items():
        if section == "recipients":
            continue
        keys = _SCHEMA.get(section)
        if keys is None:
            raise ConfigError(section, f"unknown section (known: {', '.join([*_SCHEMA, 'recipients'])})")
        if not isinstance(content, dict):
            raise ConfigError(section, "must be a table")
        for key, value in content.items():
            if key not in keys:
                raise ConfigError(f"{section}.{key}", f"unknown setting (known: {', '.join(keys)})")
            attr, types = keys[key]
            if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
                raise ConfigError(f"{section}.{key}", f"expected {_type_name(types)}, got {type(value).__name__}")
            values[attr] = value
    if data_dir is not None:
        values["data_dir"] = data_dir
    if listen:
        values["listen"] = list(listen)
    base = Path(values.pop("data_dir", Config.data_dir)).expanduser()
    if "listen" in values:
        if not values["listen"] or not all(isinstance(x, str) and x for x in values["listen"]):
            raise ConfigError("server.listen", "must be a non-empty list of endpoint strings")
        values["listen"] = tuple(values["listen"])
    if values.get("matching_model"):
        model = Path(values["matching_model"]).expanduser()
        values["matching_model"] = model if model.is_absolute() or path is None else Path(path).parent / model
    recipients = default_recipients(base)
    configured = raw.get("recipients", {})
    if not isinstance(configured, dict):
        raise ConfigError("recipients", "must be a table")
    for role, content in configured.items():
        recipients[role] = _recipient(role, content, base)
    cfg = Config(data_dir=base, recipients=recipients, **values)
    _check(cfg)
    return cfg


def _recipient(role: str, content: Any, base: Path) -> Recipient:
    key = f"recipients.{role}"
    if role not in ROLES:
        raise ConfigError(key, f"unknown recipient role (known: {', '.join(ROLES)})")
    if not isinstance(content, dict):
        raise ConfigError(key, "must be a table")
    for k, v in content.items():
        if k not in _RECIPIENT_KEYS:
            raise ConfigError(f"{key}.{k}", f"unknown setting (known: {', '.join(_RECIPIENT_KEYS)})")
        if not isinstance(v, _RECIPIENT_KEYS[k]):
            raise ConfigError(f"{key}.{k}", f"expected {_type_name(_RECIPIENT_KEYS[k])}")
    channel = content.get("channel", "file")
    if channel not in CHANNELS:
        raise ConfigError(f"{key}.channel", f"{channel!r} is not one of {', '.join(CHANNELS)}")
    enabled = content.get("enabled", True)
    if channel == "fhir":
        url = content.get("url", "")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url", "a fhir channel needs an http:// or https:// base URL")
        return Recipient(role, enabled, "fhir", None, url)
    folder = OUTBOX_FOLDERS[role]
    directory = Path(content.get("directory", "")) if content.get("directory") else Path("outbox") / folder
    if not directory.is_absolute():
        directory = base / directory
    return Recipient(role, enabled, "file", directory, "")


def _check(cfg: Config) -> None:
    if cfg.max_frame_bytes < 1024:
        raise ConfigError("server.max_frame_bytes", "must be at least 1024")
    if cfg.idle_timeout <= 0:
        raise ConfigError("server.idle_timeout", "must be positive")
    for name, value in (("server.application", cfg.application), ("server.facility", cfg.facility)):
        if not value or any(c in value for c in "|^~\\&\r\n"):
            raise ConfigError(name, "must be non-empty and free of HL7 separator characters")
    try:
        ZoneInfo(cfg.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("conversion.timezone", f"{cfg.timezone!r} is not an IANA time zone name") from None
    if cfg.pipeline_batch < 1:
        raise ConfigError("pipeline.batch_size", "must be at least 1")
    if cfg.pipeline_workers < 0:
        raise ConfigError("pipeline.workers", "must be 0 (convert in the server process) or more")
    if cfg.delivery_max_attempts < 1:
        raise ConfigError("delivery.max_attempts", "must be at least 1")
    if cfg.delivery_backoff_initial <= 0 or cfg.delivery_backoff_max < cfg.delivery_backoff_initial:
        raise ConfigError("delivery.backoff_initial", "must be positive and not above delivery.backoff_max")
    if cfg.delivery_concurrency < 1:
        raise ConfigError("delivery.concurrency", "must be at least 1")
    if cfg.delivery_timeout <= 0:
        raise ConfigError("delivery.timeout", "must be positive")
    if cfg.delivery_poll_interval <= 0:
        raise ConfigError("delivery.poll_interval", "must be positive")
    _check_roster(cfg)
    _check_matching(cfg)


def _check_roster(cfg: Config) -> None:
    if cfg.roster_format not in ROSTER_FORMATS:
        raise ConfigError("roster.format", f"{cfg.roster_format!r} is not one of {', '.join(ROSTER_FORMATS)}")
    if cfg.roster_aco_id != cfg.roster_aco_id.strip():
        raise ConfigError("roster.aco_id", "must not start or end with spaces")
    for column, header in cfg.roster_columns.items():
        if column not in MEMBER_COLUMNS:
            raise ConfigError(f"roster.columns.{column}", f"unknown roster column (known: {', '.join(MEMBER_COLUMNS)})")
        if not isinstance(header, str) or not header.strip():
            raise ConfigError(f"roster.columns.{column}", "expected the header name in the file (a non-empty string)")


def _check_matching(cfg: Config) -> None:
    """Load the match model with the configured thresholds now, so a bad one fails at start."""
    if cfg.matching_model is not None and not cfg.matching_model.is_file():
        raise ConfigError("matching.model", f"{cfg.matching_model} does not exist")
    given = list(_thresholds(cfg).items())
    for key, value in given:
        if not math.isfinite(value):
            raise ConfigError(f"matching.{key}", "must be a finite number")
    for (hi_key, hi), (lo_key, lo) in zip(given, given[1:], strict=False):
        if hi <= lo:
            raise ConfigError(f"matching.{lo_key}", f"must be below matching.{hi_key} ({hi})")
    try:
        match_model(cfg)
    except ConfigError as e:
        # The model checks its thresholds against each other and its own table.
        key = "matching.model" if cfg.matching_model is not None else "matching"
        if "thresholds" in e.reason and given:
            key = f"matching.{given[-1][0]}"
        raise ConfigError(key, e.reason) from None


def match_model(cfg: Config):
    """The match model (``gateway.matching.MatchModel``) with the configured thresholds."""
    from gateway.matching import load_model

    overrides = {k: float(v) for k, v in _thresholds(cfg).items()}
    return load_model(cfg.matching_model, **overrides)


def _thresholds(cfg: Config) -> dict[str, float]:
    """The grade thresholds the config sets (certain, probable, possible; unset ones left out)."""
    return {k: v for k in ("certain", "probable", "possible") if (v := getattr(cfg, f"matching_{k}")) is not None}


def check_listen(endpoints: tuple[str, ...], reactor) -> None:
    """Parse each endpoint string now, so a typo fails at start naming it."""
    from twisted.internet.endpoints import serverFromString

    for spec in endpoints:
        try:
            serverFromString(reactor, spec)
        except Exception as e:
            raise ConfigError("server.listen", f"{spec!r} is not a valid endpoint: {e}") from None


def _default_workers() -> int:
    """One conversion process per core (they run at a lower priority than the server)."""
    import os

    return max(1, os.cpu_count() or 1)


def _type_name(types) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__
