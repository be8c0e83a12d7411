#!/bin/sh
# wgnat-entrypoint ROLE [FLAGS...]
#
#   server|client  bring the WireGuard interface up from $WG_CONFIG (a wg-quick
#                  style file; the kernel module when the host has it, wireguard-go
#                  otherwise), then run `twistd -n --pidfile= wgnat-ROLE -i IFACE FLAGS`
#                  ($WGNAT_FLAGS are added after the command's own flags)
#   tunnel CMD...  bring the interface up likewise, then run CMD (a host on the
#                  tunnel that runs no wgnat daemon: the testbed's Prometheus)
#   router MODE    a NAT router for the testbed (see wgnat-router)
#   keygen         write the testbed's WireGuard configurations (see wgnat-keygen)
#   anything else  run as a command
#
# Environment: WGNAT_ROLE (when no command is given), WG_CONFIG (default
# /etc/wireguard/wg0.conf; the interface is named after the file), WGNAT_FLAGS,
# WGNAT_GATEWAY (make it the default route: a LAN host behind a NAT router),
# WGNAT_REGISTRY_KEY_FILE (client: read -r from this file; several files, space-
# separated, or several keys a file: one -r each, in order), WGNAT_WAIT_FILE (wait
# until this file exists before starting the daemon, with the interface up),
# WGNAT_METRICS_LISTEN (HOST:PORT for --metrics-listen; wgnat-metrics reads it too).
# The testbed's IPv6 (issue 16): WGNAT_IPV6 (ADDRESS/LEN, added to the container's
# network interface before WireGuard starts, so the daemon announces it; needs the
# sysctl net.ipv6.conf.all.disable_ipv6=0), WGNAT_IPV6_ROUTES ("PREFIX via
# ADDRESS", comma-separated; "default via ROUTER" behind a router).
set -eu
role=${1:-${WGNAT_ROLE:-client}}
[ $# -gt 0 ] && shift

case "$role" in
router) exec wgnat-router up "$@" ;;
keygen) exec wgnat-keygen "$@" ;;
server | client | tunnel) ;;
*) exec "$role" "$@" ;;
esac

if [ -n "${WGNAT_GATEWAY:-}" ]; then
    ip route replace default via "$WGNAT_GATEWAY"
fi

config=${WG_CONFIG:-/etc/wireguard/wg0.conf}
iface=$(basename "$config" .conf)
if [ -n "${WGNAT_IPV6:-}" ]; then
    # The container's one network interface: not loopback, not WireGuard's.
    dev=$(ip -o link show | awk -F': ' -v wg="$iface" '{sub(/@.*/, "", $2)} $2 != "lo" && $2 != wg {print $2; exit}')
    ip -6 addr replace "$WGNAT_IPV6" dev "${dev:?no network interface for WGNAT_IPV6}" nodad
fi
echo "${WGNAT_IPV6_ROUTES:-}" | tr ',' '\n' | while read -r route; do
    # shellcheck disable=SC2086 # PREFIX via ADDRESS: the route's words
    [ -z "$route" ] || ip -6 route replace $route
done
if [ -f "$config" ]; then
    if ! ip link show "$iface" >/dev/null 2>&1; then
        # wg-quick wants the file under its interface's name, readable by root only.
        mkdir -p /run/wgnat-wg
        install -m 0600 "$config" "/run/wgnat-wg/$iface.conf"
        # wg-quick uses the kernel module when present, else falls back to wireguard-go.
        WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go wg-quick up "/run/wgnat-wg/$iface.conf"
        rm -f "/run/wgnat-wg/$iface.conf"
    fi
elif ! ip link show "$iface" >/dev/null 2>&1; then
    echo "wgnat-entrypoint: no $config and no interface $iface" >&2
    exit 1
fi

if [ "$role" = tunnel ]; then
    exec "$@"
fi

if [ "$role" = client ] && [ -n "${WGNAT_REGISTRY_KEY_FILE:-}" ]; then
    # One -r per key, in order: several files (space-separated), each holding
    # one key or several (one a line); the first is the hub that relays.
    # (A WireGuard key is base64: no space, no glob character.)
    registries=""
    for file in $WGNAT_REGISTRY_KEY_FILE; do
        for key in $(cat "$file"); do
            registries="$registries -r $key"
        done
    done
    # shellcheck disable=SC2086 # the -r KEY pairs
    set -- $registries "$@"
fi
if [ "$role" = server ]; then
    echo "wgnat status --server -i $iface" >/run/wgnat-health
else
    echo "wgnat status -i $iface" >/run/wgnat-health
fi
if [ -n "${WGNAT_METRICS_LISTEN:-}" ]; then
    set -- --metrics-listen "$WGNAT_METRICS_LISTEN" "$@"
    echo "$WGNAT_METRICS_LISTEN" >/run/wgnat-metrics-listen
fi
if [ -n "${WGNAT_WAIT_FILE:-}" ]; then
    echo "wgnat-entrypoint: $iface is up; waiting for $WGNAT_WAIT_FILE to start wgnat-$role"
    while [ ! -e "$WGNAT_WAIT_FILE" ]; do sleep 0.1; done
fi
# shellcheck disable=SC2086 # WGNAT_FLAGS is a list of flags
exec twistd -n --pidfile= "wgnat-$role" -i "$iface" "$@" ${WGNAT_FLAGS:-}
