"""A farm of WireGuard responders: many peers (one private key and one UDP port
each) in one process, so that a real wireguard-go device can hold a thousand
*direct* peers with real handshakes, for the client cost benchmark.

Each peer answers handshake initiations (Noise_IKpsk2, as in the WireGuard paper
section 5.4, no preshared key) and answers every transport packet it receives
(the initiator's keepalives, every 25 s) with a keepalive of its own, so the
device sees handshakes and received bytes as from a live peer.  It never sends
data and never decrypts any: it is a benchmark's stand-in for a remote host, not
a tunnel.  Cookie replies (sent by a device under load) are ignored; the
initiator retries after 5 s as it would on a lost packet.

The private keys are made here and never leave this process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
INITIATION, RESPONSE, COOKIE, TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE, RESPONSE_SIZE = 148, 92
ZERO_NONCE = bytes(12)


def blake2s(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, count: int) -> list[bytes]:
    prk = _hmac(key, data)
    out = [_hmac(prk, b"\x01")]
    for index in range(2, count + 1):
        out.append(_hmac(prk, out[-1] + bytes([index])))
    return out


def mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


INITIAL_CHAIN = blake2s(CONSTRUCTION)
INITIAL_HASH = blake2s(INITIAL_CHAIN, IDENTIFIER)


@dataclass
class Session:
    remote_index: int
    send_key: ChaCha20Poly1305
    counter: int = 0


@dataclass
class Responder:
    """One fake peer: its static key and its sessions by our (local) index."""

    private: X25519PrivateKey
    public: bytes = b""
    sessions: dict[int, Session] = field(default_factory=dict)
    handshakes: int = 0
    keepalives: int = 0

    def __post_init__(self) -> None:
        self.public = public_bytes(self.private)
        self._hash0 = blake2s(INITIAL_HASH, self.public)
        self._mac1_key = blake2s(LABEL_MAC1, self.public)
        self._static_static: dict[bytes, bytes] = {}

    def receive(self, packet: bytes) -> bytes | None:
        """The answer to one datagram, if any."""
        if len(packet) < 4:
            return None
        kind = packet[0]
        if kind == INITIATION and len(packet) == INITIATION_SIZE:
            return self._respond(packet)
        if kind == TRANSPORT and len(packet) >= 32:
            (receiver,) = struct.unpack_from("<I", packet, 4)
            session = self.sessions.get(receiver)
            return self._keepalive(session) if session else None
        return None

    def _respond(self, packet: bytes) -> bytes | None:
        if mac(self._mac1_key, packet[:116]) != packet[116:132]:
            return None  # not for this peer
        (sender,) = struct.unpack_from("<I", packet, 4)
        ephemeral_i = packet[8:40]
        static_sealed, timestamp_sealed = packet[40:88], packet[88:116]
        h = blake2s(self._hash0, ephemeral_i)
        c = kdf(INITIAL_CHAIN, ephemeral_i, 1)[0]
        e_i = X25519PublicKey.from_public_bytes(ephemeral_i)
        c, k = kdf(c, self.private.exchange(e_i), 2)
        try:
            static_i = ChaCha20Poly1305(k).decrypt(ZERO_NONCE, static_sealed, h)
        except Exception:
            return None
        h = blake2s(h, static_sealed)
        ss = self._static_static.get(static_i)
        if ss is None:
            ss = self.private.exchange(X25519PublicKey.from_public_bytes(static_i))
            self._static_static[static_i] = ss
        c, k = kdf(c, ss, 2)
        try:
            ChaCha20Poly1305(k).decrypt(ZERO_NONCE, timestamp_sealed, h)
        except Exception:
            return None
        h = blake2s(h, timestamp_sealed)
        # The response.
        local_index = struct.unpack("<I", os.urandom(4))[0]
        ephemeral = X25519PrivateKey.generate()
        ephemeral_r = public_bytes(ephemeral)
        h = blake2s(h, ephemeral_r)
        c = kdf(c, ephemeral_r, 1)[0]
        c = kdf(c, ephemeral.exchange(e_i), 1)[0]
        c = kdf(c, ephemeral.exchange(X25519PublicKey.from_public_bytes(static_i)), 1)[0]
        c, tau, k = kdf(c, bytes(32), 3)  # no preshared key
        h = blake2s(h, tau)
        empty = ChaCha20Poly1305(k).encrypt(ZERO_NONCE, b"", h)
        body = struct.pack("<III", RESPONSE, local_index, sender) + ephemeral_r + empty
        mac1 = mac(blake2s(LABEL_MAC1, static_i), body)
        receive_key, send_key = kdf(c, b"", 2)
        del receive_key  # nothing is decrypted here
        self.sessions = {local_index: Session(sender, ChaCha20Poly1305(send_key))}
        self.handshakes += 1
        return body + mac1 + bytes(16)

    def _keepalive(self, session: Session) -> bytes:
        nonce = bytes(4) + struct.pack("<Q", session.counter)
        header = struct.pack("<IIQ", TRANSPORT, session.remote_index, session.counter)
        session.counter += 1
        self.keepalives += 1
        return header + session.send_key.encrypt(nonce, b"", b"")


def make_responders(count: int) -> list[Responder]:
    return [Responder(X25519PrivateKey.generate()) for _ in range(count)]


def serve(reactor: Any, responders: list[Responder], address: str, first_port: int) -> list[Any]:
    """Each responder on its own UDP port (first_port + index) of `address`."""
    from twisted.internet.protocol import DatagramProtocol

    class Port(DatagramProtocol):
        def __init__(self, responder: Responder) -> None:
            self.responder = responder

        def datagramReceived(self, datagram: bytes, addr: Any) -> None:
            answer = self.responder.receive(datagram)
            if answer is not None:
                self.transport.write(answer, addr)

    return [
        reactor.listenUDP(first_port + index, Port(responder), interface=address)
        for index, responder in enumerate(responders)
    ]
