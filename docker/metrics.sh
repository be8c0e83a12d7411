#!/bin/sh
# wgnat-metrics [PORT]: the Prometheus metrics of the daemon in this container
# (9587 the registry, 9588 a client; they listen on loopback by default, or
# where WGNAT_METRICS_LISTEN said: the entrypoint notes it in /run/wgnat-metrics-listen).
port=${1:-}
host=127.0.0.1
if [ -z "$port" ] && [ -s /run/wgnat-metrics-listen ]; then
    listen=$(cat /run/wgnat-metrics-listen)
    host=${listen%:*}
    port=${listen##*:}
fi
if [ -z "$port" ]; then
    grep -q -- --server /run/wgnat-health 2>/dev/null && port=9587 || port=9588
fi
exec python3 -c "import sys, urllib.request
sys.stdout.write(urllib.request.urlopen('http://$host:$port/metrics', timeout=5).read().decode())"
