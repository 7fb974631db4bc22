"""Configuration: one TOML file, every setting with a default.

``load_config(None)`` gives a working configuration with no file at all. Any
unknown key, wrong type or impossible value fails at start with
:class:`~gateway.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import ConfigError
from gateway.limits import Limits
from gateway.records import MEMBER_COLUMNS, ROLES
from gateway.store.postgres import PostgresDatabase, parse_store

CHANNELS = ("file", "fhir")


@dataclass(frozen=True)
class Recipient:
    """Where notifications for one role go."""

    role: str
    enabled: bool = True
    channel: str = "file"
    directory: Path | None = None  # file channel
    url: str = ""  # fhir channel: base URL; $process-message is appended
    #: File channel: seal each file drop (``<id>.json.sealed``)? None: when the folder is under the data folder.
    encrypt: bool | None = None
    #: FHIR channel: its settings as ``FhirDestination.from_settings`` reads them (TLS files, timeout, auth).
    fhir: dict = field(default_factory=dict, compare=False)

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
    listen: tuple[str, ...] = ("tls:2575:interface=127.0.0.1",)
    max_frame_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    application: str = "HERALD"
    facility: str = "HERALD"
    timezone: str = "UTC"
    #: Messages a worker takes a batch, at most (a backlog's; a steady trickle makes small batches). 512, not
    #: 64: fewer round trips per message drained (bench/README.md, Issue 16 again: +36 % routed a second).
    pipeline_batch: int = 512
    pipeline_enabled: bool = True
    pipeline_workers: int = field(default_factory=lambda: _default_workers())
    #: The share of messages whose Bundle the pipeline validates with fhir.resources (the converter's output is
    #: proven valid by the test suite; a sample keeps checking it in production). ``herald convert`` validates all.
    pipeline_validate_sample: float = field(default_factory=lambda: _default_validate_sample())
    delivery_max_attempts: int = 0  # 0: no limit by count; the retry horizon decides
    delivery_retry_hours: float = 72.0
    delivery_per_destination: int = 4  # attempts at once to one destination (of delivery_concurrency)
    delivery_backoff_initial: float = 2.0
    delivery_backoff_max: float = 600.0
    delivery_timeout: float = 30.0
    delivery_concurrency: int = 64
    delivery_poll_interval: float = 1.0
    recipients: dict[str, Recipient] = field(default_factory=dict)
    #: ``[direct]``: the SMTP relay and our Direct certificate, for recipients' Direct channels.
    direct_relay: dict = field(default_factory=dict, compare=False)
    roster_aco_id: str = ""
    roster_format: str = "auto"
    roster_columns: dict[str, str] = field(default_factory=dict)
    roster_strict: bool = False  # a column no roster column reads refuses the file (`roster import --strict`)
    #: The site's own roster columns Herald is not to read (header names or shell patterns, any case).
    roster_ignored: tuple[str, ...] = ()
    matching_model: Path | None = None
    matching_certain: float | None = None
    matching_probable: float | None = None
    matching_possible: float | None = None
    matching_route_probable: bool = True
    # [transitions], [alerts."FACILITY"], [cds_hooks] (README, "Care transitions").
    transitions_enabled: bool = True
    transitions_worklist: Path | None = None  # None: the shipped mappings/worklist.toml
    transitions_ed_close_hours: float = 24.0  # an ED visit with no A03 is closed this long after it began
    transitions_snf_facilities: tuple[str, ...] = ()  # facilities (as the timeline names them) that are SNFs
    transitions_poll_seconds: float = 5.0
    transitions_pcp_phones: Path | None = None  # a CSV file of npi,phone: the PCP's number the e-alert gives
    #: Per ACO id: {"name": ..., "care_manager_phone": ...}, what the e-alert says of the ACO.
    transitions_acos: dict = field(default_factory=dict, compare=False)
    #: Per facility: {"mllp": {host, port, ...}, "message": "MDM^T02" | "ORU^R01", "cds_hooks": bool}.
    alerts: dict = field(default_factory=dict, compare=False)
    cds_hooks_listen: str = ""  # "": no CDS Hooks service; else tls:PORT[:interface=ADDRESS]
    cds_hooks_base_url: str = ""  # the URL EHRs call (their JWT's aud); "": https://<interface>:<port>/cds-services
    #: Trusted EHRs: ({"iss": ..., "jwks": file path or https URL, "facility": ...}, ...).
    cds_hooks_issuers: tuple = field(default=(), compare=False)
    # [storage] and [retention] (README, "Audit trail, retention and disk").
    #: Where the store is: "" (default) or sqlite:///<path> for a SQLite file (one node), or
    #: postgresql://user@host:port/db for a PostgreSQL database several nodes share (README, "One node or several").
    storage_store: str = field(default="", repr=False)  # may hold a password
    #: PostgreSQL: how long a node holds work it claimed; a dead node's work waits this long for another.
    storage_claim_lease_seconds: float = 300.0
    storage_reserve_mb: float = 64.0  # below this much free space the pipeline and delivery pause
    storage_wal_limit_mb: float = 64.0  # the write-ahead log is truncated beyond this
    #: SQLite: intake's commits made on the reactor's thread when the writer thread is idle (Writer.inline).
    storage_commit_on_reactor: bool = True
    retention_days: int = 0  # 0: bodies are kept; else purged this many days after receipt, work done
    # [limits] (README, "Bounded input"): the message limits, then the connection's and the peer's.
    limits: Limits = Limits()
    frame_timeout: float = 60.0
    max_connections: int = 256
    max_connections_per_peer: int = 32
    rejected_sample: int = 10
    rejected_window: float = 60.0
    rejected_bytes_kept: int = 4096

    # [security] (README, "Encryption at rest"): the key ring that seals PHI at rest.
    key_file: Path | None = None  # default: <data_dir>/keys/herald.key; HERALD_KEYS wins over it
    encrypt_at_rest: bool = True

    # Transport security (README, "Transport security"): server.allow_plain, [tls], [[senders]],
    # [security] unknown_senders.
    allow_plain: bool = False  # tcp: (plain) listeners are refused unless this is set
    tls_cert: Path | None = None  # None: <data_dir>/certs/server.pem (what `herald certs init` makes)
    tls_key: Path | None = None  # None: <data_dir>/certs/server-key.pem
    tls_ca: Path | None = None  # client certificates must chain to these; None: <data_dir>/certs/ca.pem
    tls_min_version: str = "1.2"
    senders: tuple[SenderRule, ...] = ()
    unknown_senders: str | None = None  # "reject" | "accept"; None: reject, except plain from loopback

    # [profiles] (README, "Sender profiles"): how each sender's dialect is read. Not [security]
    # unknown_senders (who may connect): this one says how a sender with no profile is converted.
    profiles_folder: Path | None = None  # None: the shipped mappings/senders
    profiles_unknown_senders: str = "default"  # "default": the default profile, flagged; "reject": failed

    # [health] (README, "Health, metrics and logs"): the HTTP listener of /healthz, /readyz and /metrics.
    health_enabled: bool = True
    health_listen: str = "tcp:9102:interface=127.0.0.1"
    health_stall_seconds: float = 300.0  # /readyz fails when a message waits this long for the pipeline
    health_dead_letters: int = 0  # ... or a destination has more dead notifications than this
    health_pending_minutes: float = 60.0  # ... or its oldest unsent notification has waited this long
    #: Per destination (as the outbox names it): {"dead_letters": N, "pending_minutes": M}, over the two above.
    health_destinations: dict = field(default_factory=dict, compare=False)
    # [logging]: text or JSON lines, the lowest level written, and a file (None: standard error).
    log_format: str = "text"
    log_level: str = "info"
    log_file: Path | None = None
    # [console] (README, "Web console"): the interface analysts' web console, behind a login.
    console_enabled: bool = False  # off until an operator has added users and turns it on
    console_listen: str = "tls:8443:interface=127.0.0.1"  # tls: the [tls] server certificate; tcp: needs allow_plain
    console_session_hours: float = 8.0  # a login lasts this long
    console_login_attempts: int = 5  # failed logins a user name may have in 15 minutes (a client address: 4 times)

    def destination_thresholds(self, destination: str) -> tuple[int, float]:
        """(dead letters allowed, minutes a notification may wait) at ``destination`` before /readyz fails."""
        own = self.health_destinations.get(destination, {})
        dead = own.get("dead_letters", self.health_dead_letters)
        return dead, own.get("pending_minutes", self.health_pending_minutes)

    @property
    def tls_files(self) -> tuple[Path, Path, Path]:
        """(server certificate, its key, CA bundle) for tls: listeners, the defaults under <data_dir>/certs."""
        certs = self.data_dir / "certs"
        return (
            self.tls_cert or certs / "server.pem",
            self.tls_key or certs / "server-key.pem",
            self.tls_ca or certs / "ca.pem",
        )

    @property
    def database(self) -> Path | PostgresDatabase:
        """The store: ``<data_dir>/herald.db`` unless ``[storage] store`` names another file or a PostgreSQL server."""
        if not self.storage_store:
            return self.data_dir / "herald.db"
        return parse_store(self.storage_store, self.data_dir)

    @property
    def on_postgres(self) -> bool:
        """Whether the store is a PostgreSQL database (several nodes may share it)."""
        return isinstance(self.database, PostgresDatabase)

    @property
    def key_path(self) -> Path:
        """The key file (``[security] key_file``, else ``<data_dir>/keys/herald.key``)."""
        return self.key_file if self.key_file is not None else self.data_dir / "keys" / "herald.key"

    def file_drop_sealed(self, directory: Path | str) -> bool:
        """Whether file drops written to ``directory`` are sealed: a recipient's ``encrypt`` setting for
        that folder, else whether it is under the data folder (nobody but Herald reads there)."""
        if not self.encrypt_at_rest:
            return False
        folder = Path(directory)
        for r in self.recipients.values():
            if r.channel == "file" and r.directory == folder and r.encrypt is not None:
                return r.encrypt
        return folder.resolve().is_relative_to(self.data_dir.resolve())

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
        "allow_plain": ("allow_plain", bool),
    },
    "tls": {
        "cert": ("tls_cert", str),
        "key": ("tls_key", str),
        "ca": ("tls_ca", str),
        "min_version": ("tls_min_version", str),
    },
    "conversion": {"timezone": ("timezone", str)},
    "pipeline": {
        "batch_size": ("pipeline_batch", int),
        "workers": ("pipeline_workers", int),
        "enabled": ("pipeline_enabled", bool),
        "validate_sample": ("pipeline_validate_sample", (int, float)),
    },
    "delivery": {
        "max_attempts": ("delivery_max_attempts", int),
        "retry_hours": ("delivery_retry_hours", (int, float)),
        "per_destination": ("delivery_per_destination", int),
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
        "ignored": ("roster_ignored", list),
    },
    "matching": {
        "model": ("matching_model", str),
        "certain": ("matching_certain", (int, float)),
        "probable": ("matching_probable", (int, float)),
        "possible": ("matching_possible", (int, float)),
        "route_probable": ("matching_route_probable", bool),
    },
    "storage": {
        "store": ("storage_store", str),
        "claim_lease_seconds": ("storage_claim_lease_seconds", (int, float)),
        "reserve_mb": ("storage_reserve_mb", (int, float)),
        "wal_limit_mb": ("storage_wal_limit_mb", (int, float)),
        "commit_on_reactor": ("storage_commit_on_reactor", bool),
    },
    "retention": {"days": ("retention_days", int)},
    "transitions": {
        "enabled": ("transitions_enabled", bool),
        "worklist": ("transitions_worklist", str),
        "ed_close_hours": ("transitions_ed_close_hours", (int, float)),
        "snf_facilities": ("transitions_snf_facilities", list),
        "poll_seconds": ("transitions_poll_seconds", (int, float)),
        "pcp_phones": ("transitions_pcp_phones", str),
        "acos": ("transitions_acos", dict),
    },
    "cds_hooks": {
        "listen": ("cds_hooks_listen", str),
        "base_url": ("cds_hooks_base_url", str),
        "issuers": ("cds_hooks_issuers", list),
    },
    "profiles": {
        "folder": ("profiles_folder", str),
        "unknown_senders": ("profiles_unknown_senders", str),
    },
    "health": {
        "enabled": ("health_enabled", bool),
        "listen": ("health_listen", str),
        "stall_seconds": ("health_stall_seconds", (int, float)),
        "dead_letters": ("health_dead_letters", int),
        "pending_minutes": ("health_pending_minutes", (int, float)),
        "destinations": ("health_destinations", dict),
    },
    "logging": {
        "format": ("log_format", str),
        "level": ("log_level", str),
        "file": ("log_file", str),
    },
    "console": {
        "enabled": ("console_enabled", bool),
        "listen": ("console_listen", str),
        "session_hours": ("console_session_hours", (int, float)),
        "login_attempts": ("console_login_attempts", int),
    },
    "security": {
        "key_file": ("key_file", str),
        "encrypt_at_rest": ("encrypt_at_rest", bool),
        "unknown_senders": ("unknown_senders", str),
    },
    "limits": {
        **{name: (f"limits.{name}", int) for name in Limits.__dataclass_fields__},
        "frame_timeout": ("frame_timeout", (int, float)),
        "max_connections": ("max_connections", int),
        "max_connections_per_peer": ("max_connections_per_peer", int),
        "rejected_sample": ("rejected_sample", int),
        "rejected_window": ("rejected_window", (int, float)),
        "rejected_bytes_kept": ("rejected_bytes_kept", int),
    },
}

ROSTER_FORMATS = ("auto", "csv", "ssp", "cclf8")

_RECIPIENT_KEYS = {
    "enabled": bool,
    "channel": str,
    "directory": str,
    "url": str,
    "encrypt": bool,
    # fhir: mutual TLS files (relative to the config file), a timeout, SMART Backend Services ([...auth])
    "ca": str,
    "client_cert": str,
    "client_key": str,
    "timeout": (int, float),
    "auth": dict,
}
#: The settings of a fhir recipient that name files.
_FHIR_FILES = ("ca", "client_cert", "client_key")


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
    allow_plain: bool | None = None,
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
        if section in ("recipients", "senders", "direct", "alerts"):
            continue
        keys = _SCHEMA.get(section)
        if keys is None:
            known = ", ".join([*_SCHEMA, "recipients", "senders", "direct", "alerts"])
            raise ConfigError(section, f"unknown section (known: {known})")
        if not isinstance(content, dict):
            raise ConfigError(section, "must be a table")
        for key, value in content.items():
            if key not in keys:
                raise ConfigError(f"{section}.{key}", f"unknown setting (known: {', '.join(keys)})")
            attr, types = keys[key]
            if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
                raise ConfigError(f"{section}.{key}", f"expected {_type_name(types)}, got {type(value).__name__}")
            values[attr] = value
    if data_dir is None and "data_dir" in values and path is not None:
        # Every path a config file names is relative to the file (data_dir too); --data, to the shell.
        from_file = Path(values["data_dir"]).expanduser()
        values["data_dir"] = from_file if from_file.is_absolute() else Path(path).parent / from_file
    if data_dir is not None:
        values["data_dir"] = data_dir
    if listen:
        values["listen"] = list(listen)
    if allow_plain is not None:
        values["allow_plain"] = allow_plain
    base = Path(values.pop("data_dir", Config.data_dir)).expanduser()
    if "listen" in values:
        if not values["listen"] or not all(isinstance(x, str) and x for x in values["listen"]):
            raise ConfigError("server.listen", "must be a non-empty list of endpoint strings")
        values["listen"] = tuple(values["listen"])
    if values.get("matching_model"):
        model = Path(values["matching_model"]).expanduser()
        values["matching_model"] = model if model.is_absolute() or path is None else Path(path).parent / model
    if values.get("key_file"):
        key_file = Path(values["key_file"]).expanduser()
        values["key_file"] = key_file if key_file.is_absolute() or path is None else Path(path).parent / key_file
    elif "key_file" in values:
        raise ConfigError("security.key_file", "must be a file path (leave it out for <data_dir>/keys/herald.key)")
    if "profiles_folder" in values:
        if not values["profiles_folder"]:
            raise ConfigError("profiles.folder", "must be a folder (leave it out for the shipped mappings/senders)")
        folder = Path(values["profiles_folder"]).expanduser()
        values["profiles_folder"] = folder if folder.is_absolute() or path is None else Path(path).parent / folder
    if "log_file" in values:
        if not values["log_file"]:
            raise ConfigError("logging.file", "must be a file path (leave it out for standard error)")
        log_file = Path(values["log_file"]).expanduser()
        values["log_file"] = log_file if log_file.is_absolute() or path is None else Path(path).parent / log_file
    message_limits = {k.removeprefix("limits."): values.pop(k) for k in list(values) if k.startswith("limits.")}
    if message_limits:
        values["limits"] = Limits(**message_limits)
    recipients = default_recipients(base)
    configured = raw.get("recipients", {})
    if not isinstance(configured, dict):
        raise ConfigError("recipients", "must be a table")
    for role, content in configured.items():
        recipients[role] = _recipient(role, content, base, Path(path).parent if path is not None else None)
    _transport_values(values, raw, path)
    _transitions_values(values, raw, path)
    if os.environ.get(STORE_ENV):
        values["storage_store"] = os.environ[STORE_ENV]  # a password stays out of the config file
    if values.get("storage_store"):
        try:
            parse_store(values["storage_store"], base)
        except ValueError as e:
            raise ConfigError("storage.store", str(e)) from None
    if os.environ.get(VALIDATE_SAMPLE_ENV) is not None:
        values["pipeline_validate_sample"] = _default_validate_sample()  # the environment wins (the test suite)
    values["direct_relay"] = _direct_relay(raw.get("direct"), Path(path).parent if path is not None else None)
    cfg = Config(data_dir=base, recipients=recipients, **values)
    _check(cfg)
    return cfg


#: ``[direct]``: the SMTP relay (HISP) and our Direct identity, the same for every Direct recipient.
_DIRECT_KEYS: dict[str, type | tuple[type, ...]] = {
    "smtp_host": str,
    "smtp_port": int,
    "starttls": bool,
    "sender": str,
    "sign_cert": str,
    "sign_key": str,
    "ca": str,
}
_DIRECT_PATHS = ("sign_cert", "sign_key", "ca")


def _direct_relay(content: Any, config_dir: Path | None) -> dict[str, Any]:
    """The ``[direct]`` relay settings, checked by name and type, file paths relative to the config file."""
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError("direct", "must be a table")
    out: dict[str, Any] = {}
    for k, v in content.items():
        if k not in _DIRECT_KEYS:
            raise ConfigError(f"direct.{k}", f"unknown setting (known: {', '.join(_DIRECT_KEYS)})")
        if (isinstance(v, bool) and _DIRECT_KEYS[k] is not bool) or not isinstance(v, _DIRECT_KEYS[k]):
            raise ConfigError(f"direct.{k}", f"expected {_type_name(_DIRECT_KEYS[k])}")
        if k in _DIRECT_PATHS:
            p = Path(v).expanduser()
            v = str(p if p.is_absolute() or config_dir is None else config_dir / p)
        out[k] = v
    return out


def _recipient(role: str, content: Any, base: Path, config_dir: Path | None = None) -> Recipient:
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
        if "encrypt" in content:
            raise ConfigError(f"{key}.encrypt", "is for the file channel (a FHIR endpoint gets the Bundle over HTTPS)")
        url = content.get("url", "")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url", "a fhir channel needs an http:// or https:// base URL")
        settings = {k: v for k, v in content.items() if k in ("url", "timeout", "auth", *_FHIR_FILES)}

        def relative(value: str) -> str:
            p = Path(value).expanduser()
            return str(p if p.is_absolute() or config_dir is None else config_dir / p)

        for name in _FHIR_FILES:
            if name in settings:
                settings[name] = relative(settings[name])
        if "auth" in settings:
            settings["auth"] = dict(settings["auth"])
            if "key_file" in settings["auth"]:
                settings["auth"]["key_file"] = relative(str(settings["auth"]["key_file"]))
        # Checked when the delivery worker makes the channel (at start, naming the key).
        return Recipient(role, enabled, "fhir", None, url, fhir=settings)
    folder = OUTBOX_FOLDERS[role]
    directory = Path(content.get("directory", "")) if content.get("directory") else Path("outbox") / folder
    if not directory.is_absolute():
        directory = base / directory
    return Recipient(role, enabled, "file", directory, "", content.get("encrypt"))


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
    if not 0 <= cfg.pipeline_validate_sample <= 1:
        raise ConfigError("pipeline.validate_sample", "must be between 0 (none) and 1 (every message)")
    if cfg.delivery_max_attempts < 0:
        raise ConfigError("delivery.max_attempts", "must be 0 (no limit: the retry horizon decides) or more")
    if cfg.delivery_per_destination < 1:
        raise ConfigError("delivery.per_destination", "must be at least 1")
    if not cfg.delivery_retry_hours > 0:
        raise ConfigError("delivery.retry_hours", "must be a positive number of hours")
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
    _check_storage(cfg)
    _check_limits(cfg)
    _check_transport(cfg)
    _check_transitions(cfg)
    _check_health(cfg)
    _check_console(cfg)
    if cfg.profiles_unknown_senders not in ("default", "reject"):
        raise ConfigError("profiles.unknown_senders", f"{cfg.profiles_unknown_senders!r} is not one of default, reject")


def _check_console(cfg: Config) -> None:
    try:
        listen = parse_listen(cfg.console_listen)
    except ConfigError:
        raise ConfigError(
            "console.listen",
            f"{cfg.console_listen!r}: expected tls:PORT[:interface=ADDRESS] (HTTPS with the [tls] server "
            "certificate; browsers need no client certificate) or tcp:PORT[:interface=ADDRESS]",
        ) from None
    if not listen.tls and not cfg.allow_plain:
        raise ConfigError(
            "console.listen",
            f"{cfg.console_listen!r} is plain HTTP (passwords and patient data in clear text): use "
            f"tls:{listen.port} (the [tls] server certificate), or set server.allow_plain = true",
        )
    if not 0 < cfg.console_session_hours <= 24 * 7:
        raise ConfigError("console.session_hours", "must be more than 0 and at most 168 (a week)")
    if cfg.console_login_attempts < 1:
        raise ConfigError("console.login_attempts", "must be at least 1")


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error")
_HEALTH_LISTEN = re.compile(r"(tcp6?):(\d{1,5})(:interface=[^:]+)?")
_DESTINATION_KEYS: dict[str, type | tuple[type, ...]] = {"dead_letters": int, "pending_minutes": (int, float)}


def _check_health(cfg: Config) -> None:
    """[health] and [logging]: the health listener's endpoint, the /readyz thresholds, the log's format and level."""
    found = _HEALTH_LISTEN.fullmatch(cfg.health_listen)
    if found is None or int(found.group(2)) > 65535:
        raise ConfigError(
            "health.listen", f"{cfg.health_listen!r}: expected tcp:PORT[:interface=ADDRESS] (PORT 0: any free port)"
        )
    if not 0 < cfg.health_stall_seconds < math.inf:
        raise ConfigError("health.stall_seconds", "must be a positive number of seconds")
    if cfg.health_dead_letters < 0:
        raise ConfigError("health.dead_letters", "must be 0 (any dead letter fails /readyz) or more")
    if not 0 < cfg.health_pending_minutes < math.inf:
        raise ConfigError("health.pending_minutes", "must be a positive number of minutes")
    for destination, own in cfg.health_destinations.items():
        key = f"health.destinations.{destination}"
        if not isinstance(own, dict):
            raise ConfigError(key, "must be a table (dead_letters, pending_minutes)")
        for k, v in own.items():
            types = _DESTINATION_KEYS.get(k)
            if types is None:
                raise ConfigError(f"{key}.{k}", f"unknown setting (known: {', '.join(_DESTINATION_KEYS)})")
            if isinstance(v, bool) or not isinstance(v, types) or v < 0 or (k == "pending_minutes" and not v > 0):
                what = "a positive number" if k == "pending_minutes" else "a whole number, 0 or more"
                raise ConfigError(f"{key}.{k}", f"expected {what}")
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError("logging.format", f"{cfg.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError("logging.level", f"{cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")


def _check_storage(cfg: Config) -> None:
    if not 0 <= cfg.storage_reserve_mb < math.inf:
        raise ConfigError("storage.reserve_mb", "must be 0 (no reserve) or more")
    if not 1 <= cfg.storage_wal_limit_mb < math.inf:
        raise ConfigError("storage.wal_limit_mb", "must be at least 1")
    if cfg.on_postgres and not 2 * cfg.delivery_timeout < cfg.storage_claim_lease_seconds < math.inf:
        raise ConfigError(
            "storage.claim_lease_seconds",
            f"must be more than twice delivery.timeout ({cfg.delivery_timeout:g} s): "
            "a send must end before another node may take it",
        )
    if cfg.retention_days < 0:
        raise ConfigError("retention.days", "must be 0 (keep bodies) or a number of days")


def _check_roster(cfg: Config) -> None:
    if not all(isinstance(x, str) and x.strip() for x in cfg.roster_ignored):
        raise ConfigError("roster.ignored", "expected a list of header names (or patterns such as 'hcc_*')")
    if cfg.roster_format not in ROSTER_FORMATS:
        raise ConfigError("roster.format", f"{cfg.roster_format!r} is not one of {', '.join(ROSTER_FORMATS)}")
    if cfg.roster_aco_id != cfg.roster_aco_id.strip():
        raise ConfigError("roster.aco_id", "must not start or end with spaces")
    for column, header in cfg.roster_columns.items():
        if column not in MEMBER_COLUMNS:
            raise ConfigError(f"roster.columns.{column}", f"unknown roster column (known: {', '.join(MEMBER_COLUMNS)})")
        if not isinstance(header, str) or not header.strip():
            raise ConfigError(f"roster.columns.{column}", "expected the header name in the file (a non-empty string)")


def _check_limits(cfg: Config) -> None:
    for name, reason in cfg.limits.check():
        raise ConfigError(f"limits.{name}", reason)
    if cfg.frame_timeout <= 0:
        raise ConfigError("limits.frame_timeout", "must be positive")
    if cfg.max_connections < 1:
        raise ConfigError("limits.max_connections", "must be at least 1")
    if not 1 <= cfg.max_connections_per_peer <= cfg.max_connections:
        raise ConfigError("limits.max_connections_per_peer", "must be at least 1 and not above limits.max_connections")
    if cfg.rejected_sample < 1:
        raise ConfigError("limits.rejected_sample", "must be at least 1")
    if cfg.rejected_window <= 0:
        raise ConfigError("limits.rejected_window", "must be positive")
    if cfg.rejected_bytes_kept < 256:
        raise ConfigError("limits.rejected_bytes_kept", "must be at least 256")


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


# -- transport security: listeners, [tls], [[senders]] (README, "Transport security") ------------------

#: Listener kinds: ``tls:`` is Herald's mutual-TLS listener, ``tcp:``/``tcp6:`` plain (with server.allow_plain).
TLS_LISTENER, PLAIN_LISTENERS = "tls", ("tcp", "tcp6")
TLS_MIN_VERSIONS = ("1.2", "1.3")
UNKNOWN_SENDERS = ("reject", "accept")
_SENDER_KEYS = {"application": str, "facility": str, "identities": list, "networks": list}
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Listen:
    """One ``server.listen`` entry, read: ``tls:PORT[:interface=ADDR][:backlog=N]`` or a ``tcp:`` endpoint."""

    spec: str
    kind: str
    port: int
    interface: str = ""  # "" listens on every interface
    backlog: int = 50

    @property
    def tls(self) -> bool:
        return self.kind == TLS_LISTENER

    @property
    def loopback(self) -> bool:
        """Bound to a loopback address only (so only this machine can connect)."""
        if self.interface == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.interface).is_loopback
        except ValueError:
            return False


def parse_listen(spec: str) -> Listen:
    """Read a listen string; ConfigError naming ``server.listen`` when it is not one Herald accepts."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", spec)]
    kind, args = parts[0].lower(), parts[1:]
    if kind == "ssl":
        raise ConfigError(
            "server.listen",
            f"{spec!r}: an ssl: endpoint cannot require client certificates; use tls:PORT "
            "(mutual TLS with the [tls] cert, key and ca)",
        )
    if kind != TLS_LISTENER and kind not in PLAIN_LISTENERS:
        raise ConfigError(
            "server.listen", f"{spec!r}: only tls: (mutual TLS) and tcp: (plain, with server.allow_plain) listeners"
        )
    options: dict[str, str] = {}
    positional = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq:
            options[key] = value
        else:
            positional.append(a)
    port = positional[0] if positional else options.pop("port", "")
    if not port.isdigit() or int(port) > 65535 or len(positional) > 1:
        raise ConfigError("server.listen", f"{spec!r}: expected {kind}:PORT[:interface=ADDRESS]")
    if kind == TLS_LISTENER:
        unknown = set(options) - {"interface", "backlog"}
        if unknown:
            raise ConfigError(
                "server.listen", f"{spec!r}: tls: takes interface= and backlog= only, not {sorted(unknown)}"
            )
        if not options.get("backlog", "50").isdigit():
            raise ConfigError("server.listen", f"{spec!r}: backlog must be a number")
        interface = options.get("interface", "")
        if interface not in ("", "localhost"):
            try:
                ipaddress.ip_address(interface)
            except ValueError:
                raise ConfigError("server.listen", f"{spec!r}: interface {interface!r} is not an IP address") from None
    return Listen(spec, kind, int(port), options.get("interface", ""), int(options.get("backlog", "50")))


@dataclass(frozen=True)
class SenderRule:
    """One ``[[senders]]`` table: who may send as MSH-3 ``application`` / MSH-4 ``facility`` ("*": any).

    ``identities`` are client-certificate names (subject CN or SAN DNS name,
    compared case-insensitively) or SHA-256 fingerprints (``sha256:<hex>``);
    ``networks`` source networks. With both, a connection must match both.
    """

    application: str
    facility: str
    identities: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


def sender_identity(value: str) -> str:
    """An identity as compared: a fingerprint as ``sha256:`` and 64 lowercase hex digits, a name casefolded.

    Fingerprints may be written ``sha256:ab12...`` or as OpenSSL prints them
    (``AB:12:...``).
    """
    text = value.strip()
    digits = text[7:] if text.lower().startswith("sha256:") else text
    digits = digits.replace(":", "").lower()
    if _FINGERPRINT.fullmatch(digits):
        return "sha256:" + digits
    if text.lower().startswith("sha256:"):
        raise ValueError(f"{value!r} is not a SHA-256 fingerprint (64 hex digits)")
    return text.casefold()


def _transport_values(values: dict[str, Any], raw: dict[str, Any], path: Path | str | None) -> None:
    """[tls] paths relative to the config file, and the [[senders]] tables read into SenderRules."""
    for attr in ("tls_cert", "tls_key", "tls_ca"):
        if attr in values:
            if not values[attr]:
                raise ConfigError(f"tls.{attr[4:]}", "must be a file path (leave it out for the default)")
            p = Path(values[attr]).expanduser()
            values[attr] = p if p.is_absolute() or path is None else Path(path).parent / p
    tables = raw.get("senders", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("senders", "must be an array of tables ([[senders]])")
    values["senders"] = tuple(_sender(i, t) for i, t in enumerate(tables, 1))


def _sender(number: int, content: dict) -> SenderRule:
    key = f"senders[{number}]"
    for k, v in content.items():
        if k not in _SENDER_KEYS:
            raise ConfigError(f"{key}.{k}", f"unknown setting (known: {', '.join(_SENDER_KEYS)})")
        if not isinstance(v, _SENDER_KEYS[k]):
            raise ConfigError(f"{key}.{k}", f"expected {_type_name(_SENDER_KEYS[k])}")
    for k in ("application", "facility"):
        value = content.get(k, "")
        if not value or any(c in value for c in "|^~\\&\r\n"):
            raise ConfigError(f"{key}.{k}", 'must be given: the MSH value, or "*" for any, without HL7 separators')
    identities, networks = content.get("identities", []), content.get("networks", [])
    if not identities and not networks:
        raise ConfigError(key, "needs identities (client certificates) or networks (CIDR), or both")
    try:
        names = frozenset(sender_identity(i) for i in identities if isinstance(i, str) and i.strip())
    except ValueError as e:
        raise ConfigError(f"{key}.identities", str(e)) from None
    if len(names) != len(set(identities)):
        raise ConfigError(f"{key}.identities", "must be non-empty strings")
    nets = []
    for n in networks:
        try:
            nets.append(ipaddress.ip_network(n, strict=False))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.networks", f"{n!r} is not a network (e.g. 10.20.0.0/16 or 192.0.2.7)") from None
    return SenderRule(content["application"], content["facility"], names, tuple(nets))


def _check_transport(cfg: Config) -> None:
    for spec in cfg.listen:
        listen = parse_listen(spec)
        if not listen.tls and not cfg.allow_plain:
            raise ConfigError(
                "server.listen",
                f"{spec!r} is a plain (unencrypted) listener: use tls:{listen.port} (mutual TLS), "
                "or set server.allow_plain = true (herald serve --allow-plain) to allow it",
            )
    if cfg.tls_min_version not in TLS_MIN_VERSIONS:
        raise ConfigError("tls.min_version", f"{cfg.tls_min_version!r} is not one of {', '.join(TLS_MIN_VERSIONS)}")
    if cfg.unknown_senders is not None and cfg.unknown_senders not in UNKNOWN_SENDERS:
        raise ConfigError("security.unknown_senders", f"{cfg.unknown_senders!r} is not one of reject, accept")


def check_listen(endpoints: tuple[str, ...], reactor) -> None:
    """Parse each endpoint string now, so a typo fails at start naming it."""
    from twisted.internet.endpoints import serverFromString

    for spec in endpoints:
        if parse_listen(spec).tls:
            continue  # Herald's own form, read by parse_listen
        try:
            serverFromString(reactor, spec)
        except Exception as e:
            raise ConfigError("server.listen", f"{spec!r} is not a valid endpoint: {e}") from None


#: Overrides ``[pipeline] validate_sample`` (the test suite sets 1: every Bundle validated).
VALIDATE_SAMPLE_ENV = "HERALD_VALIDATE_SAMPLE"
#: The store's URL (``[storage] store``), from the environment: a password need not be in the config file.
STORE_ENV = "HERALD_STORE"
#: The default share of Bundles validated in the pipeline: one in fifty.
DEFAULT_VALIDATE_SAMPLE = 0.02


def _default_validate_sample() -> float:
    import os

    value = os.environ.get(VALIDATE_SAMPLE_ENV)
    if value is None:
        return DEFAULT_VALIDATE_SAMPLE
    try:
        return float(value)
    except ValueError:
        raise ConfigError(VALIDATE_SAMPLE_ENV, f"{value!r} is not a number between 0 and 1") from None


def _default_workers() -> int:
    """One conversion process per core (they run at a lower priority than the server)."""
    import os

    return max(1, os.cpu_count() or 1)


def _type_name(types) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


# -- care transitions: [transitions], [alerts."FACILITY"], [cds_hooks] (README, "Care transitions") ------

#: The e-alert's message types (gateway.transitions.alerts.alert_message).
ALERT_MESSAGES = ("MDM^T02", "ORU^R01")
_ALERT_KEYS: dict[str, type | tuple[type, ...]] = {"mllp": dict, "message": str, "cds_hooks": bool}
_ALERT_MLLP_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "port": int,
    "ca": str,
    "client_cert": str,
    "client_key": str,
    "timeout": (int, float),
    "on_error": str,
}
_ACO_KEYS = ("name", "care_manager_phone")
_ISSUER_KEYS = ("iss", "jwks", "facility")


def _relative(value: str, path: Path | str | None) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or path is None else Path(path).parent / p


def _transitions_values(values: dict[str, Any], raw: dict[str, Any], path: Path | str | None) -> None:
    """[transitions] paths relative to the config file; [alerts."FACILITY"] and [[cds_hooks.issuers]] read."""
    for attr, key in (("transitions_worklist", "worklist"), ("transitions_pcp_phones", "pcp_phones")):
        if attr in values:
            if not values[attr]:
                raise ConfigError(f"transitions.{key}", "must be a file path (leave it out for none)")
            values[attr] = _relative(values[attr], path)
    if "transitions_snf_facilities" in values:
        names = values["transitions_snf_facilities"]
        if not all(isinstance(n, str) and n.strip() for n in names):
            raise ConfigError("transitions.snf_facilities", "expected a list of facility names")
        values["transitions_snf_facilities"] = tuple(names)
    for aco, info in values.get("transitions_acos", {}).items():
        if not isinstance(info, dict):
            raise ConfigError(f"transitions.acos.{aco}", "must be a table (name, care_manager_phone)")
        for k, v in info.items():
            if k not in _ACO_KEYS:
                raise ConfigError(f"transitions.acos.{aco}.{k}", f"unknown setting (known: {', '.join(_ACO_KEYS)})")
            if not isinstance(v, str):
                raise ConfigError(f"transitions.acos.{aco}.{k}", "expected str")
    alerts = raw.get("alerts", {})
    if not isinstance(alerts, dict):
        raise ConfigError("alerts", 'must be tables, one per facility ([alerts."LSR"])')
    out: dict[str, dict] = {}
    for facility, content in alerts.items():
        key = f"alerts.{facility}"
        if not isinstance(content, dict):
            raise ConfigError(key, "must be a table (mllp, message, cds_hooks)")
        for k, v in content.items():
            if k not in _ALERT_KEYS:
                raise ConfigError(f"{key}.{k}", f"unknown setting (known: {', '.join(_ALERT_KEYS)})")
            if isinstance(v, bool) is not (_ALERT_KEYS[k] is bool) or not isinstance(v, _ALERT_KEYS[k]):
                raise ConfigError(f"{key}.{k}", f"expected {_type_name(_ALERT_KEYS[k])}")
        entry: dict[str, Any] = {
            "message": content.get("message", "MDM^T02"),
            "cds_hooks": content.get("cds_hooks", True),
        }
        if entry["message"] not in ALERT_MESSAGES:
            raise ConfigError(f"{key}.message", f"{entry['message']!r} is not one of {', '.join(ALERT_MESSAGES)}")
        if "mllp" in content:
            mllp = dict(content["mllp"])
            for k, v in mllp.items():
                types = _ALERT_MLLP_KEYS.get(k)
                if types is None:
                    raise ConfigError(f"{key}.mllp.{k}", f"unknown setting (known: {', '.join(_ALERT_MLLP_KEYS)})")
                if isinstance(v, bool) or not isinstance(v, types):
                    raise ConfigError(f"{key}.mllp.{k}", f"expected {_type_name(types)}")
            if not mllp.get("host", "").strip():
                raise ConfigError(f"{key}.mllp.host", "the ED's inbound interface needs host")
            if not 0 < mllp.get("port", 0) < 65536:
                raise ConfigError(f"{key}.mllp.port", "must be a TCP port number")
            if mllp.get("on_error", "retry") not in ("retry", "dead"):
                raise ConfigError(f"{key}.mllp.on_error", "must be 'retry' or 'dead' (what an AE/CE answer does)")
            for k in ("ca", "client_cert", "client_key"):
                if k in mllp:
                    mllp[k] = str(_relative(mllp[k], path))
            entry["mllp"] = mllp
        out[facility] = entry
    values["alerts"] = out
    issuers = []
    for i, content in enumerate(values.get("cds_hooks_issuers", ()), 1):
        key = f"cds_hooks.issuers[{i}]"
        if not isinstance(content, dict):
            raise ConfigError(key, "must be a table (iss, jwks, facility)")
        for k, v in content.items():
            if k not in _ISSUER_KEYS:
                raise ConfigError(f"{key}.{k}", f"unknown setting (known: {', '.join(_ISSUER_KEYS)})")
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{key}.{k}", "expected a non-empty string")
        for k in ("iss", "jwks"):
            if k not in content:
                raise ConfigError(f"{key}.{k}", "a trusted EHR needs iss (its issuer) and jwks (a file or https URL)")
        issuer = dict(content)
        if not issuer["jwks"].startswith(("https://", "http://")):
            issuer["jwks"] = str(_relative(issuer["jwks"], path))
        issuers.append(issuer)
    values["cds_hooks_issuers"] = tuple(issuers)


def _check_transitions(cfg: Config) -> None:
    if not 0 < cfg.transitions_ed_close_hours < math.inf:
        raise ConfigError("transitions.ed_close_hours", "must be a positive number of hours")
    if not 0 < cfg.transitions_poll_seconds < math.inf:
        raise ConfigError("transitions.poll_seconds", "must be a positive number of seconds")
    if not cfg.cds_hooks_listen:
        return
    try:
        listen = parse_listen(cfg.cds_hooks_listen)
    except ConfigError as e:
        raise ConfigError("cds_hooks.listen", e.reason.replace("server.listen", "cds_hooks.listen")) from None
    if not listen.tls and not cfg.allow_plain:
        raise ConfigError(
            "cds_hooks.listen", f"{cfg.cds_hooks_listen!r} is plain HTTP: use tls:PORT, or set server.allow_plain"
        )
    if cfg.cds_hooks_base_url and not cfg.cds_hooks_base_url.startswith(("https://", "http://")):
        raise ConfigError("cds_hooks.base_url", "must be the https:// URL EHRs call (ending /cds-services)")
    if not cfg.cds_hooks_issuers:
        raise ConfigError("cds_hooks.issuers", "a CDS Hooks service needs at least one trusted EHR (iss and jwks)")
