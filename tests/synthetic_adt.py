"""Synthetic ADT messages for the conversion tests (no real people), and lookups in the Bundles they become."""

from __future__ import annotations

from gateway.conversion.v2 import V2Message

#: CMS's published example MBI and a test NPI that passes the check digit.
MBI = "1EG4TE5MK73"
NPI = "1234567893"
#: Another valid test NPI (for a second clinician).
PCP_NPI = "1987654302"


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment with ``fields`` (HL7 numbering) set and the others empty."""
    values = [""] * (max(fields, default=0) + 1)
    values[0] = name
    for n, v in fields.items():
        values[n] = v
    return "|".join(values)


def adt_text(
    trigger: str = "A01",
    *,
    msh9: str | None = None,
    control: str = "CTRL0001",
    version: str = "2.5.1",
    msh18: str = "",
    evn: dict[int, str] | None = None,
    pid: dict[int, str] | None = None,
    pv1: dict[int, str] | None = None,
    after_pid: tuple[str, ...] = (),
    after_pv1: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
    end: str = "\r",
) -> str:
    """An ADT message as text; ``pid``/``pv1``/``evn`` override fields of the defaults, ``msh9``
    replaces ``ADT^<trigger>`` and ``drop`` leaves out the named segments (EVN, PID, PV1)."""
    pid_fields = {
        1: "1",
        3: f"MRN123^^^TESTFAC^MR~{MBI}^^^CMS^MB",
        5: "TESTPATIENT^ALEX^Q^^^^L",
        7: "19600102",
        8: "F",
        11: "1 TEST STREET^^TESTVILLE^CT^06000^USA^H",
    }
    pv1_fields = {
        1: "1",
        2: "I",
        3: "WARD1^101^A^TESTFAC",
        7: f"{NPI}^DOCTOR^DANA^^^DR^^^NPI^L^^^NPI",
        19: "VISIT001^^^TESTFAC^VN",
        44: "20260301100000",
    }
    evn_fields = {1: trigger, 2: "20260301120000"}
    pid_fields.update(pid or {})
    pv1_fields.update(pv1 or {})
    evn_fields.update(evn or {})
    msh = segment(
        "MSH",
        {
            1: "^~\\&",
            2: "TESTAPP",
            3: "TESTFAC",
            4: "HERALD",
            5: "ACO",
            6: "20260301120000",
            8: msh9 or f"ADT^{trigger}",
            9: control,
            10: "P",
            11: version,
            **({17: msh18} if msh18 else {}),
        },
    )
    # segment() numbers MSH like any segment (MSH-2 is at index 1): fields above are shifted by one.
    lines = [
        msh,
        *([] if "EVN" in drop else [segment("EVN", evn_fields)]),
        *([] if "PID" in drop else [segment("PID", pid_fields)]),
        *after_pid,
        *([] if "PV1" in drop else [segment("PV1", pv1_fields)]),
        *after_pv1,
    ]
    return end.join(lines) + end


def adt(trigger: str = "A01", **kwargs) -> V2Message:
    """:func:`adt_text` parsed."""
    return V2Message(adt_text(trigger, **kwargs).encode("utf-8"))


def resources(bundle: dict, resource_type: str) -> list[dict]:
    """The Bundle's resources of ``resource_type``, in entry order."""
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def only(bundle: dict, resource_type: str) -> dict:
    """The Bundle's one resource of ``resource_type`` (fails when there are none or several)."""
    found = resources(bundle, resource_type)
    assert len(found) == 1, f"{len(found)} {resource_type} resources"
    return found[0]


def resolve(bundle: dict, reference: str) -> dict:
    """The resource a urn:uuid reference points at inside the Bundle."""
    for e in bundle["entry"]:
        if e["fullUrl"] == reference:
            return e["resource"]
    raise AssertionError(f"{reference} does not resolve inside the Bundle")
