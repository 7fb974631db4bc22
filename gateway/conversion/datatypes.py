"""HL7 v2 datatypes -> FHIR datatypes (CX, XPN, XAD, XTN, XCN, CWE/CE, HD, PL, DTM).

:class:`MessageContext` carries what every map of one message shares: the
separators, the vocabulary, the sender's time zone, the warnings, the
resources made so far (deduplicated by id) and, only when an analyst asked
for it, the provenance trace. Datatype maps take a field repetition as
written (escapes intact), so subcomponents are split before unescaping.
Each follows the v2-to-FHIR IG's datatype map; docs/mapping-decisions.md
lists where Herald departs from it.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, tzinfo
from hashlib import sha1

from gateway.conversion.v2 import Segment, V2Message, parse_dtm
from gateway.conversion.vocabulary import Vocabulary
from gateway.errors import MessageError

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

#: Namespace for Herald's deterministic resource ids.
HERALD_NAMESPACE = uuid.UUID("6f1b7c1e-1e0b-5a53-9f51-6c1d7b0e4a11")

#: The MBI format (CMS): 11 characters, letters excluding S, L, O, I, B, Z.
MBI_PATTERN = re.compile(
    r"^[1-9][AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9][0-9][AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9][0-9]"
    r"[AC-HJKMNP-RT-Y]{2}[0-9]{2}$"
)

_NAMESPACE_BYTES = HERALD_NAMESPACE.bytes
_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$", re.ASCII)
_URN_UNSAFE = re.compile(r"[^A-Za-z0-9.\-]+")
_TABLE_NAME = re.compile(r"^HL7(\d{4})$", re.ASCII)
_LOCAL_SYSTEM = re.compile(r"^(L|99[A-Z0-9]{3})$", re.ASCII)
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$", re.ASCII)


def resource_id(*parts: str) -> str:
    """A deterministic id for the resource named by ``parts``: ``uuid5(HERALD_NAMESPACE, "|".join(parts))``.

    Computed directly (the same value as :func:`uuid.uuid5`, a third of its cost):
    a message makes a dozen of these.
    """
    digest = bytearray(sha1(_NAMESPACE_BYTES + "|".join(parts).encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def ref(rid: str) -> str:
    """The fullUrl (and reference) of a resource inside the Bundle."""
    return f"urn:uuid:{rid}"


def code_value(text: str) -> str:
    """``text`` as a FHIR ``code``: no leading, trailing or repeated whitespace."""
    return " ".join(text.split())


def authority_system(authority: str) -> str:
    """A system URI for an assigning authority: OIDs as urn:oid, URIs as given, others as a Herald URN."""
    return system_uri(authority, "id")


def system_uri(name: str, kind: str) -> str:
    """``name`` as a URI: an OID as urn:oid, a URI as given, anything else as ``urn:herald:<kind>:<name>``."""
    a = name.strip()
    if _OID.match(a):
        return f"urn:oid:{a}"
    if a.lower().startswith(("http://", "https://", "urn:")) and not any(c.isspace() for c in a):
        return a
    return f"urn:herald:{kind}:" + (_URN_UNSAFE.sub("-", a).strip("-") or "local")


def period_of(start: str, end: str) -> dict | None:
    """A FHIR Period of the bounds that are known; None when neither is."""
    if not start and not end:
        return None
    out = {}
    if start:
        out["start"] = start
    if end:
        out["end"] = end
    return out


def npi_check_digit(first_nine: str) -> str:
    """The check digit of an NPI from its first nine digits: Luhn over the digits prefixed with
    80840 (the card issuer prefix CMS gives the NPI, per its "NPI Check Digit" paper)."""
    total = 0
    for k, ch in enumerate(reversed("80840" + first_nine)):
        n = ord(ch) - 48
        if k % 2 == 0:  # doubled: these sit at odd positions from the right once the check digit follows
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return str((10 - total % 10) % 10)


def looks_like_npi(value: str) -> bool:
    """10 digits passing the NPI Luhn check (prefix 80840)."""
    return len(value) == 10 and value.isascii() and value.isdigit() and npi_check_digit(value[:9]) == value[9]


class HD:
    """A hierarchic designator: namespace id, universal id and its type."""

    __slots__ = ("namespace", "universal", "kind")

    def __init__(self, namespace: str, universal: str, kind: str) -> None:
        self.namespace = namespace
        self.universal = universal
        self.kind = kind

    @property
    def text(self) -> str:
        """What people call the authority: the namespace id, else the universal id."""
        return self.namespace or self.universal

    @property
    def universal_uri(self) -> str:
        """The universal id as a URI when it is valid for its type (ISO OID, UUID, URI, DNS name), else ""."""
        kind = self.kind.upper()
        u = self.universal
        if not u:
            return ""
        if kind == "ISO" or (not kind and _OID.match(u)):
            return f"urn:oid:{u}" if _OID.match(u) else ""
        if kind == "UUID":
            try:
                return f"urn:uuid:{uuid.UUID(u)}"
            except ValueError:
                return ""
        if kind in ("URI", "URL"):
            system = authority_system(u)
            return "" if system.startswith("urn:herald:") else system
        if kind == "DNS":
            return f"urn:dns:{u.lower()}" if _DNS_NAME.match(u) else ""
        return ""

    @property
    def system(self) -> str:
        """A system URI: the universal id when it is one (ISO OID, UUID, URI), else from the name."""
        if self.universal and self.kind.upper() != "DNS":
            found = self.universal_uri
            if found:
                return found
        return authority_system(self.text)

    def __bool__(self) -> bool:
        return bool(self.namespace or self.universal)


class MessageContext:
    """State shared by the maps of one message (see the module docstring)."""

    def __init__(
        self,
        msg: V2Message,
        vocab: Vocabulary,
        default_tz: tzinfo,
        scope: str,
        trace: list | None = None,
    ) -> None:
        self.msg = msg
        self.vocab = vocab
        self.tz = default_tz
        #: "sending application|sending facility": ids and local systems are scoped by it.
        self.scope = scope
        self.scope_system = authority_system(scope)
        self.warnings: list[str] = []
        #: Resources other than the header, Encounter and Patient, by id, in order.
        self.resources: dict[str, dict] = {}
        #: (segment, field number, FHIR target) per use, only when explaining.
        self.trace = trace
        self._comp = msg.comp
        self._sub = msg.sub
        self._esc = msg.esc
        self._coding_systems = vocab.coding_systems
        self._tables = vocab.tables

    # -- bookkeeping -------------------------------------------------------

    def used(self, seg: Segment, n: int, target: str) -> None:
        """Record that field ``n`` of ``seg`` went to ``target`` (a no-op unless explaining)."""
        if self.trace is not None:
            self.trace.append((seg, n, target))

    def warn(self, location: str, reason: str) -> None:
        """A problem that left a value out; ``reason`` holds no patient data."""
        self.warnings.append(f"{location}: {reason}; the field was left out")

    def add(self, resource: dict) -> str:
        """Add ``resource`` (once per id) and return its reference."""
        rid = resource["id"]
        if rid not in self.resources:
            self.resources[rid] = resource
        return ref(rid)

    # -- text --------------------------------------------------------------

    def split(self, raw: str) -> list[str]:
        """The raw components of one repetition."""
        return raw.split(self._comp)

    def text(self, raw: str) -> str:
        """One raw component or subcomponent as text: unescaped, stripped, ``""`` as empty."""
        if self._esc in raw:
            raw = self.msg.unescape(raw)
        elif raw == '""':
            return ""
        return raw.strip()

    def texts(self, raw: str) -> list[str]:
        """Every component of a raw repetition as text."""
        text = self.text
        return [text(c) for c in raw.split(self._comp)]

    def field_text(self, seg: Segment, n: int) -> str:
        """Component 1 of the first repetition of field ``n`` as text."""
        reps = seg.reps(n)
        return self.text(reps[0].split(self._comp, 1)[0]) if reps else ""

    # -- dates and times ---------------------------------------------------

    def dtm(self, value: str, location: str) -> tuple[str, datetime | None]:
        """A DTM as a FHIR dateTime; an invalid one is a warning and ``""``."""
        if not value:
            return "", None
        try:
            return parse_dtm(value, location, self.tz)
        except MessageError as e:
            self.warn(e.location, e.reason)
            return "", None

    def date(self, value: str, location: str) -> str:
        """A DT/DTM as a FHIR date (the day, or less when the source is less precise)."""
        text, _ = self.dtm(value, location)
        return text[:10]

    def field_dtm(self, seg: Segment, n: int) -> str:
        """Field ``n`` (component 1, a DTM or TS) as a FHIR dateTime, or ``""``."""
        return self.dtm(self.field_text(seg, n), f"{seg.name}-{n}")[0]

    # -- coded values ------------------------------------------------------

    def table_coding(self, table: str, code: str) -> dict | None:
        """The FHIR coding for ``code`` in one of ``mappings/tables``; None when unmapped."""
        row = self._tables[table].get(code.upper())
        return row.as_fhir() if row is not None and row.code else None

    def table_code(self, table: str, code: str) -> str:
        """The FHIR code for ``code`` in a table, or ""."""
        row = self._tables[table].get(code.upper())
        return row.code if row is not None else ""

    def coding_system(self, name: str) -> str:
        """A CWE-3 coding system name (table 0396) as a FHIR system URI; "" for none.

        HL7 tables (HL7nnnn) become terminology.hl7.org's v2-nnnn; local
        systems (L, 99zzz) and unknown names a Herald URN naming them, so
        the code is kept and never attributed to a system it is not from.
        """
        name = name.strip()
        if not name:
            return ""
        upper = name.upper()
        url = self._coding_systems.get(upper)
        if url:
            return url
        m = _TABLE_NAME.match(upper)
        if m:
            return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}"
        return system_uri(name, "codesystem")

    def cwe(self, raw: str, table: str = "", v2_system: str = "") -> dict | None:
        """A CWE/CE/CNE repetition as a CodeableConcept.

        Triplets 1-3, 4-6 and 10-12 become codings; a code without a coding
        system takes ``v2_system`` (the field's HL7 table) when given. With
        ``table``, a code the Herald table maps gets its FHIR coding first.
        """
        c = self.texts(raw)
        n = len(c)
        codings: list[dict] = []
        for code_i in (0, 3, 9):
            if n <= code_i:
                break
            code = code_value(c[code_i])
            if not code:
                continue
            coding: dict = {}
            system = self.coding_system(c[code_i + 2]) if n > code_i + 2 else ""
            if not system and v2_system:
                system = v2_system
            if system:
                coding["system"] = system
            coding["code"] = code
            version_i = 6 if code_i == 0 else (7 if code_i == 3 else 12)
            if n > version_i and c[version_i]:
                coding["version"] = c[version_i]
            if n > code_i + 1 and c[code_i + 1]:
                coding["display"] = c[code_i + 1]
            codings.append(coding)
        if table and codings:
            mapped = self.table_coding(table, codings[0]["code"])
            if mapped is not None:
                first = codings[0]
                if mapped["system"] != first.get("system"):
                    codings.insert(0, mapped)
                elif mapped["code"] == first["code"] and "display" not in first and "display" in mapped:
                    first["display"] = mapped["display"]
        concept: dict = {}
        if codings:
            concept["coding"] = codings
        text = (c[8] if n > 8 else "") or (c[1] if n > 1 else "") or (c[4] if n > 4 else "")
        if text:
            concept["text"] = text
        elif not codings and c[0]:
            concept["text"] = c[0]
        return concept or None

    # -- identifiers -------------------------------------------------------

    def hd(self, raw_component: str) -> HD:
        """An HD held in one component (its parts are subcomponents)."""
        if not raw_component:
            return HD("", "", "")
        parts = raw_component.split(self._sub)
        text = self.text
        return HD(
            text(parts[0]),
            text(parts[1]) if len(parts) > 1 else "",
            text(parts[2]) if len(parts) > 2 else "",
        )

    def hd_field(self, raw_rep: str) -> HD:
        """An HD that is a whole field (its parts are components)."""
        c = self.texts(raw_rep)
        return HD(c[0], c[1] if len(c) > 1 else "", c[2] if len(c) > 2 else "")

    def cx(self, raw: str) -> dict | None:
        """A CX repetition as an Identifier; None when it has no value or is an SSN.

        System: a US identifier system named by the type code (MBI only in
        the MBI format), an MBI recognised by a Medicare authority, else the
        assigning authority's (OID, URI, or a Herald URN of its name, or of
        the sender when there is none). ``assigner.display`` is the authority.
        """
        c = raw.split(self._comp)
        n = len(c)
        value = self.text(c[0])
        if not value:
            return None
        authority = self.hd(c[3]) if n > 3 else HD("", "", "")
        id_type = code_value(self.text(c[4])).upper() if n > 4 else ""
        vocab = self.vocab
        system = vocab.identifier_systems.get(id_type)
        if system == SSN_SYSTEM:
            return None  # minimum necessary: SSNs are not forwarded
        if system == MBI_SYSTEM or (system is None and authority.text.upper() in vocab.mbi_authorities):
            canonical = value.replace("-", "").upper()
            if MBI_PATTERN.match(canonical):
                value, system = canonical, MBI_SYSTEM
            else:
                system = None
        if system is None:
            system = authority.system if authority else self.scope_system
        ident: dict = {}
        if id_type == "MR":
            ident["use"] = "usual"
        if id_type:
            coding = {"system": V2_0203, "code": id_type}
            row = self._tables["0203-identifier-type"].get(id_type)
            if row is not None and row.display:
                coding["display"] = row.display
            ident["type"] = {"coding": [coding]}
        ident["system"] = system
        ident["value"] = value
        if n > 6:
            start = self.date(self.text(c[6]), "CX-7") if c[6] else ""
            end = self.date(self.text(c[7]), "CX-8") if n > 7 and c[7] else ""
            valid = period_of(start, end)
            if valid:
                ident["period"] = valid
        if authority:
            ident["assigner"] = {"display": authority.text}
        return ident

    # -- names, addresses, telecom -----------------------------------------

    def xpn(self, raw: str) -> dict | None:
        """An XPN repetition as a HumanName (name type -> use by table 0200)."""
        c = raw.split(self._comp)
        n = len(c)
        text = self.text
        # XPN-1 is an FN: the surname is its first subcomponent.
        family = text(c[0].split(self._sub, 1)[0]) if c[0] else ""
        name: dict = {}
        if n > 6 and c[6]:
            use = self.table_code("0200-name-use", text(c[6]))
            if use:
                name["use"] = use
        if family:
            name["family"] = family
        given = [g for g in (text(c[1]) if n > 1 else "", text(c[2]) if n > 2 else "") if g]
        if given:
            name["given"] = given
        prefix = text(c[4]) if n > 4 else ""
        if prefix:
            name["prefix"] = [prefix]
        # XPN-4 suffix, XPN-6 degree, XPN-14 professional suffix.
        suffix = [text(c[i]) for i in (3, 5, 13) if n > i]
        suffix = [s for s in suffix if s]
        if suffix:
            name["suffix"] = suffix
        if n > 11 and (c[11] or (n > 12 and c[12])):
            start = self.dtm(text(c[11]), "XPN-12")[0]
            end = self.dtm(text(c[12]), "XPN-13")[0] if n > 12 else ""
            valid = period_of(start, end)
            if valid:
                name["period"] = valid
        return name if ("family" in name or "given" in name) else None

    def xad(self, raw: str) -> dict | None:
        """An XAD repetition as an Address (type by table 0190 -> use or type)."""
        c = raw.split(self._comp)
        n = len(c)
        text = self.text
        # XAD-1 is an SAD: street address, street name and dwelling number are
        # its subcomponents, each a line (the IG's SAD[Address]) unless the
        # street address already holds it ("12 MAIN ST&MAIN ST&12" is one line).
        street = []
        if c[0]:
            sad = c[0].split(self._sub)
            street.append(text(sad[0]))
            for part in sad[1:3]:
                v = text(part)
                if v and f" {v} " not in f" {street[0]} ":
                    street.append(v)
        addr: dict = {}
        kind = text(c[6]) if n > 6 else ""
        if kind:
            use = self.table_code("0190-address-use", kind)
            if use:
                addr["use"] = use
            addr_type = self.table_code("0190-address-type", kind)
            if addr_type:
                addr["type"] = addr_type
        line = [x for x in (*street, text(c[1]) if n > 1 else "", text(c[18]) if n > 18 else "") if x]
        if line:
            addr["line"] = line
        for key, i in (("city", 2), ("state", 3), ("postalCode", 4), ("country", 5)):
            if n > i:
                v = text(c[i])
                if v:
                    addr[key] = v
        if n > 8 and c[8]:
            # XAD-9 is a CWE from v2.7 (its parts are subcomponents), an IS code
            # before: the IG's CWE[string] takes the original text, else the
            # text; a bare code (the IS form) is kept as it is all there is.
            county = [text(s) for s in c[8].split(self._sub)]
            v = (county[8] if len(county) > 8 else "") or (county[1] if len(county) > 1 else "") or county[0]
            if v:
                addr["district"] = v
        if n > 12 and (c[12] or (n > 13 and c[13])):
            start = self.dtm(text(c[12]), "XAD-13")[0]
            end = self.dtm(text(c[13]), "XAD-14")[0] if n > 13 else ""
            valid = period_of(start, end)
            if valid:
                addr["period"] = valid
        if len(addr) == (1 if "use" in addr else 0) + (1 if "type" in addr else 0):
            return None  # a type code alone is not an address
        return addr

    def xtn(self, raw: str, default_use: str = "") -> dict | None:
        """An XTN repetition as a ContactPoint.

        The value is XTN-12 (the unformatted number) when sent, else the
        components (country, area, local number, extension) written as the
        IG writes them (``+1 203 5550188 X12``), else the pre-v2.3 string in
        XTN-1 (``(203)555-0147``); e-mail from XTN-4.
        """
        c = self.texts(raw)
        n = len(c)
        use_code = c[1] if n > 1 else ""
        equipment = c[2] if n > 2 else ""
        email = c[3] if n > 3 else ""
        point: dict = {}
        row = self._tables["0202-telecom-system"].get(equipment.upper()) if equipment else None
        use = self.table_code("0201-telecom-use", use_code) if use_code else default_use
        if row is not None and row.system.endswith("/contact-point-use"):
            # The IG maps CP (cellular phone) to the use "mobile": it is a phone.
            system, use = "phone", row.code
        elif row is not None:
            system = row.code
        else:
            # No XTN-3 (the pre-v2.3 string form): the field is a phone number.
            # An equipment type outside table 0202: "other" (a value needs a system).
            system = "other" if equipment else "phone"
        if system == "email" or (email and (not equipment or use_code == "NET")):
            if not email:
                return None
            point["system"] = "email"
            point["value"] = email
        else:
            country, area, local = (c[4] if n > 4 else ""), (c[5] if n > 5 else ""), (c[6] if n > 6 else "")
            ext = c[7] if n > 7 else ""
            unformatted = c[11] if n > 11 else ""
            if unformatted:
                # XTN-12, the number as dialled, is the IG's value when it is sent.
                value = unformatted
            elif local:
                value = " ".join(x for x in (f"+{country}" if country else "", area, local) if x)
                if ext:
                    value += f" X{ext}"
            else:
                value = c[0]
            if not value:
                return None
            point["system"] = system
            point["value"] = value
        if use:
            point["use"] = use
        if n > 17 and c[17].isascii() and c[17].isdigit() and int(c[17]) > 0:
            point["rank"] = int(c[17])
        return point

    # -- people and places -------------------------------------------------

    def xcn(self, raw: str) -> tuple[str, dict] | None:
        """An XCN repetition as a Practitioner (and its id); None when it names nobody.

        An NPI is recognised by the type code NPI, an NPI authority, or 10
        digits passing the NPI check digit with no authority; it gets the US
        NPI system. The id is from the identifier (NPIs are global; other ids
        are scoped by their authority or the sender), else from the name.
        """
        c = raw.split(self._comp)
        n = len(c)
        text = self.text
        ident_value = text(c[0])
        family = text(c[1].split(self._sub, 1)[0]) if n > 1 and c[1] else ""
        given = [g for g in (text(c[2]) if n > 2 else "", text(c[3]) if n > 3 else "") if g]
        if not ident_value and not family and not given:
            return None
        practitioner: dict = {"resourceType": "Practitioner"}
        if ident_value:
            authority = self.hd(c[8]) if n > 8 else HD("", "", "")
            id_type = code_value(text(c[12])).upper() if n > 12 else ""
            vocab = self.vocab
            is_npi = (
                id_type == "NPI"
                or authority.text.upper() in vocab.npi_authorities
                or authority.universal == "2.16.840.1.113883.4.6"
                or (not authority and not id_type and looks_like_npi(ident_value))
            )
            system = NPI_SYSTEM if is_npi else (authority.system if authority else self.scope_system)
            ident: dict = {}
            if id_type:
                ident["type"] = {"coding": [{"system": V2_0203, "code": id_type}]}
            ident["system"] = system
            ident["value"] = ident_value
            if authority and not is_npi:
                ident["assigner"] = {"display": authority.text}
            practitioner["identifier"] = [ident]
            rid = resource_id("Practitioner", system, ident_value)
        else:
            rid = resource_id("Practitioner", self.scope, family, *given)
        practitioner["id"] = rid
        name: dict = {}
        if n > 9 and c[9]:
            use = self.table_code("0200-name-use", text(c[9]))
            if use:
                name["use"] = use
        if family:
            name["family"] = family
        if given:
            name["given"] = given
        prefix = text(c[5]) if n > 5 else ""
        if prefix:
            name["prefix"] = [prefix]
        suffix = [s for s in (text(c[4]) if n > 4 else "", text(c[20]) if n > 20 else "") if s]
        if suffix:
            name["suffix"] = suffix
        # XCN-19/20 (effective, expiration), else XCN-17 (a DR: its parts are subcomponents).
        start = text(c[18]) if n > 18 else ""
        end = text(c[19]) if n > 19 else ""
        if not start and not end and n > 16 and c[16]:
            validity = c[16].split(self._sub)
            start, end = text(validity[0]), text(validity[1]) if len(validity) > 1 else ""
        if start or end:
            valid = period_of(self.dtm(start, "XCN-19")[0], self.dtm(end, "XCN-20")[0])
            if valid:
                name["period"] = valid
        if "family" in name or "given" in name:
            practitioner["name"] = [name]
        degree = code_value(text(c[6])) if n > 6 else ""
        if degree:
            practitioner["qualification"] = [
                {"code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0360", "code": degree}]}}
            ]
        return rid, practitioner

    def pl(self, raw: str, facility: str, org_ref: str) -> dict | None:
        """A PL repetition as one Location (point of care, room, bed; its facility manages it).

        The IG makes up to six Locations (bed, room, point of care, floor,
        building, facility) linked by partOf; Herald makes one, named by
        the parts present, typed by the most specific one, so a receiver
        reads "3W 312 B" where the patient is. The id is from the facility
        and the parts, so a bed is the same Location in every message.
        """
        c = raw.split(self._comp)
        n = len(c)
        text = self.text
        parts = []
        kind = ""
        # From the least to the most specific part; the point of care (a
        # nursing unit, the ED...) has no physical type of its own in FHIR.
        for i, physical in ((6, "bu"), (7, "lvl"), (0, ""), (1, "ro"), (2, "bd")):
            if n > i and c[i]:
                v = text(c[i].split(self._sub, 1)[0])
                if v:
                    parts.append(f"{i}:{v}")
                    kind = physical
        if not parts:
            return None
        rid = resource_id("Location", self.scope, facility, *parts)
        location: dict = {
            "resourceType": "Location",
            "id": rid,
            "name": " ".join(p.split(":", 1)[1] for p in parts),
            "mode": "instance",
        }
        if kind:
            location["physicalType"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": kind}]
            }
        description = text(c[8]) if n > 8 else ""
        if description:
            location["description"] = description
        location["managingOrganization"] = {"reference": org_ref}
        return location
