"""Talking to the registry over the tunnel: the long poll and the announcement.

Answers are bounded in size and time and validated whole (client.view) before
anything uses them.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from wgnat._types import Announcement, InvalidValue, IPAddress
from wgnat.client.view import Answer, parse_answer

MAX_ANSWER_BYTES = 32 * 1024 * 1024
CONNECT_TIMEOUT = 5.0
EXTRA_TIMEOUT = 10.0  # on top of the long poll's own wait


class _QuietHTTPFactory(_HTTP11ClientFactory):
    """Twisted logs "Starting factory" for every connection otherwise."""

    noisy = False


class RegistryError(Exception):
    """The registry could not be asked, or answered something unusable."""


class _BoundedBody(Protocol):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.parts.clear()
            self.transport.stopProducing()  # type: ignore[attr-defined]
            if not self.done.called:
                self.done.errback(
                    Failure(RegistryError(f"the registry's answer is over {self.limit} bytes"))
                )
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(Failure(RegistryError("the registry's answer was cut off")))


@implementer(IBodyProducer)
class _JSONBody:
    def __init__(self, document: Any) -> None:
        self.body = json.dumps(document).encode("utf-8")
        self.length = len(self.body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        from twisted.internet.defer import succeed

        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def base_url(address: IPAddress, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{port}"


class RegistryClient:
    def __init__(
        self, reactor: Any, address: IPAddress, port: int, bind_address: str | None = None
    ) -> None:
        self.reactor = reactor
        self.url = base_url(address, port)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        self.pool.retryAutomatically = False
        self.pool._factory = _QuietHTTPFactory
        self.http = Agent(
            reactor,
            connectTimeout=CONNECT_TIMEOUT,
            pool=self.pool,
            bindAddress=(bind_address, 0) if bind_address else None,
        )

    @inlineCallbacks
    def _request(self, method: bytes, path: str, timeout: float, body: Any = None) -> Any:
        headers = Headers({b"accept": [b"application/json"]})
        if body is not None:
            headers.addRawHeader(b"content-type", b"application/json")
        request = self.http.request(
            method,
            (self.url + path).encode("ascii"),
            headers,
            _JSONBody(body) if body is not None else None,
        )
        request.addTimeout(timeout, self.reactor)
        try:
            response = yield request
        except Exception as exc:
            if _cancelled(exc):
                # Our caller gave up (a resync, a shutdown): not a registry failure.
                raise CancelledError() from None
            raise RegistryError(_describe(exc, self.url)) from None
        reader = _BoundedBody(MAX_ANSWER_BYTES)
        response.deliverBody(reader)
        reading = reader.done
        reading.addTimeout(timeout, self.reactor)
        try:
            raw = yield reading
        except (RegistryError, CancelledError):
            raise
        except Exception as exc:
            raise RegistryError(_describe(exc, self.url)) from None
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # too deeply nested
            raise RegistryError(
                f"the registry answered HTTP {response.code} with a body that is not JSON"
            ) from None
        if response.code != 200:
            message = document.get("error") if isinstance(document, dict) else None
            raise RegistryError(
                f"the registry refused the request: HTTP {response.code}: "
                f"{str(message)[:200] if message else 'no reason given'}"
            )
        return document

    @inlineCallbacks
    def fetch(self, since: int | None, epoch: str | None, wait: float) -> Any:
        query: dict[str, Any] = {}
        if since is not None and epoch is not None:
            query.update(since=since, epoch=epoch, wait=f"{wait:g}")
        path = "/v1/peers" + (f"?{urlencode(query)}" if query else "")
        document = yield self._request(b"GET", path, wait + EXTRA_TIMEOUT)
        try:
            answer: Answer = parse_answer(document)
        except InvalidValue as exc:
            raise RegistryError(f"refused the registry's answer: {exc}") from None
        return answer

    def announce(self, announcement: Announcement) -> Deferred[Any]:
        return self._request(
            b"POST",
            "/v1/announce",
            EXTRA_TIMEOUT,
            {
                "session": announcement.session,
                "lan_endpoints": [str(endpoint) for endpoint in announcement.lan_endpoints],
            },
        )

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


def _cancelled(exc: BaseException) -> bool:
    """Twisted's HTTP client wraps a cancellation (ResponseNeverReceived([...]))."""
    if isinstance(exc, CancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(getattr(reason, "check", lambda *_: False)(CancelledError) for reason in reasons)


def _describe(exc: BaseException, url: str) -> str:
    from twisted.internet.defer import CancelledError, TimeoutError

    if isinstance(exc, CancelledError | TimeoutError):
        return f"no answer from the registry at {url} in time"
    text = str(exc).strip() or type(exc).__name__
    return f"cannot reach the registry at {url}: {text}"
