"""wgnat: turn a hub-and-spoke WireGuard network into a full mesh."""

__version__ = "0.1.0"
