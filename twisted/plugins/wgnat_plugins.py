# twistd plugins: `twistd -n wgnat-server ...` and `twistd -n wgnat-client ...`.
# The options and services live in wgnat.registry.tap and wgnat.client.tap, shared
# with the console scripts so the two ways to run can never drift apart.
from twisted.application.service import ServiceMaker

wgnat_server = ServiceMaker(
    "wgnat-server",
    "wgnat.registry.tap",
    "wgnat registry: serves every peer's observed endpoint over the WireGuard tunnel",
    "wgnat-server",
)
wgnat_client = ServiceMaker(
    "wgnat-client",
    "wgnat.client.tap",
    "wgnat client: adds the other peers as direct WireGuard peers (NAT hole punching)",
    "wgnat-client",
)
