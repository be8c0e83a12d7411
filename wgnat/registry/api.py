"""The registry's JSON-over-HTTP API (twisted.web); no decisions here.

    GET  /v1/peers[?since=V&wait=S]   the caller's view: full, or the changes
                                      after version V, waiting up to S seconds
                                      for one (the push: a long poll)
    GET  /v1/peers?stream=1[&since=V] the push as a stream: newline-delimited
                                      JSON, the caller's own answer first, then
                                      one line per change, the same bytes for
                                      every caller; an empty line at least every
                                      15 s when nothing changes
    POST /v1/announce                 {"session": "5f0c…", "lan_endpoints":
                                       ["192.168.1.7:51820"]}
    GET  /healthz                     "ok" when the device was read lately

The caller is the peer whose allowed IPs hold the request's source address:
WireGuard's cryptokey routing guarantees only that peer can send from it, so no
identity the caller claims is trusted.  Bodies, waits, waiters and streams are
bounded: a peer holds at most MAX_STREAMS_PER_CALLER streams (a newer one replaces
its oldest), and a stream whose reader falls MAX_STREAM_BACKLOG_BYTES behind is
dropped rather than buffered.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter, deque
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IWriteDescriptor
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from wgnat._types import Announcement, InvalidValue, PublicKey
from wgnat.limits import DeadlineChannel
from wgnat.logs import QuietSite
from wgnat.registry.hub import KEEPALIVE_SECONDS, Registry, Stream
from wgnat.registry.metrics import RegistryMetrics
from wgnat.wire import (
    DIGEST_CHARS,
    JSON_CONTENT_TYPE,
    KEEPALIVE_LINE,
    MAX_BODY_BYTES,
    MAX_EPOCH_CHARS,
    STREAM_CONTENT_TYPE,
    decode_json,
    encode_body,
    parse_announcement,
)

log = Logger(namespace="wgnat.registry.api")

MAX_WAIT_SECONDS = 60.0
MAX_WAITERS_PER_CALLER = 4
IDLE_TIMEOUT_SECONDS = MAX_WAIT_SECONDS + 15
MAX_STREAMS_PER_CALLER = 2
# Written to a stream while its connection's buffers are full (the transport
# paused us); past this the reader is too slow and the stream is dropped.
MAX_STREAM_BACKLOG_BYTES = 256 * 1024
# Unacknowledged data on a stream's connection for this long ends it (Linux
# TCP_USER_TIMEOUT): a client that vanished is noticed at the next keep-alive.
STREAM_USER_TIMEOUT_SECONDS = 2 * KEEPALIVE_SECONDS + 5


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BoundedRequest(server.Request):
    """A request that stops buffering a body past MAX_BODY_BYTES (answered 413),
    and knows when its connection is gone (`lost`)."""

    too_large = False
    lost = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        # Twisted buffers a long or chunked body in a temporary file (a second
        # descriptor per request); handleContentChunk keeps this one small.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY_BYTES:
            self.too_large = True
            return
        super().handleContentChunk(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        super().connectionLost(reason)


def _gone(request: server.Request) -> bool:
    return bool(request.finished or getattr(request, "lost", False))


def _send_json(request: server.Request, status: int, body: dict[str, Any]) -> None:
    _send_body(request, status, encode_body(body))


# A body larger than this is written only as fast as the reader reads it.
PRODUCED_BODY_BYTES = 64 * 1024


def _send_body(request: server.Request, status: int, payload: bytes) -> None:
    if _gone(request):
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE.encode())
    request.setHeader(b"cache-control", b"no-store")
    if len(payload) <= PRODUCED_BODY_BYTES:
        request.write(payload)
        request.finish()
        return
    # A full answer at 10,000 peers is about 2 MB: written a piece at a time as
    # the connection drains, so a caller that never reads holds one buffer's
    # worth, not the answer, and its next pipelined request waits behind it.
    request.setHeader(b"content-length", b"%d" % len(payload))
    BodyWriter(request, payload).start()


@implementer(IPushProducer)
class BodyWriter:
    """Writes a large body in pieces while the connection takes them: the
    connection pauses it when its buffers fill (a caller that stops reading)
    and resumes it as they drain; the request finishes with the last piece."""

    PIECE = 16 * 1024

    def __init__(self, request: server.Request, payload: bytes) -> None:
        self.request = request
        self.payload = memoryview(payload)
        self.offset = 0
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        while not (self.paused or self.stopped) and self.offset < len(self.payload):
            piece = self.payload[self.offset : self.offset + self.PIECE]
            self.offset += len(piece)
            self.request.write(bytes(piece))
        if self.offset >= len(self.payload) and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            if not _gone(self.request):
                self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._write()

    def stopProducing(self) -> None:
        self.stopped = True


def _caller_address(request: server.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host = getattr(request.getClientAddress(), "host", "")
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class _Branch(Resource):
    """A path segment with no page of its own (404/405).  Twisted's
    Resource.render_HEAD calls a render_GET these lack: a 500 without this."""

    render_HEAD = None  # type: ignore[assignment]


class RegistryResource(Resource):
    """Base: identify the caller, turn ApiError and surprises into JSON answers."""

    isLeaf = True

    def __init__(self, registry: Registry, metrics: Any = None) -> None:
        super().__init__()
        self.registry = registry
        self.metrics = metrics
        self.waiters: Counter[PublicKey] = Counter()

    def count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.api_requests.labels(outcome=outcome).inc()

    def identify(self, request: server.Request) -> Deferred[PublicKey]:
        address = _caller_address(request)

        def known(caller: PublicKey | None) -> PublicKey:
            if caller is None:
                raise ApiError(http.FORBIDDEN, f"{address} is not the tunnel address of any peer")
            return caller

        return self.registry.identify(address).addCallback(known)

    def fail(self, request: server.Request, failure: Failure) -> None:
        if failure.check(ApiError):
            error: ApiError = failure.value  # type: ignore[assignment]
            self.count("forbidden" if error.status == http.FORBIDDEN else "bad_request")
            _send_json(request, error.status, {"error": error.message})
            return
        log.failure("internal error answering {path}", failure, path=request.path)
        self.count("error")
        _send_json(request, http.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def render(self, request: server.Request) -> Any:
        if getattr(request, "too_large", False):
            self.count("bad_request")
            _send_json(
                request,
                http.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"request body over {MAX_BODY_BYTES} bytes"},
            )
            return server.NOT_DONE_YET
        try:
            return super().render(request)
        except ApiError as error:
            self.fail(request, Failure(error))
            return server.NOT_DONE_YET


def _query_number(request: server.Request, name: str, kind: type) -> Any:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    try:
        number = kind(values[0].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(http.BAD_REQUEST, f"query parameter {name!r} must be a number") from None
    if number < 0 or number != number:
        raise ApiError(http.BAD_REQUEST, f"query parameter {name!r} must not be negative")
    return number


def _query_flag(request: server.Request, name: str) -> bool:
    values = (request.args or {}).get(name.encode())
    if not values or values[0] == b"0":
        return False
    if values[0] == b"1":
        return True
    raise ApiError(http.BAD_REQUEST, f"query parameter {name!r} must be 0 or 1")


def _query_epoch(request: server.Request) -> str | None:
    values = (request.args or {}).get(b"epoch")
    if not values:
        return None
    text = values[0].decode("ascii", "replace")
    if len(text) > MAX_EPOCH_CHARS or not all(ch in "0123456789abcdef" for ch in text):
        raise ApiError(
            http.BAD_REQUEST, f"query parameter 'epoch' must be up to {MAX_EPOCH_CHARS} hex digits"
        )
    return text


OWED_PIECE_BYTES = 64 * 1024


@implementer(IPushProducer)
class StreamWriter:
    """Writes one stream's lines to its HTTP response, never buffering without
    bound: it is the response's producer, so the transport pauses it when the
    connection's buffers are full; what is written while paused is counted, and
    past MAX_STREAM_BACKLOG_BYTES the connection is dropped."""

    def __init__(
        self, request: server.Request, caller: PublicKey, metrics: RegistryMetrics | None = None
    ) -> None:
        self.request = request
        self.caller = caller
        self.metrics = metrics
        self.paused = False
        self.backlog = 0
        self.dropped = False
        self.stream: Stream | None = None
        # What is not yet handed to the connection: the rest of the first
        # answer (a full answer is 2 MB at 10,000 peers: written as the reader
        # reads, from the encoding every caller shares, never copied whole),
        # then the lines that came meanwhile.
        self._owed: deque[memoryview] = deque()

    @property
    def gone(self) -> bool:
        return self.dropped or _gone(self.request)

    def send_first(self, parts: list[bytes]) -> None:
        """The caller's own first answer, in pieces (see _owed)."""
        if self.gone:
            return
        self._owed.extend(memoryview(part) for part in parts if part)
        self._write_owed()

    def _write_owed(self) -> None:
        wrote = False
        while self._owed and not self.paused and not self.gone:
            head = self._owed[0]
            piece = head[:OWED_PIECE_BYTES]
            if len(head) > OWED_PIECE_BYTES:
                self._owed[0] = head[OWED_PIECE_BYTES:]
            else:
                self._owed.popleft()
            self.request.write(bytes(piece))
            wrote = True
        if wrote:
            self._flush()

    def send(self, line: bytes) -> None:
        if self.gone:
            return
        if self._owed and not self.paused:
            self._write_owed()
        if self.paused or self._owed:
            if line == KEEPALIVE_LINE:
                return  # data is waiting already: the reader sees no silence
            self.backlog += len(line)
            if self.backlog > MAX_STREAM_BACKLOG_BYTES:
                if self.metrics is not None:
                    self.metrics.streams_dropped.inc()
                self.drop(
                    f"it reads too slowly ({self.backlog} bytes waiting past the connection's "
                    "buffers); it will reconnect and catch up"
                )
                return
            if self._owed:
                self._owed.append(memoryview(line))  # after the first answer's rest
                return
        self.request.write(line)
        self._flush()

    def _flush(self) -> None:
        """Hand what was just written to the socket now (the connection's
        IWriteDescriptor.doWrite), rather than at the reactor's next turn: a
        change goes to every stream at once, and 10,000 writability events, each
        dispatched through the reactor's logging context, were most of a push's
        cost.  What the socket does not take stays queued, as usual."""
        transport = getattr(self.request.channel, "transport", None)
        while isinstance(transport, ProtocolWrapper):  # the connection limits' wrapper
            transport = transport.transport
        # Not on a closing connection: what doWrite returns there (its end) is
        # the reactor's to act on.  A failed send is seen by the reactor anyway.
        if IWriteDescriptor.providedBy(transport) and not getattr(
            transport, "disconnecting", False
        ):
            transport.doWrite()

    def drop(self, why: str) -> None:
        self.dropped = True
        log.warn("{peer}: dropping its stream: {why}", peer=self.caller.short, why=why)
        channel = self.request.channel
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    # IPushProducer, called by the connection.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.backlog = 0
        self._write_owed()

    def stopProducing(self) -> None:
        self.paused = True


def _stream_connection(request: server.Request) -> None:
    """A stream's connection: no idle timeout (the stream writes keep-alives and
    the client sends nothing), and unacknowledged data ends it."""
    channel = request.channel
    if channel is not None:
        channel.setTimeout(None)
    handle = getattr(getattr(channel, "transport", None), "getHandle", lambda: None)()
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if handle is not None and option is not None:
        try:
            handle.setsockopt(socket.IPPROTO_TCP, option, int(STREAM_USER_TIMEOUT_SECONDS * 1000))
        except OSError:
            pass  # not TCP (a test's transport): the keep-alives still bound it


class PeersResource(RegistryResource):
    def __init__(self, registry: Registry, metrics: Any = None) -> None:
        super().__init__(registry, metrics)
        self.streams: dict[PublicKey, list[StreamWriter]] = {}

    def render_GET(self, request: server.Request) -> Any:
        since = _query_number(request, "since", int)
        epoch = _query_epoch(request)
        wait = min(_query_number(request, "wait", float) or 0.0, MAX_WAIT_SECONDS)
        if _query_flag(request, "stream") and request.method != b"HEAD":
            return self.render_stream(request, since, epoch)
        pending: list[Deferred[None]] = []

        def gone(_: Failure) -> None:
            for waiter in pending:
                waiter.cancel()

        request.notifyFinish().addErrback(gone)

        def answer(caller: PublicKey) -> Deferred[None]:
            if wait and self.waiters[caller] >= MAX_WAITERS_PER_CALLER:
                raise ApiError(429, f"at most {MAX_WAITERS_PER_CALLER} waiting requests per peer")
            self.waiters[caller] += 1

            def done(result: Any) -> Any:
                self.waiters[caller] -= 1
                if self.waiters[caller] <= 0:
                    del self.waiters[caller]
                return result

            answering = self.registry.answer(caller, since, epoch, wait, pending.append)
            return answering.addBoth(done).addCallback(send)

        def send(payload: bytes) -> None:
            self.count("ok")
            _send_body(request, http.OK, payload)

        result = self.identify(request)
        result.addCallback(answer)
        result.addErrback(lambda failure: self.fail(request, failure))
        return server.NOT_DONE_YET

    def render_stream(self, request: server.Request, since: int | None, epoch: str | None) -> Any:
        """One long-lived response: the caller's answer, then every change."""
        writers: list[StreamWriter] = []

        def start(caller: PublicKey) -> Deferred[None] | None:
            if _gone(request):
                return None
            writer = StreamWriter(request, caller, self.metrics)
            writers.append(writer)
            mine = self.streams.setdefault(caller, [])
            mine.append(writer)
            while len(mine) > MAX_STREAMS_PER_CALLER:
                mine.pop(0).drop(
                    f"replaced by a newer stream (at most {MAX_STREAMS_PER_CALLER} per peer)"
                )
            request.setResponseCode(http.OK)
            request.setHeader(b"content-type", STREAM_CONTENT_TYPE.encode())
            request.setHeader(b"cache-control", b"no-store")
            _stream_connection(request)
            request.registerProducer(writer, True)
            self.count("ok")
            opening = self.registry.open_stream(
                caller, since, epoch, writer.send, writer.send_first
            )
            return opening.addCallback(opened, writer)

        def opened(stream: Stream, writer: StreamWriter) -> None:
            writer.stream = stream
            if writer.gone:
                # The connection ended while the device was read: ended() has
                # run already (and forgot this writer), so the hub's record of
                # the stream is closed here, or it would stay for good.
                self.registry.close_stream(stream)

        def ended(_: object) -> None:
            for writer in writers:
                if writer.stream is not None:
                    self.registry.close_stream(writer.stream)
                mine = self.streams.get(writer.caller, [])
                if writer in mine:
                    mine.remove(writer)
                if not mine:
                    self.streams.pop(writer.caller, None)
            writers.clear()

        def failed(failure: Failure) -> None:
            if request.producer is not None:
                request.unregisterProducer()
            self.fail(request, failure)

        request.notifyFinish().addBoth(ended)
        result = self.identify(request)
        result.addCallback(start)
        result.addErrback(failed)
        return server.NOT_DONE_YET


def _announcement(body: bytes) -> Announcement:
    try:
        return parse_announcement(decode_json(body, "the body"))
    except InvalidValue as exc:
        raise ApiError(http.BAD_REQUEST, str(exc)) from None


class AnnounceResource(RegistryResource):
    # No render_GET to fake a HEAD with: a 405, not a 500.
    render_HEAD = None  # type: ignore[assignment]

    def render_POST(self, request: server.Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        announcement = _announcement(body)

        def store(caller: PublicKey) -> Deferred[None]:
            return self.registry.announce(caller, announcement).addCallback(reply)

        def reply(_: bool) -> None:
            self.count("ok")
            _send_json(request, http.OK, {"version": self.registry.model.version})

        result = self.identify(request)
        result.addCallback(store)
        result.addErrback(lambda failure: self.fail(request, failure))
        return server.NOT_DONE_YET


class CheckResource(RegistryResource):
    """GET /v1/check?epoch=E&version=V&digest=D: the -t safety net.  The
    caller holds the current view: a few bytes, nothing encoded, no device
    read.  Else the delta (or a full answer) it needs, as GET /v1/peers gives."""

    def render_GET(self, request: server.Request) -> Any:
        epoch = _query_epoch(request)
        version = _query_number(request, "version", int)
        values = (request.args or {}).get(b"digest") or [b""]
        digest = values[0].decode("ascii", "replace")
        if epoch is None or version is None:
            raise ApiError(http.BAD_REQUEST, "query parameters 'epoch' and 'version' are needed")
        if len(digest) != DIGEST_CHARS or not all(ch in "0123456789abcdef" for ch in digest):
            raise ApiError(
                http.BAD_REQUEST, f"query parameter 'digest' must be {DIGEST_CHARS} hex digits"
            )

        def answer(caller: PublicKey) -> None:
            payload = self.registry.check(caller, epoch, version, digest)
            self.count("ok")
            if payload is None:
                _send_current(request)
            else:
                _send_body(request, http.OK, payload)

        result = self.identify(request)
        result.addCallback(answer)
        result.addErrback(lambda failure: self.fail(request, failure))
        return server.NOT_DONE_YET


CURRENT = b'{"current":true}'


def _send_current(request: server.Request) -> None:
    """The answer 10,000 clients get every minute: as few bytes as HTTP allows
    (no Server or Date header, a length instead of chunks): 80 bytes, not 240."""
    if _gone(request):
        return
    headers = request.responseHeaders
    headers.removeHeader(b"server")
    headers.removeHeader(b"date")
    request.setHeader(b"content-type", JSON_CONTENT_TYPE.encode())
    request.setHeader(b"content-length", b"%d" % len(CURRENT))
    request.write(CURRENT)
    request.finish()


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if self.registry.last_read_error is not None:
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
            return b"cannot read the WireGuard device\n"
        return b"ok\n"


class ApiSite(QuietSite):
    """HTTP/1.1 connections whose requests must arrive whole in time."""

    # Twisted types this as its HTTP/2-capable channel factory; the API speaks
    # HTTP/1.1 only, over the tunnel.
    protocol = DeadlineChannel  # type: ignore[assignment]


def build_site(registry: Registry, metrics: RegistryMetrics | None = None) -> server.Site:
    """The API; its connections' timeouts run on the registry's clock."""
    root = _Branch()
    v1 = _Branch()
    root.putChild(b"v1", v1)
    v1.putChild(b"peers", PeersResource(registry, metrics))
    v1.putChild(b"announce", AnnounceResource(registry, metrics))
    v1.putChild(b"check", CheckResource(registry, metrics))
    root.putChild(b"healthz", HealthResource(registry))
    site = ApiSite(root, timeout=IDLE_TIMEOUT_SECONDS, reactor=registry.clock)
    site.requestFactory = BoundedRequest
    site.displayTracebacks = False
    return site
