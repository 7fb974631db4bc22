"""The CDS Hooks service over a real socket: discovery, a signed call answered with a card, refusals.

Run under twisted.trial's TestCase (pytest collects it) with the real reactor.
"""

from __future__ import annotations

import json
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from gateway.app.cds_hooks import CdsHooksResource, TrustedIssuer
from gateway.transitions.alerts import AlertContent

EHR = "https://ehr.lakeshore.example"


def _key(kid: str):
    private = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": "ES384", "use": "sig"})
    return private, jwk


EHR_KEY, EHR_JWK = _key("ehr-1")
OTHER_KEY, _ = _key("ehr-1")  # same kid, a key the EHR never published


def token(aud: str, *, key=EHR_KEY, iss=EHR, lifetime=120, jti=None, kid="ehr-1") -> str:
    now = int(time.time())
    claims = {
        "iss": iss,
        "sub": "epic-client",
        "aud": aud,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti or str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": kid, "typ": "JWT"})


MEMBER = {
    "resourceType": "Patient",
    "id": "e1",
    "name": [{"family": "TESTPATIENT", "given": ["ALEX"]}],
    "birthDate": "1960-01-02",
}
OPTED_OUT = {**MEMBER, "id": "e2", "name": [{"family": "OPTOUT", "given": ["OLIVE"]}]}
CONTENT = AlertContent(aco="Lakeshore ACO (A1234)", pcp_name="Dr. Rina Lee", pcp_phone="203-555-0100", ed_visits_60d=1)


def lookup(patient, context):
    # The wiring matches the Patient against the roster; here, a member and an opted-out one.
    return CONTENT if patient.get("id") == "e1" else None


class CdsHooksTests(unittest.TestCase):
    def setUp(self):
        self.audited = []
        root = Resource()
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/cds-services"
        root.putChild(
            b"cds-services",
            CdsHooksResource(
                self.base, [TrustedIssuer(EHR, {"keys": [EHR_JWK]})], lookup, lambda k, d: self.audited.append((k, d))
            ),
        )
        self.agent = Agent(reactor)

    def tearDown(self):
        return self.port.stopListening()

    @defer.inlineCallbacks
    def call(self, service="herald-aco-encounter-start", patient=MEMBER, bearer=None):
        url = f"{self.base}/{service}"
        body = {
            "hook": "encounter-start",
            "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": patient["id"]},
            "prefetch": {"patient": patient},
        }
        headers = {b"Content-Type": [b"application/json"]}
        bearer = token(url) if bearer is None else bearer
        if bearer:
            headers[b"Authorization"] = [f"Bearer {bearer}".encode()]
        response = yield self.agent.request(
            b"POST", url.encode(), Headers(headers), FileBodyProducer(_bytes(json.dumps(body)))
        )
        data = yield readBody(response)
        return response.code, json.loads(data)

    @defer.inlineCallbacks
    def test_discovery_lists_both_hooks_with_the_patient_prefetch(self):
        response = yield self.agent.request(b"GET", self.base.encode())
        services = json.loads((yield readBody(response)))["services"]
        self.assertEqual(sorted(s["hook"] for s in services), ["encounter-start", "patient-view"])
        self.assertTrue(all(s["prefetch"]["patient"] == "Patient/{{context.patientId}}" for s in services))

    @defer.inlineCallbacks
    def test_a_signed_call_for_a_member_gets_the_card(self):
        code, body = yield self.call()
        self.assertEqual(code, 200)
        (card,) = body["cards"]
        self.assertIn("Dr. Rina Lee", card["summary"])
        self.assertIn("before the patient is discharged", card["detail"])
        self.assertEqual(self.audited[-1][0], "cds-hooks-call")

    @defer.inlineCallbacks
    def test_an_opted_out_member_gets_no_card(self):
        code, body = yield self.call(patient=OPTED_OUT)
        self.assertEqual((code, body), (200, {"cards": []}))

    @defer.inlineCallbacks
    def test_refusals(self):
        url = f"{self.base}/herald-aco-encounter-start"
        cases = {
            "no bearer token": "",
            "signature does not verify": token(url, key=OTHER_KEY),
            "issuer not trusted": token(url, iss="https://elsewhere.example"),
            "Audience": token("https://herald.example/cds-services/other"),
            "longer than 5 minutes": token(url, lifetime=3600),
        }
        for reason, bearer in cases.items():
            code, body = yield self.call(bearer=bearer)
            self.assertEqual(code, 401, reason)
            self.assertIn(reason.lower(), body["error"].lower())
        self.assertEqual(len([k for k, _ in self.audited if k == "cds-hooks-refused"]), len(cases))

    @defer.inlineCallbacks
    def test_a_replayed_token_is_refused(self):
        bearer = token(f"{self.base}/herald-aco-encounter-start", jti="same")
        code, _ = yield self.call(bearer=bearer)
        self.assertEqual(code, 200)
        code, body = yield self.call(bearer=bearer)
        self.assertEqual(code, 401)
        self.assertIn("replay", body["error"])


def _bytes(text: str):
    from io import BytesIO

    return BytesIO(text.encode())


class DeferredLookupTests(unittest.TestCase):
    """The wiring answers from a thread: a lookup that fires later, an issuer without cards, keys that come later."""

    def setUp(self):
        self.audited = []
        root = Resource()
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/cds-services"
        self.resource = CdsHooksResource(
            self.base,
            [TrustedIssuer(EHR, {}), TrustedIssuer("https://quiet.example", {"keys": [EHR_JWK]}, cards=False)],
            self.lookup,
            lambda k, d: self.audited.append((k, d)),
        )
        root.putChild(b"cds-services", self.resource)
        self.agent = Agent(reactor)

    def tearDown(self):
        return self.port.stopListening()

    def lookup(self, patient, context):
        from twisted.internet import task

        from gateway.app.cds_hooks import CardAnswer

        return task.deferLater(reactor, 0.01, lambda: CardAnswer(CONTENT, {"member": "M-1"}))

    @defer.inlineCallbacks
    def call(self, iss):
        url = f"{self.base}/herald-aco-patient-view"
        body = {"hook": "patient-view", "context": {"patientId": "e1"}, "prefetch": {"patient": MEMBER}}
        headers = Headers({b"Authorization": [f"Bearer {token(url, iss=iss)}".encode()]})
        response = yield self.agent.request(b"POST", url.encode(), headers, FileBodyProducer(_bytes(json.dumps(body))))
        return response.code, json.loads((yield readBody(response)))

    @defer.inlineCallbacks
    def test_keys_that_come_later_a_deferred_card_and_an_issuer_without_cards(self):
        """Before its JWKS is loaded a call is refused; after, the Deferred's card is sent; cards=False gets none."""
        code, body = yield self.call(EHR)
        self.assertEqual(code, 401)
        self.assertIn("not loaded yet", body["error"])
        self.resource.set_issuer(TrustedIssuer(EHR, {"keys": [EHR_JWK]}))
        code, body = yield self.call(EHR)
        self.assertEqual(code, 200)
        self.assertEqual(len(body["cards"]), 1)
        self.assertEqual(self.audited[-1][1]["member"], "M-1")
        code, body = yield self.call("https://quiet.example")
        self.assertEqual((code, body), (200, {"cards": []}))
