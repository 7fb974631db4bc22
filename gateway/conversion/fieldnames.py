"""Field names per HL7 version, from hl7apy's message definitions.

Used where an analyst reads a message (``herald log show --fields``, error
reasons), never on the per-message path: hl7apy's definitions know that PID-7
is "Date/Time of Birth" in v2.4 but "Date of Birth" in v2.3.
"""

from __future__ import annotations

import re
from functools import lru_cache

from hl7apy import SUPPORTED_LIBRARIES, load_reference
from hl7apy.exceptions import ChildNotFound

_FALLBACK_VERSION = "2.5.1"
_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d+)")


def _library_version(version: str) -> str:
    v = version.strip()
    while v and v not in SUPPORTED_LIBRARIES:
        v = v.rsplit(".", 1)[0] if "." in v else ""
    return v or _FALLBACK_VERSION


@lru_cache(maxsize=4096)
def field_info(segment: str, number: int, version: str = _FALLBACK_VERSION) -> tuple[str, str] | None:
    """(name, datatype) of ``segment``-``number`` in ``version``, or None when undefined (Z-segments)."""
    try:
        ref = load_reference(f"{segment}_{number}", "Field", _library_version(version))
    except (ChildNotFound, KeyError, ValueError):
        return None
    datatype, long_name = ref[2], ref[3]
    words = long_name.replace("_", " ").lower().split()
    acronyms = {"id", "pid", "msh", "npi", "mrn", segment.lower()}
    name = " ".join(w.upper() if w in acronyms else w for w in words)
    return name[:1].upper() + name[1:], datatype


def describe_location(location: str, version: str = _FALLBACK_VERSION) -> str:
    """``PID-7`` -> ``PID-7 (Date/time of birth)`` when the field is known."""
    m = _LOCATION.match(location)
    if not m:
        return location
    info = field_info(m.group(1), int(m.group(2)), version)
    return f"{location} ({info[0]})" if info else location
