# The testbed's Prometheus (compose/docker-compose.yml, service `prometheus`): the
# wgnat image, for wg-quick and the entrypoint's `tunnel` role (Prometheus scrapes
# the daemons over the WireGuard tunnel), plus the prometheus binary of Debian's
# `prometheus` package.  The package is unpacked, not installed: its other
# dependencies are web assets, and its post-install would try to start a server.
# Built by scripts/docker-build.sh where no Prometheus image can be pulled.
ARG WGNAT_IMAGE=wgnat:latest
FROM ${WGNAT_IMAGE}
RUN apt-get update \
    && cd /tmp \
    && apt-get download prometheus \
    && dpkg-deb -x prometheus_*.deb unpacked \
    && install -m 0755 unpacked/usr/bin/prometheus /usr/local/bin/prometheus \
    && rm -rf /tmp/* /var/lib/apt/lists/* /var/cache/apt/* \
    && prometheus --version 2>&1 | head -1
