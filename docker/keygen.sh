#!/bin/sh
# The testbed's WireGuard configurations, made at start-up (keys never leave the
# volumes; they are never committed).  Written once: a restarted testbed keeps its keys.
#
#   OUT=/config REGISTRY=203.0.113.10:51820 TUNNEL=192.0.2 \
#   CLIENTS="a:2 b:3 ..." wgnat-keygen
#
# One directory per host, each meant to be its own volume so that every
# container mounts only its own private key: OUT/registry/wg0.conf is the hub
# (every client a peer with its /32), OUT/NAME/wg0.conf each client (the hub its
# one peer: the tunnel network, keepalive 25).  OUT/public/registry.pub, the
# hub's public key (the clients' -r), is the only file hosts share, and is
# written last: its presence says the set is complete.
#
# A second hub (REGISTRY2=host:port, HUB2_HOST=its last tunnel octet, 254 by
# default): OUT/registry2/wg0.conf lists every client too, each client has both
# hubs as peers (hub 1: its own address and the tunnel network, which relays;
# hub 2: its own address only), and OUT/public/registry2.pub holds its key.
set -eu
out=${OUT:-/config}
tunnel=${TUNNEL:-192.0.2}
registry=${REGISTRY:?host:port of the hub}
port=${registry##*:}
registry2=${REGISTRY2:-}
hub2_host=${HUB2_HOST:-254}
umask 077
mkdir -p "$out/public"
if [ -f "$out/public/registry.pub" ]; then
    echo "wgnat-keygen: configurations exist in $out, kept"
    exit 0
fi

host_dir() { # NAME: the host's directory (a mount point: kept, emptied of drafts)
    mkdir -p "$out/$1"
    chmod 0700 "$out/$1"
    rm -f "$out/$1/.wg0.conf.new"
    echo "$out/$1"
}

hub_key=$(wg genkey)
hub_pub=$(echo "$hub_key" | wg pubkey)
hub=$(host_dir registry)
printf '[Interface]\nPrivateKey = %s\nAddress = %s.1/24\nListenPort = %s\n' \
    "$hub_key" "$tunnel" "$port" >"$hub/.wg0.conf.new"
hub1_allowed="$tunnel.0/24"
if [ -n "$registry2" ]; then
    hub2_key=$(wg genkey)
    hub2_pub=$(echo "$hub2_key" | wg pubkey)
    hub2=$(host_dir registry2)
    printf '[Interface]\nPrivateKey = %s\nAddress = %s.%s/24\nListenPort = %s\n' \
        "$hub2_key" "$tunnel" "$hub2_host" "${registry2##*:}" >"$hub2/.wg0.conf.new"
    # WireGuard routes an address to one peer: hub 1 keeps the tunnel network.
    hub1_allowed="$tunnel.1/32, $tunnel.0/24"
fi
for entry in ${CLIENTS:?}; do
    name=${entry%%:*}
    host=${entry##*:}
    dir=$(host_dir "$name")
    key=$(wg genkey)
    pub=$(echo "$key" | wg pubkey)
    printf '\n[Peer]\n# %s\nPublicKey = %s\nAllowedIPs = %s.%s/32\n' \
        "$name" "$pub" "$tunnel" "$host" >>"$hub/.wg0.conf.new"
    printf '[Interface]\nPrivateKey = %s\nAddress = %s.%s/24\nListenPort = %s\n\n[Peer]\nPublicKey = %s\nEndpoint = %s\nAllowedIPs = %s\nPersistentKeepalive = 25\n' \
        "$key" "$tunnel" "$host" "$port" "$hub_pub" "$registry" "$hub1_allowed" >"$dir/.wg0.conf.new"
    if [ -n "$registry2" ]; then
        printf '\n[Peer]\n# %s\nPublicKey = %s\nAllowedIPs = %s.%s/32\n' \
            "$name" "$pub" "$tunnel" "$host" >>"$hub2/.wg0.conf.new"
        printf '\n[Peer]\nPublicKey = %s\nEndpoint = %s\nAllowedIPs = %s.%s/32\nPersistentKeepalive = 25\n' \
            "$hub2_pub" "$registry2" "$tunnel" "$hub2_host" >>"$dir/.wg0.conf.new"
    fi
    mv "$dir/.wg0.conf.new" "$dir/wg0.conf"
done
mv "$hub/.wg0.conf.new" "$hub/wg0.conf"
if [ -n "$registry2" ]; then
    mv "$hub2/.wg0.conf.new" "$hub2/wg0.conf"
    echo "$hub2_pub" >"$out/public/.registry2.pub.new"
    chmod 0644 "$out/public/.registry2.pub.new"
    mv "$out/public/.registry2.pub.new" "$out/public/registry2.pub"
fi
echo "$hub_pub" >"$out/public/.registry.pub.new"
chmod 0644 "$out/public/.registry.pub.new"
mv "$out/public/.registry.pub.new" "$out/public/registry.pub"
echo "wgnat-keygen: $([ -n "$registry2" ] && echo "two hubs" || echo hub) and $(echo "$CLIENTS" | wc -w) clients written to $out, one directory each"
