"""Talking to the registry over the tunnel: the stream of changes and the
announcement, on Twisted's HTTP client.

Answers are bounded in size and time and validated whole (wgnat.wire) before
anything uses them.
"""

from __future__ import annotations

from collections.abc import Generator
from io import BytesIO
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from wgnat._types import Announcement, InvalidValue, IPAddress
from wgnat.wire import (
    JSON_CONTENT_TYPE,
    MAX_ANSWER_BYTES,
    STREAM_CONTENT_TYPE,
    Answer,
    StreamDecoder,
    decode_json,
    encode_announcement,
    encode_body,
    parse_own_answer,
)

log = Logger(namespace="wgnat.client")

CONNECT_TIMEOUT = 5.0
# A request's answer (the announcement's, a stream's first line) within this.
REQUEST_TIMEOUT = 15.0
# The registry writes to a stream at least every 15 s (a keep-alive line); this
# long without a byte and the stream is taken for dead.
STREAM_SILENCE_SECONDS = 35.0
# Answers read from a stream and not yet taken by the agent: past this, the
# stream fails (and the agent, as after any failure, opens a new one, whole).
MAX_PENDING_ANSWERS = 64


class RegistryError(Exception):
    """The registry could not be asked, or answered something unusable
    (`status`: the HTTP status of a refusal, when it answered one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StreamEnded(Exception):
    """The registry ended a stream cleanly after answering: ask again at once."""


class RegistryStream:
    """The answers of one request to the registry, as they come: `next()` gives
    the next one (None for a keep-alive), fails with RegistryError when the
    stream broke or was refused, or with StreamEnded when it ended cleanly."""

    def __init__(self) -> None:
        self._ready: list[Answer | None] = []
        self._waiter: Deferred[Answer | None] | None = None
        self._error: BaseException | None = None
        self.answers = 0
        self.on_close: Any = None  # what closing must stop (a connection, a subscription)

    def next(self) -> Deferred[Answer | None]:
        assert self._waiter is None, "one next() at a time"
        if self._ready:
            return succeed(self._ready.pop(0))
        if self._error is not None:
            return fail(self._error)

        def cancel(_: Deferred[Answer | None]) -> None:
            self._waiter = None

        self._waiter = Deferred(cancel)
        return self._waiter

    def put(self, answer: Answer | None) -> None:
        if self._error is not None:
            return
        if answer is not None:
            self.answers += 1
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(answer)
            return
        self._ready.append(answer)
        if len(self._ready) > MAX_PENDING_ANSWERS:
            self._ready.clear()
            self.fail(
                RegistryError(
                    f"fell {MAX_PENDING_ANSWERS} answers behind the registry's stream; reopening it"
                )
            )
            self.close()

    def fail(self, error: BaseException) -> None:
        """End the stream with `error`, given by next() after the answers
        already received."""
        if self._error is not None:
            return
        self._error = error
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(error)

    def end(self) -> None:
        """The registry ended the stream cleanly; without a single answer that is
        a failure (else a registry doing so would be asked again in a tight loop)."""
        if self.answers:
            self.fail(StreamEnded())
        else:
            self.fail(RegistryError("the registry ended the stream without an answer"))

    def close(self) -> None:
        """Stop reading: the connection (or subscription) ends; a pending next()
        is cancelled."""
        self._ready.clear()
        self.fail(CancelledError())
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


class _StreamReader(Protocol):
    """A streamed response body: lines decoded into the stream as they arrive;
    a stream silent for STREAM_SILENCE_SECONDS is taken for dead."""

    def __init__(self, stream: RegistryStream, reactor: Any, url: str) -> None:
        self.stream = stream
        self.reactor = reactor
        self.url = url
        self.decoder = StreamDecoder(MAX_ANSWER_BYTES)
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.timer = self.reactor.callLater(STREAM_SILENCE_SECONDS, self._silent)
        self.stream.on_close = self._stop

    def dataReceived(self, data: bytes) -> None:
        if self.timer is None:
            return  # stopped
        self.timer.reset(STREAM_SILENCE_SECONDS)
        try:
            for answer in self.decoder.feed(data):
                self.stream.put(answer)
                if self.timer is None:
                    return  # closed by whoever took the answer
        except InvalidValue as exc:
            self.stream.fail(RegistryError(f"refused the registry's answer: {exc}"))
            self._stop()

    def _silent(self) -> None:
        self.timer = None
        self.stream.fail(
            RegistryError(
                f"no answer from the registry at {self.url} in time (its stream was silent "
                f"for {STREAM_SILENCE_SECONDS:g} s)"
            )
        )
        self._stop()

    def _stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        IPushProducer(self.transport).stopProducing()  # a response body's: ends it

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if reason.check(ResponseDone) and not self.decoder.partial:
            self.stream.end()
        else:
            self.stream.fail(RegistryError(f"the registry's stream from {self.url} was cut off"))


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
            IPushProducer(self.transport).stopProducing()  # a response body's: ends it
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


def _peers_path(since: int | None, epoch: str | None) -> str:
    query: dict[str, Any] = {"stream": 1}
    if since is not None and epoch is not None:
        query.update(since=since, epoch=epoch)
    return f"/v1/peers?{urlencode(query)}"


def base_url(address: IPAddress, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{port}"


class RegistryClient:
    def __init__(
        self, reactor: Any, address: IPAddress, port: int, bind_address: str | None = None
    ) -> None:
        self.reactor: IReactorTime = reactor
        self.url = base_url(address, port)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        self.pool.retryAutomatically = False
        self.http = Agent(
            reactor,
            connectTimeout=CONNECT_TIMEOUT,
            pool=self.pool,
            bindAddress=(bind_address, 0) if bind_address else None,
        )
        # Request bodies are written on this reactor (the default cooperator
        # would use the global one).
        self._cooperator = Cooperator(scheduler=lambda step: reactor.callLater(0, step))

    def _send(
        self,
        method: bytes,
        path: str,
        body: bytes | None = None,
        accept: str | None = JSON_CONTENT_TYPE,
    ) -> Deferred[IResponse]:
        headers = Headers({b"accept": [accept.encode()]} if accept else {})
        if body is not None:
            headers.addRawHeader(b"content-type", JSON_CONTENT_TYPE.encode())
        request = self.http.request(
            method,
            (self.url + path).encode("ascii"),
            headers,
            FileBodyProducer(BytesIO(body), cooperator=self._cooperator)
            if body is not None
            else None,
        )

        def timed_out(result: Any, timeout: float) -> Any:
            # Our own deadline cancelled the request: a registry failure (with
            # its backoff), not the caller giving up, which a plain
            # CancelledError means to the follower.
            if isinstance(result, Failure):
                return Failure(RegistryError(f"no answer from the registry at {self.url} in time"))
            return result

        request.addTimeout(REQUEST_TIMEOUT, self.reactor, onTimeoutCancel=timed_out)

        def failed(failure: Failure) -> Any:
            assert failure.value is not None
            if failure.check(RegistryError):
                return failure
            if _cancelled(failure.value):
                # Our caller gave up (a resync, a shutdown): not a registry failure.
                raise CancelledError()
            raise RegistryError(_describe(failure.value, self.url))

        return request.addErrback(failed)

    @inlineCallbacks
    def _document(self, response: IResponse) -> Generator[Deferred[Any], Any, Any]:
        """A whole JSON answer: its body read within bounds, decoded, a refusal
        (not HTTP 200) turned into a RegistryError saying why."""
        reader = _BoundedBody(MAX_ANSWER_BYTES)
        response.deliverBody(reader)
        reading = reader.done
        reading.addTimeout(REQUEST_TIMEOUT, self.reactor)
        try:
            raw = yield reading
        except (RegistryError, CancelledError):
            raise
        except Exception as exc:
            raise RegistryError(_describe(exc, self.url)) from None
        try:
            document = decode_json(raw, f"the registry's answer (HTTP {response.code})")
        except InvalidValue as exc:
            raise RegistryError(str(exc)) from None
        if response.code != 200:
            message = document.get("error") if isinstance(document, dict) else None
            raise RegistryError(
                f"the registry refused the request: HTTP {response.code}: "
                f"{str(message)[:200] if message else 'no reason given'}",
                status=response.code,
            )
        return document

    def follow(self, since: int | None, epoch: str | None) -> RegistryStream:
        """The stream of answers: the first at once (full when `since` is None),
        then one per change."""
        stream = RegistryStream()
        opening = self._send(b"GET", _peers_path(since, epoch), accept=STREAM_CONTENT_TYPE)
        stream.on_close = opening.cancel

        def opened(response: IResponse) -> Deferred[None] | None:
            kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
            if response.code == 200 and kind.split(b";")[0].strip() == STREAM_CONTENT_TYPE.encode():
                response.deliverBody(_StreamReader(stream, self.reactor, self.url))
                return None
            # A refusal (403, 429, ...) says why in a JSON body.
            refusal = self._document(response)
            stream.on_close = refusal.cancel

            def not_a_stream(_: object) -> None:
                raise RegistryError(
                    f"the registry at {self.url} answered without a stream "
                    f"(content type {kind.decode('ascii', 'replace')!r})"
                )

            return refusal.addCallback(not_a_stream)

        def failed(failure: Failure) -> None:
            stream.fail(failure.value or RegistryError("the stream failed"))

        opening.addCallback(opened).addErrback(failed)
        return stream

    @inlineCallbacks
    def check(
        self, epoch: str, version: int, digest: str
    ) -> Generator[Deferred[Any], Any, Answer | None]:
        """The -t safety net: None when our view is current, else the answer
        (a delta, or a full answer) that brings it up to date."""
        query = urlencode({"epoch": epoch, "version": version, "digest": digest})
        # No Accept header: the check has one kind of answer, and every byte
        # counts ten thousand times a minute at rest.
        response = yield self._send(b"GET", f"/v1/check?{query}", accept=None)
        document = yield self._document(response)
        try:
            return parse_own_answer(document)
        except InvalidValue as exc:
            raise RegistryError(f"refused the registry's answer: {exc}") from None

    @inlineCallbacks
    def announce(self, announcement: Announcement) -> Generator[Deferred[Any], Any, Any]:
        """POST the announcement.  A registry older than the optional fields
        refuses them (HTTP 400): the follower announces again without them."""
        response = yield self._send(
            b"POST", "/v1/announce", encode_body(encode_announcement(announcement))
        )
        document = yield self._document(response)
        return document

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
