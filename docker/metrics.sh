#!/bin/sh
# wgnat-metrics [PORT]: the Prometheus metrics of the daemon in this container
# (9587 the registry, 9588 a client; they listen on loopback by default).
port=${1:-}
if [ -z "$port" ]; then
    grep -q -- --server /run/wgnat-health 2>/dev/null && port=9587 || port=9588
fi
exec python3 -c "import sys, urllib.request
sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=5).read().decode())"
