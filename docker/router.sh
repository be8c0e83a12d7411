#!/bin/sh
# The testbed's NAT routers: iptables MASQUERADE from the LAN to the internet.
#
#   wgnat-router up MODE      set up, then stay (the container's command)
#   wgnat-router rebind A-B   move every mapping: MASQUERADE to ports A-B, conntrack flushed
#
# MODE: home (port-preserving, stateful firewall: INPUT/FORWARD DROP,
# ESTABLISHED,RELATED accepted), symmetric (--random-fully: a new port per
# destination), accept_all (INPUT accepts everything: the conntrack race).
# ROUTER_WAN is the router's address on the internet; the other interface is the LAN.
set -eu
wan=$(ip -o -4 addr show | awk -v a="${ROUTER_WAN:?}" 'index($4, a "/") == 1 {print $2}' | cut -d@ -f1)
[ -n "$wan" ] || { echo "wgnat-router: no interface holds $ROUTER_WAN" >&2; exit 1; }
lan=$(ip -o -4 addr show | awk -v w="$wan" '$2 != "lo" && $2 != w {print $2}' | cut -d@ -f1 | head -1)
mode=${ROUTER_MODE:-home}
random=""
[ "$mode" = symmetric ] && random="--random-fully"

masquerade() { # [PORTS]
    iptables -w -t nat -F POSTROUTING
    if [ -n "${1:-}" ]; then
        for proto in udp tcp; do
            iptables -w -t nat -A POSTROUTING -o "$wan" -p "$proto" -j MASQUERADE --to-ports "$1" $random
        done
    fi
    iptables -w -t nat -A POSTROUTING -o "$wan" -j MASQUERADE $random
}

case "${1:-}" in
up)
    mode=${2:-$mode}
    random=""
    [ "$mode" = symmetric ] && random="--random-fully"
    sysctl -qw net.ipv4.ip_forward=1 2>/dev/null || true
    ip route del default 2>/dev/null || true
    masquerade
    iptables -w -P FORWARD DROP
    iptables -w -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -w -A FORWARD -i "$lan" -o "$wan" -j ACCEPT
    if [ "$mode" != accept_all ]; then
        iptables -w -P INPUT DROP
        iptables -w -A INPUT -i lo -j ACCEPT
        iptables -w -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        iptables -w -A INPUT -i "$lan" -j ACCEPT
    fi
    echo "$mode" >/run/wgnat-router-mode
    echo "wgnat-router: $mode NAT, internet on $wan ($ROUTER_WAN), LAN on $lan"
    exec sleep infinity
    ;;
rebind)
    [ -f /run/wgnat-router-mode ] && mode=$(cat /run/wgnat-router-mode)
    random=""
    [ "$mode" = symmetric ] && random="--random-fully"
    masquerade "${2:?port range}"
    conntrack -F 2>/dev/null || true
    echo "wgnat-router: mappings moved to ports $2, conntrack flushed"
    ;;
*)
    echo "usage: wgnat-router up MODE | rebind FROM-TO" >&2
    exit 2
    ;;
esac
