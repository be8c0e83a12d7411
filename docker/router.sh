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
#
# IPv6 (issue 16), when ROUTER_WAN6 is set: ROUTER_WAN6 and ROUTER_LAN6 (ADDRESS/LEN)
# on the two interfaces, ROUTER_ROUTES6 ("PREFIX via ADDRESS", comma-separated: the
# other routers' LAN prefixes), forwarding with no NAT66 (the LAN's addresses are
# global) behind a home router's stateful firewall, whatever MODE: out, and what
# answers it; nothing else in.  The container needs IPv6 on and forwarding
# (sysctls net.ipv6.conf.all.disable_ipv6=0, net.ipv6.conf.all.forwarding=1).
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

# "PREFIX via ADDRESS, ..." -> one `ip -6 route replace` each.
routes6() {
    echo "$1" | tr ',' '\n' | while read -r route; do
        # shellcheck disable=SC2086 # PREFIX via ADDRESS: the route's words
        [ -z "$route" ] || ip -6 route replace $route
    done
}

ipv6_up() {
    # nodad: usable at once (the testbed's addresses are unique by design).
    ip -6 addr replace "$ROUTER_WAN6" dev "$wan" nodad
    ip -6 addr replace "${ROUTER_LAN6:?ROUTER_LAN6 with ROUTER_WAN6}" dev "$lan" nodad
    routes6 "${ROUTER_ROUTES6:-}"
    ip6tables -w -P FORWARD DROP
    ip6tables -w -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ip6tables -w -A FORWARD -i "$lan" -o "$wan" -j ACCEPT
    ip6tables -w -P INPUT DROP
    ip6tables -w -A INPUT -i lo -j ACCEPT
    # Neighbour discovery (and ping to the router itself): without it nothing
    # on the internet could resolve the router's link-layer address.
    ip6tables -w -A INPUT -p ipv6-icmp -j ACCEPT
    ip6tables -w -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ip6tables -w -A INPUT -i "$lan" -j ACCEPT
    echo "wgnat-router: IPv6 routed (no NAT66), $ROUTER_WAN6 on $wan, $ROUTER_LAN6 on $lan"
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
    if [ -n "${ROUTER_WAN6:-}" ]; then ipv6_up; fi
    # What crossed the router before its rules existed (the interfaces are up
    # before this script runs): an unsolicited packet accepted then stays a
    # conntrack entry as long as its sender keeps sending, and takes the port a
    # LAN host's mapping needs (the conntrack race, after a restart).
    conntrack -F 2>/dev/null || true
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
