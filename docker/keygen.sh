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
set -eu
out=${OUT:-/config}
tunnel=${TUNNEL:-192.0.2}
registry=${REGISTRY:?host:port of the hub}
port=${registry##*:}
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
for entry in ${CLIENTS:?}; do
    name=${entry%%:*}
    host=${entry##*:}
    dir=$(host_dir "$name")
    key=$(wg genkey)
    pub=$(echo "$key" | wg pubkey)
    printf '\n[Peer]\n# %s\nPublicKey = %s\nAllowedIPs = %s.%s/32\n' \
        "$name" "$pub" "$tunnel" "$host" >>"$hub/.wg0.conf.new"
    printf '[Interface]\nPrivateKey = %s\nAddress = %s.%s/24\nListenPort = %s\n\n[Peer]\nPublicKey = %s\nEndpoint = %s\nAllowedIPs = %s.0/24\nPersistentKeepalive = 25\n' \
        "$key" "$tunnel" "$host" "$port" "$hub_pub" "$registry" "$tunnel" >"$dir/.wg0.conf.new"
    mv "$dir/.wg0.conf.new" "$dir/wg0.conf"
done
mv "$hub/.wg0.conf.new" "$hub/wg0.conf"
echo "$hub_pub" >"$out/public/.registry.pub.new"
chmod 0644 "$out/public/.registry.pub.new"
mv "$out/public/.registry.pub.new" "$out/public/registry.pub"
echo "wgnat-keygen: hub and $(echo "$CLIENTS" | wc -w) clients written to $out, one directory each"
