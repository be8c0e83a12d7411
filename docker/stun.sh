#!/bin/sh
# wgnat-stun: the testbed's STUN server (coturn, STUN only: no relaying, no
# authentication), in the gateway image (docker/gateway.Dockerfile).
#
# STUN_ADDRESSES="FIRST SECOND": FIRST is the container's address (Compose
# gives it); SECOND is added to the same interface.  miniupnpd's STUN test (the
# "upnp" router, docker/router.sh) asks FIRST:3478 for answers from the other
# address and port, which a STUN server can give only with two addresses.
set -eu
addresses=${STUN_ADDRESSES:?two addresses, FIRST SECOND}
first=${addresses%% *}
found=$(ip -o -4 addr show | awk -v a="$first" 'index($4, a "/") == 1 {print $2, $4}')
[ -n "$found" ] || { echo "wgnat-stun: no interface holds $first" >&2; exit 1; }
iface=$(echo "$found" | cut -d' ' -f1 | cut -d@ -f1)
prefix=${found##*/}
listening=""
for address in $addresses; do
    [ "$address" = "$first" ] || ip addr add "$address/$prefix" dev "$iface"
    listening="$listening --listening-ip=$address"
done
echo "wgnat-stun: STUN on$(echo "$listening" | sed 's/--listening-ip=/ /g'), ports 3478 and 3479"
# shellcheck disable=SC2086 # the --listening-ip flags
exec turnserver -n --no-cli --stun-only --no-auth $listening \
    --listening-port=3478 --alt-listening-port=3479 --pidfile=/run/turnserver.pid --log-file=stdout
