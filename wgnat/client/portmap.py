"""Port mapping: ask this host's gateway to forward a public UDP port to the
WireGuard listen port, so that peers can reach us even through a NAT that maps
every destination differently (a symmetric NAT, where hole punching fails).

PCP (RFC 6887) first, NAT-PMP (RFC 6886) when the gateway answers PCP with
"unsupported version", UPnP IGD (miniupnpc, in a thread) when PCP has not
answered within 0.25 s (the first mapping obtained is held, a later one deleted).
The mapping is renewed at half its lifetime and deleted on a clean stop; what
it gives (`PortMapper.mapping`) is announced to the registry, which passes it
on to the other peers.  A failure (no gateway, no answer, a refusal, a lease
that expired without renewal) is logged once with its reason and the client
goes on without a mapping, asking again later.

The messages are encoded in client.portmap_wire (pure); here are the sockets,
timers and threads, each injectable so that tests run on a Clock.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgnat._types import Endpoint, InvalidValue
from wgnat.client import portmap_wire as wire
from wgnat.timing import cancel

log = Logger(namespace="wgnat.client.portmap")

# After a failure, ask again after these delays (then every last one): a
# gateway that was starting, or that lost its mappings, is found again.
RETRY_DELAYS = (30.0, 60.0, 120.0, 300.0, 600.0)
# A renewal that fails is tried again at half the time left, but not sooner than this.
MIN_RENEW_DELAY = 1.0
# A clean stop waits this long for the gateway to confirm a deletion.
DELETE_TIMEOUT = 1.0
# Asked of UPnP IGD gateways (IGD v1 treats 0 as "forever": never ask that).
UPNP_LIFETIME = 3600
# UPnP IGD is asked this long after PCP (its first retransmission) unless PCP
# answered or failed by then: see PortMapper._obtain.
UPNP_AFTER = 0.25
# miniupnpc waits this long for each of the device types it asks for in turn.
UPNP_DISCOVER_MS = 1000
UPNP_DESCRIPTION = "wgnat WireGuard"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class MappingFailed(Exception):
    """The gateway did not map the port; the message says why."""


@dataclass(frozen=True)
class PortMapping:
    """A mapping the gateway granted: `external` forwards to our `internal_port`
    until `obtained_at + lifetime` (clock seconds)."""

    protocol: str  # "pcp", "nat-pmp" or "upnp"
    external: Endpoint
    internal_port: int
    lifetime: int
    obtained_at: float

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime


class MappingMethod(Protocol):
    """One way to ask the gateway (PCP/NAT-PMP, UPnP IGD)."""

    name: str

    def map(self, internal_port: int, lifetime: int) -> Deferred[PortMapping]: ...

    def delete(self, mapping: PortMapping) -> Deferred[None]: ...

    def close(self) -> None: ...


# -- the default gateway ------------------------------------------------------


def parse_proc_route(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 default route's gateway in /proc/net/route's text (the lowest
    metric wins), or None when there is none."""
    best: tuple[int, ipaddress.IPv4Address] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, flags = int(fields[1], 16), int(fields[2], 16), int(fields[3], 16)
            metric, mask = int(fields[6]), int(fields[7], 16)
        except ValueError:
            continue
        if destination != 0 or mask != 0 or not flags & 0x2 or not flags & 0x1:  # UP, GATEWAY
            continue
        # The kernel writes the address in host (little-endian) byte order.
        address = ipaddress.IPv4Address(struct.pack("<I", gateway))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def default_gateway() -> ipaddress.IPv4Address | None:
    """This network namespace's IPv4 default gateway (a /proc read: instant)."""
    try:
        with open("/proc/net/route", encoding="ascii") as routes:
            return parse_proc_route(routes.read())
    except OSError:
        return None


# -- PCP and NAT-PMP over UDP ---------------------------------------------------


class Channel(Protocol):
    """A UDP socket connected to the gateway's port 5351."""

    local_address: IPAddress

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _GatewaySocket(DatagramProtocol):
    def __init__(self, gateway: str, received: Callable[[bytes], None]) -> None:
        self.gateway = gateway
        self.received = received

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if addr[0] == self.gateway and addr[1] == wire.SERVER_PORT:
            self.received(datagram)


def local_address_towards(gateway: IPAddress) -> IPAddress:
    """The address this host sends from to `gateway` (what PCP must carry:
    the server refuses any other, ADDRESS_MISMATCH): a UDP connect sends
    nothing, it only picks the route."""
    family = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((str(gateway), wire.SERVER_PORT))
        return ipaddress.ip_address(probe.getsockname()[0])


class UdpChannel:
    """The real Channel: a UDP socket bound to the address that routes to the
    gateway, taking only the gateway's datagrams.  Not a connected socket: an
    ICMP error on one (no PCP server: port unreachable) makes Twisted's epoll
    reactor close it."""

    def __init__(self, reactor: Any, gateway: IPAddress, received: Callable[[bytes], None]) -> None:
        self.gateway = str(gateway)
        self.local_address = local_address_towards(gateway)
        self.port = reactor.listenUDP(
            0, _GatewaySocket(self.gateway, received), interface=str(self.local_address)
        )
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.port.write(data, (self.gateway, wire.SERVER_PORT))
        except OSError:
            pass  # unreachable just now, say: the retransmission or its timeout follows

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.port.stopListening()


ChannelFactory = Callable[[IPAddress, Callable[[bytes], None]], Channel]


class PcpOrNatPmp:
    """PCP, falling back to NAT-PMP when the gateway says it speaks only that.
    Each request is sent on the RETRANSMIT_DELAYS schedule until an answer that
    parses arrives; no answer at all is a MappingFailed."""

    def __init__(
        self,
        clock: IReactorTime,
        gateway: IPAddress,
        open_channel: ChannelFactory,
        nonce: bytes | None = None,
    ) -> None:
        self.clock = clock
        self.gateway = gateway
        self.channel = open_channel(gateway, self._received)
        self.nonce = nonce if nonce is not None else os.urandom(wire.NONCE_BYTES)
        self.name = "pcp"  # becomes "nat-pmp" when the gateway answers so
        self._waiting: tuple[Callable[[bytes], Any], Deferred[Any]] | None = None

    def _received(self, data: bytes) -> None:
        if self._waiting is None:
            return
        parse, answered = self._waiting
        try:
            result = parse(data)
        except (InvalidValue, ValueError, struct.error):
            return  # not the answer to this request (a stale or foreign packet)
        self._waiting = None
        answered.callback(result)

    @inlineCallbacks
    def _ask(
        self, request: bytes, parse: Callable[[bytes], Any], delays: tuple[float, ...]
    ) -> Generator[Deferred[Any], Any, Any]:
        answered: Deferred[Any] = Deferred()
        self._waiting = (parse, answered)
        timer: IDelayedCall | None = None
        attempts = iter(delays)

        def send() -> None:
            """Send, then wait the next delay; after the last, give up."""
            nonlocal timer
            timer = None
            delay = next(attempts, None)
            if delay is None:
                if self._waiting is not None and self._waiting[1] is answered:
                    self._waiting = None
                    answered.errback(
                        MappingFailed(
                            f"no answer from the gateway {self.gateway} on UDP port "
                            f"{wire.SERVER_PORT} (PCP/NAT-PMP) in {sum(delays):g} s"
                        )
                    )
                return
            timer = self.clock.callLater(delay, send)
            self.channel.send(request)

        send()
        try:
            return (yield answered)
        finally:
            cancel(timer)
            if self._waiting is not None and self._waiting[1] is answered:
                self._waiting = None

    def _pcp_answer(self, data: bytes) -> wire.MapResult:
        if wire.natpmp_unsupported_version(data):
            return wire.MapResult("nat-pmp", wire.RESULT_UNSUPPORTED_VERSION, 0, 0, 0)
        result = wire.parse_pcp_map_response(data)
        if result.ok and result.nonce != self.nonce:
            raise InvalidValue("a PCP answer to another request (its nonce differs)")
        return result

    @inlineCallbacks
    def map(
        self, internal_port: int, lifetime: int, delays: tuple[float, ...] = wire.RETRANSMIT_DELAYS
    ) -> Generator[Deferred[Any], Any, PortMapping]:
        if self.name == "pcp":
            request = wire.pcp_map_request(
                self.channel.local_address, internal_port, lifetime, self.nonce, internal_port
            )
            result = yield self._ask(request, self._pcp_answer, delays)
            if result.result == wire.RESULT_UNSUPPORTED_VERSION:
                log.info(
                    "the gateway {gateway} does not speak PCP ({reason}); asking in NAT-PMP",
                    gateway=self.gateway,
                    reason=result.reason,
                )
                self.name = "nat-pmp"
            else:
                return self._granted(result, internal_port, lifetime)
        code, address = yield self._ask(
            wire.natpmp_address_request(), wire.parse_natpmp_address_response, delays
        )
        if code != wire.RESULT_SUCCESS or address is None:
            raise MappingFailed(
                f"the gateway {self.gateway} gave no external address (nat-pmp result "
                f"{code} ({wire.NATPMP_RESULTS.get(code, 'unknown')}))"
            )
        result = yield self._ask(
            wire.natpmp_map_request(internal_port, lifetime, internal_port),
            wire.parse_natpmp_map_response,
            delays,
        )
        return self._granted(
            wire.MapResult(
                result.protocol,
                result.result,
                result.internal_port,
                result.external_port,
                result.lifetime,
                address,
            ),
            internal_port,
            lifetime,
        )

    def _granted(self, result: wire.MapResult, internal_port: int, lifetime: int) -> PortMapping:
        if not result.ok:
            raise MappingFailed(f"the gateway {self.gateway} refused: {result.reason}")
        external = result.external
        if external is None or result.lifetime <= 0:
            raise MappingFailed(
                f"the gateway {self.gateway} answered {self.name} success without an "
                "external address, port or lifetime"
            )
        if result.internal_port != internal_port:
            raise MappingFailed(
                f"the gateway {self.gateway} mapped port {result.internal_port}, not ours "
                f"({internal_port})"
            )
        return PortMapping(
            self.name, external, internal_port, result.lifetime, self.clock.seconds()
        )

    @inlineCallbacks
    def delete(self, mapping: PortMapping) -> Generator[Deferred[Any], Any, None]:
        quick = (DELETE_TIMEOUT / 2, DELETE_TIMEOUT / 2)
        if self.name == "pcp":
            request = wire.pcp_map_request(
                self.channel.local_address, mapping.internal_port, 0, self.nonce
            )
            result = yield self._ask(request, self._pcp_answer, quick)
        else:
            result = yield self._ask(
                wire.natpmp_map_request(mapping.internal_port, 0),
                wire.parse_natpmp_map_response,
                quick,
            )
        if not result.ok:
            raise MappingFailed(f"the gateway {self.gateway} refused the deletion: {result.reason}")

    def close(self) -> None:
        self.channel.close()


# -- UPnP IGD (miniupnpc, blocking: run in a thread) -----------------------------


class UpnpIgd:
    """UPnP IGD through miniupnpc, whose calls block (SSDP discovery waits
    UPNP_DISCOVER_MS): each runs in a thread (`in_thread`, deferToThread)."""

    name = "upnp"

    def __init__(
        self,
        clock: IReactorTime,
        in_thread: Callable[..., Deferred[Any]],
        make_client: Callable[[], Any] | None = None,
    ) -> None:
        self.clock = clock
        self.in_thread = in_thread
        self.make_client = make_client or _miniupnpc_client
        self._client: Any = None

    def _map_blocking(self, internal_port: int, lifetime: int) -> tuple[str, int]:
        if self._client is None:
            client = self.make_client()
            client.discoverdelay = UPNP_DISCOVER_MS
            try:
                found = client.discover()
            except Exception as exc:  # miniupnpc says "Success" (errno 0) for none
                detail = "" if str(exc) in ("", "Success") else f" ({exc})"
                raise MappingFailed(f"no UPnP IGD answered discovery{detail}") from None
            if not found:
                raise MappingFailed("no UPnP IGD answered discovery")
            try:
                client.selectigd()
            except Exception as exc:
                raise MappingFailed(f"no usable UPnP IGD: {exc}") from None
            self._client = client
        client = self._client
        try:
            external = client.externalipaddress()
            client.addportmapping(
                internal_port, "UDP", client.lanaddr, internal_port, UPNP_DESCRIPTION, "", lifetime
            )
        except MappingFailed:
            raise
        except Exception as exc:
            raise MappingFailed(f"the UPnP IGD refused: {exc}") from None
        return str(external), internal_port

    @inlineCallbacks
    def map(self, internal_port: int, lifetime: int) -> Generator[Deferred[Any], Any, PortMapping]:
        lifetime = min(lifetime, UPNP_LIFETIME)
        address, port = yield self.in_thread(self._map_blocking, internal_port, lifetime)
        try:
            external = Endpoint(ipaddress.ip_address(address), port)
        except (ValueError, InvalidValue):
            raise MappingFailed(
                f"the UPnP IGD gave no usable external address ({address!r})"
            ) from None
        return PortMapping(self.name, external, internal_port, lifetime, self.clock.seconds())

    def delete(self, mapping: PortMapping) -> Deferred[None]:
        client = self._client

        def delete_blocking() -> None:
            if client is not None:
                client.deleteportmapping(mapping.external.port, "UDP")

        return self.in_thread(delete_blocking)

    def close(self) -> None:
        self._client = None


def _miniupnpc_client() -> Any:
    # Imported here, in the thread, and only when PCP/NAT-PMP failed: the
    # client's start-up does not pay for it.
    try:
        import miniupnpc  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise MappingFailed(
            "UPnP IGD needs the miniupnpc package (pip install miniupnpc)"
        ) from None
    return miniupnpc.UPnP()


# -- the mapping kept ----------------------------------------------------------


@dataclass
class _Round:
    """One round of asking for a mapping (PortMapper._obtain)."""

    asking: dict[MappingMethod, Deferred[Any]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # by method, in asking order
    upnp_waiting: bool = False  # UPnP IGD is still to be asked
    upnp_timer: IDelayedCall | None = None


class PortMapper:
    """Holds one mapping of the listen port: obtains it in the background after
    start, renews it at half its lifetime, drops it when a lease runs out, asks
    again after failures, deletes it on stop.  `on_change(mapping or None)` is
    called whenever the external endpoint appears, moves or goes."""

    def __init__(
        self,
        clock: IReactorTime,
        find_gateway: Callable[[], IPAddress | None],
        open_channel: ChannelFactory,
        upnp: MappingMethod | None = None,
        lifetime: int = wire.REQUESTED_LIFETIME,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
    ) -> None:
        self.clock = clock
        self.find_gateway = find_gateway
        self.open_channel = open_channel
        self.upnp = upnp
        self.lifetime = lifetime
        self.retry_delays = retry_delays
        self.on_change: Callable[[PortMapping | None], None] = lambda mapping: None
        self.state = "off"  # off, searching, held, failed
        self.mapping: PortMapping | None = None
        self.error: str | None = None
        self.failures = 0
        self.internal_port = 0
        self._method: MappingMethod | None = None
        self._timer: IDelayedCall | None = None
        self._expiry: IDelayedCall | None = None
        self._working: Deferred[Any] | None = None
        self._round: _Round | None = None
        self._running = False

    # -- life cycle -----------------------------------------------------
    def start(self, internal_port: int) -> None:
        self._running = True
        self.internal_port = internal_port
        self._timer = self.clock.callLater(0, self._obtain)

    def stop(self) -> Deferred[None]:
        """Stop renewing; delete a mapping we hold (waiting at most DELETE_TIMEOUT)."""
        self._running = False
        cancel(self._timer)
        cancel(self._expiry)
        self._timer = self._expiry = None
        if self._working is not None:
            self._working.cancel()
        round_, self._round = self._round, None
        if round_ is not None:
            cancel(round_.upnp_timer)
            for method_asked, asking in list(round_.asking.items()):
                if method_asked is not self.upnp:
                    asking.cancel()  # UPnP's thread runs on: what it maps is deleted
        method, mapping = self._method, self.mapping
        self._method = None
        self.state = "off"
        if method is None:
            return succeed(None)
        if mapping is None:
            method.close()
            return succeed(None)

        def deleted(result: object) -> None:
            log.info(
                "port mapping {external} ({protocol}) deleted",
                external=mapping.external,
                protocol=mapping.protocol,
            )

        def not_deleted(failure: Any) -> None:
            log.info(
                "port mapping {external} not confirmed deleted ({error}); it expires in "
                "{left:.0f} s",
                external=mapping.external,
                error=failure.getErrorMessage(),
                left=max(0.0, mapping.expires_at - self.clock.seconds()),
            )

        deleting = maybeDeferred(method.delete, mapping)
        deleting.addCallbacks(deleted, not_deleted)
        deleting.addBoth(lambda _: method.close())
        self._set_mapping(None)
        return deleting

    # -- obtaining ------------------------------------------------------
    def _obtain(self) -> None:
        """Ask PCP (NAT-PMP) first, and UPnP IGD UPNP_AFTER seconds later or as
        soon as PCP fails: a gateway that speaks PCP answers within a round
        trip, and one that does not would otherwise cost PCP's 3.75 s of
        retransmissions before UPnP is asked.  The first mapping obtained is
        held; one obtained after it is deleted (PCP's retransmissions are
        cancelled; UPnP's blocking call cannot be)."""
        self._timer = None
        self.state = "searching"
        round_ = _Round()
        self._round = round_
        gateway = None
        try:
            gateway = self.find_gateway()
        except Exception as exc:  # a lookup that fails is a reason, not a crash
            round_.reasons["gateway"] = f"cannot find the default gateway: {exc}"
        if gateway is None and not round_.reasons:
            round_.reasons["gateway"] = "no IPv4 default gateway"
        round_.upnp_waiting = self.upnp is not None
        if gateway is not None:
            try:
                method: MappingMethod = PcpOrNatPmp(self.clock, gateway, self.open_channel)
            except Exception as exc:
                round_.reasons["pcp"] = f"cannot open a socket to the gateway: {exc}"
            else:
                self._ask(round_, method)
        if round_.asking and round_.upnp_waiting:
            round_.upnp_timer = self.clock.callLater(UPNP_AFTER, self._ask_upnp, round_)
        else:
            self._ask_upnp(round_)

    def _ask(self, round_: _Round, method: MappingMethod) -> None:
        round_.reasons.setdefault(method.name, "")
        asking: Deferred[PortMapping] = maybeDeferred(method.map, self.internal_port, self.lifetime)
        round_.asking[method] = asking
        asking.addCallbacks(
            self._obtained,
            self._not_obtained,
            callbackArgs=(round_, method),
            errbackArgs=(round_, method),
        )

    def _ask_upnp(self, round_: _Round) -> None:
        cancel(round_.upnp_timer)
        round_.upnp_timer = None
        if round_.upnp_waiting and self._round is round_ and self._running:
            round_.upnp_waiting = False
            assert self.upnp is not None
            self._ask(round_, self.upnp)
        self._settle(round_)

    def _obtained(self, mapping: PortMapping, round_: _Round, method: MappingMethod) -> None:
        round_.asking.pop(method, None)
        if self._round is not round_ or not self._running:
            # Stopped meanwhile, or another method won: the gateway forgets it.
            method.delete(mapping).addErrback(lambda _: None).addBoth(lambda _: method.close())
            return
        self._round = None
        cancel(round_.upnp_timer)
        for other, asking in list(round_.asking.items()):
            if other is not self.upnp:
                asking.cancel()
        self._method = method
        self._hold(mapping)

    def _not_obtained(self, failure: Failure, round_: _Round, method: MappingMethod) -> None:
        round_.asking.pop(method, None)
        method.close()
        if failure.check(CancelledError):
            return
        if not failure.check(MappingFailed):
            log.failure("unexpected error asking for a port mapping", failure)
        round_.reasons[method.name] = f"{method.name}: {failure.getErrorMessage()}"
        if self._round is round_:
            self._ask_upnp(round_)  # PCP failed before UPNP_AFTER: no reason to wait

    def _settle(self, round_: _Round) -> None:
        """Every method asked has failed: say why, ask again later."""
        if self._round is round_ and self._running and not round_.asking:
            if not round_.upnp_waiting:
                self._round = None
                reasons = [reason for reason in round_.reasons.values() if reason]
                self._failed("; ".join(reasons) or "no way to ask the gateway")

    def _hold(self, mapping: PortMapping) -> None:
        self.state = "held"
        self.error = None
        self.failures = 0
        if self.mapping is None or self.mapping.external != mapping.external:
            log.info(
                "port mapping held: {external} -> our port {port} ({protocol}, lifetime "
                "{lifetime} s, renewed at half)",
                external=mapping.external,
                port=mapping.internal_port,
                protocol=mapping.protocol,
                lifetime=mapping.lifetime,
            )
        self._set_mapping(mapping)
        cancel(self._expiry)
        self._expiry = self.clock.callLater(
            max(0.0, mapping.expires_at - self.clock.seconds()), self._expired
        )
        self._timer = self.clock.callLater(mapping.lifetime / 2, self._renew)

    def _set_mapping(self, mapping: PortMapping | None) -> None:
        old, self.mapping = self.mapping, mapping
        if (old.external if old else None) != (mapping.external if mapping else None):
            try:
                self.on_change(mapping)
            except Exception:
                log.failure("unexpected error announcing the port mapping")

    # -- renewing -------------------------------------------------------
    @inlineCallbacks
    def _renew(self) -> Generator[Deferred[Any], Any, None]:
        self._timer = None
        method, mapping = self._method, self.mapping
        if method is None or mapping is None or not self._running:
            return
        try:
            self._working = method.map(self.internal_port, self.lifetime)
            renewed = yield self._working
        except CancelledError:
            return
        except Exception as exc:
            self.error = f"renewal failed: {exc}"
            left = mapping.expires_at - self.clock.seconds()
            if left > MIN_RENEW_DELAY:
                log.info(
                    "port mapping {external}: renewal failed ({error}); trying again in "
                    "{delay:.0f} s, {left:.0f} s before it expires",
                    external=mapping.external,
                    error=str(exc),
                    delay=max(MIN_RENEW_DELAY, left / 2),
                    left=left,
                )
                self._timer = self.clock.callLater(max(MIN_RENEW_DELAY, left / 2), self._renew)
            return  # otherwise the expiry timer drops it
        finally:
            self._working = None
        if renewed.external != mapping.external:
            log.info(
                "port mapping moved from {old} to {new} at renewal",
                old=mapping.external,
                new=renewed.external,
            )
        self._hold(renewed)

    def _expired(self) -> None:
        self._expiry = None
        mapping = self.mapping
        if mapping is None:
            return
        cancel(self._timer)
        self._timer = None
        if self._working is not None:
            self._working.cancel()
        method, self._method = self._method, None
        if method is not None:
            method.close()
        self._set_mapping(None)
        self._failed(
            f"the lease of {mapping.external} ({mapping.protocol}) expired without renewal"
            + (f" ({self.error})" if self.error else "")
        )

    def _failed(self, reason: str) -> None:
        delay = self.retry_delays[min(self.failures, len(self.retry_delays) - 1)]
        self.failures += 1
        if reason != self.error:  # once, not once a retry
            log.warn(
                "no port mapping: {reason}; going on without one (peers behind symmetric "
                "NATs stay relayed), asking again in {delay:.0f} s",
                reason=reason,
                delay=delay,
            )
        self.state = "failed"
        self.error = reason
        if self._running:
            self._timer = self.clock.callLater(delay, self._obtain)

    # -- for status and metrics ------------------------------------------
    def describe(self, now: float) -> dict[str, Any]:
        mapping = self.mapping
        return {
            "state": self.state,
            "protocol": mapping.protocol if mapping else None,
            "external_endpoint": str(mapping.external) if mapping else None,
            "lifetime": mapping.lifetime if mapping else None,
            "expires_in": round(max(0.0, mapping.expires_at - now), 1) if mapping else None,
            "error": self.error,
        }
