"""The client's copy of the registry's view, built from its answers (decoded and
validated whole by wgnat.wire before any of it reaches here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from wgnat._types import Endpoint, PublicKey
from wgnat.wire import Answer, RemotePeer


@dataclass
class RegistryView:
    """The mesh as the registry last described it, built from full answers and deltas."""

    epoch: str | None = None
    version: int | None = None
    my_endpoint: Endpoint | None = None
    peers: dict[PublicKey, RemotePeer] = field(default_factory=dict)

    def apply(self, answer: Answer) -> bool:
        """Merge an answer; return whether anything the mesh depends on changed."""
        before = (self.my_endpoint, dict(self.peers))
        if answer.full:
            self.peers = {peer.public_key: peer for peer in answer.peers}
        else:
            for key in answer.removed:
                self.peers.pop(key, None)
            for peer in answer.peers:
                self.peers[peer.public_key] = peer
        self.epoch = answer.epoch
        self.version = answer.version
        self.my_endpoint = answer.my_endpoint
        return before != (self.my_endpoint, self.peers)
