"""What an analyst reads from ``herald convert FILE --explain``.

The converter records each field it uses as it maps it (``MessageContext.used``:
segment, field number, FHIR target), only when asked (``convert(...,
explain=True)``); this module turns that trace into lines: every field that was
used, with its HL7 name for the message's version (hl7apy), its value and where
it went, then every field that is present but was not mapped.
"""

from __future__ import annotations

from gateway.conversion.convert import Conversion
from gateway.conversion.fieldnames import field_info
from gateway.conversion.v2 import V2Message

_VALUE_WIDTH = 60


def explain_lines(msg: V2Message, conversion: Conversion) -> list[str]:
    """The explanation of one conversion (made with ``explain=True``) as text lines."""
    if conversion.trace is None:
        raise ValueError("the conversion was made without explain=True")
    version = msg.version or "2.5.1"
    targets: dict[tuple[int, int], list[str]] = {}
    for seg, n, target in conversion.trace:
        found = targets.setdefault((id(seg), n), [])
        if target not in found:
            found.append(target)
    counts: dict[str, int] = {}
    mapped: list[str] = []
    unmapped: list[str] = []
    for seg in msg.segments:
        counts[seg.name] = counts.get(seg.name, 0) + 1
        occurrence = counts[seg.name]
        for n in range(1, len(seg.fields)):
            value = seg.fields[n]
            if not value:
                continue
            label = f"{seg.name}-{n}" + (f" (#{occurrence})" if occurrence > 1 else "")
            info = field_info(seg.name, n, version)
            name = info[0] if info else "(not in HL7 " + version + ")"
            shown = value if len(value) <= _VALUE_WIDTH else value[: _VALUE_WIDTH - 3] + "..."
            where = targets.get((id(seg), n))
            if where:
                mapped.append(f"  {label:<13} {name}: {shown}")
                mapped.extend(f"  {'':<13}   -> {t}" for t in where)
            else:
                unmapped.append(f"  {label:<13} {name}: {shown}")
    header = conversion.bundle["entry"][0]["resource"]
    lines = [
        f"{msg.msh.get(9, 1)}^{conversion.trigger_event} v{msg.version or '?'} -> "
        f"{header['eventCoding']['code']}, {len(conversion.bundle['entry'])} resources"
        + (" (a retraction)" if conversion.retraction else ""),
        "",
        "Mapped (field, HL7 name, value -> FHIR):",
        *mapped,
        "",
        "Present but not mapped:",
        *(unmapped or ["  (none)"]),
    ]
    if conversion.warnings:
        lines += ["", "Warnings:", *(f"  {w}" for w in conversion.warnings)]
    return lines
