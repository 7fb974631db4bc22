"""A CDS Hooks 2.0 service: the ED e-alert as a card inside the EHR.

EHRs that speak CDS Hooks (Epic and Oracle Health among them) call a service
at ``encounter-start`` and ``patient-view``. Herald answers with one card when
the patient is an attributed ACO member (and not opted out): the ACO, the PCP
and how to reach them, the care manager, recent utilisation, and a reminder to
contact the PCP before discharge (:func:`gateway.transitions.alerts.alert_lines`).

- ``GET /cds-services``: discovery, listing the two services and the prefetch
  each asks for (the Patient, so no call back to the EHR's FHIR server is needed).
- ``POST /cds-services/<id>``: a hook call. It must carry ``Authorization:
  Bearer <JWT>`` signed by a trusted EHR, checked as the CDS Hooks spec says:
  the issuer is known and its JWKS verifies the signature (ES384 or RS384),
  ``aud`` is this service's URL, ``exp`` is in the future and no more than 5
  minutes after ``iat``, and the ``jti`` is not one seen before. Anything
  else is a 401 with the reason, and an audit event.

The card content comes from a *lookup* the server wiring provides (the roster
match and the patient's episodes); this module only speaks the protocol.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jwt
from twisted.logger import Logger
from twisted.web import resource

from gateway.transitions.alerts import AlertContent, alert_lines

__all__ = ["SERVICES", "CdsHooksResource", "TrustedIssuer"]

SERVICES = [
    {
        "hook": "encounter-start",
        "id": "herald-aco-encounter-start",
        "title": "ACO attribution alert",
        "description": "When an encounter starts for an ACO member: the ACO, the PCP to call, the care manager.",
        "prefetch": {"patient": "Patient/{{context.patientId}}"},
    },
    {
        "hook": "patient-view",
        "id": "herald-aco-patient-view",
        "title": "ACO attribution alert",
        "description": "When a member's chart is opened: the ACO, the PCP to call, the care manager.",
        "prefetch": {"patient": "Patient/{{context.patientId}}"},
    },
]
_ALGORITHMS = ["ES384", "RS384"]
_MAX_LIFETIME = 300


@dataclass(frozen=True)
class TrustedIssuer:
    """An EHR allowed to call: its ``iss`` and the JWKS (a dict) its keys are in."""

    iss: str
    jwks: Mapping


class _Refused(Exception):
    pass


class CdsHooksResource(resource.Resource):
    """``/cds-services`` and its children (put it at that path of a Twisted ``Site``)."""

    _log = Logger()

    def __init__(
        self,
        base_url: str,
        issuers: list[TrustedIssuer],
        lookup: Callable[[Mapping, Mapping], AlertContent | None],
        audit: Callable[[str, dict], None] = lambda kind, detail: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.keys = {i.iss: jwt.PyJWKSet.from_dict(dict(i.jwks)) for i in issuers}
        self.lookup = lookup
        self.audit = audit
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def getChild(self, path: bytes, request):  # noqa: N802 - Twisted's name
        if path == b"":
            return self
        return _Service(self, path.decode("utf-8", "replace"))

    def render_GET(self, request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"services": SERVICES}).encode()

    # -- a call -------------------------------------------------------------------

    def check_token(self, request, service_id: str) -> dict:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        if not header.startswith("Bearer "):
            raise _Refused("no bearer token")
        token = header[len("Bearer ") :]
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            head = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise _Refused(f"not a JWT ({e})") from None
        keys = self.keys.get(unverified.get("iss", ""))
        if keys is None:
            raise _Refused("issuer not trusted")
        kid = head.get("kid")
        candidates = [k for k in keys.keys if kid is None or k.key_id == kid]
        if not candidates:
            raise _Refused("no key of the issuer's JWKS has the token's kid")
        audience = f"{self.base_url}/{service_id}"
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=_ALGORITHMS,
                    audience=[audience, self.base_url],
                    options={"require": ["iss", "aud", "exp", "iat", "jti"]},
                    leeway=5,
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as e:
                raise _Refused(f"token refused: {e}") from None
        else:
            raise _Refused("the signature does not verify with the issuer's keys")
        if claims["exp"] - claims["iat"] > _MAX_LIFETIME:
            raise _Refused("the token lives longer than 5 minutes")
        now = self.clock()
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if claims["jti"] in self._seen:
            raise _Refused("the token's jti was used before (a replay)")
        self._seen[claims["jti"]] = claims["exp"] + 10
        return claims

    def card(self, content: AlertContent) -> dict:
        lines = alert_lines(content)
        who = f"; call PCP {content.pcp_name}" if content.pcp_name else ""
        phone = f" at {content.pcp_phone}" if content.pcp_phone else ""
        summary = f"ACO member ({content.aco}){who}{phone}"
        return {
            "uuid": str(uuid.uuid4()),
            "summary": summary[:140],
            "detail": "\n\n".join(lines),
            "indicator": "warning" if content.flags else "info",
            "source": {"label": "Herald: ACO care coordination"},
        }


class _Service(resource.Resource):
    isLeaf = True

    def __init__(self, parent: CdsHooksResource, service_id: str) -> None:
        super().__init__()
        self.parent = parent
        self.service_id = service_id

    def render_POST(self, request) -> bytes:  # noqa: N802
        p = self.parent
        request.setHeader(b"content-type", b"application/json")
        if self.service_id not in {s["id"] for s in SERVICES}:
            request.setResponseCode(404)
            return json.dumps({"error": "no such service"}).encode()
        peer = request.getClientAddress()
        try:
            claims = p.check_token(request, self.service_id)
        except _Refused as e:
            p._log.warn("CDS Hooks call refused from {peer}: {reason}", peer=getattr(peer, "host", "?"), reason=str(e))
            p.audit("cds-hooks-refused", {"service": self.service_id, "reason": str(e)})
            request.setResponseCode(401)
            return json.dumps({"error": str(e)}).encode()
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            request.setResponseCode(400)
            return json.dumps({"error": "the body is not JSON"}).encode()
        patient = (body.get("prefetch") or {}).get("patient")
        if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
            # Herald does not call back into the EHR's FHIR server: without the prefetch, no card.
            p.audit("cds-hooks-call", {"service": self.service_id, "iss": claims["iss"], "cards": 0, "prefetch": False})
            return json.dumps({"cards": []}).encode()
        content = p.lookup(patient, body.get("context") or {})
        cards = [p.card(content)] if content is not None else []
        p.audit("cds-hooks-call", {"service": self.service_id, "iss": claims["iss"], "cards": len(cards)})
        return json.dumps({"cards": cards}).encode()
