"""Fakes that ship with the product (as treq ships StubTreq), for tests,
simulations and benchmarks of the client, all in memory and on one clock:

- `MemoryRegistryClient`: a registry connection that runs the registry's real
  request logic (`Registry`) without sockets, its lines through the same
  decoding as the wire's;
- `SimulatedNetwork`: a hub (a Registry over a MemoryDevice) and client hosts,
  each a MemoryDevice with the hub as its peer, whose agents follow the hub
  through MemoryRegistryClients; the test plays the network (`handshake`,
  `alive`);
- `ScriptedRegistryClient`: a registry connection that says exactly what a test
  scripts (any JSON, valid or not), to see what the agent does with it.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from wgnat._types import (
    Announcement,
    Endpoint,
    InvalidValue,
    IPAddress,
    IPInterface,
    PeerState,
    PublicKey,
    parse_network,
)
from wgnat.client.agent import AgentConfig, MeshAgent
from wgnat.client.reconcile import Settings
from wgnat.client.registry_client import RegistryError, RegistryStream
from wgnat.device.memory import MemoryDevice
from wgnat.registry.hub import Registry, Stream
from wgnat.wire import Answer, StreamDecoder, decode_json, encode_line, parse_own_answer

# -- a registry connection in memory --------------------------------------------


class MemoryRegistryClient:
    """Same interface as client.registry_client.RegistryClient; the caller is
    identified by `address` exactly as the API identifies a source address."""

    def __init__(self, hub: Registry, address: IPAddress) -> None:
        self.hub = hub
        self.address = address
        self._down: str | None = None
        self.fetches = 0  # streams opened
        self.checks = 0
        self.full_answers = 0  # received on streams
        self.announced: list[Announcement] = []
        self.streams: list[RegistryStream] = []  # open ones

    @property
    def down(self) -> str | None:
        """Set to a message to simulate an unreachable registry: every request
        fails with it, and open streams are cut."""
        return self._down

    @down.setter
    def down(self, message: str | None) -> None:
        self._down = message
        if message is not None:
            for stream in list(self.streams):
                stream.fail(RegistryError(message))
                stream.close()

    def _caller(self) -> Deferred[PublicKey]:
        if self.down is not None:
            return fail(RegistryError(self.down))

        def known(caller: PublicKey | None) -> PublicKey:
            if caller is None:
                raise RegistryError(
                    f"the registry refused the request: HTTP 403: {self.address} "
                    "is not the tunnel address of any peer"
                )
            return caller

        return self.hub.identify(self.address).addCallback(known)

    def follow(self, since: int | None, epoch: str | None) -> RegistryStream:
        """A stream from the hub: its lines go through the same decoding as the
        wire's (StreamDecoder), keep-alives included."""
        self.fetches += 1
        if since is None or epoch is None:
            since, epoch = None, None
        stream = RegistryStream()
        decoder = StreamDecoder()
        subscription: list[Stream] = []

        def receive(line: bytes) -> None:
            try:
                for answer in decoder.feed(line):
                    if answer is not None and answer.full:
                        self.full_answers += 1
                    stream.put(answer)
            except InvalidValue as exc:
                stream.fail(RegistryError(f"refused the registry's answer: {exc}"))
                stream.close()

        def opened(hub_stream: Stream) -> None:
            if stream in self.streams:
                subscription.append(hub_stream)
            else:  # closed while opening
                self.hub.close_stream(hub_stream)

        def closed() -> None:
            if stream in self.streams:
                self.streams.remove(stream)
            for hub_stream in subscription:
                self.hub.close_stream(hub_stream)

        stream.on_close = closed
        self.streams.append(stream)
        opening = self._caller().addCallback(
            lambda caller: self.hub.open_stream(caller, since, epoch, receive)
        )

        def failed(failure: Failure) -> None:
            stream.fail(failure.value or RegistryError("the stream failed"))
            stream.close()

        opening.addCallback(opened).addErrback(failed)
        return stream

    def check(self, epoch: str, version: int, digest: str) -> Deferred[Answer | None]:
        """The -t check, through the same JSON decoding as the wire's."""
        self.checks += 1

        def ask(caller: PublicKey) -> Answer | None:
            payload = self.hub.check(caller, epoch, version, digest)
            if payload is None:
                return None
            try:
                return parse_own_answer(decode_json(payload, "the registry's answer"))
            except InvalidValue as exc:
                raise RegistryError(f"refused the registry's answer: {exc}") from None

        return self._caller().addCallback(ask)

    def announce(self, announcement: Announcement) -> Deferred[object]:
        self.announced.append(announcement)
        return self._caller().addCallback(lambda caller: self.hub.announce(caller, announcement))

    def close(self) -> Deferred[None]:
        return succeed(None)


# -- a registry that says what it is told -----------------------------------------


class ScriptedRegistryClient:
    """A registry connection answering with the given JSON documents (anything:
    the client must survive it), through the wire's decoding.

    `per_stream=False`: one stream, whose first line names this peer, then each
    document as a shared line.  `per_stream=True`: each document is the first
    line of a new stream (this peer named in its "you" when it has none).  Once
    the documents are used up, a stream stays open and silent."""

    def __init__(self, me: PublicKey, documents: list[Any], per_stream: bool = False) -> None:
        self.me = me
        self.documents = list(documents)
        self.per_stream = per_stream
        self.refused: list[str] = []
        self.accepted = 0

    def _feed(self, stream: RegistryStream, decoder: StreamDecoder, document: Any) -> bool:
        try:
            answers = list(decoder.feed(encode_line(document) if _encodable(document) else b"?\n"))
        except InvalidValue as exc:
            self.refused.append(str(exc))
            stream.fail(RegistryError(f"refused the registry's answer: {exc}"))
            return False
        self.accepted += 1
        for answer in answers:
            stream.put(answer)
        return True

    def follow(self, since: int | None, epoch: str | None) -> RegistryStream:
        stream = RegistryStream()
        if not self.documents:
            return stream  # nothing more to say
        decoder = StreamDecoder()
        if self.per_stream:
            document = self.documents.pop(0)
            if isinstance(document, dict):
                you = document.get("you")
                if you is None or (isinstance(you, dict) and "public_key" not in you):
                    document = {**document, "you": {**(you or {}), "public_key": self.me.base64}}
            self._feed(stream, decoder, document)
            return stream
        first = {"epoch": "e1", "version": 0, "full": True, "you": {"public_key": self.me.base64}}
        for answer in decoder.feed(encode_line(first)):
            stream.put(answer)
        while self.documents:
            if not self._feed(stream, decoder, self.documents.pop(0)):
                break
        return stream

    def check(self, epoch: str, version: int, digest: str) -> Deferred[Answer | None]:
        return succeed(None)  # what it says comes on the stream

    def announce(self, announcement: Announcement) -> Deferred[object]:
        return succeed({"version": 0})

    def close(self) -> Deferred[None]:
        return succeed(None)


def _encodable(document: Any) -> bool:
    try:
        json.dumps(document)
    except (TypeError, ValueError):
        return False
    return True


# -- a hub and its clients, all in memory -----------------------------------------

HUB_ENDPOINT = "203.0.113.10:51820"
TUNNEL_NETWORK = "198.51.100.0/24"


class MemoryStateStore:
    """The state file, in memory: what was saved, and how often."""

    def __init__(self) -> None:
        self.managed: set[PublicKey] = set()
        self.saves = 0

    def load(self) -> set[PublicKey]:
        return set(self.managed)

    def save(self, managed: set[PublicKey]) -> None:
        self.saves += 1
        self.managed = set(managed)


@dataclass
class Host:
    """One client host of a SimulatedNetwork."""

    name: str
    key: PublicKey
    device: MemoryDevice
    tunnel: str
    lan: str
    ipv6: str | None = None  # a global IPv6 address of the host, if any
    store: MemoryStateStore = field(default_factory=MemoryStateStore)
    client: MemoryRegistryClient | None = None
    agent: MeshAgent | None = None


class SimulatedNetwork:
    """A hub and client hosts on one clock (a Clock by default, or the real
    reactor).  Each host's device has the hub as its peer (tunnel network as
    allowed IPs, keepalive 25 s); the hub's device has each host at its public
    endpoint with its tunnel address, just handshaken."""

    def __init__(self, clock: IReactorTime | None = None, start: float = 1_700_000_000.0):
        if clock is None:
            clock = Clock()
            clock.advance(start)
        self.clock = clock
        self.registry_key = PublicKey(os.urandom(32))
        self.registry_device = MemoryDevice(public_key=self.registry_key)
        self.hub = Registry(self.registry_device, clock)
        self.hosts: dict[str, Host] = {}

    def add_host(
        self,
        name: str,
        tunnel: str,
        public: str,
        lan: str = "192.168.1.10",
        ifname: str = "wg0",
        ipv6: str | None = None,
    ) -> Host:
        key = PublicKey(os.urandom(32))
        now = self.clock.seconds()
        device = MemoryDevice(
            ifname=ifname, public_key=key, addresses=[ipaddress.ip_interface(f"{tunnel}/24")]
        )
        device.add_peer(
            PeerState(
                self.registry_key,
                Endpoint.parse(HUB_ENDPOINT),
                (parse_network(TUNNEL_NETWORK),),
                now,
                persistent_keepalive=25,
            )
        )
        self.registry_device.add_peer(
            PeerState(key, Endpoint.parse(public), (parse_network(f"{tunnel}/32"),), now)
        )
        host = Host(name, key, device, tunnel, lan, ipv6)
        self.hosts[name] = host
        return host

    def agent(self, name: str, start: bool = True, **settings: Any) -> MeshAgent:
        """A MeshAgent for host `name`, following the hub (started unless told)."""
        host = self.hosts[name]
        client = MemoryRegistryClient(self.hub, ipaddress.ip_address(host.tunnel))
        host.client = client

        def addresses(ifname: str) -> Deferred[list[IPInterface]]:
            # The host's addresses as they are when asked (a test may change them).
            found: list[IPInterface] = [ipaddress.ip_interface(f"{host.lan}/24")]
            if host.ipv6 is not None:
                found.append(ipaddress.ip_interface(f"{host.ipv6}/64"))
            return succeed(found)

        agent = MeshAgent(
            host.device,
            self.clock,
            AgentConfig(registry_key=self.registry_key, settings=Settings(**settings)),
            lan_addresses=addresses,
            client_factory=lambda reactor, address, port: client,
            state_store=host.store,
            wall=self.clock.seconds,  # the simulation's clock is its wall clock
        )
        host.agent = agent
        if start:
            agent.startService()
        return agent

    def key(self, name: str) -> PublicKey:
        return self.hosts[name].key

    def handshake(self, a: str, b: str) -> None:
        """a and b completed a direct handshake (both devices record it)."""
        ka, kb = self.key(a), self.key(b)
        now = self.clock.seconds()
        self.hosts[a].device.handshake(kb, now)
        self.hosts[b].device.handshake(ka, now)

    def alive(self, a: str, b: str) -> None:
        """Time passes normally: handshakes renew, keepalives arrive, everywhere."""
        ka, kb = self.key(a), self.key(b)
        now = self.clock.seconds()
        self.handshake(a, b)
        self.hosts[a].device.traffic(kb, rx=100)
        self.hosts[b].device.traffic(ka, rx=100)
        self.registry_device.handshake(ka, now)
        self.registry_device.handshake(kb, now)

    def stop(self) -> None:
        for host in self.hosts.values():
            if host.agent is not None and host.agent.running:
                host.agent.stopService()
