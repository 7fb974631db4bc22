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
match and the patient's episodes, :meth:`gateway.app.transitions_service.TransitionsService.card_for`);
it may answer at once or with a Deferred (the wiring matches on a thread, never
on the reactor). This module only speaks the protocol.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from gateway.transitions.alerts import AlertContent, alert_lines

__all__ = [
    "SERVICES",
    "CardAnswer",
    "CdsHooksListener",
    "CdsHooksResource",
    "TrustedIssuer",
    "cds_hooks_listener",
    "load_issuers",
]

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
    """An EHR allowed to call: its ``iss`` and the JWKS (a dict) its keys are in.

    ``cards``: whether its calls are answered with cards (a facility may have
    the e-alert by MLLP only: its EHR's calls then get no card).
    """

    iss: str
    jwks: Mapping
    cards: bool = True


@dataclass(frozen=True)
class CardAnswer:
    """A lookup's answer: the card's content (None: no card) and what the audit event says of the match."""

    content: AlertContent | None
    detail: Mapping = field(default_factory=dict)


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
        self.keys: dict[str, jwt.PyJWKSet | None] = {}
        self.cards: dict[str, bool] = {}
        for i in issuers:
            self.set_issuer(i)
        self.lookup = lookup
        self.audit = audit
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def set_issuer(self, issuer: TrustedIssuer) -> None:
        """Trust an EHR, or take its new keys (a JWKS fetched again); an empty JWKS: known, no key yet."""
        keys = issuer.jwks.get("keys") if isinstance(issuer.jwks, Mapping) else None
        self.keys[issuer.iss] = jwt.PyJWKSet.from_dict(dict(issuer.jwks)) if keys else None
        self.cards[issuer.iss] = issuer.cards

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
        iss = unverified.get("iss", "")
        if iss not in self.keys:
            raise _Refused("issuer not trusted")
        keys = self.keys[iss]
        if keys is None:
            raise _Refused("the issuer's JWKS is not loaded yet (no key of the issuer's JWKS has the token's kid)")
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
        if not p.cards.get(claims["iss"], True):
            p.audit("cds-hooks-call", {"service": self.service_id, "iss": claims["iss"], "cards": 0, "enabled": False})
            return json.dumps({"cards": []}).encode()
        d = defer.maybeDeferred(p.lookup, patient, body.get("context") or {})
        d.addCallback(self._answer, request, claims)
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _answer(self, answer, request, claims: Mapping) -> None:
        p = self.parent
        if not isinstance(answer, CardAnswer):
            answer = CardAnswer(answer)
        cards = [p.card(answer.content)] if answer.content is not None else []
        p.audit(
            "cds-hooks-call", {"service": self.service_id, "iss": claims["iss"], "cards": len(cards), **answer.detail}
        )
        self._finish(request, json.dumps({"cards": cards}).encode())

    def _failed(self, failure, request) -> None:
        # The type only: an exception's text may quote the patient.
        self.parent._log.error("CDS Hooks lookup failed ({error})", error=failure.type.__name__)
        request.setResponseCode(500)
        self._finish(request, json.dumps({"error": "the lookup failed"}).encode())

    @staticmethod
    def _finish(request, body: bytes) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(body)
        request.finish()


# -- served by `herald serve` ([cds_hooks]) ----------------------------------------------------------

#: How often a JWKS published at a URL is fetched again (seconds): an EHR rotates its keys there.
JWKS_REFRESH_SECONDS = 3600.0


def load_issuers(config) -> tuple[list[TrustedIssuer], dict[str, str]]:
    """The trusted EHRs of ``[cds_hooks]``: those with a JWKS file read now, and the JWKS URLs to fetch.

    An EHR bound to a facility whose ``[alerts."FACILITY"]`` says ``cds_hooks = false`` gets no cards.
    Raises :class:`~gateway.errors.ConfigError` naming the issuer's ``jwks`` when a file cannot be read.
    """
    from gateway.errors import ConfigError

    issuers, urls = [], {}
    for i, spec in enumerate(config.cds_hooks_issuers, 1):
        cards = bool((config.alerts.get(spec.get("facility", "")) or {}).get("cds_hooks", True))
        source = spec["jwks"]
        if source.startswith(("https://", "http://")):
            urls[spec["iss"]] = source
            issuers.append(TrustedIssuer(spec["iss"], {}, cards))
            continue
        try:
            jwks = json.loads(Path(source).read_text(encoding="utf-8"))
            jwt.PyJWKSet.from_dict(jwks)
        except (OSError, ValueError, jwt.PyJWTError) as e:
            raise ConfigError(f"cds_hooks.issuers[{i}].jwks", f"{source}: not a readable JWKS ({e})") from None
        issuers.append(TrustedIssuer(spec["iss"], jwks, cards))
    return issuers, urls


def https_options(config):
    """TLS for the CDS Hooks listener: the server certificate of ``[tls]``, no client certificate asked for
    (EHRs authenticate with their signed JWT, as CDS Hooks says)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from OpenSSL import SSL
    from twisted.internet import ssl

    from gateway.errors import ConfigError
    from mllp.tls import TLS_VERSIONS

    cert_path, key_path, _ = config.tls_files
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as e:
        raise ConfigError("cds_hooks.listen", f"a tls: listener needs [tls] cert and key ({e})") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError("tls.cert", f"{cert_path} or {key_path} cannot be read ({e})") from None
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLS_VERSIONS[config.tls_min_version],
    )
    try:
        options.getContext()
    except SSL.Error as e:
        raise ConfigError("tls.key", f"{key_path} does not belong to {cert_path} ({e})") from None
    return options


class CdsHooksListener(Service):
    """The CDS Hooks service's HTTPS listener (``[cds_hooks] listen``), and its issuers' JWKS kept fresh."""

    _log = Logger()

    def __init__(self, config, reactor, lookup, audit, agent=None) -> None:
        from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString

        from gateway.config import parse_listen

        self.config = config
        self.reactor = reactor
        self.listen = parse_listen(config.cds_hooks_listen)
        issuers, self.jwks_urls = load_issuers(config)
        self.resource = CdsHooksResource(
            config.cds_hooks_base_url or "https://localhost/cds-services", issuers, lookup, audit
        )
        if self.listen.tls:
            self.endpoint = SSL4ServerEndpoint(
                reactor, self.listen.port, https_options(config), self.listen.backlog, self.listen.interface
            )
        else:
            self.endpoint = serverFromString(reactor, self.listen.spec)
        self.agent = agent
        self.port = None
        self.ready: defer.Deferred = defer.Deferred()
        self._refresh = None

    def startService(self):
        from twisted.internet import task
        from twisted.web.resource import Resource

        super().startService()
        root = Resource()
        root.putChild(b"cds-services", self.resource)
        site = server.Site(root)
        site.displayTracebacks = False
        d = self.endpoint.listen(site)

        def bound(port):
            self.port = port
            if not self.config.cds_hooks_base_url:
                scheme = "https" if self.listen.tls else "http"
                host = self.listen.interface if self.listen.interface not in ("", "0.0.0.0", "::") else "localhost"
                self.resource.base_url = f"{scheme}://{host}:{port.getHost().port}/cds-services"
            self._log.info("CDS Hooks listening on {spec} ({url})", spec=self.listen.spec, url=self.resource.base_url)
            self.ready.callback(port)
            return port

        d.addCallback(bound)
        d.addErrback(self.ready.errback)
        if self.jwks_urls:
            self._refresh = task.LoopingCall(self.fetch_keys)
            self._refresh.clock = self.reactor
            self._refresh.start(JWKS_REFRESH_SECONDS, now=True)
        return d

    def stopService(self):
        super().stopService()
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        if self.port is not None:
            return self.port.stopListening()
        return None

    @defer.inlineCallbacks
    def fetch_keys(self):
        """Fetch each JWKS published at a URL; one that fails keeps the keys it had (and is said in the log)."""
        from twisted.web.client import Agent, readBody

        agent = self.agent or Agent(self.reactor, connectTimeout=10)
        for i, issuer in enumerate(self.config.cds_hooks_issuers, 1):
            url = self.jwks_urls.get(issuer["iss"])
            if url is None:
                continue
            try:
                response = yield agent.request(b"GET", url.encode("ascii"))
                body = yield readBody(response)
                if response.code != 200:
                    raise ValueError(f"HTTP {response.code}")
                jwks = json.loads(body)
                jwt.PyJWKSet.from_dict(jwks)
            except Exception as e:
                self._log.warn(
                    "CDS Hooks: the JWKS of issuer {n} ({url}) could not be fetched: {error}",
                    n=i,
                    url=url,
                    error=f"{type(e).__name__}: {e}",
                )
                continue
            cards = self.resource.cards.get(issuer["iss"], True)
            self.resource.set_issuer(TrustedIssuer(issuer["iss"], jwks, cards))


def cds_hooks_listener(config, reactor, store, transitions) -> CdsHooksListener | None:
    """The CDS Hooks listener ``make_service`` starts when ``[cds_hooks] listen`` is set (else None).

    Its cards come from the transitions service (the roster match and the member's episodes);
    every call, refused or answered, is an audit event (actor ``cds-hooks``).
    """
    if not config.cds_hooks_listen:
        return None
    if transitions is None:
        from gateway.errors import ConfigError

        raise ConfigError("cds_hooks.listen", "needs [transitions] enabled: the card comes from the member's episodes")
    log = Logger()

    def audit(kind: str, detail: dict) -> None:
        d = store.record_connection_event(kind, dict(detail), actor="cds-hooks")
        d.addErrback(lambda f: log.error("CDS Hooks: an audit event was not written ({error})", error=f.type.__name__))

    return CdsHooksListener(config, reactor, transitions.card_for, audit)
