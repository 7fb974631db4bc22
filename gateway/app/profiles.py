"""What an interface analyst does with sender profiles: check one, try one on messages, see what one
changes, ask the running server to reload them.

The CLI (``herald profile check|test|diff``, ``herald reload``) calls these
and prints their lines. The reports quote field values (identifiers, codes):
they are for the analyst's terminal, never for a log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import Config
from gateway.conversion.convert import Conversion, convert, validate_bundle
from gateway.conversion.profiles import (
    Change,
    Profile,
    ProfileSet,
    Selection,
    apply_profile,
    load_profiles,
    open_message,
)
from gateway.conversion.vocabulary import Vocabulary, load_vocabulary
from gateway.errors import MessageError, ProfileError

__all__ = [
    "DiffReport",
    "MessageReport",
    "ProfileCheck",
    "check_profile",
    "configured_profiles",
    "convert_for_cli",
    "diff_message",
    "find_profile",
    "request_reload",
    "try_profile",
]


def configured_profiles(config: Config, vocab: Vocabulary | None = None, draft: Path | None = None) -> ProfileSet:
    """The profiles of ``config``'s ``[profiles] folder`` (with ``draft`` in place of its namesake)."""
    return load_profiles(config.profiles_folder, vocab, config.profiles_unknown_senders, draft=draft)


def find_profile(spec: str, config: Config, vocab: Vocabulary | None = None) -> tuple[ProfileSet, Profile]:
    """A profile named on the command line: a ``.toml`` file (checked with the configured folder), else
    the name of one in that folder. Raises ProfileError, or LookupError when there is none by that name."""
    path = Path(spec)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise ProfileError(spec, "(file)", "does not exist")
        profiles = configured_profiles(config, vocab, draft=path)
        return profiles, profiles.get(path.stem)
    profiles = configured_profiles(config, vocab)
    try:
        return profiles, profiles.get(spec)
    except KeyError:
        known = ", ".join(sorted(profiles.profiles)) or "none"
        raise LookupError(f"no profile {spec!r} in {profiles.folder} (known: {known})") from None


# -- check -------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileCheck:
    """A profile that loaded, and the set it loaded with."""

    profile: Profile
    profiles: ProfileSet

    def lines(self) -> list[str]:
        p = self.profile
        out = [f"ok: {p.name} ({p.file})"]
        if p.description:
            out.append(f"  {p.description}")
        out.append(f"  {p.summary()}")
        for rule in p.identifiers:
            what = " ".join(x for x in (f"type {rule.type}" if rule.type else "", _authority(rule.authority)) if x)
            out.append(f"  identifier {rule.path}: {what}" + (" (expected)" if rule.expected else ""))
        for key, table in p.codes.items():
            pairs = ", ".join(f"{k} -> {v}" for k, v in table.items())
            out.append(f"  codes {key}: {pairs}")
        for rule in p.class_rules:
            when = ", ".join(f"{path} {glob!r}" for path, glob in rule.when)
            out.append(f"  class rule: {when} -> PV1-2 {rule.set}")
        if p.ignore:
            out.append(f"  ignored: {', '.join(map(str, p.ignore))}")
        if p.expected:
            out.append(f"  expected: {', '.join(map(str, p.expected))}")
        out.append(f"  checked with the {len(self.profiles)} profiles of {self.profiles.folder}")
        return out


def check_profile(spec: str, config: Config) -> ProfileCheck:
    """Load ``spec`` (a file or a name) with the configured folder; ProfileError (file, key, reason) when bad."""
    profiles, profile = find_profile(spec, config)
    return ProfileCheck(profile, profiles)


def _authority(authority: str) -> str:
    return f"authority {authority}" if authority else ""


# -- test --------------------------------------------------------------------


@dataclass
class MessageReport:
    """One message converted with a profile: what an analyst checks."""

    where: str
    selection: Selection | None = None
    would_select: str = ""
    changes: list[Change] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    conversion: Conversion | None = None
    error: str = ""
    invalid: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and not self.invalid

    def lines(self) -> list[str]:
        out = [self.where]
        if self.would_select:
            out.append(f"  note: {self.would_select}")
        if self.error:
            return [*out, f"  error: {self.error}"]
        c = self.conversion
        bundle = c.bundle
        header = bundle["entry"][0]["resource"]
        encounter = bundle["entry"][1]["resource"]
        out.append(
            f"  event: {header['reason']['coding'][0]['code']} -> {c.event_code} (Encounter {encounter['status']})"
        )
        ids = []
        for ident in c.patient_resource.get("identifier", []):
            kind = ident.get("type", {}).get("coding", [{}])[0].get("code", "-")
            ids.append(f"{kind} {ident['system']}|{ident['value']}")
        out.append(f"  patient ids: {'; '.join(ids) or '(none)'}")
        visit = [f"{i['system']}|{i['value']}" for i in encounter.get("identifier", [])]
        if visit:
            out.append(f"  visit: {'; '.join(visit)}")
        out.append(f"  class: {self._class_line(encounter)}")
        period = encounter.get("period", {})
        times = [f"{k} {period[k]}" for k in ("start", "end") if k in period]
        times.append(f"Bundle.timestamp {bundle['timestamp']}")
        out.append(f"  times: {'; '.join(times)}")
        codes = [f"{ch.path} {ch.before} -> {ch.after}" for ch in self.changes if ch.why.startswith("local code")]
        out.append(f"  codes translated: {'; '.join(codes) or '(none)'}")
        disposition = encounter.get("hospitalization", {}).get("dischargeDisposition")
        if disposition:
            coding = disposition["coding"][0]
            out.append(f"  discharge disposition: {coding['code']} ({coding.get('display', coding['system'])})")
        other = [ch for ch in self.changes if not ch.why.startswith("local code") and ch.path != "PV1-2"]
        for ch in other:
            out.append(f"  changed {ch.path}: {ch.before or '(empty)'} -> {ch.after or '(empty)'}  [{ch.why}]")
        for m in self.missing:
            out.append(f"  warning: {m}")
        for w in c.warnings:
            out.append(f"  warning: {w}")
        out.append(f"  valid R4: {'no: ' + self.invalid if self.invalid else 'yes'}")
        return out

    def _class_line(self, encounter: dict) -> str:
        steps = [ch for ch in self.changes if ch.path == "PV1-2"]
        chain = [steps[0].before or "(empty)", *(ch.after for ch in steps)] if steps else []
        cls = encounter.get("class", {})
        target = cls.get("code", "")
        if cls.get("display"):
            target += f" ({cls['display']})"
        elif "system" not in cls:
            target += " (no code system)"
        return f"PV1-2 {' -> '.join(chain)} -> {target}" if chain else target


def try_profile(
    spec: str, messages: list[tuple[str, bytes]], config: Config, now: datetime | None = None
) -> tuple[Profile, list[MessageReport]]:
    """Convert each message with the profile ``spec`` (forced: whatever its sender) and report it.

    Raises ProfileError or LookupError when the profile does not load.
    """
    vocab = load_vocabulary()
    profiles, profile = find_profile(spec, config, vocab)
    received = now or datetime.now(UTC)
    reports = []
    for where, raw in messages:
        report = MessageReport(where)
        try:
            msg, selection = open_message(raw, profiles, profile=profile)
            chosen = profiles.select(msg.header.sending_application, msg.header.sending_facility).profile
            if chosen.name != profile.name:
                report.would_select = (
                    f"the pipeline would choose {chosen.name!r} for MSH-3 {msg.header.sending_application!r}, "
                    f"MSH-4 {msg.header.sending_facility!r}, not this profile"
                )
            applied = apply_profile(msg, profile)
            report.selection, report.changes, report.missing = selection, list(applied.changes), list(applied.missing)
            report.conversion = convert(msg, vocab, applied.tz or config.tzinfo, received)
        except MessageError as e:
            report.error = f"{e} (HL7 error {e.code})"
            reports.append(report)
            continue
        try:
            validate_bundle(report.conversion.bundle)
        except MessageError as e:
            report.invalid = str(e)
        reports.append(report)
    return profile, reports


# -- diff --------------------------------------------------------------------


@dataclass
class DiffReport:
    """Which profile a message gets and why, and what it changes against the default mapping."""

    where: str
    selection: Selection | None = None
    passed_over: list[Profile] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    fhir: list[str] = field(default_factory=list)
    warnings_gone: list[str] = field(default_factory=list)
    warnings_new: list[str] = field(default_factory=list)
    error: str = ""

    def lines(self) -> list[str]:
        out = [self.where]
        if self.error:
            return [*out, f"  error: {self.error}"]
        s = self.selection
        out.append(f"  profile: {s.profile.name} ({s.profile.file})")
        out.append(f"  why: {s.reason}")
        if s.profile.lineage:
            out.append(f"  extends: {' -> '.join(s.profile.lineage)}")
        for p in self.passed_over:
            out.append(f"  also matches, less specific: {p.name} ({p.match.describe()})")
        if not s.known:
            out.append("  (the default profile: this sender has no profile of its own)")
        out.append(f"  v2 changes ({len(self.changes)}):")
        out += [
            f"    {ch.path}: {ch.before or '(empty)'} -> {ch.after or '(empty)'}  [{ch.why}]" for ch in self.changes
        ] or ["    (none)"]
        out.append(f"  FHIR against the default mapping ({len(self.fhir)}):")
        out += [f"    {line}" for line in self.fhir] or ["    (no difference)"]
        out += [f"  warning gone: {w}" for w in self.warnings_gone]
        out += [f"  new warning: {w}" for w in self.warnings_new]
        return out


def diff_message(where: str, raw: bytes, profiles: ProfileSet, config: Config, vocab: Vocabulary) -> DiffReport:
    """Convert ``raw`` with the default profile and with its sender's, and compare."""
    report = DiffReport(where)
    received = datetime(2000, 1, 1, tzinfo=UTC)  # the same on both sides: only the profile differs
    try:
        msg, selection = open_message(raw, profiles)
        applied = apply_profile(msg, selection.profile)
        profiled = convert(msg, vocab, applied.tz or config.tzinfo, received)
        base_msg, _ = open_message(raw, profiles, profile=profiles.default)
        base_applied = apply_profile(base_msg, profiles.default)
        base = convert(base_msg, vocab, base_applied.tz or config.tzinfo, received)
    except MessageError as e:
        report.error = f"{e} (HL7 error {e.code})"
        return report
    report.selection = selection
    header = msg.header
    report.passed_over = [
        p
        for p in profiles.candidates(header.sending_application, header.sending_facility)
        if p.name != selection.profile.name
    ]
    report.changes = list(applied.changes)
    report.fhir = _bundle_diff(base.bundle, profiled.bundle)
    report.warnings_gone = [w for w in base.warnings if w not in profiled.warnings]
    report.warnings_new = [w for w in profiled.warnings if w not in base.warnings] + list(applied.missing)
    return report


#: Keys left out of the comparison: resource ids and references are UUIDs made from the identifiers.
_ID_KEYS = frozenset({"id", "fullUrl", "reference"})


def _bundle_diff(before: dict, after: dict) -> list[str]:
    """``Resource.path: before -> after`` for each leaf that differs (ids and references left out)."""
    a, b = _leaves(before), _leaves(after)
    out = []
    for key in sorted(set(a) | set(b), key=_path_order(a, b)):
        if a.get(key) == b.get(key):
            continue
        if key not in a:
            out.append(f"{key}: + {b[key]}")
        elif key not in b:
            out.append(f"{key}: - {a[key]}")
        else:
            out.append(f"{key}: {a[key]} -> {b[key]}")
    return out


def _path_order(a: dict, b: dict):
    order = {k: i for i, k in enumerate([*b, *(k for k in a if k not in b)])}
    return lambda k: order[k]


def _leaves(bundle: dict) -> dict[str, str]:
    out: dict[str, str] = {"Bundle.timestamp": bundle.get("timestamp", "")}
    seen: dict[str, int] = {}
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        kind = resource["resourceType"]
        n = seen[kind] = seen.get(kind, 0) + 1
        _walk(resource, f"{kind}{f'#{n}' if n > 1 else ''}", out)
    return out


def _walk(value, path: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in _ID_KEYS and k != "resourceType":
                _walk(v, f"{path}.{k}", out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", out)
    else:
        out[path] = str(value)


# -- reload ------------------------------------------------------------------


def request_reload(config: Config) -> str:
    """Check the configured profiles, then ask the server of ``config``'s data folder to reload them.

    Raises ProfileError (nothing is asked) when they do not load, and
    FileNotFoundError when there is no data folder. Returns what was done.
    """
    # Here, not at the top: the pipeline's service imports the store (and sqlite-utils, pandas), which
    # `herald profile check|test|diff` never need; an analyst's round trip stays about a second.
    from gateway.pipeline.runner import RELOAD_POLL_SECONDS, reload_request_path

    profiles = configured_profiles(config)
    if not config.data_dir.is_dir():
        raise FileNotFoundError(f"no Herald data folder at {config.data_dir} (is --data or --config right?)")
    path = reload_request_path(config.data_dir)
    path.write_text(datetime.now(UTC).isoformat(timespec="seconds") + "\n", encoding="utf-8")
    return (
        f"{len(profiles)} profiles in {profiles.folder} check out; asked the server of {config.data_dir} to reload "
        f"them (it looks every {RELOAD_POLL_SECONDS:.0f} s; `kill -HUP` on herald serve reloads at once). "
        "Its log says whether it did."
    )


def convert_for_cli(raw: bytes, profiles: ProfileSet, profile: Profile | None, config: Config, vocab, explain: bool):
    """``herald convert``'s conversion: ``raw`` read with its sender's profile (or ``profile``);
    returns (message, selection, what the profile did, conversion); MessageError as convert."""
    msg, selection = open_message(raw, profiles, profile=profile)
    applied = apply_profile(msg, selection.profile)
    conversion = convert(msg, vocab, applied.tz or config.tzinfo, datetime.now(UTC), explain=explain)
    return msg, selection, applied, conversion
