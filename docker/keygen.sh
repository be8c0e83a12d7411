#!/bin/sh
# The testbed's WireGuard configurations, made at start-up (keys never leave the
# volume; they are never committed).  Written once: a restarted testbed keeps its keys.
#
#   OUT=/config REGISTRY=203.0.113.10:51820 TUNNEL=192.0.2 \
#   CLIENTS="a:2 b:3 ..." wgnat-keygen
#
# OUT/registry/wg0.conf is the hub (every client a peer with its /32),
# OUT/NAME/wg0.conf each client (the hub its one peer: the tunnel network,
# keepalive 25), OUT/registry.pub the hub's public key (the clients' -r).
set -eu
out=${OUT:-/config}
tunnel=${TUNNEL:-192.0.2}
registry=${REGISTRY:?host:port of the hub}
port=${registry##*:}
umask 077
mkdir -p "$out"
if [ -f "$out/registry.pub" ]; then
    echo "wgnat-keygen: configurations exist in $out, kept"
    exit 0
fi
tmp=$(mktemp -d "$out/.new.XXXXXX")
hub_key=$(wg genkey)
hub_pub=$(echo "$hub_key" | wg pubkey)
printf '[Interface]\nPrivateKey = %s\nAddress = %s.1/24\nListenPort = %s\n' \
    "$hub_key" "$tunnel" "$port" >"$tmp/registry.conf"
mkdir "$tmp/registry"
for entry in ${CLIENTS:?}; do
    name=${entry%%:*}
    host=${entry##*:}
    mkdir "$tmp/$name"
    key=$(wg genkey)
    pub=$(echo "$key" | wg pubkey)
    printf '\n[Peer]\n# %s\nPublicKey = %s\nAllowedIPs = %s.%s/32\n' \
        "$name" "$pub" "$tunnel" "$host" >>"$tmp/registry.conf"
    printf '[Interface]\nPrivateKey = %s\nAddress = %s.%s/24\nListenPort = %s\n\n[Peer]\nPublicKey = %s\nEndpoint = %s\nAllowedIPs = %s.0/24\nPersistentKeepalive = 25\n' \
        "$key" "$tunnel" "$host" "$port" "$hub_pub" "$registry" "$tunnel" >"$tmp/$name/wg0.conf"
done
mv "$tmp/registry.conf" "$tmp/registry/wg0.conf"
echo "$hub_pub" >"$tmp/registry.pub"
chmod 0644 "$tmp/registry.pub"
# The public key last: its presence says the set is complete.
for item in "$tmp"/*; do
    [ "$item" = "$tmp/registry.pub" ] || mv "$item" "$out"/
done
mv "$tmp/registry.pub" "$out"/
rmdir "$tmp"
echo "wgnat-keygen: hub and $(echo "$CLIENTS" | wc -w) clients written to $out"
