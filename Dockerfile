# One image for both daemons (and for the testbed's NAT routers and key generator).
#
#   docker run --cap-drop ALL --cap-add NET_ADMIN --device /dev/net/tun \
#       --security-opt no-new-privileges \
#       -v ./wg0.conf:/etc/wireguard/wg0.conf:ro wgnat server --poll-interval 1s
#   docker run ... wgnat client -r <registry public key>
#
# The entrypoint brings the interface up from a wg-quick style file (the kernel
# module when the host has it, wireguard-go otherwise), then runs
# `twistd -n --pidfile= wgnat-server|wgnat-client` with the flags given.  It needs
# only CAP_NET_ADMIN (README "With Docker" says why it stays root with that one
# capability rather than running as another user).
#
# Two stages: the build directory is copied into the builder only, and the final
# image takes the virtualenv and the scripts from it, so no layer of the final
# image holds the source tree (nor anything .dockerignore might have let through).
#
# BASE_IMAGE: the official Python image normally; scripts/docker-build.sh picks a
# locally made Debian base (debootstrap + docker import) where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim

# What both stages run on: the system packages (the builder's virtualenv points
# at this stage's python3, so the final image must have the same one).
FROM ${BASE_IMAGE} AS runtime
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
    && cp /usr/bin/ping /usr/bin/ping.plain && mv /usr/bin/ping.plain /usr/bin/ping \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
# ping (the tests' and `wgnat ping`'s) loses Debian's file capability cap_net_raw
# (the copy above drops it): a container with only NET_ADMIN has no NET_RAW in
# its bounding set, and the kernel refuses to run a binary whose file
# capabilities it cannot grant ("Operation not permitted").  Without it ping
# uses ICMP echo sockets, which Docker opens to every group in a container's
# network namespace (net.ipv4.ping_group_range).

FROM runtime AS builder
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
    && /opt/wgnat/bin/wgnat --version >/dev/null \
    && /opt/wgnat/bin/pip uninstall -q -y pip \
    && mkdir /opt/wgnat-scripts \
    && for script in entrypoint healthcheck router keygen metrics; do \
        install -m 0755 "/src/docker/$script.sh" "/opt/wgnat-scripts/wgnat-$script"; done

FROM runtime
COPY --from=builder /opt/wgnat /opt/wgnat
COPY --from=builder /opt/wgnat-scripts/ /usr/local/bin/

# The registry answers on the interface's listen port (TCP, tunnel addresses only)
# and WireGuard listens on it (UDP).
EXPOSE 51820/udp
HEALTHCHECK --interval=2s --timeout=3s --start-period=5s --retries=3 CMD ["wgnat-healthcheck"]
ENTRYPOINT ["wgnat-entrypoint"]
CMD ["client"]
