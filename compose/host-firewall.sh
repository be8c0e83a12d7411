#!/bin/sh
# compose/host-firewall.sh add|remove
#
# Let traffic that stays on one of the testbed's bridges (wgnat-inet,
# wgnat-lan1..5) through the host's FORWARD chain.  Docker loads br_netfilter, so
# bridged frames meet Docker's isolation rules for internal networks, which drop
# packets whose source or destination is outside the bridge's subnet: every
# packet a NAT router forwards for its LAN.  Only same-bridge traffic is
# accepted; nothing is routed between the bridges or out of the testbed.
set -eu
bridges="wgnat-inet wgnat-lan1 wgnat-lan2 wgnat-lan3 wgnat-lan4 wgnat-lan5"
action=${1:-add}
iptables -w -nL DOCKER-USER >/dev/null 2>&1 || {
    echo "host-firewall: no DOCKER-USER chain (is the Docker engine running?)" >&2
    [ "$action" = remove ] && exit 0
    exit 1
}
for bridge in $bridges; do
    rule="-i $bridge -o $bridge -j ACCEPT"
    # shellcheck disable=SC2086
    case "$action" in
    add) iptables -w -C DOCKER-USER $rule 2>/dev/null || iptables -w -I DOCKER-USER $rule ;;
    remove) while iptables -w -D DOCKER-USER $rule 2>/dev/null; do :; done ;;
    *) echo "usage: $0 add|remove" >&2; exit 2 ;;
    esac
done
# -- IPv6 internet (issue 16) --
# The testbed's IPv6 crosses the same bridges (the containers address themselves;
# Docker's IPv6 is off).  An engine that manages ip6tables (Docker 27 and later by
# default) has a DOCKER-USER chain there too: the same rules.  Docker 20.10 leaves
# ip6tables alone, and bridged IPv6 meets the host's FORWARD policy only.
if ip6tables -w -nL DOCKER-USER >/dev/null 2>&1; then
    for bridge in $bridges; do
        rule="-i $bridge -o $bridge -j ACCEPT"
        # shellcheck disable=SC2086
        case "$action" in
        add) ip6tables -w -C DOCKER-USER $rule 2>/dev/null || ip6tables -w -I DOCKER-USER $rule ;;
        remove) while ip6tables -w -D DOCKER-USER $rule 2>/dev/null; do :; done ;;
        esac
    done
fi
# -- end --
