#!/usr/bin/env bash
# Install the Debian packages the test suite needs, only when missing:
# wireguard-go (the kernel here has no WireGuard module), wg, iptables, ip, conntrack,
# ping, tcpdump for the benchmarks, miniupnpd and coturn for the port-mapping test.
# promtool is fetched by scripts/fetch-promtool.sh instead (not installed here).
set -euo pipefail
need=()
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v iptables >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
command -v conntrack >/dev/null || need+=(conntrack)
command -v ping >/dev/null || need+=(iputils-ping)
command -v tcpdump >/dev/null || need+=(tcpdump)  # make bench: bench/formation.py
# tests/integration/test_portmap_gateway.py: a port-mapping gateway (its rules through
# iptables-legacy, which the iptables package ships) and the STUN server it needs.
command -v miniupnpd >/dev/null || need+=(miniupnpd-iptables)
command -v turnserver >/dev/null || need+=(coturn)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing ${need[*]}: run as root, or: sudo apt-get install ${need[*]}" >&2
    exit 1
fi
echo "installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: wireguard-tools recommends a kernel image otherwise.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
