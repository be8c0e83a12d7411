#!/usr/bin/env bash
# Put promtool (which checks metrics/alerts.yml and the exported metrics) into
# the virtualenv's bin.  Debian ships it only inside the `prometheus` package,
# whose installation would also start a Prometheus server on a systemd host: so
# the package is only downloaded and unpacked here, never installed.
set -euo pipefail
target="$(cd "$1" && pwd)/promtool"  # absolute: the script changes directory below
[ -x "$target" ] && exit 0
if command -v promtool >/dev/null; then
    ln -sf "$(command -v promtool)" "$target"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get download prometheus >/dev/null
fi
dpkg-deb -x prometheus_*.deb unpacked
install -m 0755 unpacked/usr/bin/promtool "$target"
echo "promtool $("$target" --version 2>&1 | head -1 | awk '{print $3}') in $1"
