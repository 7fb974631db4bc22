"""Herald's one exception hierarchy."""

from __future__ import annotations


class HeraldError(Exception):
    """Base of every error Herald raises on purpose."""


class ConfigError(HeraldError):
    """The configuration is unusable; ``key`` names the setting."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config: {key}: {reason}")
        self.key = key
        self.reason = reason


class MessageError(HeraldError):
    """A message cannot be read or converted.

    ``code`` is an HL7 table 0357 error code, ``location`` a field path such as
    ``MSH-10`` or ``PID-7``, and the message text a plain-words reason with no
    patient data in it.
    """

    def __init__(self, reason: str, code: str = "207", location: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.location = location

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}" if self.location else self.reason


class RosterError(HeraldError):
    """A roster file has problems; ``problems`` lists (line, column, reason)."""

    def __init__(self, problems: list[tuple[int, str, str]], source: str = "", more: int = 0) -> None:
        self.problems = problems
        self.source = source  # the file, when it is not the roster file itself (e.g. the --pcp file)
        self.more = more  # problems found beyond those listed
        first = "; ".join(f"line {ln}, column {col}: {why}" for ln, col, why in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} problem(s) in roster: {first}{more}")


class StoreError(HeraldError):
    """The message store could not complete an operation."""


class ProfileError(ConfigError):
    """A sender profile (``mappings/senders/*.toml``) is unusable: ``file``, ``key`` (as written there), ``reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        HeraldError.__init__(self, f"{file}: {key}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason
