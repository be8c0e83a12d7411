#!/bin/sh
# The testbed's NAT routers: iptables MASQUERADE from the LAN to the internet.
#
#   wgnat-router up MODE      set up, then stay (the container's command)
#   wgnat-router rebind A-B   move every mapping: MASQUERADE to ports A-B, conntrack flushed
#
# MODE: home (port-preserving, stateful firewall: INPUT/FORWARD DROP,
# ESTABLISHED,RELATED accepted), symmetric (--random-fully: a new port per
# destination), accept_all (INPUT accepts everything: the conntrack race),
# upnp (symmetric, and a port-mapping gateway: miniupnpd answers PCP, NAT-PMP
# and UPnP IGD on the LAN; only in the testbed's gateway image, see below).
# ROUTER_WAN is the router's address on the internet; the other interface is the LAN.
#
# upnp: miniupnpd changes the firewall through libiptc, so every rule of this
# router is made with iptables-legacy (chain MINIUPNPD not found otherwise), and
# its chains are made first (what its iptables_init.sh makes).  It refuses to
# map behind a reserved external address, which every documentation range is,
# unless its STUN test finds the address public: ROUTER_STUN names a STUN server
# (coturn, the testbed's `stun` service) by its two addresses, "FIRST SECOND";
# the test asks FIRST:3478 for answers from SECOND too.  Two things make the
# test pass: MASQUERADE only the LAN's packets (with --random-fully on the
# router's own, the test sees a symmetric NAT), and INPUT accepting UDP from
# the STUN addresses.  (tests/netns.py's "upnp" router does the same.)
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
stun_port=3478

# The rules for MODE: which iptables, and MASQUERADE's options.
set_mode() { # MODE
    mode=$1
    random=""
    iptables=iptables
    case "$mode" in
    symmetric) random="--random-fully" ;;
    upnp)
        iptables=iptables-legacy
        lan_net=$(ip -o -4 route show dev "$lan" scope link | awk '{print $1; exit}')
        random="-s $lan_net --random-fully"
        ;;
    esac
}
set_mode "$mode"

masquerade() { # [PORTS]
    $iptables -w -t nat -F POSTROUTING
    if [ "$mode" = upnp ]; then
        $iptables -w -t nat -A POSTROUTING -o "$wan" -j MINIUPNPD-POSTROUTING
    fi
    if [ -n "${1:-}" ]; then
        for proto in udp tcp; do
            # shellcheck disable=SC2086 # $random: options
            $iptables -w -t nat -A POSTROUTING -o "$wan" -p "$proto" -j MASQUERADE --to-ports "$1" $random
        done
    fi
    # shellcheck disable=SC2086
    $iptables -w -t nat -A POSTROUTING -o "$wan" -j MASQUERADE $random
}

stun_answers() { # ADDRESS: whether a STUN binding request to ADDRESS:3478 is answered
    python3 - "$1" "$stun_port" <<'PY'
import os, socket, sys
request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.settimeout(0.5)
try:
    probe.sendto(request, (sys.argv[1], int(sys.argv[2])))
    sys.exit(0 if probe.recv(2048)[8:20] == request[8:20] else 1)
except OSError:
    sys.exit(1)
PY
}

miniupnpd_chains() {
    $iptables -w -t nat -N MINIUPNPD
    $iptables -w -t nat -A PREROUTING -i "$wan" -j MINIUPNPD
    $iptables -w -t nat -N MINIUPNPD-POSTROUTING
    $iptables -w -t mangle -N MINIUPNPD
    $iptables -w -t mangle -A PREROUTING -i "$wan" -j MINIUPNPD
    $iptables -w -N MINIUPNPD
    $iptables -w -A FORWARD -i "$wan" ! -o "$wan" -j MINIUPNPD
    # Its STUN test asks for answers from the server's other address and port,
    # which no packet this router sent matches.
    for address in $ROUTER_STUN; do
        $iptables -w -A INPUT -i "$wan" -p udp -s "$address" -j ACCEPT
    done
}

start_miniupnpd() {
    stun_host=${ROUTER_STUN%% *}
    # Its STUN test runs once, at start: the server must answer by then.
    tries=0
    until stun_answers "$stun_host"; do
        tries=$((tries + 1))
        [ "$tries" -lt 60 ] || { echo "wgnat-router: no STUN answer from $stun_host:$stun_port" >&2; exit 1; }
        sleep 0.5
    done
    cat >/run/miniupnpd.conf <<CONF
ext_ifname=$wan
listening_ip=$lan
http_port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=yes
ext_perform_stun=yes
ext_stun_host=$stun_host
ext_stun_port=$stun_port
allow 1024-65535 $lan_net 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
    echo "wgnat-router: starting miniupnpd (PCP, NAT-PMP, UPnP IGD on $lan; STUN test against $stun_host)"
    # -d: in the foreground, logging to stderr (the container's log).
    exec miniupnpd -d -f /run/miniupnpd.conf -P /run/miniupnpd.pid
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
    set_mode "${2:-$mode}"
    sysctl -qw net.ipv4.ip_forward=1 2>/dev/null || true
    ip route del default 2>/dev/null || true
    if [ "$mode" = upnp ]; then
        command -v miniupnpd >/dev/null || {
            echo "wgnat-router: upnp needs miniupnpd (the testbed's gateway image, docker/gateway.Dockerfile)" >&2
            exit 1
        }
        miniupnpd_chains
    fi
    masquerade
    $iptables -w -P FORWARD DROP
    $iptables -w -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    $iptables -w -A FORWARD -i "$lan" -o "$wan" -j ACCEPT
    if [ "$mode" != accept_all ]; then
        $iptables -w -P INPUT DROP
        $iptables -w -A INPUT -i lo -j ACCEPT
        $iptables -w -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        $iptables -w -A INPUT -i "$lan" -j ACCEPT
    fi
    if [ -n "${ROUTER_WAN6:-}" ]; then ipv6_up; fi
    # What crossed the router before its rules existed (the interfaces are up
    # before this script runs): an unsolicited packet accepted then stays a
    # conntrack entry as long as its sender keeps sending, and takes the port a
    # LAN host's mapping needs (the conntrack race, after a restart).
    conntrack -F 2>/dev/null || true
    echo "$mode" >/run/wgnat-router-mode
    echo "wgnat-router: $mode NAT, internet on $wan ($ROUTER_WAN), LAN on $lan"
    [ "$mode" = upnp ] && start_miniupnpd
    exec sleep infinity
    ;;
rebind)
    [ -f /run/wgnat-router-mode ] && set_mode "$(cat /run/wgnat-router-mode)"
    masquerade "${2:?port range}"
    conntrack -F 2>/dev/null || true
    echo "wgnat-router: mappings moved to ports $2, conntrack flushed"
    ;;
*)
    echo "usage: wgnat-router up MODE | rebind FROM-TO" >&2
    exit 2
    ;;
esac
