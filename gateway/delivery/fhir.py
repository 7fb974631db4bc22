"""The FHIR channel: ``POST [base]/$process-message`` with the notification Bundle.

Per the Da Vinci Unsolicited Notifications IG ("Reliable Delivery"): a 2xx
answer is success (200 or 204: received and processable; 202: received);
401 and 404 are not resent "without addressing the error"; 429 means resend
more slowly; 5xx may be retried. Here:

==================  ======================================================
answer              what the attempt becomes
==================  ======================================================
2xx                 sent
401, auth set       the token is dropped and the POST made once more at
                    once with a fresh one; a second 401 is permanent
401, no auth        permanent (the receiver wants authorization)
404, other 4xx      permanent
408, 429, 5xx       retryable, ``retry_after`` from ``Retry-After``
3xx                 permanent (the URL needs updating)
no answer, timeout  retryable
==================  ======================================================

The destination's ``timeout`` bounds the whole send: the token request, the
POST, its answer and the answer's body, and the 401 retry. Failure reasons
name the host, the status and the OperationOutcome's issue codes, never its
diagnostics (a receiver may echo patient data there).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.delivery.channels import (
    DeliveryFailed,
    FhirDestination,
    HttpAnswer,
    HttpConnections,
    HttpTimeout,
    OutboundNotification,
    SendResult,
    client_tls,
    connection_failure,
    host_of,
    http_post,
    parse_retry_after,
)
from gateway.delivery.smart import SmartTokens

__all__ = ["FhirChannel", "fhir_outcome"]

_CODE = re.compile(r"[a-z][a-z-]{0,40}")
_BEARER_ERROR = re.compile(r'error="?([A-Za-z_]{1,40})')


def _issue_codes(answer: HttpAnswer) -> str:
    """`` (OperationOutcome: code, code)`` from the answer's body, or ``""``: codes only, no free text."""
    try:
        doc = json.loads(answer.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return ""
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return ""
    codes = []
    for issue in doc.get("issue") or ():
        code = issue.get("code") if isinstance(issue, dict) else None
        if isinstance(code, str) and _CODE.fullmatch(code) and code not in codes:
            codes.append(code)
    return f" (OperationOutcome: {', '.join(codes[:3])})" if codes else ""


def fhir_outcome(answer: HttpAnswer, where: str, *, authorized: bool, now: float) -> str:
    """What a ``$process-message`` answer means: the detail of a success, or :class:`DeliveryFailed`.

    ``authorized``: the request carried a token fresh from the token endpoint
    (a 401 then means the client itself is refused). ``now``: the wall
    clock, for a ``Retry-After`` given as an HTTP-date.
    """
    code = answer.code
    said = f"HTTP {code} from {where}"
    if 200 <= code < 300:
        return f"HTTP {code}"
    issues = _issue_codes(answer)
    if code == 401:
        found = _BEARER_ERROR.search(answer.header("WWW-Authenticate") or "")
        error = f" ({found.group(1)})" if found else ""
        if authorized:
            reason = f"{said}{error} with a fresh access token: the client's authorization needs fixing{issues}"
        else:
            reason = f"{said}{error}: it wants authorization and none is configured (auth){issues}"
        raise DeliveryFailed(reason, permanent=True, status=code)
    if code in (408, 429) or code >= 500:
        raise DeliveryFailed(
            f"{said}{issues}",
            permanent=False,
            retry_after=parse_retry_after(answer.header("Retry-After"), now),
            status=code,
        )
    if code == 404:
        raise DeliveryFailed(f"{said}: no $process-message at this URL{issues}", permanent=True, status=code)
    if 300 <= code < 400:
        raise DeliveryFailed(f"{said}: a redirect; the URL needs updating", permanent=True, status=code)
    if 400 <= code < 500:
        raise DeliveryFailed(f"{said}{issues}", permanent=True, status=code)
    raise DeliveryFailed(f"{said}: not a final answer", permanent=False, status=code)


class FhirChannel:
    """Sends notifications to one FHIR destination (see the module docstring for what each answer does).

    ``tokens``: a shared :class:`SmartTokens` (made from ``destination.auth``
    when not given). ``clock``: the wall clock (assertion times, HTTP-dates).
    ``connections``: the delivery worker's kept-alive connections, for the
    POSTs and the token requests (None: a connection a request).
    Unreadable TLS or key files raise :class:`~gateway.errors.ConfigError` here.
    """

    _log = Logger()

    def __init__(
        self,
        destination: FhirDestination,
        reactor,
        *,
        tokens: SmartTokens | None = None,
        clock: Callable[[], float] = time.time,
        connections: HttpConnections | None = None,
    ) -> None:
        self.destination = destination
        self.reactor = reactor
        self.clock = clock
        self.connections = connections
        self.url = destination.process_message_url
        self.where = host_of(self.url)
        self._tls = client_tls(destination.tls) if self.url.startswith("https://") else None
        if tokens is None and destination.auth is not None:
            tokens = SmartTokens(
                destination.auth,
                reactor,
                timeout=destination.timeout,
                tls=self._tls,
                clock=clock,
                connections=connections,
            )
        self.tokens = tokens

    def send(self, item: OutboundNotification) -> defer.Deferred[SendResult]:
        """POST ``item.payload``; fire with a :class:`SendResult` or fail with :class:`DeliveryFailed`."""
        return self._send(item)

    @defer.inlineCallbacks
    def _send(self, item: OutboundNotification):
        start = self.reactor.seconds()
        deadline = start + self.destination.timeout
        refreshed = False
        while True:
            headers = {
                b"Content-Type": [b"application/fhir+json"],
                b"Accept": [b"application/fhir+json"],
                b"User-Agent": [b"Herald"],
            }
            token = None
            if self.tokens is not None:
                token = yield self._token(deadline)
                headers[b"Authorization"] = [b"Bearer " + token.encode("utf-8")]
            answer = yield self._post(headers, item.payload, deadline)
            if answer.code == 401 and token is not None and not refreshed:
                # The token may have been revoked or expired early: one more try, at once, with a new one.
                self.tokens.invalidate(token)
                refreshed = True
                self._log.info(
                    "HTTP 401 from {where} for notification {id}: asking for a new access token",
                    where=self.where,
                    id=item.id,
                )
                continue
            break
        detail = fhir_outcome(answer, self.where, authorized=refreshed, now=self.clock())
        return SendResult(detail, answer.code, self.reactor.seconds() - start)

    def _timed_out(self) -> DeliveryFailed:
        return DeliveryFailed(
            f"{self.where}: no complete answer within {self.destination.timeout:g} s", permanent=False
        )

    @defer.inlineCallbacks
    def _token(self, deadline: float):
        remaining = deadline - self.reactor.seconds()
        if remaining <= 0:
            raise self._timed_out()
        waiting = self.tokens.token()
        waiting.addTimeout(remaining, self.reactor)
        try:
            token = yield waiting
        except defer.TimeoutError:
            raise DeliveryFailed(
                f"no access token from {host_of(self.tokens.auth.token_url)} within {self.destination.timeout:g} s",
                permanent=False,
            ) from None
        return token

    @defer.inlineCallbacks
    def _post(self, headers, payload: bytes, deadline: float):
        remaining = deadline - self.reactor.seconds()
        if remaining <= 0:
            raise self._timed_out()
        try:
            answer = yield http_post(self.reactor, self.url, headers, payload, remaining, self._tls, self.connections)
        except HttpTimeout:
            raise self._timed_out() from None
        except defer.CancelledError:
            raise
        except Exception:
            raise connection_failure(Failure(), self.where) from None
        return answer
