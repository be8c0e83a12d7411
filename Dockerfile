# One image for both daemons (and for the testbed's NAT routers and key generator).
#
#   docker run --cap-add NET_ADMIN --device /dev/net/tun \
#       -v ./wg0.conf:/etc/wireguard/wg0.conf:ro wgnat server --poll-interval 1s
#   docker run ... wgnat client -r <registry public key>
#
# The entrypoint brings the interface up from a wg-quick style file (the kernel
# module when the host has it, wireguard-go otherwise), then runs
# `twistd -n --pidfile= wgnat-server|wgnat-client` with the flags given.
#
# BASE_IMAGE: the official Python image normally; scripts/docker-build.sh picks a
# locally made Debian base (debootstrap + docker import) where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/wgnat/bin:$PATH \
    WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Debian's python3 is only installed when the base has none (a bare Debian base).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        wireguard-tools wireguard-go iproute2 iptables iputils-ping conntrack \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*

# PIP_OFFLINE=1: install from wheels built on the host (build/docker-wheels), for
# machines whose containers cannot reach PyPI.  Otherwise from the source tree.
ARG PIP_OFFLINE=0
COPY . /src
RUN python3 -m venv /opt/wgnat \
    && if [ "$PIP_OFFLINE" = 1 ]; then \
        /opt/wgnat/bin/pip install -q --no-index --find-links /src/build/docker-wheels wgnat; \
    else \
        /opt/wgnat/bin/pip install -q /src; fi \
    && /opt/wgnat/bin/twistd --help-reactors >/dev/null \
    && install -m 0755 /src/docker/entrypoint.sh /usr/local/bin/wgnat-entrypoint \
    && install -m 0755 /src/docker/healthcheck.sh /usr/local/bin/wgnat-healthcheck \
    && install -m 0755 /src/docker/router.sh /usr/local/bin/wgnat-router \
    && install -m 0755 /src/docker/keygen.sh /usr/local/bin/wgnat-keygen \
    && install -m 0755 /src/docker/metrics.sh /usr/local/bin/wgnat-metrics \
    && rm -rf /src /root/.cache

# The registry answers on the interface's listen port (TCP, tunnel addresses only)
# and WireGuard listens on it (UDP).
EXPOSE 51820/udp
HEALTHCHECK --interval=2s --timeout=3s --start-period=5s --retries=3 CMD ["wgnat-healthcheck"]
ENTRYPOINT ["wgnat-entrypoint"]
CMD ["client"]
