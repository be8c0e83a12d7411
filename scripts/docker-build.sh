#!/usr/bin/env bash
# Build the wgnat image (both daemons, the testbed's routers and key generator)
# and the testbed's Prometheus image on it (docker/prometheus.Dockerfile), and its
# port-mapping gateway and STUN server image (docker/gateway.Dockerfile).
#
#   scripts/docker-build.sh [IMAGE]        (default wgnat:latest)
#   PROMETHEUS_IMAGE=...                   (default wgnat-prometheus:latest; "" skips it)
#   GATEWAY_IMAGE=...                      (default wgnat-gateway:latest; "" skips it)
#
# Base image: $BASE_IMAGE when set.  Otherwise the official python:3.11-slim when
# it is present or can be pulled; where no container registry is reachable, a
# Debian bookworm base made here (debootstrap --variant=minbase + docker import,
# once: wgnat-base:bookworm).  The Python packages are installed from wheels built
# on this host (build/docker-wheels), so the build needs no PyPI access inside
# containers.  Skipped when the image exists and its inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-${WGNAT_IMAGE:-wgnat:latest}}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE-wgnat-prometheus:latest}
GATEWAY_IMAGE=${GATEWAY_IMAGE-wgnat-gateway:latest}
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.11}
LOCAL_BASE=wgnat-base:bookworm
OFFICIAL_BASE=python:3.11-slim
say() { echo "docker-build: $*" >&2; }

command -v docker >/dev/null && docker info >/dev/null 2>&1 || {
    say "no Docker engine answers (scripts/docker-engine.sh installs and starts one)"
    exit 1
}

debian_mirror() {
    # The first Debian mirror apt uses here (deb822 .sources or one-line lists).
    local url
    url=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -oE 'https?://[^ ]*debian/?' | grep -v security | head -1 || true)
    echo "${url:-http://deb.debian.org/debian}"
}

make_local_base() {
    if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        return
    fi
    command -v debootstrap >/dev/null || {
        say "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    }
    local mirror dir
    mirror=$(debian_mirror)
    dir=$(mktemp -d /var/tmp/wgnat-base.XXXXXX)
    trap 'rm -rf "$dir"' RETURN
    say "making $LOCAL_BASE: debootstrap --variant=minbase bookworm from $mirror (about a minute)"
    debootstrap --variant=minbase bookworm "$dir" "$mirror" >/var/tmp/wgnat-debootstrap.log 2>&1 || {
        tail -20 /var/tmp/wgnat-debootstrap.log >&2
        exit 1
    }
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -c . | docker import -c 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
    say "made $LOCAL_BASE"
}

if [ -n "${BASE_IMAGE:-}" ]; then
    base=$BASE_IMAGE
    say "base image $base (from BASE_IMAGE)"
elif docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1 \
    || timeout 30 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
    base=$OFFICIAL_BASE
    say "base image $base (the official Python image)"
else
    say "no container registry reachable (docker pull $OFFICIAL_BASE failed):"
    say "building on a local Debian base instead ($LOCAL_BASE, debootstrap + docker import)"
    make_local_base
    base=$LOCAL_BASE
fi

# BuildKit where this docker client can use it: with the buildx plugin (Docker's
# own packages), or built in (clients before Docker 23, e.g. Debian 12's docker.io
# 20.10).  A client of Docker 23 or later without buildx refuses BuildKit ("the
# buildx component is missing or broken"), and Debian 12 has no package of it
# (apt-cache search buildx: nothing), so such a client gets the legacy builder.
# That prints "DEPRECATED: The legacy builder is deprecated ... Install the buildx
# component" on every build: advice this machine cannot follow, so the notice
# (and only it) is dropped.  DOCKER_BUILDKIT=0|1 in the environment chooses.
if [ -z "${DOCKER_BUILDKIT:-}" ]; then
    client_major=$(docker version -f '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
    if docker buildx version >/dev/null 2>&1 || [ "${client_major:-99}" -lt 23 ] 2>/dev/null; then
        DOCKER_BUILDKIT=1
    else
        DOCKER_BUILDKIT=0
    fi
fi
export DOCKER_BUILDKIT
docker_build() {
    if [ "$DOCKER_BUILDKIT" != 0 ]; then
        docker build "$@"
        return
    fi
    # stderr through the filter, stdout untouched; the status is docker's (pipefail).
    { docker build "$@" 2>&1 1>&3 3>&- | awk '
        /^DEPRECATED: The legacy builder is deprecated/ { notice = 1; next }
        notice && /^[[:space:]]+[^[:space:]]/ { next }
        notice && /^[[:space:]]*$/ { notice = 0; next }
        { notice = 0; print; fflush() }' >&2; } 3>&1
}

# Everything the image is made of: skip the build when it has not changed.
inputs=$( {
    echo "$base $(docker image inspect -f '{{.Id}}' "$base" 2>/dev/null || true) $PY_VERSION"
    find Dockerfile .dockerignore docker pyproject.toml wgnat twisted -type f \
        ! -name '*.pyc' ! -name dropin.cache ! -path '*/__pycache__/*' -print0 \
        | sort -z | xargs -0 sha1sum
} | sha1sum | cut -c1-16)
up_to_date() { # IMAGE INPUTS
    [ "$(docker image inspect -f '{{index .Config.Labels "wgnat.inputs"}}' "$1" 2>/dev/null || true)" = "$2" ]
}

build_prometheus() {
    [ -n "$PROMETHEUS_IMAGE" ] || return 0
    local inputs
    inputs=$( (docker image inspect -f '{{.Id}}' "$IMAGE"; sha1sum docker/prometheus.Dockerfile) \
        | sha1sum | cut -c1-16)
    if up_to_date "$PROMETHEUS_IMAGE" "$inputs"; then
        say "$PROMETHEUS_IMAGE is up to date (inputs $inputs)"
        return
    fi
    say "building $PROMETHEUS_IMAGE on $IMAGE (prometheus from Debian's package)"
    docker_build -q -f docker/prometheus.Dockerfile \
        --build-arg WGNAT_IMAGE="$IMAGE" --label wgnat.inputs="$inputs" \
        -t "$PROMETHEUS_IMAGE" docker >/dev/null
}

# The testbed's gateway (miniupnpd) and STUN server (coturn), from Debian's
# packages: on the wgnat image, which the product keeps without them.
build_gateway() {
    [ -n "$GATEWAY_IMAGE" ] || return 0
    local inputs
    inputs=$( (docker image inspect -f '{{.Id}}' "$IMAGE"; sha1sum docker/gateway.Dockerfile docker/stun.sh) \
        | sha1sum | cut -c1-16)
    if up_to_date "$GATEWAY_IMAGE" "$inputs"; then
        say "$GATEWAY_IMAGE is up to date (inputs $inputs)"
        return
    fi
    say "building $GATEWAY_IMAGE on $IMAGE (miniupnpd and coturn from Debian's packages)"
    docker_build -q -f docker/gateway.Dockerfile \
        --build-arg WGNAT_IMAGE="$IMAGE" --label wgnat.inputs="$inputs" \
        -t "$GATEWAY_IMAGE" docker >/dev/null
}

if up_to_date "$IMAGE" "$inputs"; then
    say "$IMAGE is up to date (inputs $inputs)"
    build_prometheus
    build_gateway
    exit 0
fi

# Wheels for the image's Python, built or fetched on this host.
wheels=build/docker-wheels
rm -rf "$wheels"
mkdir -p "$wheels"
say "building wheels for Python $PY_VERSION into $wheels"
"$PYTHON" -m pip wheel -q --no-deps -w "$wheels" . 2>&1 | grep -v '^WARNING: Location' >&2 || true
ls "$wheels"/wgnat-*.whl >/dev/null
arch=$(uname -m)
"$PYTHON" -m pip download -q -d "$wheels" --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" \
    --platform "manylinux2014_$arch" --platform "manylinux_2_34_$arch" \
    "$wheels"/wgnat-*.whl 2>&1 | grep -v '^WARNING: Location' >&2 || true
[ "$(ls "$wheels" | wc -l)" -gt 5 ] || { say "fetching the dependencies' wheels failed"; exit 1; }

say "building $IMAGE on $base ($([ "$DOCKER_BUILDKIT" = 0 ] && echo "the legacy builder" || echo BuildKit))"
started=$(date +%s)
docker_build -q \
    --build-arg BASE_IMAGE="$base" --build-arg PIP_OFFLINE=1 \
    --label wgnat.inputs="$inputs" -t "$IMAGE" . >/dev/null
say "built $IMAGE in $(($(date +%s) - started)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
build_prometheus
build_gateway
